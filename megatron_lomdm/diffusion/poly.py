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

import torch
from torch import Tensor

from megatron_lomdm.config.families import POLY
from megatron_lomdm.diffusion.base import (
    ContextFreeFamily,
    ForwardSchedule,
    compute_dtype,
    power_schedule,
)
from megatron_lomdm.diffusion.reverse import PowerReverse, ReverseSchedule


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

    def reverse_schedule(self) -> ReverseSchedule:
        """See ``DiffusionFamily.reverse_schedule``: alpha_R = 1 - t^e (``PowerReverse``)."""
        return PowerReverse(self.exponent)


class PolyFamily(PowerFamily):
    """Polynomial MDM, alpha = 1 - t^c1 (``diffusion.name: poly``)."""

    spec = POLY

    def __init__(self, *, c1: float, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            c1: The exponent, > 0.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].

        Raises:
            ValueError: If c1 <= 0.
        """
        self.spec.check(c1=c1)
        super().__init__(exponent=c1, seq_length=seq_length, mask_id=mask_id)
        self.c1 = float(c1)
