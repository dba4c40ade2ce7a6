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
in fp32 even under bf16 autocast. ``schedule`` and ``forward_schedule`` give this law (the
samplers use it).

The Monte-Carlo NELBO estimator of training and evaluation (``estimator_schedule``) does not
sample tau: masking w.p. tau with weight A = nb / tau has second moment ~ int tau^-2 tau dtau
= infinity. With n valid positions in the active block and k of them masked,

    int_0^1 (1/tau) C(n, k) tau^k (1 - tau)^(n - k) dtau = 1/k,

so block b's NELBO is exactly n E_{k ~ U{1..n}} E_{S ~ uniform k-subset}[(1/k) sum_{i in S}
-log p(x_i | x_<b, x_{b \ S})]. The estimator maps tau to k = ceil(tau n) (uniform on 1..n for
uniform tau), masks the k active positions with the smallest uniforms (a uniform k-subset),
every later block and no earlier one, and weighs masked active positions by A = nb n / k. Each
draw is at most nb n max(-log p) (ARM: L times one position's AR loss), so the variance is
finite, and the mean is the NELBO above exactly, t being uniform on [0, 1) (no eps_t floor:
``needs_time_floor`` is False). Pads are never masked and a block's n counts its valid positions
only, so with padding the estimate is unbiased for the sum over blocks of the MDLM NELBO of the
block's valid positions (what the tau law gives); blocks of pads only contribute 0. Each
position's expected weight is still 1: E_t[P(masked) A] = E_k[(k / n) nb n / k] / nb = 1.

Shape legend:
    B  sequences in the micro-batch
    K  corruptions per sequence
    N  flattened sequences (B, or K * B for the reverse velocity)
    L  sequence length
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_lomdm.config.families import BD3LM, BLOCKS_DIVIDE
from megatron_lomdm.diffusion.base import ContextFreeFamily, ForwardSchedule, compute_dtype


@dataclass
class SlotEstimatorSchedule(ForwardSchedule):
    """The slot families' finite-variance estimator law at (x, t) (see the module docstring).

    The inherited (B, L) tensors hold per-position marginals: log(k/n) and log(1 - k/n) on the
    valid positions of the active block, log 0 / log 1 elsewhere (earlier blocks clean, later
    blocks masked, pads of the active block clean), and A = nb n / k on the active valid
    positions, 0 elsewhere. Masks are NOT independent across positions: exactly k of the n
    active positions are masked (``SlotFamily.sample_masks``).

    Attributes:
        active_BL: Valid positions of the active block, bool (B, L).
        num_masked_B: k in 1..n, int64 (B,); 0 when the active block has no valid position.
    """

    active_BL: Tensor
    num_masked_B: Tensor


class SlotFamily(ContextFreeFamily):
    """A clipped slot schedule over consecutive blocks of ``block_size`` positions."""

    needs_time_floor = False  # the estimator's weights are bounded by nb * block_size

    def __init__(self, *, block_size: int, seq_length: int, mask_id: int) -> None:
        """Build the schedule.

        Args:
            block_size: Block length L' (positions per slot); must divide seq_length.
            seq_length: Sequence length L.
            mask_id: Token id of [MASK].

        Raises:
            ValueError: If block_size does not divide seq_length.
        """
        BLOCKS_DIVIDE.check(type(self).__name__, block_size=block_size, seq_length=seq_length)
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

    def estimator_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> SlotEstimatorSchedule:
        """See ``DiffusionFamily.estimator_schedule``: tau integrated out given k.

        t in ((s - 1)/nb, s/nb] (slot s = 1..nb) activates block nb - s (0-based) with local
        time tau = nb t - (s - 1) in (0, 1] and k = ceil(tau n) clipped to [1, n]; t = 0
        counts as tau -> 0 in slot 1. ``fwd_logits_BL`` is ignored.
        """
        self._check_length(x_BL)
        dtype = compute_dtype(t_B)
        B, L = x_BL.shape
        device = t_B.device
        nb = self.num_blocks
        if valid_BL is None:
            valid_BL = torch.ones(B, L, dtype=torch.bool, device=device)
        # (block, k) is an integer function of t: computed in fp64 whatever t's dtype.
        t64_B = t_B.detach().to(torch.float64)
        slot_B = torch.ceil(nb * t64_B).clamp(1, nb)
        tau_B = nb * t64_B - (slot_B - 1)
        block_B1 = (nb - slot_B).to(torch.int64).unsqueeze(-1)  # 0-based active block
        block_L = torch.arange(L, device=device) // self.block_size
        active_BL = (block_L == block_B1) & valid_BL.bool()
        later_BL = block_L > block_B1
        n_B = active_BL.sum(-1)
        k_B = torch.minimum(torch.ceil(tau_B * n_B).clamp(min=1), n_B.to(torch.float64))
        k_B = k_B.to(torch.int64)
        n_B1 = n_B.clamp(min=1).to(dtype).unsqueeze(-1)
        k_B1 = k_B.clamp(min=1).to(dtype).unsqueeze(-1)
        mask_prob_BL = torch.where(active_BL, k_B1 / n_B1, later_BL.to(dtype))
        # where(): A = 0 outside the active positions (alpha is flat there), as in schedule().
        velocity_BL = torch.where(active_BL, nb * n_B1 / k_B1, 0.0)
        return SlotEstimatorSchedule(
            log_mask_prob_BL=torch.log(mask_prob_BL),  # -inf: never masked
            log_keep_prob_BL=torch.log1p(-mask_prob_BL),  # -inf: always masked
            velocity_BL=velocity_BL,
            t_B=t_B.to(dtype),
            active_BL=active_BL,
            num_masked_B=k_B,
        )

    def estimator_reverse_velocity(
        self,
        *,
        sched: ForwardSchedule,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """See ``DiffusionFamily.estimator_reverse_velocity``: input-free, A_hat = A.

        For a ``SlotEstimatorSchedule`` A_hat is the schedule's own velocity (the reverse
        scheduler is the forward one), so the velocity term is exactly 0.
        """
        if not isinstance(sched, SlotEstimatorSchedule):
            return super().estimator_reverse_velocity(
                sched=sched,
                t_KB=t_KB,
                rev_logits_KBL=rev_logits_KBL,
                expected_rate_KBL=expected_rate_KBL,
                valid_BL=valid_BL,
            )
        return sched.velocity_BL.unsqueeze(0).expand(t_KB.shape[0], *sched.velocity_BL.shape)

    def sample_masks(self, sched: ForwardSchedule, uniform_KBL: Tensor) -> Tensor:
        """See ``DiffusionFamily.sample_masks``; a ``SlotEstimatorSchedule`` masks exactly k.

        The k active positions with the smallest uniforms are masked (a uniformly random
        k-subset; ties, of probability ~ n^2 2^-25, go to the leftmost), plus every position
        masked with certainty (later blocks); nothing else. With shared uniforms the masks
        are nested in t, as for the independent law.
        """
        masks_KBL = super().sample_masks(sched, uniform_KBL)  # 0/1 outside the active block
        if not isinstance(sched, SlotEstimatorSchedule):
            return masks_KBL
        active_1BL = sched.active_BL.unsqueeze(0)
        # Uniforms are < 1, so the n active positions take ranks 0..n-1 before the others.
        key_KBL = torch.where(active_1BL, uniform_KBL, 2.0)
        order_KBL = torch.argsort(key_KBL, dim=-1, stable=True)
        position_KBL = torch.arange(key_KBL.shape[-1], device=key_KBL.device).expand_as(order_KBL)
        rank_KBL = torch.empty_like(order_KBL).scatter_(-1, order_KBL, position_KBL)
        chosen_KBL = rank_KBL < sched.num_masked_B.view(1, -1, 1)
        return torch.where(active_1BL, chosen_KBL, masks_KBL)

    def log_q(
        self, sched: ForwardSchedule, mask_KBL: Tensor, valid_BL: Tensor | None = None
    ) -> Tensor:
        """See ``DiffusionFamily.log_q``; exact for the k-subset law of a SlotEstimatorSchedule.

        That law gives -log C(n, k) when exactly k active positions are masked (-inf
        otherwise), plus the deterministic rest (0 or -inf) over the other valid positions.
        """
        if not isinstance(sched, SlotEstimatorSchedule):
            return super().log_q(sched, mask_KBL, valid_BL)
        active_BL = sched.active_BL
        rest_BL = ~active_BL if valid_BL is None else valid_BL.bool() & ~active_BL
        rest_KB = super().log_q(sched, mask_KBL, rest_BL)
        n_B = active_BL.sum(-1).to(rest_KB.dtype)
        k_B = sched.num_masked_B.to(rest_KB.dtype)
        log_subsets_B = torch.lgamma(n_B + 1) - torch.lgamma(k_B + 1) - torch.lgamma(n_B - k_B + 1)
        hits_KB = (mask_KBL.bool() & active_BL.unsqueeze(0)).sum(-1)
        subset_KB = torch.where(
            hits_KB == sched.num_masked_B.unsqueeze(0), -log_subsets_B.unsqueeze(0), -torch.inf
        )
        return rest_KB + subset_KB


class BD3LMFamily(SlotFamily):
    """Block diffusion with block size L' (``diffusion.name: bd3lm``)."""

    spec = BD3LM
