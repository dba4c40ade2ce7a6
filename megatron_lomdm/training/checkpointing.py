"""A run's state <-> its checkpoints: what is saved, and how a resume finds, checks and loads it.

Format 2 (`checkpoint/sharded.py`): model, optimizer and EMA in `dist/` (reshardable: any TP x PP
x DP layout resumes it), RNG and the train/loader/P-POTS position in the rank files. Format 1
(the EMA in the rank files) still loads on the layout that wrote it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_lomdm.checkpoint.manager import LayoutMismatch
from megatron_lomdm.checkpoint.safe_load import check_checkpoint_folder
from megatron_lomdm.checkpoint.sharded import (ema_sharded_state_dict, model_sharded_state_dict, rng_state,
                                               set_rng_state)
from megatron_lomdm.utils.finite import NonFiniteWeightsError, check_finite
from megatron_lomdm.utils.logging import get_logger

if TYPE_CHECKING:
    from megatron_lomdm.training.build import Run

log = get_logger(__name__)


@dataclasses.dataclass
class TrainState:
    """What the loop counts; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    bad_steps: int = 0  # consecutive skipped steps (non-finite loss)
    skipped_steps: int = 0


def plain_state(run: Run) -> dict[str, Any]:
    """This rank's plain state: what the rank file holds."""
    return {
        "train_state": dataclasses.asdict(run.state),
        "loader": run.loader.state_dict(),
        "rng": rng_state(),
        **({"ppots": run.ppots.state_dict()} if run.ppots is not None else {}),
    }


def _ema_template(run: Run) -> dict[str, Any]:
    """The EMA's sharded entries; none without an EMA (optim.ema_decay=0, as ZeRO-3 requires: its
    partitioned parameters have no sharding metadata outside the engine's gather)."""
    if not run.ema.shadow:
        return {"ema": {}}
    return {"ema": ema_sharded_state_dict(model_sharded_state_dict(run.model), run.model, run.ema.shadow)}


def save_checkpoint(run: Run) -> None:
    """Checkpoint the run at its current step (collective)."""
    extra = _ema_template(run)
    run.ckpt.save(run.state.step, plain_state(run), sharded_writer=lambda folder: run.engine.save_sharded(folder, extra))


def _load_tensors(run: Run, step: int, sd: dict[str, Any]) -> None:
    """Model and optimizer through the engine, the EMA from `dist/` (format 2) or the rank file (1)."""
    folder = run.ckpt.folder(step)
    format_2 = run.ckpt.meta(step).get("format", 1) >= 2
    try:
        loaded = run.engine.load_sharded(folder / "dist", _ema_template(run) if format_2 else None)
    except KeyError as err:  # megatron: "<key> from model not in state dict: [<every key>]"
        key = str(err.args[0] if err.args else err).split(" from model not in state dict")[0]
        raise ValueError(f"checkpoint {folder} does not match the model of this config: it "
                         f"has no {key} (trained with another diffusion.name or model shape?)") from None
    if format_2:
        run.ema.load_state_dict({"shadow": loaded["ema"]}, strict=False)
    else:
        run.ema.load_state_dict(sd["ema"])


def load_checkpoint(run: Run, step: int, sd: dict[str, Any] | None = None) -> None:
    """Restore everything from checkpoint `step` (collective); non-finite weights are an error.

    `sd`: this rank's plain state, already read and checked by `resume`.
    """
    check_checkpoint_folder(run.ckpt.folder(step))  # before any library unpickles its files
    _check_backend_layout(run, step)
    sd = run.ckpt.load(step) if sd is None else sd
    _load_tensors(run, step, sd)
    if run.ppots is not None:
        if "ppots" in sd:
            run.ppots.load_state_dict(sd["ppots"])
        else:
            log.warning("checkpoint %d has no P-POTS state: its estimates start afresh (uniform t)", step)
    elif "ppots" in sd:
        log.warning("checkpoint %d holds P-POTS state, ignored: diffusion.time_sampler=%s",
                    step, run.cfg.diffusion.time_sampler)
    run.state = TrainState(**sd["train_state"])
    run.loader.load_state_dict(sd["loader"])
    run.train_iter = iter(run.loader)
    if sd["rng"] is not None:
        set_rng_state(sd["rng"])
    else:
        log.info("checkpoint %d was written on another layout: RNG streams restart from train.seed", step)
    check_finite_weights(run, step)


def _check_backend_layout(run: Run, step: int) -> None:
    """DeepSpeed's ZeRO partitions of the optimizer resume only on the TP x DP that wrote them."""
    if run.cfg.parallel.backend != "deepspeed":
        return
    meta, info = run.ckpt.meta(step), run.info
    saved = (meta.get("tp"), meta.get("dp", info.dp))
    if saved != (info.tp, info.dp):
        raise LayoutMismatch(
            f"{run.ckpt.folder(step)} holds DeepSpeed ZeRO optimizer partitions of parallel.tp={saved[0]} on "
            f"{saved[1]} data-parallel ranks; this run has tp={info.tp}, dp={info.dp}. Resume with the saved "
            f"layout (the model and EMA in dist/ reshard; DeepSpeed's optimizer state does not)")


