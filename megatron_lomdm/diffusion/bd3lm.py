"""Block diffusion (BD3LM) as an OeMDM slot schedule (method.md §2).

With nb = L / L' blocks and block index b(i) = ceil(i / L') (1-based positions i), block b
is noised during the time slot [(nb - b)/nb, (nb - b + 1)/nb]. With the block-local time
tau = nb t - (nb - b(i)):

    1 - alpha = clip(tau, 0, 1)
    A         = nb / tau   inside the slot (0 < tau < 1)
    A         = 0          outside it (alpha is flat there: 1 before the slot, 0 after)

Inside the slot this is MDLM's linear schedule in local time (A dt = dtau / tau), blocks
before b are clean and blocks after b are fully masked. Fully-masked future positions have
A = 0 and thus contribute exactly 0 loss, which makes the NELBO the sum of per-block MDLM
NELBOs conditioned on the clean prefix. L' = 1 is ARM, L' = L is MDLM. Schedule math runs
in fp32 even under bf16 autocast.

Shape legend:
    N  flattened sequences (B, or K * B for the reverse velocity)
    L  sequence length
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import ContextFreeFamily, ForwardSchedule, compute_dtype


class SlotFamily(ContextFreeFamily):
    """A clipped slot schedule over consecutive blocks of ``block_size`` positions."""

    def __init__(self, *, block_size: int, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            block_size: Block length L' (positions per slot); must divide seq_length.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].

        Raises:
            ValueError: If block_size does not divide seq_length.
        """
        if block_size < 1 or seq_length % block_size != 0:
            raise ValueError(
                f"diffusion.block_size must be a positive divisor of seq_length={seq_length}, "
                f"got {block_size}"
            )
        super().__init__(seq_length=seq_length, mask_id=mask_id)
        self.block_size = block_size
        self.num_blocks = seq_length // block_size

    def schedule(self, t_N: Tensor) -> ForwardSchedule:
        """See ``ContextFreeFamily.schedule``: the clipped block-slot schedule."""
        dtype = compute_dtype(t_N)
        t_N = t_N.to(dtype)
        # 1-based block index b(i) of each position.
        block_L = torch.arange(self.seq_length, device=t_N.device) // self.block_size + 1
        nb = self.num_blocks
        tau_NL = nb * t_N.unsqueeze(-1) - (nb - block_L).to(dtype)
        in_slot_NL = (tau_NL > 0) & (tau_NL < 1)
        mask_prob_NL = tau_NL.clamp(0.0, 1.0)
        # where(): nb / tau is inf or negative outside the slot; there alpha is flat, A = 0.
        velocity_NL = torch.where(in_slot_NL, nb / tau_NL, 0.0)
        return ForwardSchedule(
            log_mask_prob_BL=torch.log(mask_prob_NL),  # -inf before the slot: never masked
            log_keep_prob_BL=torch.log1p(-mask_prob_NL),  # -inf after it: always masked
            velocity_BL=velocity_NL,
            t_B=t_N,
        )


class BD3LMFamily(SlotFamily):
    """Block diffusion with block size L' (``diffusion.name: bd3lm``)."""

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
    ) -> BD3LMFamily:
        """Build from ``diffusion.*``; uses block_size, which must divide seq_length."""
        return cls(block_size=block_size, seq_length=seq_length, mask_id=mask_id)
