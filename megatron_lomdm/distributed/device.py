"""The compute device of this process: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

Project code asks this module for its device instead of writing ``"cuda"``, so the same code runs
on GPU nodes and on the CPU development machine; only megatron-core internals need the CPU test
shims (``tests/helpers/cpu_megatron.py``).
"""

from __future__ import annotations

import os

import torch


def cuda_available() -> bool:
    """Whether this process can use CUDA (a GPU build of torch and at least one visible GPU)."""
    return torch.cuda.is_available()


def local_rank_from_env() -> int:
    """The node-local rank from the launcher's environment (torchrun or Slurm), 0 when alone."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def get_device(local_rank: int | None = None) -> torch.device:
    """The device this process computes on.

    Args:
        local_rank: the node-local rank; defaults to the launcher's environment.

    Returns:
        ``cuda:<local_rank mod #GPUs>`` when CUDA is available, else ``cpu``.
    """
    if not cuda_available():
        return torch.device("cpu")
    rank = local_rank_from_env() if local_rank is None else local_rank
    return torch.device("cuda", rank % torch.cuda.device_count())


def default_backend() -> str:
    """The torch.distributed backend for this device: ``nccl`` on CUDA, else ``gloo``."""
    return "nccl" if cuda_available() else "gloo"
