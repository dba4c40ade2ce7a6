"""One optimizer step's forward/backward: the only home of both LoMDM phases, for every backend.

LoMDM is two-phase (method.md §3.4): phase one runs the clean sequence through the backbone
without gradient and the forward scheduler head on it (graph to phi kept); phase two runs the K·B
corruptions forward and backward. `forward_backward` has one backend branch:

* megatron (`engine.pipeline_schedule`): megatron-core's schedule runs both phases for any
  pipeline layout. `forward_step(..., data_iterator, model) -> (output, partial(loss_func, ...))`
  is its contract; `phase_one` pipelines the clean pass and leaves the forward-head logits on every
  stage. Losses are token sums (`config.calculate_per_token_loss=True`); after the backward,
  megatron's `finalize_model_grads` divides every gradient by the number of valid tokens of the
  whole global batch (all micro-batches, all data-parallel ranks), which makes gradient
  accumulation and data parallelism exact reformulations of one big batch.
* DeepSpeed: the engine wraps `MicroBatchStep` (both phases of one micro-batch in one forward, so
  ZeRO-3's gathers see every parameter use); the step calls it per micro-batch and hands the
  token-sum loss and the global token count to `engine.backward`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

from megatron_lomdm.distributed.engine import Engine, unwrap
from megatron_lomdm.losses.grad_snr import SNR_KEYS
from megatron_lomdm.losses.objective import LossTerms
from megatron_lomdm.models.diffusion_lm import DIAG_KEYS, free_positions

REPORT_KEYS = ("nelbo", "main", "velocity", "rloo", "surrogate")
# Report sums whose statistics the loop averages over a whole log interval (`IntervalSums`).
INTERVAL_KEYS = ("corr_sum", "corr_seqs", *SNR_KEYS)


def loss_func(terms: LossTerms, diag: dict[str, torch.Tensor], output_tensor: torch.Tensor):
    """megatron-core loss contract: (loss sum to backprop, token count, report of detached sums)."""
    report = {key: getattr(terms, key).detach().double().clone() for key in REPORT_KEYS}
    num_tokens = torch.as_tensor(terms.num_tokens, dtype=torch.int).reshape(())
    report["num_tokens"] = num_tokens.double()
    report.update(diag)
    return output_tensor, num_tokens, report


def _batch(data_iterator: Iterator[tuple[int, dict]], device: torch.device) -> tuple[int, torch.Tensor, ...]:
    """`(j, tokens_BL, valid_BL, index_B, cond_BL)` on `device`; `cond_BL` is None for batches
    without a conditioning mask (`data.loader`: ``cond``)."""
    j, batch = next(data_iterator)
    cond = batch.get("cond")
    return (j, batch["tokens"].to(device, non_blocking=True), batch["valid"].to(device, non_blocking=True),
            batch["sample_index"].to(device, non_blocking=True),
            None if cond is None else cond.to(device, non_blocking=True))


def _off_last_stage(output_tensor: torch.Tensor):
    raise AssertionError("megatron-core calls the loss function on the last pipeline stage only")


def forward_step(step: int, device: torch.device, fwd_logits: list[torch.Tensor] | None,
                 data_iterator: Iterator[tuple[int, dict]], model: torch.nn.Module):
    """Phase two, one micro-batch: forward the corruptions; the loss closes it on the last stage."""
    j, tokens_BL, valid_BL, index_B, cond_BL = _batch(data_iterator, device)
    out = model(tokens_BL, valid_BL, index_B, step, fwd_logits_BL=None if fwd_logits is None else fwd_logits[j],
                cond_BL=cond_BL)
    if isinstance(out, tuple):
        terms, diag = out
        return terms.surrogate, partial(loss_func, terms, diag)
    return out, _off_last_stage


def _keep_head_logits(store: dict[int, torch.Tensor], j: int, model: torch.nn.Module, valid_BL: torch.Tensor,
                      free_BL: torch.Tensor, hidden_BLD: torch.Tensor):
    with torch.enable_grad():  # phase one runs without grad except for g_phi, whose graph phase two needs
        store[j] = unwrap(model).forward_head_logits(hidden_BLD, valid_BL, free_BL)
    zero = torch.zeros((), device=hidden_BLD.device)
    return zero, torch.zeros((), dtype=torch.int), {}


def clean_forward_step(device: torch.device, store: dict[int, torch.Tensor],
                       data_iterator: Iterator[tuple[int, dict]], model: torch.nn.Module):
    """Phase one, one micro-batch: clean x through this stage; the forward head on the last one."""
    j, tokens_BL, valid_BL, _, cond_BL = _batch(data_iterator, device)
    out = unwrap(model).clean_features(tokens_BL, valid_BL)
    return out, partial(_keep_head_logits, store, j, model, valid_BL, free_positions(valid_BL, cond_BL))


def clean_head_logits(model: nn.Module, tokens_BL: torch.Tensor, valid_BL: torch.Tensor,
                      cond_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Phase one of one micro-batch without a pipeline: f(x) of the clean sequence without grad
    (stop-grad, method.md §3.1), then the forward head's logits with their graph to phi."""
    with torch.no_grad():
        hidden_x_BLD = model.clean_features(tokens_BL, valid_BL)
    return model.forward_head_logits(hidden_x_BLD, valid_BL, free_positions(valid_BL, cond_BL))


