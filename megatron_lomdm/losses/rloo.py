"""REINFORCE leave-one-out (RLOO) surrogate for the forward scheduler (method.md §3.4 step 6).

For K corruptions of the same (x, t), the score-function part of grad_phi E_z[loss] is
estimated by (1/K) sum_k (loss_k - mean_{j != k} loss_j) grad log q(z_k). For K = 2 this is
0.5 sg(loss_1 - loss_2) (log q_1 - log q_2), exactly GenMD4's `reinforce_loss`.

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
"""

from __future__ import annotations

from torch import Tensor


def rloo_surrogate(loss_KB: Tensor, log_q_KB: Tensor) -> Tensor:
    """The leave-one-out score-function surrogate per sequence.

    Its value is not a loss; only its gradient matters (the advantage is stop-gradient).

    Args:
        loss_KB: Per-corruption sequence losses, (K, B).
        log_q_KB: log q(z_k | x, t), (K, B), with gradient to the forward scheduler.

    Returns:
        The surrogate per sequence, (B,).

    Raises:
        ValueError: If K < 2 or the shapes differ.
    """
    if loss_KB.shape != log_q_KB.shape or loss_KB.dim() != 2:
        raise ValueError(
            f"loss_KB {tuple(loss_KB.shape)} and log_q_KB {tuple(log_q_KB.shape)} must both "
            "be (K, B)"
        )
    return (rloo_advantage(loss_KB) * log_q_KB).mean(0)


def rloo_advantage(loss_KB: Tensor) -> Tensor:
    """The stop-gradient leave-one-out advantage loss_k - mean_{j != k} loss_j, (K, B).

    Raises:
        ValueError: If K < 2.
    """
    K = loss_KB.shape[0]
    if K < 2:
        raise ValueError(f"RLOO needs K >= 2 corruptions per sequence, got K={K}")
    # stop-grad: RLOO advantage (a baseline-corrected reward, not differentiated).
    loss_KB = loss_KB.detach()
    baseline_KB = (loss_KB.sum(0, keepdim=True) - loss_KB) / (K - 1)
    return loss_KB - baseline_KB
