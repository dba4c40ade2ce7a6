"""`parallel.backend=deepspeed` through the CLI (2 processes, gloo, fp32) against the megatron backend.

Every DeepSpeed layout must write the per-step losses and gradient norms of the one-process megatron
run of the same config to a relative 1e-5 (ZeRO-0/1/2/3 at DP=2, ZeRO-1 with TP=2; LoMDM and
MDLM; `train.global_batch_size=16`, so the DP=2 runs accumulate 2 micro-batches, the TP=2 run 4
and the reference 4), and the validation NELBO with EMA weights (ZeRO 0-2). Measured on the 2-core
dev machine (2026-11), max relative differences over 3 steps: losses <= 6.1e-7, gradient norms
<= 7.2e-7, validation NELBO <= 6e-8 (MDLM losses mostly bit-identical).

Model-state bytes per parameter at DP=2 (the loop's log line after the first update: tensors
enumerated, gradients at their peak in the first step, reduction buckets reported apart) next to
ZeRO's accounting (performance.md §A2; per-element sizes P, G and K = 12 for fp32 master + Adam m, v):

| stage  | fp32 measured | fp32 theory (4, 4, 12) | bf16 measured (by hand) | §A2 (2, 2, 12) |
|--------|---------------|------------------------|-------------------------|----------------|
| ZeRO-1 | 4+4+6 = 14.00 | P + G + K/2 = 14       | 2+2+6 = 10.00           | 10             |
| ZeRO-2 | 4+2+6 = 12.00 | P + (G+K)/2 = 12       | 2+1+6 = 9.00            | 9              |
| ZeRO-3 | 2+2+6 = 10.00 | (P+G+K)/2 = 10         | 1+1+6 = 8.00            | 8              |

On CPU the engine does not JIT-compile DeepSpeed's `deepspeed_shm_comm` op (inference-only; it cost
the suite's first DeepSpeed run ~25-80 s on a fresh machine): cpu_compat shim 5, asserted below.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import zygote
from tests.helpers.runs import ROOT, TINY, clean_env, read_metrics, train, wait_for_step

pytestmark = pytest.mark.slow

NAN_DRIVER = Path(__file__).with_name("_ds_nan_driver.py")
COMMON = ("train.steps=3", "checkpoint.interval=0", "train.global_batch_size=16", "train.eval_interval=3",
          "train.eval_batches=1")
LAYOUTS = [  # (family, zero, tp)
    ("lomdm", 0, 1), ("lomdm", 1, 1), ("lomdm", 2, 1), ("lomdm", 3, 1), ("lomdm", 1, 2),
    ("mdlm", 1, 1), ("mdlm", 2, 1), ("mdlm", 3, 1), ("mdlm", 1, 2),
]
STATE_LINE = re.compile(r"model states on rank 0: params [\d.]+ MiB \(([\d.]+) B/param\), "
                        r"grads [\d.]+ MiB \(([\d.]+) B/param\), optimizer [\d.]+ MiB \(([\d.]+) B/param\)")


class Runs:
    """Launches each configuration once per module and keeps what it wrote."""

    def __init__(self, root: Path, shards: Path) -> None:
        self.root, self.shards = root, shards
        self.done: dict[str, tuple[Path, str]] = {}
        self.stdout: dict[Path, str] = {}  # what DeepSpeed prints (not the log) of each run

    def get(self, name: str, *overrides: str, nproc: int = 1) -> tuple[Path, str]:
        if name not in self.done:
            run_dir = self.root / name
            out = train(run_dir, self.shards, *COMMON, *overrides, nproc=nproc)
            assert out.returncode == 0, f"{name} failed:\n{out.stderr[-4000:]}"
            self.done[name] = (run_dir, out.stderr)
            self.stdout[run_dir] = out.stdout
        return self.done[name]

    def reference(self, family: str) -> Path:
        return self.get(f"megatron_{family}", f"diffusion.name={family}")[0]

    def deepspeed(self, family: str, zero: int, tp: int) -> tuple[Path, str]:
        overrides = [f"diffusion.name={family}", "parallel.backend=deepspeed", f"parallel.zero={zero}",
                     f"parallel.tp={tp}"]
        if zero == 3:
            overrides.append("optim.ema_decay=0")  # ZeRO-3 partitions the parameters the EMA averages
        return self.get(f"ds_{family}_z{zero}_tp{tp}", *overrides, nproc=2)


@pytest.fixture(scope="module")
def runs(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ds_parity"), tiny_shards)


def test_parity_zero3_rejects_ema(tiny_shards: Path, tmp_path: Path) -> None:
    """ZeRO-3 with an EMA is refused with a clear message before any work (one process suffices)."""
    out = train(tmp_path / "run", tiny_shards, "parallel.backend=deepspeed", "parallel.zero=3", "optim.ema_decay=0.99",
                timeout=120)
    assert out.returncode == 2
    assert "optim.ema_decay=0.99" in out.stderr and "parallel.zero=3" in out.stderr


def _column(run_dir: Path, key: str, kind: str = "train") -> list[float]:
    return [r[key] for r in read_metrics(run_dir, kind)]


@pytest.mark.parametrize(("family", "zero", "tp"), LAYOUTS, ids=[f"{f}-zero{z}-tp{t}" for f, z, t in LAYOUTS])
def test_parity_deepspeed_vs_megatron(family: str, zero: int, tp: int, runs: Runs) -> None:
    ref = runs.reference(family)
    got, stderr = runs.deepspeed(family, zero, tp)
    assert f"DeepSpeed ZeRO-{zero} engine: dp={2 // tp} tp={tp}, {4 // (2 // tp)} micro-batches" in stderr
    # on CPU the engine never JIT-builds DeepSpeed's shared-memory all-reduce (cpu_compat shim 5)
    assert "deepspeed_shm_comm" not in runs.stdout[got] + stderr
    assert len(_column(got, "loss")) == 3
    assert _column(got, "loss") == pytest.approx(_column(ref, "loss"), rel=1e-5)
    assert _column(got, "grad_norm") == pytest.approx(_column(ref, "grad_norm"), rel=1e-5)
    assert _column(got, "num_tokens") == _column(ref, "num_tokens")
    if zero < 3:  # same EMA as the reference: the validation NELBO uses the EMA weights
        assert _column(got, "nelbo", "valid") == pytest.approx(_column(ref, "nelbo", "valid"), rel=1e-5)


def test_deepspeed_checkpoint_exports_to_hf(runs: Runs, tmp_path: Path) -> None:
    """A DeepSpeed ZeRO-2 run's checkpoint exports through the one reader (checkpoint format 2: its
    model and EMA are in dist/ like a megatron run's; the ZeRO partitions sit in deepspeed/)."""
    from megatron_lomdm.apps.hf_export import export_run

    run_dir, _ = runs.deepspeed("lomdm", 2, 1)
    folder = run_dir / "checkpoints" / "step_0000003"
    assert (folder / "deepspeed").is_dir() and (folder / "dist" / "metadata.json").is_file()
    result = export_run(run_dir, tmp_path / "hf", verify=True)
    assert result.ema and result.source_layout == (1, 1)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert max(result.max_abs_diff.values()) < 1e-5, result.max_abs_diff


