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

The run is opened read-only through ``apps.run.open_run``: its ``config.yaml`` and
``metrics.jsonl`` are left untouched and no tracker run is started. Launch under ``torchrun``
exactly like training (the config's ``parallel.*``, overridable with dotted keys); every rank
returns the same result. ``main`` is ``tools/evaluate.py`` after its flags are parsed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lomdm.apps.fingerprint import run_fingerprint
from megatron_lomdm.apps.run import RunNotReady, broadcast_object, close_run, is_rank0, open_run, weights
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import check_tokenizer_compat, read_manifest
from megatron_lomdm.models.diffusion_lm import DIAG_KEYS
from megatron_lomdm.training.step import forward_backward, order_stats
from megatron_lomdm.utils.logging import get_logger
from megatron_lomdm.utils.progress import progress
from megatron_lomdm.utils.proc import quick_exit_gc

log = get_logger(__name__)

# The "step" of the evaluation noise: negative, so it never coincides with a training step, and
# away from the few negative steps `Run.evaluate` (in-training validation) uses.
EVAL_NOISE_STEP = -(1 << 24)
# Sums carried from the loss reports (the order diagnostics are optional).
_SUM_KEYS = ("nelbo", "main", "velocity", "num_tokens", *DIAG_KEYS)


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
        tokens, lengths, cond = reader.read_rows(seq_B)  # cond: prompts, so the NELBO is the response's
        valid = np.arange(L)[None, :] < lengths[:, None]
        valid &= (seq_B >= 0)[:, None] & (seq_B < limit_n)[:, None]
        yield {"tokens": torch.from_numpy(tokens), "valid": torch.from_numpy(valid),
               "cond": torch.from_numpy(cond & valid), "sample_index": torch.from_numpy(index_B)}


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
            starts = range(0, len(rows), microbatches_per_call)
            for start in progress(starts, total=len(starts), desc="evaluating", unit="call"):
                chunk = rows[start:start + microbatches_per_call]
                reports += forward_backward(
                    run.engine, _batches(reader, chunk, n), step=EVAL_NOISE_STEP, num_microbatches=len(chunk),
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


def read_eval_prompts(run: Any, *, max_prompts: int | None = None) -> list[list[int]]:
    """The given (prompt) tokens of the conditioned rows of the eval split, in stored order.

    Each prompt runs up to the row's last given position; a position to generate before it (an
    in-place row, e.g. a Sudoku's blanks) is [MASK] (``apps.generate.prompt_batch`` keeps only the
    others fixed). For prefix-conditioned rows this is the given prefix.

    Raises:
        ValueError: the split has no conditioned row (its shards carry no prompts).
    """
    path, split = resolve_eval_data(run, None, None)
    reader = ShardLoader(path, split=split, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                         seed=0, shuffle=False, drop_last=False, num_epochs=1)
    try:
        tokens, _, cond = reader.read_rows(np.arange(reader.num_samples, dtype=np.int64))
    finally:
        reader.close()
    mask_id = run.cfg.model.mask_id
    prompts = [np.where(given, row, mask_id)[: int(np.flatnonzero(given)[-1]) + 1].tolist()
               for row, given in zip(tokens, cond) if given.any()]
    if not prompts:
        raise ValueError(f"split {split!r} of {path} has no prompts (not written with --prompt-key)")
    return prompts[:max_prompts]


# --------------------------------------------------------------------------------------------
# The command line (tools/evaluate.py)
# --------------------------------------------------------------------------------------------

EXIT_BAD_INPUT = 2


def exact_ar(run: Any, *, data: str | None, split: str | None, max_sequences: int | None,
             use_ema: bool) -> dict[str, Any]:
    """Exact AR NLL per token of the eval set under an ARM run (same sequences as the NELBO)."""
    from megatron_lomdm.apps.judges import ar_logprobs

    seqs = read_eval_sequences(run, data=data, split=split, max_sequences=max_sequences)
    rows = ar_logprobs(run, seqs, use_ema=use_ema)
    count = sum(len(r) for r in rows)
    nll = -sum(float(r.sum()) for r in rows) / max(count, 1)
    return {"nll": nll, "ppl": math.exp(nll), "num_tokens": count}


def write_scores(run: Any, jsonl: str, *, out: str | None, use_ema: bool) -> None:
    """``--score-jsonl``: one JSON line of exact AR log-probs per input line, to ``out`` or stdout (rank 0)."""
    from megatron_lomdm.apps.judges import score_jsonl

    lines = score_jsonl(run, jsonl, use_ema=use_ema)
    if is_rank0():
        text = "".join(json.dumps(line) + "\n" for line in lines)
        if out:
            Path(out).write_text(text)
        else:
            sys.stdout.write(text)


def report(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON object ``tools/evaluate.py`` prints (``EvalResult.to_dict`` + ``exact_ar``)."""
    result = evaluate_run(run, data=args.data, split=args.split, t_draws=args.t_draws, use_ema=args.ema,
                          micro_batch_size=args.micro_batch_size, seed=args.seed,
                          max_sequences=args.max_sequences, hash_checkpoint=not args.no_hash)
    out = result.to_dict()
    if args.exact_ar:
        out["exact_ar"] = exact_ar(run, data=args.data, split=args.split, max_sequences=args.max_sequences,
                                   use_ema=args.ema)
    return out


def main(args: argparse.Namespace) -> int:
    """``tools/evaluate.py`` with its parsed flags; returns the exit code (0 done, 2 bad input)."""
    quick_exit_gc()
    try:
        run = open_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        if args.score_jsonl is not None:
            write_scores(run, args.score_jsonl, out=args.score_out, use_ema=args.ema)
            close_run()
            return 0
        result = report(run, args)
    except (RunNotReady, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"evaluate.py: {err}\n")
        return EXIT_BAD_INPUT
    if is_rank0():
        text = json.dumps(result, indent=None)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    close_run()
    return 0
