"""Test helpers for megatron-core on CPU: the library's CPU shims plus an in-process session.

The shims themselves live in ``megatron_lomdm.distributed.cpu_compat`` (the CPU development
backend, also used by ``python -m megatron_lomdm.train`` on machines without a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from megatron_lomdm.distributed.cpu_compat import CpuShims, install_cpu_shims

__all__ = ["CpuShims", "install_cpu_shims", "megatron_cpu_session"]


@contextlib.contextmanager
def megatron_cpu_session(
    *, tp: int = 1, pp: int = 1, seed: int = 1234, **shim_flags: bool
) -> Iterator[Any]:
    """A single-process (world 1) megatron session on CPU for in-process tests.

    Installs the requested shims (default: 1 + 2 only, which is what model code needs), yields the
    ``ParallelInfo``, then destroys the groups and uninstalls the shims.
    """
    from megatron_lomdm.distributed.init import destroy_distributed, init_distributed

    flags = {"rng": True, "current_device": True, "cuda_to_cpu": False, "fake_cuda_types": False}
    flags.update(shim_flags)
    holder: dict[str, CpuShims] = {}

    def _install() -> None:
        holder["shims"] = install_cpu_shims(**flags)

    try:
        yield init_distributed(tp=tp, pp=pp, seed=seed, backend="gloo", before_rng_seed=_install)
    finally:
        destroy_distributed()
        if "shims" in holder:
            holder["shims"].uninstall()
