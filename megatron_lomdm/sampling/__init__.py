"""Samplers for OeMDM models (method.md §3.5, §5.1, §5.4–5.6), pure PyTorch.

Every sampler takes a one-pass denoiser ``denoise(z_BL) -> DenoiserOutput`` (see ``base``),
applies SUBS itself, caches the call when no token changed, draws in fp64 and returns a
``SampleResult``. The registry below is the only place a sampler name is resolved.

Shape legend:
    B  sequences in the batch
    L  sequence length
"""

from __future__ import annotations

import inspect
from typing import Any

from megatron_lomdm.sampling.adaptive import (
    EntropyBoundSampler,
    TopMarginSampler,
    TopProbSampler,
    entropy_bound_select,
    select_top_k,
)
from megatron_lomdm.sampling.ancestral import AncestralSampler, MDLMCacheSampler
from megatron_lomdm.sampling.base import (
    Denoiser,
    DenoiserOutput,
    FamilyReverse,
    PowerReverse,
    ReverseSchedule,
    Sampler,
    SampleResult,
    confidence,
    denoiser_from_backbone,
    gumbel_argmax,
    reverse_schedule,
    sampling_log_probs,
)
from megatron_lomdm.sampling.exact import ExactSampler
from megatron_lomdm.sampling.grids import GridSpec, beta_grid, betainc, uniform_grid
from megatron_lomdm.sampling.metrics import (
    gen_ppl,
    order_heatmap,
    order_kendall_tau,
    save_order_heatmap,
    unigram_entropy,
    velocity_confidence_corr,
)

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        AncestralSampler,
        ExactSampler,
        MDLMCacheSampler,
        TopProbSampler,
        TopMarginSampler,
        EntropyBoundSampler,
    )
}


def build_sampler(name: str, **opts: Any) -> Sampler:
    """Build the sampler registered under ``name``.

    Args:
        name: One of ``SAMPLERS``.
        **opts: The sampler's keyword options (``mask_id`` is always required).

    Returns:
        The sampler.

    Raises:
        ValueError: For an unknown name or unknown options (the message lists valid ones).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(opts) - valid
    if unknown:
        raise ValueError(
            f"unknown options for sampler {name!r}: {sorted(unknown)}; valid: {sorted(valid)}"
        )
    return cls(**opts)


__all__ = [
    "SAMPLERS",
    "AncestralSampler",
    "Denoiser",
    "DenoiserOutput",
    "EntropyBoundSampler",
    "ExactSampler",
    "FamilyReverse",
    "GridSpec",
    "MDLMCacheSampler",
    "PowerReverse",
    "ReverseSchedule",
    "SampleResult",
    "Sampler",
    "TopMarginSampler",
    "TopProbSampler",
    "beta_grid",
    "betainc",
    "build_sampler",
    "confidence",
    "denoiser_from_backbone",
    "entropy_bound_select",
    "gen_ppl",
    "gumbel_argmax",
    "order_heatmap",
    "order_kendall_tau",
    "reverse_schedule",
    "sampling_log_probs",
    "save_order_heatmap",
    "select_top_k",
    "unigram_entropy",
    "uniform_grid",
    "velocity_confidence_corr",
]
