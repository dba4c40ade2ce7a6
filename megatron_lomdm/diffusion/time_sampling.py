"""Diffusion-time sampling: the antithetic training sampler, P-POTS proposals, sampling grids.

P-POTS (Jia et al., arXiv 2511.18159; method.md §5.8) draws t from a proposal p(t) instead of
the uniform density u(t) = 1 / (1 - eps) on [eps, 1] and weights each sequence's loss by
u(t) / p(t), which keeps E_t[loss] (the NELBO) exactly unchanged while lowering its variance
when p(t) follows the per-t loss scale w(t) = sqrt(Var[loss | t] + E[loss | t]^2). Here p is
piecewise constant on N equal bins of [eps, 1] and a mixture with the uniform,

    p = (1 - lambda) * w / Z + lambda * u,

so every weight is at most 1 / lambda with no clamping (clamping would bias the estimator).
Draws keep MDLM's stratification: each sequence's stratified uniform (the low-discrepancy
sampler before its affine map to [eps, 1]) goes through p's inverse CDF, which is piecewise
linear, so the t of a sequence still depends only on (seed, step, global index) and p.

Shape legend:
    B  sequences in the (micro-)batch
    N  bins of the P-POTS proposal over [eps, 1]
    T  sampling steps
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import compute_dtype

# method.md §3.6: training times live in [eps, 1].
DEFAULT_T_EPS = 1e-3
# MDLM's ancestral sampler grid ends at 1e-5, not 0.
DEFAULT_T_MIN = 1e-5


def low_discrepancy_t(
    uniform_B: Tensor, index_B: Tensor, num_total: int, eps: float = DEFAULT_T_EPS
) -> Tensor:
    """MDLM's low-discrepancy (antithetic) time sampler over the GLOBAL batch.

    t = ((u + index) / num_total) mod 1, then t <- (1 - eps) t + eps (method.md §3.4 step 1).
    Because ``index_B`` is each sequence's index within the global batch, the stratified grid
    spans the global batch whatever the data-parallel layout or micro-batching: the t of a
    sequence depends only on its own uniform and global index.

    Args:
        uniform_B: Uniforms in [0, 1), (B,).
        index_B: Global batch index of each sequence, integer, (B,).
        num_total: Global batch size (number of strata), >= 1.
        eps: Lower bound of t, in [0, 1).

    Returns:
        Times in [eps, 1], fp32 (fp64 for fp64 uniforms), (B,).

    Raises:
        ValueError: If num_total < 1, eps is outside [0, 1) or the shapes differ.
    """
    if num_total < 1:
        raise ValueError(f"num_total must be >= 1, got {num_total}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if uniform_B.shape != index_B.shape:
        raise ValueError(
            f"uniform_B {tuple(uniform_B.shape)} and index_B {tuple(index_B.shape)} differ"
        )
    dtype = compute_dtype(uniform_B)
    t_B = torch.remainder((uniform_B.to(dtype) + index_B.to(dtype)) / num_total, 1.0)
    return (1.0 - eps) * t_B + eps


def time_bin(t_B: Tensor, num_bins: int, eps: float = DEFAULT_T_EPS) -> Tensor:
    """Index of the equal-width bin of [eps, 1] that holds each time (t = 1 is in the last bin).

    Args:
        t_B: Times in [eps, 1], (B,).
        num_bins: Number of bins N, >= 1.
        eps: Lower end of the binned interval, in [0, 1).

    Returns:
        Bin indices in [0, N - 1], int64, (B,). Times outside [eps, 1] are clamped to the ends.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    pos_B = (t_B.double() - eps) / (1.0 - eps) * num_bins
    return pos_B.floor().clamp(0, num_bins - 1).to(torch.int64)


def _check_mass(mass_N: Tensor) -> None:
    if mass_N.dim() != 1 or mass_N.numel() < 1:
        raise ValueError(f"mass_N must be a non-empty vector, got shape {tuple(mass_N.shape)}")


def proposal_t(
    uniform_B: Tensor, index_B: Tensor, num_total: int, mass_N: Tensor, eps: float = DEFAULT_T_EPS
) -> Tensor:
    """Stratified times drawn from the piecewise-constant proposal with bin probabilities mass_N.

    The stratified uniform s = ((u + index) / num_total) mod 1 of `low_discrepancy_t` is mapped
    through the proposal's inverse CDF: with C_n = sum_{j<n} mass_j, the s in [C_n, C_{n+1}) lands
    in bin n at the fraction (s - C_n) / mass_n of its width. The global batch therefore still
    holds one draw per p-quantile stratum, and each t depends only on its own uniform, its global
    index and mass_N (identical under every parallel layout). A uniform mass_N gives
    `low_discrepancy_t`'s times up to rounding.

    Args:
        uniform_B: Uniforms in [0, 1), (B,).
        index_B: Global batch index of each sequence, integer, (B,).
        num_total: Global batch size (number of strata), >= 1.
        mass_N: Bin probabilities of the proposal over N equal bins of [eps, 1], each > 0
            (normalised here), (N,).
        eps: Lower bound of t, in [0, 1).

    Returns:
        Times in [eps, 1], fp32 (fp64 for fp64 uniforms), (B,). The map runs in fp64.
    """
    _check_mass(mass_N)
    strata_B = low_discrepancy_t(uniform_B, index_B, num_total, eps=0.0)
    num_bins = mass_N.numel()
    mass_N = mass_N.to(device=strata_B.device, dtype=torch.float64)
    mass_N = mass_N / mass_N.sum()
    cdf_N = torch.cumsum(mass_N, 0) - mass_N  # C_n: probability below bin n
    s_B = strata_B.double()
    bin_B = (torch.searchsorted(cdf_N, s_B, right=True) - 1).clamp(0, num_bins - 1)
    frac_B = ((s_B - cdf_N[bin_B]) / mass_N[bin_B]).clamp(0.0, 1.0)
    t_B = eps + (1.0 - eps) * (bin_B.double() + frac_B) / num_bins
    return t_B.clamp(eps, 1.0).to(strata_B.dtype)


