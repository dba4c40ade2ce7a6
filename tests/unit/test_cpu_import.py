"""CPU shim 0: without a GPU, importing megatron_lomdm first turns megatron's JIT fusers off and quiets
the known harmless warnings (`QUIET_WARNINGS` / `QUIET_LOGGERS`), and only those."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_PROBE = ("import os, megatron.core.jit as j, megatron.core.fusions.fused_bias_gelu as g; "
          "print(j.jit_fuser.__name__, os.path.basename(g.bias_gelu.__code__.co_filename))")


def _probe(prefix: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", prefix + _PROBE], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU processes keep megatron's fusers")
def test_megatron_jit_fusers_off_on_cpu() -> None:
    fuser, kernel_file = _probe("")
    assert fuser == "compile" and kernel_file != "fused_bias_gelu.py"  # megatron's default: a dynamo wrapper
    assert _probe("import megatron_lomdm; ") == ["noop_decorator", "fused_bias_gelu.py"]  # the plain kernel


# --------------------------------------------------------------------------------------------
# CPU development mode: the known harmless noise is silenced in one table, everything else shows
# --------------------------------------------------------------------------------------------

_NOISE_PROBE = ("import warnings, megatron_lomdm, megatron.core.optimizer, megatron.core.models.backends; "
                "warnings.warn('lomdm-probe: a warning nobody listed')")
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _probe_stderr(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", _NOISE_PROBE], capture_output=True, text=True, check=True,
                          env={**environ, **env}).stderr


def _silenced(stderr: str) -> list[str]:
    """The lines of `stderr` that a QUIET_WARNINGS / QUIET_LOGGERS entry should have silenced."""
    from megatron_lomdm.distributed.cpu_import import QUIET_LOGGERS, QUIET_WARNINGS

    patterns = [re.compile(rf"{q.category.__name__}: {q.message}") for q in QUIET_WARNINGS]
    patterns += [re.compile(rf" INFO {re.escape(name)}: ") for name in QUIET_LOGGERS]
    return [line for line in stderr.splitlines() if any(p.search(line) for p in patterns)]


def test_quiet_table_says_why_for_every_entry() -> None:
    from megatron_lomdm.distributed.cpu_import import QUIET_LOGGERS, QUIET_WARNINGS

    for entry in QUIET_WARNINGS:
        re.compile(entry.message)
        assert issubclass(entry.category, Warning) and len(entry.why) > 20, entry
    assert all(len(why) > 20 for why in QUIET_LOGGERS.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="nothing is silenced on a GPU machine")
def test_known_noise_silenced_and_an_unknown_warning_shows() -> None:
    stderr = _probe_stderr()
    assert "lomdm-probe: a warning nobody listed" in stderr
    assert not _silenced(stderr), stderr
    shown = _probe_stderr(PYTHONWARNINGS="default")  # asking for warnings shows them all
    assert "Transformer Engine and Apex are not installed" in shown and _silenced(shown)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="nothing is silenced on a GPU machine")
def test_tiny_cli_run_starts_with_a_log_line(tiny_shards: Path, tmp_path: Path) -> None:
    """A tracked tiny training: its stderr opens with our log line and holds none of the silenced lines."""
    from tests.helpers.runs import train

    out = train(tmp_path / "run", tiny_shards, "train.steps=1", "tracking.enabled=true", timeout=240, fresh=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert lines and _LOG_LINE.match(lines[0]), f"stderr does not start with a log line:\n{out.stderr[:3000]}"
    assert not _silenced(out.stderr), out.stderr[:3000]
