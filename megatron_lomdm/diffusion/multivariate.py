"""Multivariate power schedules (Garg et al. 2025; method.md §2, §5.7, §5.8).

One learnable logit v_l per position, the same for every sequence (context-free, u = empty):

    w = c1 + c2 NormSig(v)       (NormSig over the valid positions, as LoMDM's, method.md §3.2)
    alpha_l(t) = 1 - t^{w_l},    A_l = w_l / t

With c1 > c2 >= 0 every exponent lies in (c1 - c2, c1 + c2); c1 is the mean exponent and v = 0
(the initialisation) is exactly poly(c1). The reverse scheduler is the forward one (alpha_R =
alpha_F), so A_hat = A and L_velocity = 0 identically: the NELBO is the A-weighted masked
cross-entropy, and the generation order is Plackett-Luce with weights w (P(i before j) =
w_i / (w_i + w_j), method.md §3.2). v is learned like LoMDM's forward scheduler: RLOO through
log q over K corruptions plus the pathwise gradient through A in the main term. (A_hat depends
on v too, but the velocity term and both of its partial derivatives vanish at A_hat = A, so that
path contributes exactly 0.) With ``learn_order=False`` v is frozen: a fixed multivariate
schedule with K = 1 and no RLOO (e.g. fixed-order references).

Schedule math runs in fp32 (fp64 for fp64 times) even for bf16 parameters.

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
    L  sequence length
    N  flattened times
    X  any leading shape
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from megatron_lomdm.config.families import MULTIVARIATE
from megatron_lomdm.diffusion.base import (
    ContextFreeFamily,
    ForwardSchedule,
    compute_dtype,
    power_schedule,
)
from megatron_lomdm.diffusion.lomdm import spread_exponents


class MultivariateFamily(ContextFreeFamily):
    """Multivariate MDM (``diffusion.name: multivariate``): per-position learnable exponents.

    Attributes:
        order_logits_L: The order logits v, an ``nn.Parameter`` of shape (L,) (frozen when
            ``learn_order`` is False). Like GenMD4's exponents it is a "head parameter": DP
            averages its gradient, PP trains it on the last stage, checkpoints save it.
        learn_order: Whether v is trained.
    """

    spec = MULTIVARIATE
    denoiser_exponents = True

    def __init__(
        self,
        *,
        c1: float,
        c2: float,
        seq_length: int,
        mask_id: int,
        learn_order: bool = True,
        num_corruptions: int = 2,
        order_logits: Sequence[float] = (),
    ) -> None:
        """Build the family.

        Args:
            c1: Mean exponent.
            c2: Exponent spread; c1 > c2 >= 0.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
            learn_order: Train v (RLOO over K corruptions); False freezes it (K = 1).
            num_corruptions: K, >= 2 when ``learn_order``; ignored otherwise.
            order_logits: Initial v, length L; empty means zeros (poly(c1)).

        Raises:
            ValueError: For c1, c2, K or order logits that break the rules; the message names
                the ``diffusion.*`` key.
        """
        # K only matters (and is only checked) when v is learned.
        self.spec.check(c1=c1, c2=c2, learn_order=learn_order,
                        **({"num_corruptions": num_corruptions} if learn_order else {}))
        logits = [float(v) for v in order_logits]
        if logits and len(logits) != seq_length:
            raise ValueError(
                f"diffusion.order_logits has {len(logits)} values; the multivariate family needs "
                f"one per position (seq_length={seq_length}) or none"
            )
        if not all(math.isfinite(v) for v in logits):
            raise ValueError("diffusion.order_logits must be finite")
        super().__init__(seq_length=seq_length, mask_id=mask_id)
        self.c1 = float(c1)
        self.c2 = float(c2)
        self.learn_order = bool(learn_order)
        self.num_corruptions = int(num_corruptions) if learn_order else 1
        init_L = torch.tensor(logits) if logits else torch.zeros(seq_length)
        self.order_logits_L = nn.Parameter(init_L, requires_grad=self.learn_order)

    def exponents(
        self, valid_XL: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The exponents w = c1 + c2 NormSig(v - mean v), graph kept to v.

        v is centred first (see models/scheduler_head.py): NormSig is not shift-invariant, and a
        drift of all logits into sigmoid saturation would flatten the order with ~0 gradient.

        Args:
            valid_XL: Bool non-pad mask (X, L): NormSig's mean runs over each row's valid
                positions and the result has shape (X, L). None: all positions, shape (L,).
            dtype: Compute dtype; default fp32 (``compute_dtype`` of v).

        Returns:
            Exponents in (c1 - c2, c1 + c2).
        """
        v_L = self.order_logits_L
        v_L = v_L.to(dtype or compute_dtype(v_L))
        v_L = v_L - v_L.mean()  # a common shift is a null direction, never a drift into saturation
        if valid_XL is None:
            return spread_exponents(self.c1, self.c2, v_L)
        return spread_exponents(self.c1, self.c2, v_L.expand(valid_XL.shape), valid_XL)

    def _exponents_BL(self, B: int, valid_BL: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Per-sequence exponents (B, L); the one place both schedulers take them from."""
        if valid_BL is None:
            return self.exponents(dtype=dtype).expand(B, self.seq_length)
        return self.exponents(valid_BL, dtype)

    def schedule(self, t_N: Tensor) -> ForwardSchedule:
        """See ``ContextFreeFamily.schedule``: alpha_l = 1 - t^{w_l}, all positions valid."""
        dtype = compute_dtype(self.order_logits_L, t_N)
        return power_schedule(self._exponents_BL(t_N.shape[0], None, dtype), t_N)

    def forward_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """See ``DiffusionFamily.forward_schedule``; NormSig over each sequence's valid positions."""
        self._check_length(x_BL)
        dtype = compute_dtype(self.order_logits_L, t_B)
        return power_schedule(self._exponents_BL(x_BL.shape[0], valid_BL, dtype), t_B)

    def reverse_velocity(
        self,
        *,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """See ``DiffusionFamily.reverse_velocity``: A_hat = A = w / t, bit for bit.

        The exponents come from the same (B, L) computation as ``forward_schedule``'s, so with
        the same ``valid_BL`` the velocity term is exactly 0.
        """
        K, B = t_KB.shape
        dtype = compute_dtype(self.order_logits_L, t_KB)
        e_BL = self._exponents_BL(B, valid_BL, dtype)
        return power_schedule(e_BL.expand(K, B, self.seq_length).reshape(K * B, -1),
                              t_KB.reshape(K * B)).velocity_BL.view(K, B, self.seq_length)

    def denoiser_outputs(
        self,
        logits_BLV: Tensor,
        hidden_BLD: Tensor,
        *,
        rev_head: nn.Module | None = None,
        valid_BL: Tensor | None = None,
        free_BL: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """See ``DiffusionFamily.denoiser_outputs``: its per-position exponents w (alpha_R =
        alpha_F = 1 - t^w; NormSig over all positions, or each row's valid ones), so every
        power-law sampler (ancestral, exact Plackett-Luce) follows the learned order."""
        B, L = logits_BLV.shape[:-1]
        if L != self.seq_length:
            raise ValueError(f"the multivariate family has one order logit per position: sequences "
                             f"must have length {self.seq_length}, got {L}")
        norm_BL = valid_BL if free_BL is None else free_BL  # NormSig's set: the positions to generate
        e_XL = self.exponents() if norm_BL is None else self.exponents(norm_BL)  # fp32 (as lomdm's e_R)
        return logits_BLV, e_XL.detach().expand(B, L).to(logits_BLV.device)
