"""The multivariate family (Garg et al.) through the CLI: `python -m megatron_lomdm.train` and
`tools/sample.py` on the tiny config.

A learned run's order logits move from 0 (poly(c1)) and are checkpointed with their optimizer state
(a run resumed at step 2 gives the uninterrupted losses and logits); its velocity term is exactly 0
and its RLOO term is not. A frozen run (learn_order=false) keeps the chosen logits. The sampler
follows the learned per-position exponents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_lomdm.apps.hf_export import load_native_checkpoint
from tests.helpers import zygote
from tests.helpers.runs import ROOT, clean_env, losses, read_metrics, train

LEARN = ("diffusion.name=multivariate", "train.steps=4", "checkpoint.interval=2")
KEY = "family.order_logits_L"
L = 32  # the tiny shards' sequence length (tests/conftest.py)


def _logits(run_dir: Path, step: int) -> torch.Tensor:
    """The live (non-EMA) order logits of checkpoint `step`."""
    return load_native_checkpoint(run_dir, step, ema=False).state_dict[KEY].double()


@pytest.fixture(scope="module")
def learned_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("multivariate") / "run"
    done = train(run_dir, tiny_shards, *LEARN)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_multivariate_learns_its_order(learned_run: Path) -> None:
    records = read_metrics(learned_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["velocity"] == 0.0 for r in records)  # alpha_R = alpha_F
    assert all(r["rloo"] != 0.0 for r in records)  # K = 2 corruptions, leave-one-out
    assert records[0]["exponent_std"] < 1e-6 < records[-1]["exponent_std"]  # poly(c1) at init
    assert all(abs(r["exponent_mean"] - 0.7) < 1e-4 for r in records)  # NormSig is zero-mean
    at_2, at_4 = _logits(learned_run, 2), _logits(learned_run, 4)
    assert at_2.shape == (L,) and at_2.abs().max() > 0
    assert (at_4 - at_2).abs().max() > 0


@pytest.mark.slow
def test_multivariate_resume_restores_order_logits(learned_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = train(run_dir, tiny_shards, "diffusion.name=multivariate", "train.steps=2", "checkpoint.interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(run_dir, tiny_shards, *LEARN)
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(run_dir) == pytest.approx(losses(learned_run), rel=1e-6)
    torch.testing.assert_close(_logits(run_dir, 4), _logits(learned_run, 4), rtol=1e-6, atol=1e-9)


def test_frozen_multivariate_keeps_its_logits(tiny_shards: Path, tmp_path: Path) -> None:
    """learn_order=false with +6 / -6 halves: a fixed schedule (K = 1, no RLOO), exponents c1 +- c2 s."""
    logits = [6.0] * (L // 2) + [-6.0] * (L // 2)
    run_dir = tmp_path / "run"
    done = train(run_dir, tiny_shards, "diffusion.name=multivariate", "diffusion.learn_order=false",
                 f"diffusion.order_logits={json.dumps(logits)}", "train.steps=2", "checkpoint.interval=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "corruptions/sequence K=1" in done.stderr
    records = read_metrics(run_dir)
    assert len(records) == 2 and all(r["rloo"] == 0.0 and r["velocity"] == 0.0 for r in records)
    half = 0.65 * float(torch.sigmoid(torch.tensor(6.0)) - 0.5)
    assert records[-1]["exponent_std"] == pytest.approx(half, rel=1e-4)
    assert torch.equal(_logits(run_dir, 2), torch.tensor(logits, dtype=torch.float64))


@pytest.mark.slow
def test_sample_cli_follows_the_learned_exponents(learned_run: Path, tmp_path: Path) -> None:
    """tools/sample.py samples a multivariate run; the per-position e_R it reports are the family's."""
    out = zygote.run([sys.executable, "tools/sample.py", "--run-dir", str(learned_run), "--sampler", "exact",
                      "--steps", str(L), "--num-samples", "2", "--no-ema", "--no-hash",
                      "--out", str(tmp_path / "s.jsonl")], env=clean_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["num_calls"] == L  # one batch, one backbone call per unmasked position
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(3 not in r["token_ids"] for r in rows)  # no [MASK] (id 3) left
    w = 0.7 + 0.65 * (torch.sigmoid(_logits(learned_run, 4)) - torch.sigmoid(_logits(learned_run, 4)).mean())
    got = torch.tensor(summary["per_position_mean_exponent"], dtype=torch.float64)
    torch.testing.assert_close(got, w, rtol=0, atol=1e-5)
