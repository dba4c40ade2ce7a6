"""The fork server the suite trains through (tests/helpers/zygote.py) against fresh commands.

A DP=2 LoMDM run (torch's elastic launcher, forked workers) and a one-process run write exactly
the per-step metrics and stderr log lines a fresh `torchrun` / `python -m` command writes: the
same losses and gradient norms bit for bit, the same rank tags, the same exit codes for a refused
config. Run with LOMDM_TEST_FRESH_PROCESSES=1 to send the whole suite to fresh commands instead.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.helpers import zygote
from tests.helpers.runs import read_metrics, train

pytestmark = pytest.mark.slow
STEPS = ("train.steps=3", "checkpoint.interval=0", "diffusion.name=lomdm")
LOG = re.compile(r"^\d\d:\d\d:\d\d \[rank(\d+)\] (\w+) ([\w.]+): ")


def _log_shape(stderr: str) -> list[tuple[str, str, str]]:
    """(rank, level, logger) of each log line, timings and values aside."""
    return [m.groups() for m in map(LOG.match, stderr.splitlines()) if m]


@pytest.mark.parametrize("nproc", [1, 2])
def test_fork_server_run_equals_a_fresh_command(nproc: int, tiny_shards: Path, tmp_path: Path) -> None:
    if not zygote.enabled():
        pytest.skip("the fork server is switched off (LOMDM_TEST_FRESH_PROCESSES=1): no forked run to compare")
    fresh = train(tmp_path / "fresh", tiny_shards, *STEPS, nproc=nproc, fresh=True)
    forked = train(tmp_path / "forked", tiny_shards, *STEPS, nproc=nproc)
    assert fresh.returncode == forked.returncode == 0, (fresh.stderr[-2000:], forked.stderr[-2000:])
    keys = ("step", "loss", "nelbo", "grad_norm", "num_tokens")
    want = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "fresh")]
    assert len(want) == 3
    assert [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "forked")] == want
    assert _log_shape(forked.stderr) == _log_shape(fresh.stderr) != []


def test_fork_server_exit_codes(tiny_shards: Path, tmp_path: Path) -> None:
    """A refused config exits 2 under `python -m`; under the launcher the failed worker makes it 1."""
    for nproc, code in ((1, 2), (2, 1)):
        fresh = train(tmp_path / f"f{nproc}", tiny_shards, "model.vocab_size=100", nproc=nproc, fresh=True)
        forked = train(tmp_path / f"z{nproc}", tiny_shards, "model.vocab_size=100", nproc=nproc)
        assert fresh.returncode == forked.returncode == code, (nproc, fresh.returncode, forked.returncode)
        assert "vocab" in forked.stderr


def test_split_command_refuses_what_it_cannot_run() -> None:
    python = sys.executable
    assert zygote.split_command([python, "-m", "m", "a"]) == (["-m", "m"], ["a"], 1)
    assert zygote.split_command([python, "s.py", "a"]) == (["s.py"], ["a"], 1)
    assert zygote.split_command([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                                 "-m", "m", "a"]) == (["-m", "m"], ["a"], 4)
    for cmd in ([python, "-c", "print(1)"], ["bash", "x.sh"]):
        with pytest.raises(ValueError, match="not a command the fork server runs"):
            zygote.split_command(cmd)
