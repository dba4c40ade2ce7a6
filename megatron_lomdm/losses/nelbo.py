"""Per-position OeMDM NELBO terms (method.md §1.7).

    main     = -A log <x_theta, x>
    velocity = A (log A - log A_hat) - A + A_hat      (generalised Poisson KL, >= 0)

Both are evaluated at masked positions only (the caller masks). A and A_hat are clamped to
>= 1e-6 before the logs (method.md §3.6). Math runs in fp32 (fp64 for fp64 inputs) even
under bf16 autocast: inputs are upcast first.

Shape legend: any broadcastable shape, typically (K, B, L).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import VELOCITY_FLOOR, compute_dtype


def main_term(velocity: Tensor, logp_true: Tensor) -> Tensor:
    """The main (reconstruction) term -A log p of the true token.

    Args:
        velocity: Forward velocity A >= 0.
        logp_true: log-probability of the true token (<= 0).

    Returns:
        -A log p, fp32 (fp64 for fp64 inputs), broadcast shape.
    """
    dtype = compute_dtype(velocity, logp_true)
    return -velocity.to(dtype) * logp_true.to(dtype)


def velocity_term(velocity: Tensor, velocity_hat: Tensor) -> Tensor:
    """The velocity-matching term A (log A - log A_hat) - A + A_hat.

    Args:
        velocity: Forward velocity A >= 0.
        velocity_hat: Reverse velocity A_hat >= 0.

    Returns:
        The term, >= 0 with equality iff A_hat = A; fp32 (fp64 for fp64 inputs).
    """
    dtype = compute_dtype(velocity, velocity_hat)
    a = velocity.to(dtype)
    a_hat = velocity_hat.to(dtype)
    log_ratio = torch.log(a.clamp_min(VELOCITY_FLOOR)) - torch.log(a_hat.clamp_min(VELOCITY_FLOOR))
    return a * log_ratio - a + a_hat
