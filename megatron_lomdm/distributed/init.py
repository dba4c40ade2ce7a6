"""Process-group and model-parallel initialisation, per-rank seeding, and replication helpers.

``init_distributed`` is the one entry point: it reads the launcher's environment (torchrun, Slurm,
or nothing for a single process), checks the parallel layout before any heavy work, creates the
default process group and megatron-core's model-parallel groups, and seeds the RNGs.

Seeding contract:
    * The default torch RNG (CPU and, on GPU, CUDA) gets the *same* seed on every rank. Modules
      built afterwards with plain torch (the replicated scheduler heads) therefore start identical
      on all ranks, and dropout outside megatron's model-parallel regions draws the same masks on
      all tensor-parallel ranks, as megatron-core expects.
    * megatron-core's RNG tracker (the per-TP-rank stream used by TP-region dropout and by
      activation recompute) is seeded with ``model_parallel_cuda_manual_seed``. That function is
      CUDA-only, so on CPU it runs only when the caller supplies ``before_rng_seed`` (the CPU test
      shims install a CPU tracker there); otherwise the tracker is left unseeded on CPU.

Replicated (non-TP-split) modules such as the scheduler heads must stay bit-identical across TP
ranks: ``broadcast_head_params`` makes them so and ``assert_replicated`` checks it.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lomdm.distributed.device import default_backend, get_device

logger = logging.getLogger(__name__)

_DEFAULT_SLURM_PORT_BASE = 20000


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    source: str
    """``torchrun``, ``slurm`` or ``single`` (no launcher, or a launcher with one task)."""
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class ParallelInfo:
    """The parallel layout of this process after ``init_distributed``."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str


def _first_slurm_host(nodelist: str) -> str:
    """The first host name of a Slurm node list such as ``gpu[003-005,010],login1``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env_from(environ: Mapping[str, str]) -> LaunchEnv:
    """Parse the launcher's environment: torchrun first, then Slurm, else a single process.

    Args:
        environ: the environment, usually ``os.environ``.

    Returns:
        The rank, world size, local rank and rendezvous address. Under Slurm without
        MASTER_ADDR/MASTER_PORT, the address is the first host of the job's node list and the port
        is derived from the job id.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        port = environ.get("MASTER_PORT")
        return LaunchEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            source="torchrun",
            master_addr=environ.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
        )
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        addr = environ.get("MASTER_ADDR") or (_first_slurm_host(nodelist) if nodelist else None)
        if addr is None:
            raise ValueError("Slurm job without MASTER_ADDR or SLURM_JOB_NODELIST: no rendezvous")
        port = environ.get("MASTER_PORT")
        if not port:
            port = str(_DEFAULT_SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            source="slurm",
            master_addr=addr,
            master_port=int(port),
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, source="single")


def validate_parallel_sizes(tp: int, pp: int, world_size: int) -> int:
    """Check the layout and return the data-parallel size ``world_size / (tp * pp)``.

    Raises:
        ValueError: naming ``parallel.tp``/``parallel.pp`` and the world size when they do not fit.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world size "
            f"{world_size}; choose parallel.tp and parallel.pp so that tp*pp divides it"
        )
    return world_size // (tp * pp)


def _init_process_group(env: LaunchEnv, backend: str, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(
                f"torch.distributed is already initialised with world size "
                f"{dist.get_world_size()}, "
                f"but the launcher says {env.world_size}"
            )
        return
    if env.source == "single":
        # No launcher: an in-memory store is the whole rendezvous (no port, no race).
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    elif env.source == "torchrun":
        dist.init_process_group(
            backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )


def _init_model_parallel(tp: int, pp: int, timeout_minutes: int, vp: int = 1) -> None:
    from megatron.core import parallel_state as ps

    virtual = vp if vp > 1 else None
    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp
            and ps.get_virtual_pipeline_model_parallel_world_size() == virtual
        )
        if same:
            return
        logger.info("re-initialising megatron model parallelism for tp=%d pp=%d", tp, pp)
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual,
        distributed_timeout_minutes=timeout_minutes,
    )


def seed_rngs(seed: int, *, before_rng_seed: Callable[[], None] | None = None) -> None:
    """Seed python's and torch's default RNGs (same seed on every rank) and megatron's tracker.

    Args:
        seed: the run's seed.
        before_rng_seed: called before seeding megatron's RNG tracker; on CPU the tracker is seeded
            only when this is given (see the module docstring).
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    torch.manual_seed(seed)
    if before_rng_seed is not None:
        before_rng_seed()
    if torch.cuda.is_available() or before_rng_seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        logger.debug("CPU without a before_rng_seed hook: megatron's CUDA RNG tracker not seeded")


