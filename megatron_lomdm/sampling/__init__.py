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
    LoMDMTopMarginSampler,
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
    gumbel_noise,
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
from megatron_lomdm.sampling.record import batch_seed, sampler_record
from megatron_lomdm.sampling.remask import RemaskSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        AncestralSampler,
        ExactSampler,
        MDLMCacheSampler,
        TopProbSampler,
        TopMarginSampler,
        LoMDMTopMarginSampler,
        RemaskSampler,
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


def sampler_options(name: str, *, mask_id: int, family: Any, steps: int | None, grid: GridSpec | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
                    gamma: float | None = None, noise_scale: float | None = None,
                    checks: int | None = None, drop: float | None = None) -> dict[str, Any]:
    """The keyword options ``build_sampler(name, ...)`` gets for a model of ``family``.

    Options a sampler does not take are left out (``entropy_bound`` has no steps or grid; only
    the top-K samplers take ``noise_scale``, only ``remask`` ``checks`` and ``drop``;
    ``mdlm_cache`` is MDLM's alpha = 1 - t whatever the family); ``family=`` is passed wherever
    accepted so context-free families supply their reverse schedule.

    Raises:
        ValueError: For an unknown sampler name (the message lists valid ones).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(sorted(SAMPLERS))}")
    accepted = set(inspect.signature(SAMPLERS[name].__init__).parameters)
    opts: dict[str, Any] = {"mask_id": mask_id, "temperature": temperature, "top_p": top_p, "use_cache": use_cache}
    if "num_steps" in accepted and steps is not None:
        opts["num_steps"] = steps
    if "grid" in accepted and grid is not None:
        opts["grid"] = grid
    if "family" in accepted:
        opts["family"] = family
    for key, value in (("gamma", gamma), ("noise_scale", noise_scale), ("checks", checks), ("drop", drop)):
        if key in accepted and value is not None:
            opts[key] = value
    return opts


__all__ = [
    "SAMPLERS",
    "AncestralSampler",
    "Denoiser",
    "DenoiserOutput",
    "EntropyBoundSampler",
    "ExactSampler",
    "FamilyReverse",
    "LoMDMTopMarginSampler",
    "RemaskSampler",
    "GridSpec",
    "MDLMCacheSampler",
    "PowerReverse",
    "ReverseSchedule",
    "SampleResult",
    "Sampler",
    "TopMarginSampler",
    "TopProbSampler",
    "batch_seed",
    "beta_grid",
    "betainc",
    "build_sampler",
    "confidence",
    "denoiser_from_backbone",
    "entropy_bound_select",
    "gen_ppl",
    "gumbel_argmax",
    "gumbel_noise",
    "order_heatmap",
    "order_kendall_tau",
    "reverse_schedule",
    "sampler_options",
    "sampler_record",
    "sampling_log_probs",
    "save_order_heatmap",
    "select_top_k",
    "unigram_entropy",
    "uniform_grid",
    "velocity_confidence_corr",
]
