"""Left-to-right autoregression as an OeMDM slot schedule (method.md §2, ARM check).

alpha^(i)(t) = clip(L (1 - t) - i + 1, 0, 1): position i is masked only during the slot
[(L - i)/L, (L - i + 1)/L], while every earlier position is clean and every later one is
fully masked (with velocity 0, hence zero loss). With a predictor that only sees the clean
prefix, the NELBO equals the autoregressive NLL exactly. This is BD3LM with block size 1.
Its Monte-Carlo estimator (``SlotFamily.estimator_schedule``) draws one position i uniformly
(t uniform on [0, 1)), masks it and everything after it, and weighs its loss by L: L (-log
p(x_i | x_<i)), or 0 if i is a pad, an unbiased estimate of the AR NLL with finite variance.
Schedule math runs in fp32 even under bf16 autocast.

Shape legend:
    B  sequences in the micro-batch
    L  sequence length
"""

from __future__ import annotations

from megatron_lomdm.config.families import ARM
from megatron_lomdm.diffusion.bd3lm import SlotFamily


class ARMFamily(SlotFamily):
    """Autoregressive order as a slot schedule with one position per slot (``arm``)."""

    spec = ARM
    autoregressive = True

    def __init__(self, *, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
        """
        super().__init__(block_size=1, seq_length=seq_length, mask_id=mask_id)
