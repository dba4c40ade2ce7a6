"""Test-set NELBO / perplexity of a run's checkpoint (method.md §3.7), fingerprinted.

What is computed, per token over a whole shard split (not a few batches):

    NELBO = (1 / (D · #tokens)) · sum_{draws d} sum_{sequences n} sum_{masked valid i} (L_main + L_velocity)

- the forward scheduler reads the clean x, the reverse scheduler z_t; ``L_velocity`` is ALWAYS
  included (the value is an upper bound on the NLL only with it; P3's evaluate.py drops it);
- D = ``t_draws`` times per sequence, antithetic over the whole eval set: the N·D (sequence,
  draw) rows get global indices j = d·N + n and t_j = ((u_j + j) / (N·D)) mod 1 (MDLM's
  low-discrepancy sampler with the eval set as the "batch"), so each sequence sees D evenly
  spread times and the set as a whole one stratified grid. One z_t per draw (K = 2 for LoMDM,
  whose two corruptions at the same t are averaged, as in training);
- the noise is a function of (seed, ``EVAL_NOISE_STEP``, j) only: the number does not depend on
  TP/PP/DP, micro-batch size or the number of processes, and two checkpoints are compared with
  the same noise (common random numbers);
- pad tokens are never masked and never counted; EMA weights by default.

Every result carries a fingerprint (checkpoint step and sha256 of its files, data manifest
fingerprint, t draws, weights, seed, precision, layout) so a number can be traced to what made it.

The run is opened read-only through ``build_run`` (``open_run``): its ``config.yaml`` and
``metrics.jsonl`` are left untouched and no tracker run is started. Launch under ``torchrun``
exactly like training (the config's ``parallel.*``, overridable with dotted keys); every rank
returns the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.config import Config, load_config
from megatron_lomdm.config.load import replace
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import check_tokenizer_compat, read_manifest
from megatron_lomdm.models.diffusion_lm import DIAG_KEYS
from megatron_lomdm.training.step import order_stats
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)

# The "step" of the evaluation noise: negative, so it never coincides with a training step, and
# away from the few negative steps `Run.evaluate` (in-training validation) uses.
EVAL_NOISE_STEP = -(1 << 24)
# Sums carried from the loss reports (the order diagnostics are optional).
_SUM_KEYS = ("nelbo", "main", "velocity", "num_tokens", *DIAG_KEYS)


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

    Returns:
        The ``training.build.Run``; ``run.state.step`` is the checkpoint's step.

    Raises:
        RunNotReady, ValueError: see ``load_run_config`` / ``resolve_checkpoint``; the overrides
            change the family's checkpoint keys (``check_trained_family``); non-finite weights.
    """
    from megatron_lomdm.training.build import build_run, check_trained_family

    cfg = load_run_config(run_dir, overrides)
    cfg = replace(cfg, tracking={"enabled": False})
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


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(folder: str | Path) -> dict[str, Any]:
    """sha256 over every file of a checkpoint folder (relative path + content hash, sorted).

    Returns:
        ``{"step", "folder", "sha256", "num_files", "num_bytes"}``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    total = 0
    for path in files:
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{_sha256_file(path)}\n".encode())
        total += path.stat().st_size
    step = int(folder.name[5:]) if folder.name.startswith("step_") and folder.name[5:].isdigit() else None
    return {"step": step, "folder": str(folder.resolve()), "sha256": digest.hexdigest(), "num_files": len(files),
            "num_bytes": total}


def _code_version() -> dict[str, Any]:
    import megatron_lomdm

    out: dict[str, Any] = {"megatron_lomdm": megatron_lomdm.__version__, "torch": torch.__version__}
    try:
        import megatron.core

        out["megatron_core"] = getattr(megatron.core, "__version__", None)
    except Exception:  # noqa: BLE001
        pass
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        out["git_commit"] = ref
    except OSError:
        pass
    return out


def run_fingerprint(run: Any, *, use_ema: bool, hash_checkpoint: bool = True) -> dict[str, Any]:
    """What identifies a run's model at its loaded checkpoint (shared by evaluation and sampling).

    Collective-free; the checkpoint hash is computed on global rank 0 only (None elsewhere) and
    is spread by the caller (``broadcast_object``).
    """
    cfg, info = run.cfg, run.info
    step = run.state.step
    ckpt = {"step": step, "folder": str(run.ckpt.folder(step).resolve())}
    if hash_checkpoint and info.rank == 0:
        ckpt = checkpoint_fingerprint(run.ckpt.folder(step))
    d, m = cfg.diffusion, cfg.model
    manifest = read_manifest(cfg.data.train)
    return {
        "run_dir": str(Path(cfg.run.dir).resolve()),
        "checkpoint": ckpt,
        "weights": "ema" if use_ema else "live",
        "ema_decay": cfg.optim.ema_decay,
        "model": {"family": d.name, "c1": d.c1, "c2": d.c2, "block_size": d.block_size, "eps_t": d.eps_t,
                  "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                  "vocab_size": m.vocab_size, "mask_id": m.mask_id, "seq_length": m.seq_length},
        "train_data": {"fingerprint": manifest.fingerprint("train"),
                       "tokenizer_sha256": manifest.tokenizer.get("tokenizer_json_sha256")},
        "precision": cfg.train.precision,
        "layout": {"tp": info.tp, "pp": info.pp, "dp": info.dp, "world_size": info.world_size,
                   "backend": cfg.parallel.backend, "device": info.device.type},
        "code": _code_version(),
    }


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of global rank ``src`` on every rank (identity without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-token NELBO and friends over an eval set; ``to_dict`` is the CLI's JSON."""

    nelbo: float
    main: float
    velocity: float
    num_tokens: int
    num_sequences: int
    t_draws: int
    seconds: float
    order: dict[str, float] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(self.nelbo)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nelbo": self.nelbo,
            "ppl": self.ppl,
            "bits_per_token": self.nelbo / math.log(2.0),
            "main": self.main,
            "velocity": self.velocity,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "t_draws": self.t_draws,
            **self.order,
            "seconds": self.seconds,
            "tokens_per_s": self.num_tokens * self.t_draws / max(self.seconds, 1e-9),
            "fingerprint": self.fingerprint,
        }