def proposal_weight(t_B: Tensor, mass_N: Tensor, eps: float = DEFAULT_T_EPS) -> Tensor:
    """Importance weight u(t) / p(t) of each time: uniform density over proposal density.

    With N equal bins p(t) = N mass_n / (1 - eps) in bin n, so the weight is 1 / (N mass_n); for
    the mixture with lambda of the uniform it is at most 1 / lambda. E_{t~p}[weight(t) f(t)] =
    E_{t~U[eps,1]}[f(t)] for every f: the weighted loss is an unbiased estimate of the NELBO.

    Args:
        t_B: Times in [eps, 1], (B,).
        mass_N: Bin probabilities of the proposal (normalised here), (N,).
        eps: Lower end of the binned interval, in [0, 1).

    Returns:
        Weights, fp64, (B,).
    """
    _check_mass(mass_N)
    mass_N = mass_N.to(device=t_B.device, dtype=torch.float64)
    mass_N = mass_N / mass_N.sum()
    return 1.0 / (mass_N.numel() * mass_N[time_bin(t_B, mass_N.numel(), eps)])


def bin_loss_sums(
    t_B: Tensor, loss_B: Tensor, num_bins: int, eps: float = DEFAULT_T_EPS, keep_B: Tensor | None = None
) -> Tensor:
    """Per-bin sums (count, sum of loss, sum of loss^2) of per-sequence losses, for P-POTS.

    Sums, so micro-batches and data-parallel ranks combine exactly by addition. Within a bin a
    piecewise-constant proposal is flat, so these are uniform-t moments of the loss over the bin
    whatever proposal drew the times.

    Args:
        t_B: Each sequence's time, (B,).
        loss_B: Each sequence's loss (detached; unweighted), (B,).
        num_bins: Number of bins N over [eps, 1].
        eps: Lower end of the binned interval.
        keep_B: Bool, sequences to count (e.g. those with valid tokens); None counts all.

    Returns:
        fp64 (3, N): rows count, sum loss, sum loss^2.
    """
    loss_B = loss_B.detach().double()
    keep_B = torch.ones_like(loss_B) if keep_B is None else keep_B.to(loss_B.dtype)
    rows_3B = torch.stack([keep_B, keep_B * loss_B, keep_B * loss_B.square()])
    sums_3N = torch.zeros(3, num_bins, dtype=torch.float64, device=loss_B.device)
    return sums_3N.index_add_(1, time_bin(t_B, num_bins, eps), rows_3B)


def loss_scale_mass(sums_3N: Tensor, uniform_mix: float) -> Tensor:
    """Bin probabilities of the P-POTS proposal p = (1 - lambda) w / Z + lambda * uniform.

    w_n = sqrt(sum loss^2 / count) = sqrt(Var[loss | bin] + E[loss | bin]^2), the loss scale of
    bin n (the importance density that minimises the weighted estimator's second moment). A bin
    without observations gets the pooled scale of all bins; with no observations (or an all-zero
    loss) the proposal is uniform.

    Args:
        sums_3N: (count, sum loss, sum loss^2) per bin, (3, N), e.g. from `bin_loss_sums`.
        uniform_mix: lambda in (0, 1]: weights are bounded by 1 / lambda.

    Returns:
        fp64 (N,) probabilities summing to 1, each >= lambda / N.
    """
    if sums_3N.dim() != 2 or sums_3N.shape[0] != 3:
        raise ValueError(f"sums_3N must have shape (3, N), got {tuple(sums_3N.shape)}")
    if not 0.0 < uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
    count_N, _, sq_N = sums_3N.double().clamp_min(0.0)
    num_bins = count_N.numel()
    uniform_N = torch.full_like(count_N, 1.0 / num_bins)
    total = count_N.sum()
    if total <= 0:
        return uniform_N
    pooled = (sq_N.sum() / total).sqrt()
    scale_N = torch.where(count_N > 0, (sq_N / count_N.clamp_min(1e-300)).sqrt(), pooled)
    if not bool(torch.isfinite(scale_N).all()) or scale_N.sum() <= 0:
        return uniform_N
    return (1.0 - uniform_mix) * scale_N / scale_N.sum() + uniform_mix * uniform_N


def sampling_time_grid(
    num_steps: int, t_min: float = DEFAULT_T_MIN, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Decreasing time grid 1 = t_0 > ... > t_T = t_min for T-step samplers (MDLM style).

    Args:
        num_steps: Number of reverse steps T, >= 1.
        t_min: Last time; MDLM uses 1e-5. 0 gives a grid ending exactly at 0.
        dtype: Grid dtype; fp64 by default (sampling is done in fp64).

    Returns:
        The grid ``linspace(1, t_min, T + 1)``, (T + 1,).

    Raises:
        ValueError: If num_steps < 1 or t_min is outside [0, 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    return torch.linspace(1.0, t_min, num_steps + 1, dtype=dtype)
