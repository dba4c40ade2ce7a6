"""The loop survives kills, preemption signals, crashes during a save and NaN losses.

A slightly larger model than tiny_cpu makes steps long enough (tens of ms) to interrupt.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.train import EXIT_PREEMPTED
from tests.helpers.runs import ROOT, clean_env, losses, read_metrics, start_train, train, wait_for_step

SLOW = ("model.hidden_size=128", "model.num_layers=4", "train.steps=40")


@pytest.fixture(scope="module")
def straight(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Losses of an uninterrupted 40-step run."""
    run_dir = tmp_path_factory.mktemp("straight")
    out = train(run_dir, tiny_shards, *SLOW, "checkpoint.interval=5")
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run_dir)


def test_resume_bit_exact(tiny_shards: Path, tmp_path: Path, straight: list[float]) -> None:
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, tiny_shards, *SLOW, "checkpoint.interval=5", log=tmp_path / "log1")
    wait_for_step(run_dir, 12, proc)
    proc.send_signal(signal.SIGKILL)  # kill -9: no chance to save
    proc.wait(timeout=30)
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 10 <= resumed_from < 40
    out = train(run_dir, tiny_shards, *SLOW, "checkpoint.interval=5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at step {resumed_from}" in out.stderr
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 41))  # each step exactly once after the rerun
    assert losses(run_dir) == straight  # bit-exact: same data order, noise, weights, optimizer