def eval_rows(num_sequences: int, t_draws: int, *, dp_rank: int, dp_size: int,
              micro_batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This DP rank's micro-batches of (sequence index, global draw index) rows.

    Rows j = d·N + n (draw-major) are cut into equal contiguous DP slices, padded with filler rows
    (sequence index -1: no valid token, no contribution) so every rank runs the same number of
    full micro-batches, as pipeline schedules need.

    Returns:
        ``[(seq_B, index_B), ...]``, int64 arrays of length ``micro_batch_size``.
    """
    total = num_sequences * t_draws
    per_rank = -(-total // (dp_size * micro_batch_size)) * micro_batch_size
    rows = np.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank, dtype=np.int64)
    real = rows < total
    seq = np.where(real, rows % max(num_sequences, 1), -1)
    index = np.where(real, rows, 0)
    return [(seq[s:s + micro_batch_size], index[s:s + micro_batch_size])
            for s in range(0, per_rank, micro_batch_size)]


def _batches(reader: ShardLoader, rows: list[tuple[np.ndarray, np.ndarray]], limit_n: int) -> Iterator[dict]:
    L = reader.seq_length
    for seq_B, index_B in rows:
        tokens, lengths = reader.read_samples(seq_B)
        valid = np.arange(L)[None, :] < lengths[:, None]
        valid &= (seq_B >= 0)[:, None] & (seq_B < limit_n)[:, None]
        yield {"tokens": torch.from_numpy(tokens), "valid": torch.from_numpy(valid),
               "sample_index": torch.from_numpy(index_B)}


def _sum_reports(reports: list[dict], device: torch.device) -> dict[str, float]:
    """Sum the reports of this rank, over DP, and hand the last pipeline stage's sums to all stages."""
    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=device)
    for r in reports:
        sums += torch.stack([torch.as_tensor(r[k], dtype=torch.float64).to(device).reshape(()) if k in r
                             else torch.zeros((), dtype=torch.float64, device=device) for k in _SUM_KEYS])
    if dist.is_initialized():
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(_SUM_KEYS, sums.tolist()))