class MicroBatchStep(nn.Module):
    """Both LoMDM phases of one micro-batch as one module: what the DeepSpeed engine wraps.

    Returns `(surrogate, terms, diag)`: the surrogate first, so that DeepSpeed attaches its
    backward hooks to it (see distributed/deepspeed_engine.py).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens_BL: torch.Tensor, valid_BL: torch.Tensor, index_B: torch.Tensor, step: int,
                cond_BL: torch.Tensor | None = None):
        model = self.model
        fwd_logits_BL = None
        if model.family.needs_clean_features:
            fwd_logits_BL = clean_head_logits(model, tokens_BL, valid_BL, cond_BL)
        terms, diag = model(tokens_BL, valid_BL, index_B, step, fwd_logits_BL=fwd_logits_BL, cond_BL=cond_BL)
        return terms.surrogate, terms, diag


def sync_family_params(chunks: list[torch.nn.Module]) -> None:
    """Copy the family's learnable parameters (GenMD4 exponents) from the last pipeline stage's last
    chunk into every chunk's copy on every stage."""
    trained = list(chunks[-1].family.parameters())
    if not trained or (len(chunks) == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        return
    last = parallel_state.is_pipeline_last_stage()
    for chunk in chunks:
        for p, src in zip(chunk.family.parameters(), trained, strict=True):
            if last and p is not src:
                p.data.copy_(src.data)
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(p.data, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())


def _iterators(batches: list[dict], chunks: list[torch.nn.Module]):
    """The schedule's data iterator: one over the batches, or one per chunk when interleaved
    (every chunk reads each micro-batch: the tokens' shape, their masks)."""
    if len(chunks) == 1:
        return iter(enumerate(batches))
    return [iter(enumerate(batches)) for _ in chunks]


def phase_one(model: torch.nn.Module | list[torch.nn.Module], batches: list[dict], *, seq_length: int,
              micro_batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Forward-head logits of every micro-batch, on every pipeline stage.

    The clean pass is pipelined like any forward-only pass (`model`: the model, or the rank's list
    of chunks when interleaved). On the last stage the logits keep their graph to phi; their values
    are broadcast to the other stages, which draw the masks.
    """
    chunks = model if isinstance(model, list) else [model]
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad():  # stop-grad: f(x) of the clean sequence (method.md §3.1)
        get_forward_backward_func()(
            forward_step_func=partial(clean_forward_step, device, store), data_iterator=_iterators(batches, chunks),
            model=chunks, num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return [store[j] for j in range(len(batches))]
    last = parallel_state.is_pipeline_last_stage()
    shape = (len(batches), micro_batch_size, seq_length)
    values = torch.stack([store[j].detach() for j in range(len(batches))]) if last else torch.empty(shape, device=device)
    dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return [store[j] for j in range(len(batches))] if last else list(values.unbind(0))


@dataclass
class StepReport:
    """Per-token values of one optimizer step, reduced over micro-batches and DP ranks."""

    values: dict[str, float]
    num_tokens: int
    sums: dict[str, float] = field(default_factory=dict)  # the reduced sums of every report key


def interval_stats(sums: dict[str, float]) -> dict[str, float]:
    """Statistics of the `INTERVAL_KEYS` sums (of one step, a log interval or an eval set).

    ``velocity_confidence_corr``: the mean over corrupted sequences of the within-sequence
    correlation of the scaled forward velocity with confidence
    (`models.diffusion_lm.order_diagnostics`); 0 when no sequence qualifies (e.g. while every
    exponent is equal). ``order_grad_snr``: S / N of the forward head's logit gradient
    (`losses.grad_snr`); only where it was computed (LoMDM training, log steps).
    """
    seqs = sums["corr_seqs"]
    out = {"velocity_confidence_corr": sums["corr_sum"] / seqs if seqs > 0 else 0.0}
    if sums["snr_seqs"] > 0:
        out["order_grad_snr"] = sums["snr_signal"] / sums["snr_noise"] if sums["snr_noise"] > 0 else 0.0
    return out


def order_stats(sums: dict[str, float]) -> dict[str, float]:
    """Mean/std of the scaled forward velocity, plus `interval_stats`."""
    n = max(sums["exp_n"], 1.0)
    mean = sums["exp_sum"] / n
    std = max(sums["exp_sq"] / n - mean * mean, 0.0) ** 0.5
    return {"exponent_mean": mean, "exponent_std": std, **interval_stats(sums)}


class IntervalSums:
    """The `INTERVAL_KEYS` sums of the steps since the last log line, so that the logged
    correlation and SNR describe the whole interval rather than its last step."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(INTERVAL_KEYS, 0.0)

    def add(self, report: StepReport) -> None:
        """Add one step's sums (left out if any is non-finite: a skipped step)."""
        if all(math.isfinite(report.sums[k]) for k in INTERVAL_KEYS):
            for k in INTERVAL_KEYS:
                self.sums[k] += report.sums[k]

    def pop(self) -> dict[str, float]:
        """The interval's statistics; the next interval starts empty."""
        out = interval_stats(self.sums)
        self.sums = dict.fromkeys(INTERVAL_KEYS, 0.0)
        return out


def reduce_reports(reports: list[dict], device: torch.device) -> StepReport:
    """Sum the micro-batch reports, all-reduce over DP, share from the last pipeline stage, and
    derive per-token values (every rank returns the same numbers)."""
    keys = (*REPORT_KEYS, "num_tokens", *DIAG_KEYS)
    sums_K = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for r in reports:
        sums_K += torch.stack([r[k].to(device, torch.float64) for k in keys])
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums_K, group=parallel_state.get_data_parallel_group())
    if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(sums_K, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    sums = dict(zip(keys, sums_K.tolist()))
    ntok = max(sums["num_tokens"], 1.0)
    values = {k: sums[k] / ntok for k in REPORT_KEYS}
    values.update(order_stats(sums))
    return StepReport(values=values, num_tokens=int(sums["num_tokens"]), sums=sums)


def forward_backward(engine: Engine, data_iterator: Iterator[dict], *, step: int, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, device: torch.device,
                     forward_only: bool = False) -> list[dict[str, Any]]:
    """Forward (and backward) `num_microbatches` micro-batches of `data_iterator`; their reports.

    Under PP only the last stage gets reports (an empty list elsewhere).
    """
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    if not engine.pipeline_schedule:
        return _each_micro_batch(engine, batches, step=step, device=device, forward_only=forward_only)
    chunks = engine.model_chunks  # DDP-wrapped DiffusionLM(s); the engine set finalize_model_grads_func
    sync_family_params([unwrap(c) for c in chunks])
    family = unwrap(chunks[-1]).family
    fwd_logits = None
    if family.needs_clean_features:
        fwd_logits = phase_one(chunks, batches, seq_length=seq_length, micro_batch_size=micro_batch_size, device=device)
    num_corruptions = family.num_corruptions
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, step, device, fwd_logits),
        data_iterator=_iterators(batches, chunks),
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size * num_corruptions,  # the pipeline carries K corruptions per sequence
        forward_only=forward_only,
    )