def check_finite_weights(run: Run, step: int) -> None:
    """Refuse NaN/inf live or EMA weights on any rank; every rank raises the first message (collective)."""
    source, problem = f"checkpoint {run.ckpt.folder(step)}", ""
    try:
        check_finite(run.model.named_parameters(), source=source, kind="model weight")
        check_finite(run.ema.shadow.items(), source=source, kind="ema weight")
    except NonFiniteWeightsError as err:
        problem = str(err)
    first = first_problem(problem or None)
    if first is not None:
        raise NonFiniteWeightsError(first)


def first_problem(problem: str | None) -> str | None:
    """The first rank's problem (in rank order) on every rank, so all ranks take the same branch (collective)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return problem
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


def _is_rng_state(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        return False
    try:
        torch.Generator().set_state(value)
    except RuntimeError:
        return False
    return True


def _rng_problem(rng: Any, path: Path) -> str | None:
    if not isinstance(rng, dict) or not _is_rng_state(rng.get("torch")):
        return f"{path}: rng.torch is not a torch RNG state"
    try:
        random.Random().setstate(rng.get("python"))
    except (TypeError, ValueError):
        return f"{path}: rng.python is not a Python RNG state"
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8):
        return f"{path}: rng.cuda is not a CUDA RNG state"
    return None


def _ema_problem(run: Run, ema: Any, path: Path) -> str | None:
    """Format 1: the rank file's EMA shadows against this model's."""
    shadow = ema.get("shadow") if isinstance(ema, dict) else None
    if not isinstance(shadow, dict):
        return f"{path}: ema has no shadow weights"
    for name, mine in run.ema.shadow.items():
        saved = shadow.get(name)
        if not isinstance(saved, torch.Tensor) or saved.shape != mine.shape:
            return f"{path}: ema.shadow[{name!r}] is missing or has another shape"
    return None


def _state_problem(run: Run, sd: Any, step: int, path: Path, format_2: bool) -> str | None:
    """What in a rank file would fail or silently mislead a resume (naming the entry), or None."""
    if not isinstance(sd, dict) or not {"train_state", "loader", "rng"} <= sd.keys() or not (format_2 or "ema" in sd):
        return f"{path} is not a rank file of this trainer"
    fields = {f.name for f in dataclasses.fields(TrainState)}
    ts = sd["train_state"]
    if not isinstance(ts, dict) or not set(ts) <= fields or not all(type(v) is int for v in ts.values()):
        return f"{path}: train_state is malformed ({ts!r:.80})"
    if ts.get("step") != step:
        return f"{path}: train_state.step is {ts.get('step')!r}, but the folder is step {step}"
    problem = None if sd["rng"] is None else _rng_problem(sd["rng"], path)  # None: another layout's file
    return problem or (None if format_2 else _ema_problem(run, sd["ema"], path))


def _read_checkpoint(run: Run, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """This rank's state of checkpoint `step` if its files and entries are sound, else what is wrong.

    Raises:
        LayoutMismatch: the checkpoint cannot be resumed on this layout (not damage: no fallback).
    """
    ckpt = run.ckpt
    problem = ckpt.check(step)
    if problem is not None:
        return None, problem
    path = ckpt.state_file(step)
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        sd = ckpt.load(step)
    except LayoutMismatch:
        raise  # not damage: no fallback hides it
    except Exception as err:  # noqa: BLE001  (zip, EOF, unpickling errors, a refused file)
        first_line = str(err).splitlines()[0] if str(err) else ""
        return None, f"{path} is unreadable ({type(err).__name__}: {first_line})"
    return sd, _state_problem(run, sd, step, path, ckpt.meta(step).get("format", 1) >= 2)


def resume(run: Run) -> int | None:
    """Load the latest checkpoint; a damaged one falls back to the one saved before it (collective).

    Returns:
        The step resumed from, or None when the run has no checkpoint.

    Raises:
        ValueError: checkpoints exist but none is loadable (each named with its damaged file).
    """
    damaged = []
    for step in run.ckpt.resume_candidates():
        refused = None
        try:
            sd, problem = _read_checkpoint(run, step)
        except LayoutMismatch as err:  # raised on every rank below, after the collective
            sd, problem, refused = None, None, str(err)
        refused = first_problem(refused)
        if refused is not None:
            raise LayoutMismatch(refused)
        problem = first_problem(problem)
        if problem is None:
            load_checkpoint(run, step, sd)
            return step
        log.warning("checkpoint %s is damaged: %s; trying the one saved before it", run.ckpt.folder(step), problem)
        damaged.append(problem)
    if damaged:
        raise ValueError(f"no loadable checkpoint in {run.ckpt.root}: {'; '.join(damaged)}. Repair or move the "
                         f"damaged folders away (moving all of them starts the run afresh)")
    return None
