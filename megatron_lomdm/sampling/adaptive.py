"""Adaptive (planner) samplers: Kim et al.'s top-K oracles and the EB-sampler.

``top_prob`` / ``top_margin`` (Kim et al. 2025; method.md §5.4): on a T-step grid, step k
unmasks the K_k masked positions with the largest max-probability (resp. top-2 probability
margin) of their sampling law and draws their tokens from it. K follows the vanilla
(context-free) schedule's expected count: with M initially masked positions and
C_k = round(sum_{i masked} alpha_R^(i)(t_k)) the planned cumulative count (C_T = M),

    K_k = min(remaining, max(1, C_{k+1} - done)),

so at least one token is unmasked per call while masks remain, the plan self-corrects,
the counts sum to M, and the last step fills everything. ``noise_scale`` > 0 adds
``noise_scale * G`` (G standard Gumbel, one per masked position and step, from the sampler's
generator) to the selection score, as Kim et al. do (0.5 in their Sudoku runs); at 0 no noise is
drawn and the selection is deterministic given the logits.

``lomdm_top_margin`` (a learned-order model's reverse scheduler with the margin oracle): at step
k (t = t_k to s = t_{k+1}) the denoiser's reverse exponents give every masked position its
unmask probability p_i = 1 - (s/t)^{e_R,i} (what ``ancestral`` would use). How many: K =
min(remaining, max(1, round(sum_{i masked} p_i))), the learned schedule's expected count for this
step (the last step fills everything). Which: the K largest scores log p_i + log margin_i (the
learned scheduler's wish to unmask i now times the denoiser's confidence), plus the Gumbel noise
when ``noise_scale`` > 0. With equal exponents it is ``top_margin`` on the same schedule.

``entropy_bound`` (Ben-Hamu et al. 2025; method.md §5.5): sort the masked positions by the
entropy H of their sampling law (ascending) and accept the largest prefix U with
sum_U H - max_U H <= gamma (the first one always); draw and commit U, one call per step.
As H is sorted, sum_U H - max_U H is the sum over U of all but its last element, which
grows with |U|, so the accepted prefix is maximal. The number of calls varies.

Confidences and entropies are those of the law tokens are drawn from (SUBS, temperature,
nucleus). Ties are broken by position (stable sort).

Shape legend:
    B  sequences in the batch
    L  sequence length
    T  grid steps
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.sampling.base import (
    DenoiserOutput,
    Sampler,
    SamplingRun,
    gumbel_noise,
    power_unmask_prob,
    reverse_schedule,
)
from megatron_lomdm.sampling.grids import GridLike, resolve_grid


def select_top_k(score_BL: Tensor, candidate_BL: Tensor, k_B: Tensor) -> Tensor:
    """The k_b highest-scoring candidates of each row (ties: lower position first).

    Args:
        score_BL: Scores, (B, L); ignored outside the candidates.
        candidate_BL: Bool, (B, L).
        k_B: Number to select per row (clipped to the number of candidates), (B,).

    Returns:
        Bool selection, (B, L).
    """
    score_BL = torch.where(candidate_BL, score_BL, -math.inf)
    order_BL = torch.sort(score_BL, dim=-1, descending=True, stable=True).indices
    rank_BL = torch.empty_like(order_BL)
    arange_BL = torch.arange(order_BL.shape[1], device=order_BL.device).expand_as(order_BL)
    rank_BL.scatter_(1, order_BL, arange_BL)
    return candidate_BL & (rank_BL < k_B[:, None])


def entropy_bound_select(entropy_BL: Tensor, candidate_BL: Tensor, gamma: float) -> Tensor:
    """EB-sampler's accepted set: the largest low-entropy prefix with sum H - max H <= gamma.

    Args:
        entropy_BL: Entropies (>= 0), (B, L); ignored outside the candidates.
        candidate_BL: Bool, (B, L); rows without candidates select nothing.
        gamma: The error budget, >= 0.

    Returns:
        Bool selection, (B, L); at least one position in every row with a candidate.
    """
    h_BL = torch.where(candidate_BL, entropy_BL.to(torch.float64), math.inf)
    h_sorted_BL, order_BL = torch.sort(h_BL, dim=-1, stable=True)
    cand_sorted_BL = torch.gather(candidate_BL, 1, order_BL)
    # sum over the prefix minus its max (the last, sorted) = exclusive cumulative sum.
    h_finite_BL = torch.where(cand_sorted_BL, h_sorted_BL, 0.0)
    excl_BL = h_finite_BL.cumsum(-1) - h_finite_BL
    accept_sorted_BL = cand_sorted_BL & (excl_BL <= gamma)
    return torch.zeros_like(candidate_BL).scatter_(1, order_BL, accept_sorted_BL)


class _Plan(NamedTuple):
    """The context-free plan of a top-K run: initially masked counts (B,), C_k (T + 1, B)."""

    total_B: Tensor
    counts_T1B: Tensor


class _TopKOracle(Sampler):
    """Shared T-step loop of the top-K oracles; subclasses pick the confidence."""

    confidence_kind = ""

    def __init__(
        self,
        *,
        mask_id: int,
        num_steps: int | None = None,
        grid: GridLike = None,
        family: DiffusionFamily | None = None,
        exponent: float | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        noise_scale: float = 0.0,
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id: Token id of [MASK].
            num_steps: T.
            grid: As for ``ancestral``; default uniform ``linspace(1, 0, T + 1)``.
            family: Context-free family whose schedule sets K (its mean schedule for
                lomdm/genmd4); default: exponent 1 (MDLM, alpha = 1 - t).
            exponent: A constant exponent instead of ``family``.
            temperature: Softmax temperature, > 0.
            top_p: Nucleus mass in (0, 1].
            use_cache: Skip the call when no token changed (never happens here).
            noise_scale: Scale of the Gumbel noise added to the selection score, >= 0.

        Raises:
            ValueError: If noise_scale < 0.
        """
        super().__init__(mask_id=mask_id, temperature=temperature, top_p=top_p,
                         use_cache=use_cache)
        if not noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        self.noise_scale = float(noise_scale)
        self.grid_T1 = resolve_grid(grid, num_steps, 0.0)
        self.num_steps = self.grid_T1.numel() - 1
        if family is None and exponent is None:
            exponent = 1.0
        self.reverse = reverse_schedule(family, exponent)

    def planned_counts(self, masked_BL: Tensor) -> Tensor:
        """Planned cumulative unmask counts C_k per row, (T + 1, B) int64; C_T = M."""
        L, device = masked_BL.shape[1], masked_BL.device
        keep_T1L = torch.stack(
            [self.reverse.keep_prob(float(t), L, device) for t in self.grid_T1]
        )
        expected_T1B = keep_T1L @ masked_BL.to(torch.float64).T
        counts_T1B = torch.round(expected_T1B).long()
        counts_T1B[-1] = masked_BL.sum(-1)
        return torch.minimum(counts_T1B, counts_T1B[-1])

    def _count_B(self, out: DenoiserOutput, masked_BL: Tensor, k: int, plan: _Plan) -> Tensor:
        """K_k per row: the planned cumulative count minus what is done (>= 1); all at the end."""
        remaining_B = masked_BL.sum(-1)
        if k == self.num_steps - 1:
            return remaining_B
        done_B = plan.total_B - remaining_B
        return torch.minimum((plan.counts_T1B[k + 1] - done_B).clamp_min(1), remaining_B)

    def _score_BL(self, run: SamplingRun, out: DenoiserOutput, masked_BL: Tensor, k: int) -> Tensor:
        """The selection score of each masked position (noise included), fp64 (B, L)."""
        score_BL = self._confidence_BL(out, masked_BL, self.confidence_kind)
        return self._add_noise(run, score_BL)

    def _add_noise(self, run: SamplingRun, score_BL: Tensor) -> Tensor:
        if self.noise_scale == 0:
            return score_BL
        return score_BL + self.noise_scale * gumbel_noise(score_BL.shape, score_BL.device, run.generator)

    def _run(self, run: SamplingRun) -> Tensor:
        """T steps of top-K selection by the score."""
        masked_BL = run.masked_BL()
        plan = _Plan(masked_BL.sum(-1), self.planned_counts(masked_BL))
        for k in range(self.num_steps):
            if not bool(masked_BL.any()):
                break
            run.num_steps += 1
            out = run.output()
            k_B = self._count_B(out, masked_BL, k, plan)
            score_BL = self._score_BL(run, out, masked_BL, k)
            self._draw_and_commit(run, out, select_top_k(score_BL, masked_BL, k_B), k)
            masked_BL = run.masked_BL()
        return self.grid_T1

    def extra_repr(self) -> str:
        """Options, for logging."""
        return f"{super().extra_repr()}, num_steps={self.num_steps}, noise_scale={self.noise_scale}"