def _order_stats(s: dict[str, float]) -> dict[str, float]:
    """Mean/std of the forward exponent (A·t) over tokens and the mean within-sequence correlation
    of A·t with the backbone's confidence in the true token at masked positions ("Figure 4"):
    the training statistics (`training.step.order_stats`) over the whole eval set."""
    return order_stats(s) if s["exp_n"] > 0 else {}


def resolve_eval_data(run: Any, data: str | Path | None, split: str | None) -> tuple[str, str]:
    """The shard folder and split to evaluate on; checks it against the model's tokenizer.

    Default: the run's validation data (``data.valid``, else ``data.train``'s valid split).
    ``split`` defaults to ``valid`` where the folder has one, else ``train``.

    Raises:
        ValueError: missing split, or data made with another tokenizer / sequence length.
    """
    cfg = run.cfg
    path = str(data) if data is not None else run.valid_path  # a URL or pipe: spec must not go through Path
    manifest = read_manifest(path)
    if split is None:
        split = run.valid_split if data is None else ("valid" if "valid" in manifest["splits"] else "train")
    manifest.split(split)  # raises with the available splits
    check_tokenizer_compat(manifest, vocab_size=cfg.model.vocab_size, mask_id=cfg.model.mask_id,
                           seq_length=cfg.model.seq_length)
    ours = read_manifest(cfg.data.train).tokenizer.get("tokenizer_json_sha256")
    theirs = manifest.tokenizer.get("tokenizer_json_sha256")
    if ours and theirs and ours != theirs:
        raise ValueError(f"{manifest.path} was tokenized with tokenizer sha256 {theirs[:16]}... but the model "
                         f"was trained with {ours[:16]}... ({cfg.data.train}); re-tokenize it with the "
                         "run's tokenizer")
    return path, split


