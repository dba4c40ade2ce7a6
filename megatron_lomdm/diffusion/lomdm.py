"""LoMDM: learnable, context-dependent power schedules (method.md §3.2).

    NormSig(v)_i = sigmoid(v_i) - mean_j sigmoid(v_j)        (mean over valid positions j)
    e_fwd = c1 + c2 NormSig(g_phi(f(x)))    alpha_F = 1 - t^e_fwd,  A     = e_fwd / t
    e_rev = c1 + c2 NormSig(g_psi(f(z_t)))  alpha_R = 1 - t^e_rev,  A_hat = e_rev / t

The scheduler heads g_phi, g_psi live in the model; this family turns their logits into
schedules. With c1 > c2 >= 0 every exponent lies in (c1 - c2, c1 + c2) subset (0, inf).
c2 = 0 is the polynomial schedule, (c1, c2) = (1, 0) is MDLM. Schedule math runs in fp32
even under bf16 autocast (logits are upcast first).

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
    L  sequence length
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_lomdm.config.families import LOMDM
from megatron_lomdm.diffusion.base import (
    DiffusionFamily,
    ForwardSchedule,
    compute_dtype,
    power_schedule,
)
from megatron_lomdm.diffusion.reverse import PowerReverse, ReverseSchedule


def normsig(logits_XL: Tensor, valid_XL: Tensor | None = None) -> Tensor:
    """NormSig over the last (position) axis: sigmoid minus its mean over valid positions.

    Args:
        logits_XL: Scheduler logits, any leading shape X, positions last.
        valid_XL: Bool non-pad mask broadcastable to ``logits_XL``; None means all valid.

    Returns:
        NormSig values in (-1, 1), same shape and dtype as ``logits_XL``. Pad positions get
        a finite value that is never used.
    """
    sig_XL = torch.sigmoid(logits_XL)
    if valid_XL is None:
        return sig_XL - sig_XL.mean(-1, keepdim=True)
    valid_XL = valid_XL.bool().expand_as(sig_XL)
    count_X1 = valid_XL.sum(-1, keepdim=True).clamp_min(1)
    mean_X1 = torch.where(valid_XL, sig_XL, 0.0).sum(-1, keepdim=True) / count_X1
    return sig_XL - mean_X1


def spread_exponents(c1: float, c2: float, logits_XL: Tensor, valid_XL: Tensor | None = None) -> Tensor:
    """Exponents e = c1 + c2 NormSig(logits) (method.md §3.2), the one formula for LoMDM's
    scheduler heads and the multivariate order logits.

    Args:
        c1: Mean exponent.
        c2: Spread; with c1 > c2 >= 0 every exponent lies in (c1 - c2, c1 + c2).
        logits_XL: Logits, positions last (already in the compute dtype).
        valid_XL: Bool non-pad mask for NormSig's mean; None means all valid.

    Returns:
        The exponents, same shape and dtype, graph kept to the logits.
    """
    return c1 + c2 * normsig(logits_XL, valid_XL)


class LoMDMFamily(DiffusionFamily):
    """LoMDM (``diffusion.name: lomdm``): forward head on clean x, reverse head on z_t."""

    spec = LOMDM
    needs_clean_features = True
    needs_reverse_head = True
    denoiser_exponents = True

    def __init__(
        self, *, c1: float, c2: float, seq_length: int, mask_id: int, num_corruptions: int = 2
    ) -> None:
        """Build the family.

        Args:
            c1: Mean exponent.
            c2: Exponent spread; c1 > c2 >= 0 (method.md §3.2, "Prop. C.3").
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
            num_corruptions: K corruptions per sequence for RLOO, >= 2 (the paper's 2).

        Raises:
            ValueError: Unless c1 > c2 >= 0 and K >= 2.
        """
        self.spec.check(c1=c1, c2=c2, num_corruptions=num_corruptions)
        super().__init__(seq_length=seq_length, mask_id=mask_id)
        self.c1 = float(c1)
        self.c2 = float(c2)
        self.num_corruptions = int(num_corruptions)

    def exponents(self, logits_XL: Tensor, valid_XL: Tensor | None = None) -> Tensor:
        """Exponents e = c1 + c2 NormSig(logits), in fp32 (fp64 for fp64 logits).

        Args:
            logits_XL: Scheduler head logits, positions last.
            valid_XL: Bool non-pad mask broadcastable to ``logits_XL``; None = all valid.

        Returns:
            Exponents in (c1 - c2, c1 + c2), same shape, graph kept to the logits.
        """
        logits_XL = logits_XL.to(compute_dtype(logits_XL))
        return spread_exponents(self.c1, self.c2, logits_XL, valid_XL)

    def forward_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """See ``DiffusionFamily.forward_schedule``; ``fwd_logits_BL`` is required."""
        self._check_length(x_BL)
        if fwd_logits_BL is None or fwd_logits_BL.shape != x_BL.shape:
            raise ValueError("the lomdm family needs fwd_logits_BL with the shape of x_BL")
        return power_schedule(self.exponents(fwd_logits_BL, valid_BL), t_B)

    def reverse_velocity(
        self,
        *,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """See ``DiffusionFamily.reverse_velocity``: A_hat = e_rev / t; needs rev logits."""
        if rev_logits_KBL is None or rev_logits_KBL.shape[:2] != t_KB.shape:
            raise ValueError("the lomdm family needs rev_logits_KBL of shape (K, B, L)")
        e_rev_KBL = self.exponents(rev_logits_KBL, None if valid_BL is None else valid_BL[None])
        return e_rev_KBL / t_KB.to(e_rev_KBL.dtype).unsqueeze(-1)

    def reverse_schedule(self) -> ReverseSchedule:
        """See ``DiffusionFamily.reverse_schedule``: 1 - t^c1, the mean of e_R, which the
        denoiser must supply per position (``requires_denoiser_exponents``)."""
        return PowerReverse(self.c1, requires_denoiser_exponents=True)

    def denoiser_outputs(
        self,
        logits_BLV: Tensor,
        hidden_BLD: Tensor,
        *,
        rev_head: nn.Module | None = None,
        valid_BL: Tensor | None = None,
        free_BL: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """See ``DiffusionFamily.denoiser_outputs``: e_R = c1 + c2 NormSig(rev_head(hidden))
        from the same pass (method.md §3.5)."""
        if rev_head is None:
            raise ValueError("the lomdm family needs rev_head to compute e_R")
        if free_BL is not None:  # conditioned: centring and NormSig over the positions to generate
            return logits_BLV, self.exponents(rev_head(hidden_BLD, valid_BL, free_BL), free_BL)
        rev_logits_BL = rev_head(hidden_BLD) if valid_BL is None else rev_head(hidden_BLD, valid_BL)
        return logits_BLV, self.exponents(rev_logits_BL, valid_BL)