def test_parity_bytes_per_param(runs: Runs) -> None:
    """ZeRO-1/2/3 at DP=2: measured fp32 model-state bytes per parameter equal ZeRO's accounting."""
    P, G, K, dp = 4, 4, 12, 2  # fp32 params and grads; fp32 master + Adam m + v
    theory = {1: (P, G, K / dp), 2: (P, G / dp, K / dp), 3: (P / dp, G / dp, K / dp)}
    rows = []
    for zero in (1, 2, 3):
        _, stderr = runs.deepspeed("lomdm", zero, 1)
        match = STATE_LINE.search(stderr)
        assert match, f"no model-state line in the ZeRO-{zero} log"
        measured = tuple(float(v) for v in match.groups())
        rows.append(f"ZeRO-{zero} dp={dp}: params + grads + optimizer = {' + '.join(f'{v:.2f}' for v in measured)} = "
                    f"{sum(measured):.2f} B/param; theory {' + '.join(f'{v:g}' for v in theory[zero])} = "
                    f"{sum(theory[zero]):g}")
        assert measured == pytest.approx(theory[zero], rel=0.02), rows[-1]
    print("\n" + "\n".join(rows))


def _torchrun(script_or_module: list[str], run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script_or_module,
            "--config", TINY, f"run.dir={run_dir}", f"data.train={shards}", *overrides]


