"""Launch the training CLI from tests and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import zygote

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/experiments/tiny_cpu.yaml"


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment minus any launcher variables, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_ID", "SLURM_LOCALID"):
        env.pop(key, None)
    return env


def train_cmd(run_dir: Path, shards: Path, *overrides: str, nproc: int = 1, config: str = TINY) -> list[str]:
    launcher = [sys.executable, "-m", "megatron_lomdm.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "megatron_lomdm.train"]
    return [*launcher, "--config", config, f"run.dir={run_dir}", f"data.train={shards}", *overrides]


def train(run_dir: Path, shards: Path, *overrides: str, nproc: int = 1, timeout: int = 300,
          fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the training CLI to completion (under torchrun when nproc > 1): in a child of this worker's
    fork server (tests/helpers/zygote.py), or as a fresh command when `fresh` (a test of the command
    itself, of what a process does at start-up) or with LOMDM_TEST_FRESH_PROCESSES=1."""
    return zygote.run(train_cmd(run_dir, shards, *overrides, nproc=nproc), env=clean_env(), cwd=ROOT,
                      timeout=timeout, fresh=fresh)


def start_train(run_dir: Path, shards: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """Start the training CLI in the background, stdout+stderr to `log`."""
    return subprocess.Popen(train_cmd(run_dir, shards, *overrides), cwd=ROOT, env=clean_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return [r for r in records if r.get("kind", "train") == kind]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll metrics.jsonl until `step` is logged; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")
