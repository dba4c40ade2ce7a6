"""Diffusion-time sampling: the antithetic training sampler and sampling time grids.

Shape legend:
    B  sequences in the (micro-)batch
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