def _free_tokens(batch: dict) -> int:
    """The batch's positions to generate: valid and not conditioned."""
    cond = batch.get("cond")
    return int(batch["valid"].sum()) if cond is None else int((batch["valid"] & ~cond.bool()).sum())


def global_valid_tokens(batches: list[dict], device: torch.device) -> int:
    """Tokens to generate (valid, not conditioned) of these micro-batches summed over the
    data-parallel ranks (one all-reduce): the loss's divisor."""
    count = torch.tensor([sum(_free_tokens(b) for b in batches)], dtype=torch.float64, device=device)
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count.item())


def _each_micro_batch(engine: Engine, batches: list[dict], *, step: int, device: torch.device,
                      forward_only: bool) -> list[dict[str, Any]]:
    """Engines without a pipeline schedule: `engine.module` runs `MicroBatchStep` on each micro-batch."""
    global_tokens = 0 if forward_only else global_valid_tokens(batches, device)
    reports = []
    for j, batch in enumerate(batches):
        _, tokens_BL, valid_BL, index_B, cond_BL = _batch(iter([(j, batch)]), device)
        surrogate, terms, diag = engine.module(tokens_BL, valid_BL, index_B, step, cond_BL)
        loss, num_tokens, report = loss_func(terms, diag, surrogate)
        if int(num_tokens) != _free_tokens(batch):
            raise AssertionError(f"the loss counted {int(num_tokens)} tokens of {_free_tokens(batch)} free positions")
        if not forward_only:
            engine.backward(loss, global_tokens=global_tokens, last=j == len(batches) - 1)
        reports.append(report)
    return reports
