"""Assemble the OeMDM training objective from per-position quantities (method.md §3.3-3.4).

Gradient flow (method.md §3.4 table): theta through log p in the main term of every
corruption; phi pathwise through A (main and velocity terms) and by score function through
log q (RLOO); psi through A_hat in the velocity term only; the masks carry no gradient.

All terms are SUMS over the micro-batch's sequences, averaged over the K corruptions, so a
caller that divides by the global count of valid tokens gets the per-token NELBO across
micro-batches and data-parallel ranks. Math runs in fp32 (fp64 for fp64 inputs) even under
bf16 autocast: every input is upcast first.

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
    L  sequence length
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import DiffusionFamily, ForwardSchedule, compute_dtype
from megatron_lomdm.losses.nelbo import main_term, velocity_term
from megatron_lomdm.losses.rloo import rloo_advantage, rloo_surrogate


@dataclass
class LossTerms:
    """One micro-batch's loss terms, all sums over its B sequences (mean over K).

    Attributes:
        surrogate: nelbo + rloo with the graph attached; the ONLY term to backpropagate.
        nelbo: main + velocity (detached): the reported NELBO sum; PPL comes from this.
        main: Sum of -A log p over masked valid positions (detached).
        velocity: Sum of the velocity term over masked valid positions (detached).
        rloo: Value of the RLOO surrogate (detached; not a loss, 0 when K = 1).
        num_tokens: Number of valid (non-pad) positions of the B sequences, int64 scalar.
        seq_nelbo: Per-token NELBO of each sequence, mean over K, UNweighted (detached), (B,):
            the statistic P-POTS estimates its loss scale from.
        surrogate_KB: The surrogate split by corruption, (K, B), graph attached (None without
            RLOO): corruption k's main + velocity sum / K plus its RLOO share n_b adv_kb log q_kb / K
            (times weight_b); sums to ``surrogate``. For diagnostics only (``losses.grad_snr``).

    With importance weights (``weight_B``, P-POTS time sampling) every term, the surrogate and
    the reported nelbo/main/velocity/rloo alike, is the weighted sum: an unbiased estimate of
    the same sum under uniform t.
    """

    surrogate: Tensor
    nelbo: Tensor
    main: Tensor
    velocity: Tensor
    rloo: Tensor
    num_tokens: Tensor
    seq_nelbo: Tensor | None = None
    surrogate_KB: Tensor | None = None


def compute_loss_terms(
    family: DiffusionFamily,
    *,
    sched: ForwardSchedule,
    mask_KBL: Tensor,
    logp_true_KBL: Tensor,
    velocity_hat_KBL: Tensor,
    log_q_KB: Tensor | None,
    valid_BL: Tensor,
    weight_B: Tensor | None = None,
) -> LossTerms:
    """Compute the NELBO terms and the backprop surrogate for one micro-batch.

    Per corruption k and sequence b, S_kb = sum_i M_i valid_i (main_i + velocity_i) and
    the per-sequence loss is l_kb = S_kb / n_b with n_b the valid-token count (method.md
    §3.3). The surrogate is sum_b [mean_k S_kb + n_b r_b] with r_b the RLOO term of l_.b,
    so surrogate / num_tokens equals method.md §3.4 step 7 when every n_b = L. RLOO is used
    when the family's forward scheduler is learnable (``num_corruptions > 1``) and K > 1.

    Args:
        family: The OeMDM family (supplies ``adjust_logp_true``).
        sched: Forward schedule, tensors (B, L).
        mask_KBL: Bool corruption masks, (K, B, L); True = [MASK].
        logp_true_KBL: SUBS log-prob of the true token (0 at unmasked positions), (K, B, L).
        velocity_hat_KBL: Reverse velocity A_hat, (K, B, L).
        log_q_KB: log q(z_k | x, t) over valid positions, (K, B); may be None when RLOO
            does not apply.
        valid_BL: Bool non-pad positions, (B, L); pads contribute nothing anywhere.
        weight_B: Optional importance weight of each sequence, (B,) (P-POTS: uniform density
            over proposal density of its t). It multiplies the sequence's whole objective (NELBO
            and RLOO terms) and every reported sum; None (default) leaves all values unchanged.

    Returns:
        The LossTerms.

    Raises:
        ValueError: On inconsistent shapes, or a missing log_q_KB when RLOO applies.
    """
    K, B, L = mask_KBL.shape
    for name, tensor in (("logp_true_KBL", logp_true_KBL), ("velocity_hat_KBL", velocity_hat_KBL)):
        if tensor.shape != mask_KBL.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {(K, B, L)}")
    if valid_BL.shape != (B, L) or sched.velocity_BL.shape != (B, L):
        raise ValueError(f"valid_BL and the schedule must have shape {(B, L)}")
    dtype = compute_dtype(sched.velocity_BL, logp_true_KBL, velocity_hat_KBL)
    valid_BL = valid_BL.bool()
    counted_KBL = mask_KBL.bool() & valid_BL.unsqueeze(0)

    velocity_hat_KBL = velocity_hat_KBL.to(dtype)
    logp_KBL = family.adjust_logp_true(
        logp_true_KBL=logp_true_KBL.to(dtype), sched=sched, velocity_hat_KBL=velocity_hat_KBL
    )
    velocity_1BL = sched.velocity_BL.to(dtype).unsqueeze(0)
    # torch.where (not a product) so that nothing at uncounted positions can leak a NaN.
    main_KBL = torch.where(counted_KBL, main_term(velocity_1BL, logp_KBL), 0.0)
    vel_KBL = torch.where(counted_KBL, velocity_term(velocity_1BL, velocity_hat_KBL), 0.0)

    seq_sum_KB = (main_KBL + vel_KBL).sum(-1)
    num_valid_B = valid_BL.sum(-1)
    seq_nelbo_B = (seq_sum_KB.sum(0) / K / num_valid_B.clamp_min(1).to(dtype)).detach()
    w_B = None if weight_B is None else weight_B.to(dtype)
    if w_B is not None and w_B.shape != (B,):
        raise ValueError(f"weight_B has shape {tuple(w_B.shape)}, expected {(B,)}")
    nelbo_sum = seq_sum_KB.sum() / K if w_B is None else (seq_sum_KB.sum(0) * w_B).sum() / K

    use_rloo = family.num_corruptions > 1 and K > 1
    if use_rloo:
        if log_q_KB is None:
            raise ValueError("log_q_KB is required for a family with a learnable forward schedule")
        seq_loss_KB = seq_sum_KB / num_valid_B.clamp_min(1).to(dtype)
        rloo_B = rloo_surrogate(seq_loss_KB, log_q_KB.to(dtype))
        rloo_B = rloo_B if w_B is None else rloo_B * w_B
        rloo_sum = (rloo_B * num_valid_B.to(dtype)).sum()
        surrogate_KB = (seq_sum_KB + num_valid_B.to(dtype) * rloo_advantage(seq_loss_KB) * log_q_KB.to(dtype)) / K
        surrogate_KB = surrogate_KB if w_B is None else surrogate_KB * w_B
    else:
        rloo_sum = torch.zeros((), dtype=dtype, device=seq_sum_KB.device)
        surrogate_KB = None

    def weighted_sum(x_KBL: Tensor) -> Tensor:
        return x_KBL.sum() / K if w_B is None else (x_KBL.sum((0, 2)) * w_B).sum() / K

    # detach: reported values only; the surrogate is the single backprop target.
    return LossTerms(
        surrogate=nelbo_sum + rloo_sum,
        nelbo=nelbo_sum.detach(),
        main=weighted_sum(main_KBL).detach(),
        velocity=weighted_sum(vel_KBL).detach(),
        rloo=rloo_sum.detach(),
        num_tokens=num_valid_B.sum().to(torch.int64),
        seq_nelbo=seq_nelbo_B,
        surrogate_KB=surrogate_KB,
    )
