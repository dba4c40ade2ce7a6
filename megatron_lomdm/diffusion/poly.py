"""Polynomial masked diffusion: alpha = 1 - t^c1, A = c1 / t (method.md §2, LoMDM with c2=0).

Context-free and input-free: the reverse scheduler equals the forward one, so the velocity
term is 0 and the NELBO is the (c1/t)-weighted masked cross-entropy. Schedule math runs in
fp32 even under bf16 autocast.

Shape legend:
    B  sequences in the micro-batch
    L  sequence length
    N  flattened sequences (K * B for the reverse velocity)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import (
    ContextFreeFamily,
    ForwardSchedule,
    compute_dtype,
    power_schedule,
)


class PowerFamily(ContextFreeFamily):
    """The power schedule alpha = 1 - t^e with one fixed exponent e > 0 for all positions."""

    def __init__(self, *, exponent: float, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            exponent: The exponent e > 0.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
        """
        super().__init__(seq_length=seq_length, mask_id=mask_id)
        self.exponent = float(exponent)

    def schedule(self, t_N: Tensor) -> ForwardSchedule:
        """See ``ContextFreeFamily.schedule``: alpha = 1 - t^e at every position."""
        exponent_NL = torch.full(
            (t_N.shape[0], self.seq_length),
            self.exponent,
            dtype=compute_dtype(t_N),
            device=t_N.device,
        )
        return power_schedule(exponent_NL, t_N)


class PolyFamily(PowerFamily):
    """Polynomial MDM, alpha = 1 - t^c1 (``diffusion.name: poly``)."""

    def __init__(self, *, c1: float, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            c1: The exponent, > 0.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].

        Raises:
            ValueError: If c1 <= 0.
        """
        if not c1 > 0:
            raise ValueError(f"diffusion.c1 must be > 0 for the poly family, got {c1}")
        super().__init__(exponent=c1, seq_length=seq_length, mask_id=mask_id)
        self.c1 = float(c1)

    @classmethod
    def from_config(
        cls,
        *,
        c1: float,
        c2: float,
        block_size: int,
        vocab_size: int,
        seq_length: int,
        mask_id: int,
        num_corruptions: int,
        learn_order: bool,
        order_logits: Sequence[float],
    ) -> PolyFamily:
        """Build from ``diffusion.*``; uses c1 only."""
        return cls(c1=c1, seq_length=seq_length, mask_id=mask_id)
