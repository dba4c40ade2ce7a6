"""End to end through the CLI: `python -m megatron_lomdm.train` and its torchrun TP=2 form (the first
run and the bad-layout launch as fresh commands, the rest through the suite's fork server,
tests/helpers/zygote.py, which runs the same `main` under the same launcher library).

For every family the per-step losses written to metrics.jsonl by one process and by two
tensor-parallel processes agree to a relative 1e-5 (interface.md: noise and data order do not
depend on the layout).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_lomdm.diffusion.registry import FAMILIES

from tests.helpers.runs import losses, read_metrics, train


def test_train_cli_writes_run_dir(tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = train(run_dir, tiny_shards, "train.steps=4", "checkpoint.interval=2", fresh=True)  # the command itself
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("loss", "nelbo", "main", "velocity", "rloo", "lr", "grad_norm", "tokens_per_s",
                    "velocity_confidence_corr", "order_grad_snr"):  # the learned-order diagnostics (LoMDM)
            assert key in r and r[key] is not None, key
        assert r["velocity"] >= 0.0 and r["nelbo"] > 0.0
        assert -1.0 <= r["velocity_confidence_corr"] <= 1.0 and math.isfinite(r["order_grad_snr"])
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_eval_artifacts_leave_training_unchanged(tiny_shards: Path, tmp_path: Path) -> None:
    """Drawing the evaluation artifacts (samples, order picture, exponents) consumes no training
    randomness: the losses are bit-identical with tracking.artifacts on and off."""
    runs = {}
    for on in (True, False):
        run_dir = tmp_path / f"artifacts_{on}"
        out = train(run_dir, tiny_shards, "train.steps=4", "train.eval_interval=2", "train.eval_batches=1",
                    "checkpoint.interval=0", f"tracking.artifacts={str(on).lower()}")
        assert out.returncode == 0, out.stderr[-3000:]
        runs[on] = losses(run_dir), sorted(p.name for p in (run_dir / "artifacts").glob("step_*")) if on else []
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "artifacts_False" / "artifacts").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_tp2_cli(family: str, tiny_shards: Path, tmp_path: Path) -> None:
    overrides = (f"diffusion.name={family}", "train.steps=3", "checkpoint.interval=0")
    if family == "poly":
        overrides += ("diffusion.c2=0.0",)
    if family == "bd3lm":
        overrides += ("diffusion.block_size=8",)
    one = train(tmp_path / "tp1", tiny_shards, *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(tmp_path / "tp2", tiny_shards, *overrides, "parallel.tp=2", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    assert len(ref) == len(got) == 3
    assert got == pytest.approx(ref, rel=1e-5), (family, ref, got)


def test_bad_layout_fails_before_work(tiny_shards: Path, tmp_path: Path) -> None:
    out = train(tmp_path / "bad", tiny_shards, "parallel.tp=4", nproc=2, timeout=120, fresh=True)  # torchrun itself
    assert out.returncode != 0
    assert "parallel.tp" in out.stderr and "world size 2" in out.stderr


def test_seq_length_conflict_is_an_error(tiny_shards: Path, tmp_path: Path) -> None:
    out = train(tmp_path / "bad", tiny_shards, "model.seq_length=64", timeout=120)
    assert out.returncode == 2
    assert "seq_length" in out.stderr and "64" in out.stderr and "32" in out.stderr


def test_vocab_conflict_is_an_error(tiny_shards: Path, tmp_path: Path) -> None:
    out = train(tmp_path / "bad", tiny_shards, "model.vocab_size=100", timeout=120)
    assert out.returncode == 2
    assert "vocab" in out.stderr and "100" in out.stderr


def test_deepspeed_backend_without_launcher(tiny_shards: Path, tmp_path: Path) -> None:
    """`parallel.backend=deepspeed` under plain `python -m` (no LOCAL_RANK) trains single-process."""
    run_dir = tmp_path / "ds"
    out = train(run_dir, tiny_shards, "parallel.backend=deepspeed", "train.steps=1", "checkpoint.interval=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