@torch.no_grad()
def evaluate_run(run: Any, *, data: str | Path | None = None, split: str | None = None, t_draws: int = 1,
                 use_ema: bool = True, micro_batch_size: int | None = None, seed: int | None = None,
                 max_sequences: int | None = None, microbatches_per_call: int = 16,
                 hash_checkpoint: bool = True) -> EvalResult:
    """NELBO / PPL of ``run``'s loaded checkpoint over a whole shard split (collective).

    Args:
        run: from ``open_run``.
        data: shard folder; None = the run's validation data.
        split: split of ``data``; see ``resolve_eval_data``.
        t_draws: times (one z_t each) per sequence, >= 1; antithetic over the whole set.
        use_ema: EMA weights (default) or the live weights.
        micro_batch_size: rows per micro-batch; default ``train.micro_batch_size``.
        seed: noise seed; default ``train.seed``.
        max_sequences: evaluate only the first N sequences of the split.
        microbatches_per_call: micro-batches handed to the engine at once (memory bound).
        hash_checkpoint: sha256 the checkpoint files for the fingerprint.

    Returns:
        The same ``EvalResult`` on every rank.
    """
    if t_draws < 1:
        raise ValueError(f"t_draws must be >= 1, got {t_draws}")
    cfg, info = run.cfg, run.info
    path, split = resolve_eval_data(run, data, split)
    mbs = micro_batch_size or cfg.train.micro_batch_size
    reader = ShardLoader(path, split=split, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                         seed=0, shuffle=False, drop_last=False, num_epochs=1)
    n = reader.num_samples if max_sequences is None else min(max_sequences, reader.num_samples)
    if n < 1:
        raise ValueError(f"split {split!r} of {path} has no sequences to evaluate")
    seed = cfg.train.seed if seed is None else int(seed)
    rows = eval_rows(n, t_draws, dp_rank=info.dp_rank, dp_size=info.dp, micro_batch_size=mbs)

    model = run.model
    if not (hasattr(model, "global_batch_size") and hasattr(model, "seed")):
        raise AttributeError("DiffusionLM no longer exposes global_batch_size/seed; update evaluate_run")
    saved = (model.global_batch_size, model.seed)
    model.global_batch_size, model.seed = n * t_draws, seed  # the antithetic grid spans the eval set
    model.eval()
    reports: list[dict] = []
    t0 = time.time()
    try:
        with weights(run, use_ema):
            for start in range(0, len(rows), microbatches_per_call):
                chunk = rows[start:start + microbatches_per_call]
                reports += run.engine.forward_backward(
                    _batches(reader, chunk, n), step=EVAL_NOISE_STEP, num_microbatches=len(chunk),
                    seq_length=cfg.model.seq_length, micro_batch_size=mbs, device=run.device, forward_only=True)
    finally:
        model.global_batch_size, model.seed = saved
        reader.close()
    seconds = time.time() - t0
    sums = _sum_reports(reports, run.device)
    draws_tokens = max(sums["num_tokens"], 1.0)
    fingerprint = run_fingerprint(run, use_ema=use_ema, hash_checkpoint=hash_checkpoint)
    manifest = reader.manifest
    where = str(Path(path).resolve()) if Path(path).exists() else str(path)
    fingerprint["data"] = {"path": where, "split": split, "fingerprint": reader.fingerprint,
                           "layout": manifest.layout, "seq_length": manifest.seq_length,
                           "num_sequences": n, "max_sequences": max_sequences,
                           "tokenizer_sha256": manifest.tokenizer.get("tokenizer_json_sha256")}
    fingerprint["protocol"] = {"t_draws": t_draws, "time_sampler": "antithetic over sequences x draws",
                               "eps_t": model.eps_t, "seed": seed, "noise_step": EVAL_NOISE_STEP,  # 0: slot families
                               "corruptions_per_draw": model.family.num_corruptions, "velocity_term": True,
                               "pads": "excluded", "micro_batch_size": mbs}
    fingerprint = broadcast_object(fingerprint)  # rank 0 holds the checkpoint hash
    result = EvalResult(
        nelbo=sums["nelbo"] / draws_tokens, main=sums["main"] / draws_tokens,
        velocity=sums["velocity"] / draws_tokens, num_tokens=int(round(sums["num_tokens"] / t_draws)),
        num_sequences=n, t_draws=t_draws, seconds=seconds, order=_order_stats(sums), fingerprint=fingerprint)
    if info.rank == 0:
        log.info("eval %s[%s] at step %d (%s weights): nelbo=%.5f ppl=%.4g velocity=%.4g over %d tokens x %d draws",
                 path, split, run.state.step, "EMA" if use_ema else "live", result.nelbo, result.ppl,
                 result.velocity, result.num_tokens, t_draws)
    return result


def read_eval_sequences(run: Any, *, data: str | Path | None = None, split: str | None = None,
                        max_sequences: int | None = None) -> list[list[int]]:
    """The token ids (pads dropped) of the eval split ``evaluate_run`` would use, in stored order."""
    path, split = resolve_eval_data(run, data, split)
    reader = ShardLoader(path, split=split, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                         seed=0, shuffle=False, drop_last=False, num_epochs=1)
    try:
        n = reader.num_samples if max_sequences is None else min(max_sequences, reader.num_samples)
        tokens, lengths = reader.read_samples(np.arange(n, dtype=np.int64))
    finally:
        reader.close()
    return [row[:length].tolist() for row, length in zip(tokens, lengths)]


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