def test_parity_nan_step_skipped(tiny_shards: Path, tmp_path: Path) -> None:
    """A NaN loss on one DP rank skips the step on all ranks, as megatron does with the step all NaN."""
    common = ("train.steps=4", "checkpoint.interval=0")
    env = clean_env(LOMDM_TEST_NAN_STEP="1")
    ref = zygote.run([sys.executable, str(NAN_DRIVER), "--config", TINY, f"run.dir={tmp_path / 'ref'}",
                      f"data.train={tiny_shards}", *common], env=env, cwd=ROOT, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = _torchrun([str(NAN_DRIVER)], tmp_path / "ds", tiny_shards, *common, "parallel.backend=deepspeed",
                    "parallel.zero=1")
    got = zygote.run(cmd, env=clean_env(LOMDM_TEST_NAN_STEP="1", LOMDM_TEST_NAN_RANK="1"), cwd=ROOT, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    for run_dir in (tmp_path / "ref", tmp_path / "ds"):
        assert _column(run_dir, "skipped_steps") == [0, 1, 1, 1]
        assert _column(run_dir, "loss")[1] is None  # NaN is written as null
    ref_losses, got_losses = _column(tmp_path / "ref", "loss"), _column(tmp_path / "ds", "loss")
    assert [got_losses[i] for i in (0, 2, 3)] == pytest.approx([ref_losses[i] for i in (0, 2, 3)], rel=1e-5)


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun launch: torchrun, then the workers it started (each in a session of its own)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == proc.pid:  # field 4 of /proc/PID/stat: the parent's pid
            workers.append(int(stat.parent.name))
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def test_parity_deepspeed_resume_after_kill(tiny_shards: Path, tmp_path: Path) -> None:
    """ZeRO-2 (2 micro-batches per step, EMA on): kill -9 after a checkpoint, rerun, same losses."""
    cfg = ("train.steps=12", "checkpoint.interval=4", "train.global_batch_size=16", "parallel.backend=deepspeed",
           "parallel.zero=2")
    straight = train(tmp_path / "straight", tiny_shards, *cfg, nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "run"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(_torchrun(["-m", "megatron_lomdm.train"], run_dir, tiny_shards, *cfg), cwd=ROOT,
                                env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_step(run_dir, 5, proc, timeout=240)  # the step-4 checkpoint is complete by then
        finally:
            _kill_launch(proc)  # no chance to save
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 4 <= resumed_from < 12, resumed_from
    out = train(run_dir, tiny_shards, *cfg, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"/step_{resumed_from:07d} at step {resumed_from}" in out.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 13))
    assert _column(run_dir, "loss") == _column(tmp_path / "straight", "loss")
    assert _column(run_dir, "grad_norm") == _column(tmp_path / "straight", "grad_norm")


@pytest.fixture(scope="module")
def cond_runs(tiny_cond_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ds_cond_parity"), tiny_cond_shards)


def test_parity_deepspeed_conditioned(cond_runs: Runs) -> None:
    """Conditioning on (issue 19 §1): DeepSpeed ZeRO-2 at DP=2 gives the megatron one-process losses,
    gradient norms, free-token counts and validation NELBO (over the responses only)."""
    ref = cond_runs.reference("lomdm")
    got, _ = cond_runs.deepspeed("lomdm", 2, 1)
    assert _column(got, "loss") == pytest.approx(_column(ref, "loss"), rel=1e-5)
    assert _column(got, "grad_norm") == pytest.approx(_column(ref, "grad_norm"), rel=1e-5)
    assert _column(got, "num_tokens") == _column(ref, "num_tokens")
    assert _column(got, "nelbo", "valid") == pytest.approx(_column(ref, "nelbo", "valid"), rel=1e-5)
