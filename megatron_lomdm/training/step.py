"""One optimizer step's forward/backward through megatron-core's schedules.

`forward_step(step, data_iterator, model) -> (output, partial(loss_func, terms))` is the
megatron-core contract, so the same code runs under `get_forward_backward_func()` for any
pipeline layout. Losses are token sums (`config.calculate_per_token_loss=True`); after the
backward, megatron's `finalize_model_grads` divides every gradient by the number of valid tokens
of the whole global batch (all micro-batches, all data-parallel ranks), which makes gradient
accumulation and data parallelism exact reformulations of one big batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lomdm.losses.objective import LossTerms

REPORT_KEYS = ("nelbo", "main", "velocity", "rloo", "surrogate")


def loss_func(terms: LossTerms, diag: dict[str, torch.Tensor], output_tensor: torch.Tensor):
    """megatron-core loss contract: (loss sum to backprop, token count, report of detached sums)."""
    report = {key: getattr(terms, key).detach().double().clone() for key in REPORT_KEYS}
    num_tokens = torch.as_tensor(terms.num_tokens, dtype=torch.int).reshape(())
    report["num_tokens"] = num_tokens.double()
    report.update(diag)
    return output_tensor, num_tokens, report


def forward_step(step: int, device: torch.device, data_iterator: Iterator[dict], model: torch.nn.Module):
    """Forward one micro-batch; returns the surrogate sum and the loss function to close it."""
    batch = next(data_iterator)
    tokens_BL = batch["tokens"].to(device, non_blocking=True)
    valid_BL = batch["valid"].to(device, non_blocking=True)
    index_B = batch["sample_index"].to(device, non_blocking=True)
    terms, diag = model(tokens_BL, valid_BL, index_B, step)
    return terms.surrogate, partial(loss_func, terms, diag)


@dataclass
class StepReport:
    """Per-token values of one optimizer step, reduced over micro-batches and DP ranks."""

    values: dict[str, float]
    num_tokens: int


def _order_stats(sums: dict[str, float]) -> dict[str, float]:
    """Mean/std of the scaled forward velocity and its Pearson correlation with confidence."""
    n = max(sums["exp_n"], 1.0)
    mean = sums["exp_sum"] / n
    std = max(sums["exp_sq"] / n - mean * mean, 0.0) ** 0.5
    m = max(sums["corr_n"], 1.0)
    cov = sums["corr_ac"] / m - sums["corr_a"] / m * sums["corr_c"] / m
    var_a = sums["corr_aa"] / m - (sums["corr_a"] / m) ** 2
    var_c = sums["corr_cc"] / m - (sums["corr_c"] / m) ** 2
    corr = cov / (var_a * var_c) ** 0.5 if var_a > 1e-12 and var_c > 1e-12 else 0.0
    return {"exponent_mean": mean, "exponent_std": std, "velocity_confidence_corr": corr}


def reduce_reports(reports: list[dict], device: torch.device) -> StepReport:
    """Sum the micro-batch reports, all-reduce over DP, and derive per-token values."""
    keys = sorted(reports[0]) if reports else [*REPORT_KEYS, "num_tokens"]
    sums_K = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for r in reports:
        sums_K += torch.stack([r[k].to(device, torch.float64) for k in keys])
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums_K, group=parallel_state.get_data_parallel_group())
    sums = dict(zip(keys, sums_K.tolist()))
    ntok = max(sums["num_tokens"], 1.0)
    values = {k: sums[k] / ntok for k in REPORT_KEYS}
    if "exp_n" in sums:
        values.update(_order_stats(sums))
    return StepReport(values=values, num_tokens=int(sums["num_tokens"]))


def forward_backward(model: torch.nn.Module, data_iterator: Iterator[dict], *, step: int, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, device: torch.device,
                     forward_only: bool = False) -> list[dict[str, Any]]:
    """Run the megatron-core schedule over `num_microbatches` micro-batches; returns their reports.

    `model` is the engine's module (DDP-wrapped DiffusionLM); the engine has set the config's
    `finalize_model_grads_func` (DP reduce, then division by the global token count). Under PP only
    the last stage gets reports (an empty list elsewhere).
    """
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=partial(forward_step, step, device),
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
