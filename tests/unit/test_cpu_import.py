"""CPU shim 0: without a GPU, importing megatron_lomdm first turns megatron's JIT fusers off."""

from __future__ import annotations

import subprocess
import sys

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
