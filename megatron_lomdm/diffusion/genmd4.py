"""GenMD4 (Shi et al. 2024) as an OeMDM member (method.md §2, §5.3).

Each token value v has a learnable exponent w_v = softplus(w_raw_v) > 0 and survives with
alpha = 1 - t^{w_v}, so A^(i) = w_{x_i} / t. The reverse chain unmasks to v at rate
a_v mu_v with a_v = w_v / t; in OeMDM form

    A_hat = sum_v a_v mu_v = (1/t) sum_v mu_v w_v,     x_tilde_v = a_v mu_v / A_hat.

The training step computes E_mu[w] = sum_v mu_v w_v (a vocabulary reduction, possibly
vocab-parallel; see ``subs.expected_token_rate``) and passes it as ``expected_rate_KBL``.
``adjust_logp_true`` maps log mu_x to log x_tilde_x = log mu_x + log A - log A_hat, so the
generic NELBO -A log x_tilde_x + A log(A/A_hat) - A + A_hat equals GenMD4's integrand
-A log mu_x - A + A_hat. Schedule math runs in fp32 even under bf16 autocast.

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
    L  sequence length
    V  vocabulary size (including [MASK])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megatron_lomdm.config.families import GENMD4
from megatron_lomdm.diffusion.base import (
    VELOCITY_FLOOR,
    DiffusionFamily,
    ForwardSchedule,
    compute_dtype,
    power_schedule,
)
from megatron_lomdm.diffusion.reverse import PowerReverse, ReverseSchedule
from megatron_lomdm.diffusion.subs import expected_token_rate

# GenMD4's `power_init`: every w_v starts at 1 (the MDLM schedule).
_POWER_INIT = 1.0


class GenMD4Family(DiffusionFamily):
    """GenMD4 (``diffusion.name: genmd4``): per-token-id learnable power schedule."""

    spec = GENMD4
    needs_expected_rate = True
    denoiser_exponents = True

    def __init__(
        self, *, vocab_size: int, seq_length: int, mask_id: int, num_corruptions: int = 2
    ) -> None:
        """Build the family with w_v = 1 for every token.

        Args:
            vocab_size: Vocabulary size V (including [MASK]).
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].
            num_corruptions: K corruptions per sequence for RLOO, >= 2 (GenMD4's 2).

        Raises:
            ValueError: Unless K >= 2.
        """
        self.spec.check(num_corruptions=num_corruptions)
        super().__init__(seq_length=seq_length, mask_id=mask_id)
        self.vocab_size = vocab_size
        self.num_corruptions = int(num_corruptions)
        raw_init = math.log(math.expm1(_POWER_INIT))  # softplus^-1(power_init)
        self.raw_exponent_V = nn.Parameter(torch.full((vocab_size,), raw_init))

    def token_exponents(self) -> Tensor:
        """The per-token exponents w = softplus(w_raw) in fp32 (fp64 if the parameter is), (V,).

        The graph to ``raw_exponent_V`` is kept.
        """
        raw_V = self.raw_exponent_V
        return nn.functional.softplus(raw_V.to(compute_dtype(raw_V)))

    def forward_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """See ``DiffusionFamily.forward_schedule``: alpha = 1 - t^{w_x}."""
        self._check_length(x_BL)
        return power_schedule(self.token_exponents()[x_BL], t_B)

    def reverse_velocity(
        self,
        *,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """See ``DiffusionFamily.reverse_velocity``: A_hat = E_mu[w] / t."""
        if expected_rate_KBL is None or expected_rate_KBL.shape[:2] != t_KB.shape:
            raise ValueError("the genmd4 family needs expected_rate_KBL of shape (K, B, L)")
        dtype = compute_dtype(expected_rate_KBL, t_KB)
        return expected_rate_KBL.to(dtype) / t_KB.to(dtype).unsqueeze(-1)

    def adjust_logp_true(
        self, *, logp_true_KBL: Tensor, sched: ForwardSchedule, velocity_hat_KBL: Tensor
    ) -> Tensor:
        """Return log x_tilde_x = log mu_x + log A - log A_hat (velocity-term clamps).

        The clamps match ``losses.nelbo.velocity_term`` so the log A_hat pieces cancel
        exactly in the sum of the main and velocity terms.
        """
        log_a_BL = torch.log(sched.velocity_BL.clamp_min(VELOCITY_FLOOR))
        log_a_hat_KBL = torch.log(velocity_hat_KBL.clamp_min(VELOCITY_FLOOR))
        return logp_true_KBL + log_a_BL.unsqueeze(0) - log_a_hat_KBL

    def reverse_schedule(self) -> ReverseSchedule:
        """See ``DiffusionFamily.reverse_schedule``: 1 - t (w = 1, the initialisation) for the
        token budget; the denoiser supplies e_R = E_mu[w] per position."""
        return PowerReverse(1.0, requires_denoiser_exponents=True)

    def denoiser_outputs(
        self,
        logits_BLV: Tensor,
        hidden_BLD: Tensor,
        *,
        rev_head: nn.Module | None = None,
        valid_BL: Tensor | None = None,
        free_BL: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """See ``DiffusionFamily.denoiser_outputs``: e_R = sum_v softmax_SUBS(logits)_v w_v and
        the logits tilted by log w, so tokens are drawn from x~_v ∝ w_v mu_v (method.md §2)."""
        w_V = self.token_exponents()  # fp32
        B, L, V = logits_BLV.shape
        rate_BL = expected_token_rate(logits_BLV.reshape(B * L, V), w_V, self.mask_id)
        return logits_BLV.float() + w_V.log(), rate_BL.view(B, L)
