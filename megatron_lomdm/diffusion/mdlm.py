"""MDLM (log-linear schedule): alpha = 1 - t, A = 1 / t (method.md §1.2, §2).

The NELBO is -(1/t) log p on masked positions, MDLM's loss. MDLM's code uses
alpha = 1 - (1 - eps) t, whose velocity is also exactly 1/t; we use alpha = 1 - t so that
alpha(1) = 0 and the prior term vanishes, and keep t >= eps through the time sampler.
Schedule math runs in fp32 even under bf16 autocast.

Shape legend:
    B  sequences in the micro-batch
    L  sequence length
"""

from __future__ import annotations

from megatron_lomdm.config.families import MDLM
from megatron_lomdm.diffusion.poly import PowerFamily


class MDLMFamily(PowerFamily):
    """MDLM, the power schedule with exponent 1 (``diffusion.name: mdlm``)."""

    spec = MDLM

    def __init__(self, *, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
        """
        super().__init__(exponent=1.0, seq_length=seq_length, mask_id=mask_id)
