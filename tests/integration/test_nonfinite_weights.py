"""Non-finite weights and mismatched families are refused, with one line naming the file and key.

A LoMDM run whose EMA forward head is NaN used to score NELBO 0 / PPL 1 (a NaN mask probability
masks nothing); every loader now refuses it: resume, tools/evaluate.py, tools/sample.py,
tools/convert_to_hf.py (the import: tests/integration/test_hf_export.py). The runs are shared.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist_files import fill_dist_tensor
from tests.helpers import zygote
from tests.helpers.runs import ROOT, clean_env, train

POISONED = "fwd_head.out.3.weight"  # the forward head's last layer: every exponent becomes NaN
STEP_FOLDER = "step_0000002"


def _tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, f"tools/{tool}", *map(str, args)], env=clean_env(), cwd=ROOT, timeout=300)


def _poison_ema(step_dir: Path, key: str) -> int:
    """Overwrite one EMA tensor of a checkpoint with NaN in place (same file sizes); returns its numel.

    Format 2 keeps the EMA in dist/, sharded like the weights, under ``ema.<key>``.
    """
    return fill_dist_tensor(step_dir / "dist", f"ema.{key}")


def _assert_names_nan_ema(proc: subprocess.CompletedProcess, run_dir: Path, numel: int) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    folder = run_dir / "checkpoints" / STEP_FOLDER
    line = proc.stderr.strip().splitlines()[-1]
    assert str(folder) in line and f"ema weight '{POISONED}' has {numel} non-finite values" in line, line
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def nan_ema_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    run_dir = tmp_path_factory.mktemp("nonfinite") / "lomdm"
    out = train(run_dir, tiny_shards, "train.steps=2", "checkpoint.interval=2", "optim.ema_decay=0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    numel = _poison_ema(run_dir / "checkpoints" / STEP_FOLDER, POISONED)
    return run_dir, numel


def test_evaluate_refuses_nan_ema(nan_ema_run: tuple[Path, int]) -> None:
    run_dir, numel = nan_ema_run
    _assert_names_nan_ema(_tool("evaluate.py", "--run-dir", run_dir, "--max-sequences", 4, "--no-hash"),
                          run_dir, numel)


def test_sample_refuses_nan_ema(nan_ema_run: tuple[Path, int], tmp_path: Path) -> None:
    run_dir, numel = nan_ema_run
    proc = _tool("sample.py", "--run-dir", run_dir, "--sampler", "ancestral", "--steps", 4, "--num-samples", 1,
                 "--no-hash", "--out", tmp_path / "s.jsonl")
    _assert_names_nan_ema(proc, run_dir, numel)
    assert not (tmp_path / "s.jsonl").exists()


def test_export_refuses_nan_ema(nan_ema_run: tuple[Path, int], tmp_path: Path) -> None:
    run_dir, numel = nan_ema_run
    _assert_names_nan_ema(_tool("convert_to_hf.py", "--run-dir", run_dir, "--output", tmp_path / "hf"),
                          run_dir, numel)
    assert not (tmp_path / "hf").exists()


def test_resume_refuses_nan_ema(nan_ema_run: tuple[Path, int], tiny_shards: Path) -> None:
    run_dir, numel = nan_ema_run
    out = train(run_dir, tiny_shards, "train.steps=3", "checkpoint.interval=2", "optim.ema_decay=0.5")
    _assert_names_nan_ema(out, run_dir, numel)


@pytest.fixture(scope="module")
def mdlm_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("nonfinite") / "mdlm"
    out = train(run_dir, tiny_shards, "diffusion.name=mdlm", "diffusion.c2=0.0", "train.steps=1",
                "checkpoint.interval=1", "optim.ema_decay=0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_evaluate_mdlm_checkpoint_as_lomdm_names_the_family(mdlm_run: Path) -> None:
    proc = _tool("evaluate.py", "--run-dir", mdlm_run, "--max-sequences", 4, "--no-hash", "diffusion.name=lomdm")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert str(mdlm_run / "checkpoints" / "step_0000001") in line
    assert "trained with diffusion.name=mdlm" in line and "diffusion.name=lomdm needs fwd_head.*, rev_head.*" in line
    assert "Traceback" not in proc.stderr


def test_resume_mdlm_checkpoint_as_lomdm_names_the_key(mdlm_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = shutil.copytree(mdlm_run, tmp_path / "mdlm")  # the resume rewrites config.yaml
    out = train(run_dir, tiny_shards, "diffusion.name=lomdm", "diffusion.c2=0.0", "train.steps=2",
                "checkpoint.interval=1", "optim.ema_decay=0.5")
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert str(run_dir / "checkpoints" / "step_0000001") in line and "fwd_head." in line, line
    assert "Traceback" not in out.stderr
