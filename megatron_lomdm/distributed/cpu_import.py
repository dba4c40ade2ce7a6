"""CPU shim 0, at import time: megatron's JIT fusers off on a machine without CUDA.

`megatron.core.jit` sets `jit_fuser = torch.compile`, and importing megatron.core decorates ~40
fused kernels with it; each decoration builds a dynamo wrapper, about 1 s of every process's
start-up on CPU for kernels the CPU backend never compiles. When `megatron.core.jit` is loaded and
no GPU is present, this hook calls megatron's own `disable_jit_fuser()` before any module decorates
with it. `megatron_lomdm/__init__.py` installs the hook (it must precede the first megatron import,
and it imports nothing heavy); GPU processes keep megatron's fusers. The run-time shims are in
`cpu_compat.py`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_MODULE = "megatron.core.jit"


class _DisableAfterExec(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        import torch  # already imported by megatron.core.jit itself

        if not torch.cuda.is_available():
            module.disable_jit_fuser()


class _JitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DisableAfterExec(spec.loader)
        return spec


def install() -> None:
    """Install the hook once per interpreter (a no-op when megatron is already imported)."""
    if _MODULE not in sys.modules and not any(isinstance(f, _JitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFinder())
