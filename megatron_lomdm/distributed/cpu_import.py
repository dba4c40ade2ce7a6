"""CPU shim 0, at import time: megatron's JIT fusers off, and the known harmless noise quiet.

`megatron.core.jit` sets `jit_fuser = torch.compile`, and importing megatron.core decorates ~40
fused kernels with it; each decoration builds a dynamo wrapper, about 1 s of every process's
start-up on CPU for kernels the CPU backend never compiles. When `megatron.core.jit` is loaded and
no GPU is present, this hook calls megatron's own `disable_jit_fuser()` before any module decorates
with it. `megatron_lomdm/__init__.py` installs the hook (it must precede the first megatron import,
and it imports nothing heavy); GPU processes keep megatron's fusers. The run-time shims are in
`cpu_compat.py`.

The same hook, just before `megatron.core` itself executes, silences the warnings and log lines
of `QUIET_WARNINGS` / `QUIET_LOGGERS` on a machine without CUDA: CPU development mode (CI, laptops,
`make demo`). Each entry says why it is harmless there; every other warning still shows. On a GPU
nothing is silenced (a missing Transformer Engine is then worth a warning), nor when the user asks
for warnings explicitly (`python -W ...` or `PYTHONWARNINGS`, e.g. `PYTHONWARNINGS=default`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

_JIT = "megatron.core.jit"
_CORE = "megatron.core"


@dataclass(frozen=True)
class Quiet:
    """One warning silenced in CPU development mode: `message` is a regex matched at its start."""

    category: type[Warning]
    message: str
    why: str


QUIET_WARNINGS: tuple[Quiet, ...] = (
    Quiet(UserWarning, r"Transformer Engine and Apex are not installed",
          "TE and apex are CUDA-only; on CPU megatron's torch fallbacks (torch AdamW, unfused multi-tensor "
          "ops) are exactly what the CPU backend runs. The GPU image installs both."),
    Quiet(UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
          "the torch LayerNorm is the CPU backend's norm (apex's fused norm needs CUDA)"),
    Quiet(UserWarning, r"full scope is deprecated",
          "megatron-core 0.16.1 warns about its own TransformerConfig default (cuda_graph_scope='full') on "
          "every construction; no CUDA graph is ever captured on CPU"),
    Quiet(UserWarning, r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
                       r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
          "a CUDA stream-scheduling hint for TP > 1; gloo on CPU has no CUDA streams"),
    Quiet(FutureWarning, r"`load_state_dict` is deprecated and will be removed",
          "megatron-core 0.16.1's dist_checkpointing calls torch's older torch.distributed.checkpoint entry "
          "point, which the pinned torch still supports; a torch pin bump is where it matters"),
    Quiet(FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
          "megatron-core 0.16.1's checkpoints are built on ShardedTensor; the pinned torch still supports it"),
)
"""Warnings a CPU development process silences, each with why it is harmless there."""

QUIET_LOGGERS: dict[str, str] = {
    "mlflow.store.db.utils": "'Creating initial MLflow database tables' / 'Updating database tables': the sqlite "
                             "store of a new run directory being created, on every first run",
    "mlflow.system_metrics.system_metrics_monitor": "'Skip logging GPU metrics' (there is no GPU) and the "
                                                    "monitor's start/stop notices; its warnings still show",
}
"""Loggers a CPU development process raises to WARNING (their INFO lines), each with why."""


def quiet_known_noise() -> None:
    """Silence `QUIET_WARNINGS` and the INFO lines of `QUIET_LOGGERS` (idempotent; no-op if -W was given)."""
    if sys.warnoptions:
        return
    for entry in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=entry.message, category=entry.category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _cpu_only() -> bool:
    import torch  # megatron.core imports it first thing anyway

    return not torch.cuda.is_available()


class _CpuHooks(importlib.abc.Loader):
    """Wraps the loader of `megatron.core` (quiet first) and `megatron.core.jit` (fusers off after)."""

    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner = inner
        self.name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self.name == _CORE and _cpu_only():
            quiet_known_noise()
        self.inner.exec_module(module)
        if self.name == _JIT and _cpu_only():
            module.disable_jit_fuser()


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in (_CORE, _JIT):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _CpuHooks(spec.loader, name)
        return spec


def install() -> None:
    """Install the hook once per interpreter (a no-op when megatron is already imported)."""
    if _JIT not in sys.modules and not any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronFinder())
    if _CORE in sys.modules and _cpu_only():  # imported before us: later warnings are still quieted
        quiet_known_noise()