def init_distributed(
    *,
    tp: int,
    pp: int,
    vp: int = 1,
    backend: str | None = None,
    seed: int,
    before_rng_seed: Callable[[], None] | None = None,
    timeout_minutes: int = 30,
) -> ParallelInfo:
    """Initialise torch.distributed and megatron-core parallelism, then seed the RNGs.

    Works under torchrun, under Slurm (one task per process) and as a plain single process.
    Calling it again with the same layout reuses what exists; with another tp/pp it rebuilds
    megatron's groups over the existing default group.

    Args:
        tp: tensor-parallel size (``parallel.tp``).
        pp: pipeline-parallel size (``parallel.pp``).
        vp: model chunks per pipeline rank (``parallel.virtual_stages``; 1: no interleaving).
        backend: torch.distributed backend; defaults to nccl on CUDA, gloo otherwise.
        seed: the run's seed (see the module docstring for what each RNG gets).
        before_rng_seed: hook run after the model-parallel groups exist and before megatron's RNG
            tracker is seeded; CPU tests pass their shim installer here.
        timeout_minutes: collective timeout.

    Returns:
        The layout of this process.

    Raises:
        ValueError: when ``tp * pp`` does not divide the world size (checked before any group is
            created).
    """
    env = launch_env_from(os.environ)
    validate_parallel_sizes(tp, pp, env.world_size)
    backend = backend or default_backend()
    device = get_device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group(env, backend, datetime.timedelta(minutes=timeout_minutes))
    _init_model_parallel(tp, pp, timeout_minutes, vp)
    seed_rngs(seed, before_rng_seed=before_rng_seed)
    info = parallel_info(local_rank=env.local_rank, backend=backend)
    logger.info(
        "distributed: world=%d tp=%d pp=%d dp=%d backend=%s device=%s (%s)",
        info.world_size, info.tp, info.pp, info.dp, backend, device, env.source,
    )
    return info


def parallel_info(*, local_rank: int | None = None, backend: str | None = None) -> ParallelInfo:
    """The current layout, read from torch.distributed and megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    if local_rank is None:
        local_rank = launch_env_from(os.environ).local_rank
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=get_device(local_rank),
        backend=backend or dist.get_backend(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel groups and the default process group, if present."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _tp_group_or_none() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_tensor_model_parallel_group()


def _module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def broadcast_head_params(head: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Copy the parameters and buffers of a replicated module from the group's first rank.

    Args:
        head: a module replicated across ``group`` (e.g. a scheduler head).
        group: defaults to the tensor-parallel group; a no-op for a group of one.
    """
    group = group if group is not None else _tp_group_or_none()
    if group is None or dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    for _, tensor in _module_tensors(head):
        dist.broadcast(tensor.data, src=src, group=group)


def _bits_int64(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as int64 (so that equality is bitwise, -0.0 and NaN included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_floating_point():
        int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
        flat = flat.view(int_dtype[flat.element_size()])
    return flat.to(torch.int64)


@torch.no_grad()
def assert_replicated(module: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Assert that every parameter and buffer of ``module`` is bit-identical across ``group``.

    Two all-reduces (max and min of the bit patterns) over the whole module; every rank reaches
    the same verdict, so a failure raises on all ranks together.

    Raises:
        AssertionError: naming the tensors that differ.
    """
    group = group if group is not None else _tp_group_or_none()
    if group is None or dist.get_world_size(group) == 1:
        return
    named = _module_tensors(module)
    bits = torch.cat([_bits_int64(t) for _, t in named]) if named else torch.zeros(0)
    high, low = bits.clone(), bits.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    differs, offset = [], 0
    for name, tensor in named:
        n = tensor.numel()
        if not torch.equal(high[offset : offset + n], low[offset : offset + n]):
            differs.append(name)
        offset += n
    if differs:
        raise AssertionError(f"not replicated across the group: {differs}")