class TopProbSampler(_TopKOracle):
    """Top-probability oracle: unmask the K most confident positions (``top_prob``)."""

    name = "top_prob"
    confidence_kind = "max_prob_N"


class TopMarginSampler(_TopKOracle):
    """Top-probability-margin oracle: unmask the K largest top-2 margins (``top_margin``)."""

    name = "top_margin"
    confidence_kind = "margin_N"


class LoMDMTopMarginSampler(TopMarginSampler):
    """The learned reverse scheduler's count and wish, ranked by margin (``lomdm_top_margin``)."""

    name = "lomdm_top_margin"

    def _unmask_prob_BL(self, out: DenoiserOutput, masked_BL: Tensor, k: int) -> Tensor:
        """p_i = 1 - (s/t)^{e_R,i} of this step, fp64 (B, L) (0 outside the masked positions)."""
        t, s = float(self.grid_T1[k]), float(self.grid_T1[k + 1])
        p_BL = power_unmask_prob(self._exponents_BL(out, self.reverse, masked_BL), t, s)
        return torch.where(masked_BL, p_BL, 0.0)

    def _count_B(self, out: DenoiserOutput, masked_BL: Tensor, k: int, plan: _Plan) -> Tensor:
        remaining_B = masked_BL.sum(-1)
        if k == self.num_steps - 1:
            return remaining_B
        expected_B = self._unmask_prob_BL(out, masked_BL, k).sum(-1)
        return torch.minimum(torch.round(expected_B).long().clamp_min(1), remaining_B)

    def _score_BL(self, run: SamplingRun, out: DenoiserOutput, masked_BL: Tensor, k: int) -> Tensor:
        margin_BL = self._confidence_BL(out, masked_BL, "margin_N")
        tiny = torch.finfo(torch.float64).tiny  # a zero margin stays finite: ranked last, still selectable
        p_BL = self._unmask_prob_BL(out, masked_BL, k)
        score_BL = torch.log(p_BL.clamp_min(tiny)) + torch.log(margin_BL.clamp_min(tiny))
        return self._add_noise(run, score_BL)


class EntropyBoundSampler(Sampler):
    """The EB-sampler (``entropy_bound``)."""

    name = "entropy_bound"

    def __init__(
        self,
        *,
        mask_id: int,
        gamma: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id: Token id of [MASK].
            gamma: Entropy budget (nats), >= 0; 0 unmasks one token per call.
            temperature: Softmax temperature, > 0.
            top_p: Nucleus mass in (0, 1].
            use_cache: Skip the call when no token changed (never happens here).

        Raises:
            ValueError: If gamma < 0.
        """
        super().__init__(mask_id=mask_id, temperature=temperature, top_p=top_p,
                         use_cache=use_cache)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def _run(self, run: SamplingRun) -> None:
        """Steps until no mask is left (at most L, one accepted position minimum)."""
        masked_BL = run.masked_BL()
        for step in range(masked_BL.shape[1]):
            if not bool(masked_BL.any()):
                break
            run.num_steps += 1
            out = run.output()
            entropy_BL = self._confidence_BL(out, masked_BL, "entropy_N")
            self._draw_and_commit(run, out, entropy_bound_select(entropy_BL, masked_BL,
                                                                 self.gamma), step)
            masked_BL = run.masked_BL()
        return None
