"""Context-free reverse schedulers alpha_R(t) per position, in fp64: what a sampler steps with.

A family hands its sampler one through ``DiffusionFamily.reverse_schedule()`` (method.md §3.5):
power families a ``PowerReverse`` with their exponent, the other context-free families (ARM,
BD3LM, multivariate) a ``FamilyReverse`` over their own ``schedule``, and the families whose
reverse scheduler reads z_t (LoMDM, GenMD4) a ``PowerReverse`` of their mean exponent that
requires the denoiser to return e_R. ``megatron_lomdm.sampling`` re-exports these classes.

Shape legend:
    L  sequence length
"""

from __future__ import annotations

import abc
import math
from typing import Any, Protocol

import torch
from torch import Tensor

_F64 = torch.float64


class _InputFreeSchedule(Protocol):
    """What ``FamilyReverse`` reads of a context-free family (``base.ContextFreeFamily``; not
    imported here, since base.py imports this module)."""

    seq_length: int

    def schedule(self, t_N: Tensor) -> Any:
        """The schedule at times t_N, a ``base.ForwardSchedule`` of (N, L) tensors."""


class ReverseSchedule(abc.ABC):
    """A context-free reverse scheduler alpha_R(t) per position (fp64).

    Attributes:
        requires_denoiser_exponents: The family's reverse scheduler reads z_t (LoMDM,
            GenMD4): a power-law sampler must get e_R from the denoiser; the schedule below
            only sets the mean (used for the oracles' token budget).
    """

    requires_denoiser_exponents: bool = False

    @abc.abstractmethod
    def log_mask_prob(self, t: float, seq_length: int, device: torch.device) -> Tensor:
        """log(1 - alpha_R(t)) per position, fp64, (L,); -inf where certainly clean."""

    def unmask_prob(self, t: float, s: float, seq_length: int, device: torch.device) -> Tensor:
        """P(unmasked at s | masked at t) = 1 - (1 - alpha(s)) / (1 - alpha(t)), (L,) fp64."""
        lm_t_L = self.log_mask_prob(t, seq_length, device)
        lm_s_L = self.log_mask_prob(s, seq_length, device)
        p_L = -torch.expm1(lm_s_L - lm_t_L)
        # where(): a position the schedule says is already clean at t unmasks now.
        return torch.where(torch.isneginf(lm_t_L), 1.0, p_L).clamp(0.0, 1.0)

    def keep_prob(self, t: float, seq_length: int, device: torch.device) -> Tensor:
        """alpha_R(t) per position, fp64, (L,)."""
        return -torch.expm1(self.log_mask_prob(t, seq_length, device))


class PowerReverse(ReverseSchedule):
    """alpha_R = 1 - t^e with one constant exponent e > 0 (MDLM e = 1, poly e = c1)."""

    def __init__(self, exponent: float, *, requires_denoiser_exponents: bool = False) -> None:
        """Build the schedule.

        Args:
            exponent: The constant exponent, > 0.
            requires_denoiser_exponents: See ``ReverseSchedule``.

        Raises:
            ValueError: If exponent <= 0.
        """
        if not exponent > 0:
            raise ValueError(f"the reverse exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)
        self.requires_denoiser_exponents = requires_denoiser_exponents

    def log_mask_prob(self, t: float, seq_length: int, device: torch.device) -> Tensor:
        """See ``ReverseSchedule.log_mask_prob``: e log t."""
        log_t = math.log(t) if t > 0 else -math.inf
        return torch.full((seq_length,), self.exponent * log_t, dtype=_F64, device=device)


class FamilyReverse(ReverseSchedule):
    """The reverse scheduler of a context-free family (alpha_R = alpha_F), e.g. ARM, BD3LM."""

    def __init__(self, family: _InputFreeSchedule) -> None:
        """Wrap the family.

        Args:
            family: A context-free family; its ``schedule(t)`` gives alpha per position.
        """
        self.family = family

    def log_mask_prob(self, t: float, seq_length: int, device: torch.device) -> Tensor:
        """See ``ReverseSchedule.log_mask_prob``; evaluates ``family.schedule`` in fp64."""
        if seq_length != self.family.seq_length:
            raise ValueError(
                f"sequence length {seq_length} differs from the family's "
                f"seq_length={self.family.seq_length}"
            )
        t_1 = torch.tensor([t], dtype=_F64, device=device)
        return self.family.schedule(t_1).log_mask_prob_BL[0].detach()
