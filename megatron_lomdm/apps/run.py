"""Opening a trained run for inference: read-only, at a chosen checkpoint, in eval mode.

``open_run`` builds the run with ``training.build.build_run(cfg, read_only=True)``: its
``config.yaml`` and ``metrics.jsonl`` are left untouched, no tracker run is started and no lock is
taken. It initialises distributed state like training does (torchrun/Slurm/single process), so
every rank holds its shard of the model; ``close_run`` tears the process groups down at the end of
a CLI. ``weights`` swaps the EMA weights in for a block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.config import Config, load_config
from megatron_lomdm.config.load import replace


class RunNotReady(ValueError):
    """The run directory has no (such) complete checkpoint or no config."""


# --------------------------------------------------------------------------------------------
# Opening a run for inference
# --------------------------------------------------------------------------------------------


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The run's resolved ``config.yaml`` with dotted overrides (e.g. ``parallel.tp=2``); ``run.dir`` unchanged.

    Raises:
        RunNotReady: no ``config.yaml`` in ``run_dir``.
        ValueError: an override is invalid or tries to move ``run.dir``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunNotReady(f"{run_dir}: no config.yaml; not a run directory written by megatron_lomdm.train")
    if any(o.split("=", 1)[0].strip() == "run.dir" for o in overrides):
        raise ValueError("run.dir cannot be overridden: the run directory is given by --run-dir")
    cfg = load_config(path, list(overrides))
    if Path(cfg.run.dir).resolve() != run_dir.resolve():
        # a moved run directory: follow it, so checkpoints are read where they are now
        cfg = replace(cfg, run={"dir": str(run_dir)})
    return cfg


def available_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir/checkpoints`` (sorted)."""
    root = Path(run_dir) / "checkpoints"
    steps = []
    for folder in root.glob("step_*"):
        name = folder.name[len("step_"):]
        if folder.is_dir() and name.isdigit():
            steps.append(int(name))
    return sorted(steps)


def resolve_checkpoint(run_dir: str | Path, step: int | None) -> int:
    """The checkpoint to use: ``step``, or the one ``checkpoints/latest`` names.

    Raises:
        RunNotReady: no complete checkpoint, or no checkpoint at ``step`` (the message lists them).
    """
    root = Path(run_dir) / "checkpoints"
    steps = available_checkpoints(run_dir)
    if step is None:
        try:
            latest = CheckpointManager.reader(root).latest_step()
        except ValueError as err:  # `latest` names no complete checkpoint, or holds garbage
            raise RunNotReady(str(err)) from None
        if latest is None:
            raise RunNotReady(f"{run_dir}: no complete checkpoint in {root}; train first")
        return latest
    if step not in steps:
        raise RunNotReady(f"{run_dir}: no checkpoint at step {step}; available: {steps or 'none'}")
    return step


def open_run(run_dir: str | Path, *, checkpoint: int | None = None, overrides: Sequence[str] = ()):
    """Build a run from its directory for inference, at checkpoint ``checkpoint`` (default: latest).

    Initialises distributed state like training does (torchrun/Slurm/single process), builds the
    model, engine and EMA with ``build_run``, loads the checkpoint and puts the model in eval mode.
    Nothing in the run directory is written; tracking is off.

    Args:
        run_dir: the training run directory.
        checkpoint: checkpoint step; None = ``checkpoints/latest``.
        overrides: dotted config overrides, e.g. ``parallel.tp=2`` or ``data.train=/new/place``.
            Interleaved runs open with ``parallel.virtual_stages=1`` unless the overrides set it
            (samplers and exporters expect one model per pipeline stage).

    Returns:
        The ``training.build.Run``; ``run.state.step`` is the checkpoint's step.

    Raises:
        RunNotReady, ValueError: see ``load_run_config`` / ``resolve_checkpoint``; the overrides
            change the family's checkpoint keys (``check_trained_family``); non-finite weights.
    """
    from megatron_lomdm.training.build import build_run, check_trained_family

    cfg = load_run_config(run_dir, overrides)
    cfg = replace(cfg, tracking={"enabled": False})
    if cfg.parallel.virtual_stages > 1 and not any(o.split("=", 1)[0].strip() == "parallel.virtual_stages"
                                                   for o in overrides):
        # inference runs one model per pipeline stage; the checkpoint reshards to it
        cfg = replace(cfg, parallel={"virtual_stages": 1})
    step = resolve_checkpoint(run_dir, checkpoint)
    check_trained_family(load_run_config(run_dir), cfg, Path(run_dir) / "checkpoints" / f"step_{step:07d}")
    run = build_run(cfg, read_only=True)
    latest = run.ckpt.latest_step()
    if latest != step:
        run.load_checkpoint(step)
    if run.state.step != step:
        raise RunNotReady(f"checkpoint step_{step:07d} holds train state step {run.state.step}")
    run.model.eval()
    return run


@contextlib.contextmanager
def weights(run: Any, use_ema: bool) -> Iterator[None]:
    """The EMA weights inside the block (``use_ema``), the live weights otherwise; restored after."""
    if not use_ema:
        yield
        return
    run.ema.swap()
    try:
        yield
    finally:
        run.ema.swap()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of global rank ``src`` on every rank (identity without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def close_run() -> None:
    """Tear down the process groups ``open_run`` created (end of a CLI)."""
    if dist.is_initialized():
        from megatron_lomdm.distributed.init import destroy_distributed

        destroy_distributed()


def is_rank0() -> bool:
    """Global rank 0 (or no torch.distributed)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def clean_launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without torchrun/Slurm rank variables: for child processes
    that must start their own single-process world (e.g. a judge run)."""
    out = dict(os.environ if env is None else env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        out.pop(key, None)
    return out