def test_sigterm_checkpoint_and_resume(tiny_shards: Path, tmp_path: Path, straight: list[float]) -> None:
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, tiny_shards, *SLOW, "checkpoint.interval=0", log=tmp_path / "log1")
    wait_for_step(run_dir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a second signal while it saves changes nothing
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved == read_metrics(run_dir)[-1]["step"] < 40
    out = train(run_dir, tiny_shards, *SLOW, "checkpoint.interval=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(run_dir) == straight


def test_crash_during_save(tmp_path: Path) -> None:
    """A save killed half-way (SIGKILL while writing) leaves the previous checkpoint as latest."""
    script = textwrap.dedent(f"""
        import os, signal, time, torch
        from megatron_lomdm.checkpoint.manager import CheckpointManager
        m = CheckpointManager({str(tmp_path)!r}, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=True, keep_last=3)
        m.save(1, {{"w": torch.ones(3)}})
        real_save = torch.save
        def half_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_save
        m.save(2, {{"w": torch.full((3,), 2.0)}})
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env(), timeout=120)
    assert out.returncode == -signal.SIGKILL
    assert (tmp_path / "step_0000002.tmp").exists()  # the torn save is there...
    manager = CheckpointManager(tmp_path, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=True, keep_last=3)
    assert manager.latest_step() == 1  # ...but latest still names the complete one
    assert torch.equal(manager.load(1)["w"], torch.ones(3))
    manager.save(3, {"w": torch.zeros(3)})
    assert not (tmp_path / "step_0000002.tmp").exists()  # torn saves are cleaned up by the next save
    assert manager.latest_step() == 3


def test_latest_pointing_at_incomplete_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "step_0000005").mkdir()
    (tmp_path / "latest").write_text("step_0000005\n")
    manager = CheckpointManager(tmp_path, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=True, keep_last=3)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.latest_step()


def test_keep_last(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=True, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003", "step_0000004"]


def _poison_driver(from_step: int) -> str:
    """A training entry point whose surrogate loss is NaN from `from_step` on."""
    return textwrap.dedent(f"""
        import sys, torch
        from megatron_lomdm.models import diffusion_lm
        real = diffusion_lm.DiffusionLM.forward
        def poisoned(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            if isinstance(out, tuple) and args[3] >= {from_step}:
                out[0].surrogate = out[0].surrogate * float("nan")
            return out
        diffusion_lm.DiffusionLM.forward = poisoned
        from megatron_lomdm.train import main
        sys.exit(main(sys.argv[1:]))
    """)


def test_resume_before_first_update(tiny_shards: Path, tmp_path: Path) -> None:
    """A checkpoint written before any optimizer update (every step so far NaN) resumes."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", _poison_driver(from_step=0), "--config", "configs/experiments/tiny_cpu.yaml",
           f"run.dir={run_dir}", f"data.train={tiny_shards}", "train.steps=30", "checkpoint.interval=0"]
    out = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "non-finite" in out.stderr, out.stderr[-2000:]
    resumed = train(run_dir, tiny_shards, "train.steps=7", "checkpoint.interval=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 5" in resumed.stderr
    tail = read_metrics(run_dir)[-2:]
    assert [r["step"] for r in tail] == [6, 7] and all(r["skipped_steps"] == 5 for r in tail)


def test_nan_guard(tiny_shards: Path, tmp_path: Path) -> None:
    """From step 3 on every loss is NaN: steps are skipped and counted, then the run stops with a
    clear message and a checkpoint whose weights are those of the last good step."""
    driver = _poison_driver(from_step=2)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", driver, "--config", "configs/experiments/tiny_cpu.yaml", f"run.dir={run_dir}",
           f"data.train={tiny_shards}", "train.steps=30", "checkpoint.interval=0", "optim.ema_decay=0.5"]
    out = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "consecutive steps with a non-finite loss" in out.stderr
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3, 4, 5]
    good = tmp_path / "good"
    ref = train(good, tiny_shards, "train.steps=2", "checkpoint.interval=0", "optim.ema_decay=0.5")
    assert ref.returncode == 0, ref.stderr[-2000:]
    poisoned, clean = _live_weights(run_dir, tmp_path / "a.pt"), _live_weights(good, tmp_path / "b.pt")
    assert poisoned and poisoned.keys() == clean.keys()
    for key, value in clean.items():
        assert torch.isfinite(poisoned[key]).all(), key
        assert torch.equal(poisoned[key], value), key  # the weights of the last good step


def _live_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The live (non-EMA) weights of a run's latest checkpoint, read in a separate process
    (reading dist_checkpointing needs megatron's process groups)."""
    script = ("import sys, torch; from megatron_lomdm.apps.hf_export import load_native_checkpoint; "
              "ck = load_native_checkpoint(sys.argv[1], ema=False); "
              "torch.save({k: v for k, v in ck.state_dict.items() if isinstance(v, torch.Tensor)}, sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", script, str(run_dir), str(out)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_resume_with_head_lr(tiny_shards: Path, tmp_path: Path) -> None:
    """Scheduler heads in their own LR group survive a checkpoint round trip (megatron matches
    param groups by their multipliers, so the head group must differ from the default one)."""
    overrides = ("optim.head_lr=0.01", "checkpoint.interval=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, tiny_shards, "train.steps=3", *overrides).returncode == 0
    assert train(resumed, tiny_shards, "train.steps=2", *overrides).returncode == 0
    out = train(resumed, tiny_shards, "train.steps=3", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(resumed) == losses(straight)


def test_bf16_checkpoint_resume(tiny_shards: Path, tmp_path: Path) -> None:
    """bf16 (the precision of the real recipes) trains, checkpoints through the bf16 optimizer's
    fp32 masters, and resumes to the losses of an uninterrupted run."""
    overrides = ("train.precision=bf16", "checkpoint.interval=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, tiny_shards, "train.steps=4", *overrides).returncode == 0
    assert train(resumed, tiny_shards, "train.steps=2", *overrides).returncode == 0
    out = train(resumed, tiny_shards, "train.steps=4", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = losses(straight)
    assert all(math.isfinite(x) for x in ref)
    assert losses(resumed) == ref


def test_ppots_resume_bit_exact(tiny_shards: Path, tmp_path: Path) -> None:
    """P-POTS time sampling: its estimator (per-bin loss sums, proposal) is checkpointed, so a run
    resumed between two proposal refreshes continues bit-exactly. Two launches: the straight run
    keeps its step-3 checkpoint, which a second run directory resumes from."""
    overrides = ("diffusion.time_sampler=ppots", "diffusion.ppots_bins=8", "diffusion.ppots_refresh=2",
                 "diffusion.ppots_warmup=2", "checkpoint.interval=3", "checkpoint.keep_last=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = train(straight, tiny_shards, "train.steps=6", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("P-POTS proposal refreshed") == 3  # after steps 2, 4 and 6
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    (resumed / "checkpoints" / "latest").write_text("step_0000003\n")
    out = train(resumed, tiny_shards, "train.steps=6", *overrides)  # mid-window: one step after a refresh
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 3" in out.stderr and out.stderr.count("P-POTS proposal refreshed") == 2
    ref = losses(straight)
    assert len(ref) == 6 and all(math.isfinite(x) for x in ref)
    assert losses(resumed) == ref[3:]
