"""Grid ancestral samplers: the OeMDM reverse process and MDLM's ``ddpm_cache`` baseline.

``ancestral`` (method.md §1.6, §3.5): on a grid 1 = t_0 > ... > t_T, step k goes from
t = t_k to s = t_{k+1}; each masked position i unmasks with probability

    power schedules (e_R from the denoiser, or a constant):  1 - (s/t)^{e_R,i}
    context-free family schedules (ARM, BD3LM, ...):         (alpha(s) - alpha(t)) / (1 - alpha(t))

and, if it does, takes a token drawn from x_theta^(i)(z_t). Stay-masked probability is
(1 - alpha(s)) / (1 - alpha(t)) = (s/t)^e, NOT the third-party (1 - alpha(s)) (method.md,
"Known bugs"). At the last step every remaining mask is filled. With a slot family the
positions of a block unmask only inside the block's time slot, so block-by-block (and,
for ARM, left-to-right) generation falls out; empty slots cost no call (cache).

``mdlm_cache`` (method.md §5.1): alpha = 1 - t on ``linspace(1, 1e-5, T + 1)``: a masked
position becomes token v w.p. p_theta,v (t - s)/t and stays masked w.p. s/t; then an
optional final noise-removal step fills what is left with argmax x_theta. Denoiser
exponents are ignored (it is the MDLM baseline).

Shape legend:
    B  sequences in the batch
    L  sequence length
    T  grid steps
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.sampling.base import (
    DenoiserOutput,
    Sampler,
    SamplingRun,
    power_unmask_prob,
    reverse_schedule,
)
from megatron_lomdm.sampling.grids import GridLike, resolve_grid

# MDLM's ancestral grid ends at 1e-5.
MDLM_T_MIN = 1e-5


class AncestralSampler(Sampler):
    """The OeMDM ancestral sampler (``ancestral``)."""

    name = "ancestral"
    default_t_min = 0.0

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
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id: Token id of [MASK].
            num_steps: T; may be omitted when ``grid`` is an explicit tensor.
            grid: ``GridSpec``, mapping, kind name or explicit (T + 1,) tensor; default
                uniform ``linspace(1, 0, T + 1)``.
            family: Context-free reverse schedule source used when the denoiser returns no
                exponents (mdlm, poly, arm, bd3lm); for lomdm/genmd4 the denoiser must
                return them.
            exponent: A constant exponent instead of ``family``.
            temperature: Softmax temperature, > 0.
            top_p: Nucleus mass in (0, 1].
            use_cache: Skip the call when no token changed.
        """
        super().__init__(mask_id=mask_id, temperature=temperature, top_p=top_p,
                         use_cache=use_cache)
        self.grid_T1 = resolve_grid(grid, num_steps, self.default_t_min)
        self.num_steps = self.grid_T1.numel() - 1
        self.reverse = reverse_schedule(family, exponent)

    def _unmask_prob_BL(
        self, out: DenoiserOutput, masked_BL: Tensor, t: float, s: float
    ) -> Tensor:
        """P(unmask at this step | masked), fp64 (B, L) (broadcastable)."""
        reverse = self.reverse
        if (out.velocity_exponents_BL is not None or reverse is None
                or reverse.requires_denoiser_exponents):
            # power law with e_R from the denoiser (raises if it returned none)
            return power_unmask_prob(self._exponents_BL(out, reverse, masked_BL), t, s)
        return reverse.unmask_prob(t, s, masked_BL.shape[1], masked_BL.device)

    def _last_step_fills(self) -> bool:
        """Whether the last grid step unmasks every remaining position."""
        return True

    def _run(self, run: SamplingRun) -> Tensor:
        """T grid steps; see the module docstring."""
        grid_T1 = self.grid_T1
        for k in range(self.num_steps):
            masked_BL = run.masked_BL()
            if not bool(masked_BL.any()):
                break
            run.num_steps += 1
            out = run.output()
            t, s = float(grid_T1[k]), float(grid_T1[k + 1])
            if k == self.num_steps - 1 and self._last_step_fills():
                p_BL = torch.ones(masked_BL.shape, dtype=torch.float64, device=masked_BL.device)
            else:
                p_BL = self._unmask_prob_BL(out, masked_BL, t, s).expand(masked_BL.shape)
            u_BL = torch.rand(masked_BL.shape, dtype=torch.float64, device=masked_BL.device,
                              generator=run.generator)
            self._draw_and_commit(run, out, masked_BL & (u_BL < p_BL), k)
        return grid_T1


class MDLMCacheSampler(AncestralSampler):
    """MDLM's ancestral ``ddpm_cache`` sampler, alpha = 1 - t (``mdlm_cache``)."""

    name = "mdlm_cache"
    default_t_min = MDLM_T_MIN

    def __init__(
        self,
        *,
        mask_id: int,
        num_steps: int | None = None,
        grid: GridLike = None,
        noise_removal: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id: Token id of [MASK].
            num_steps: T.
            grid: As for ``ancestral``; default ``linspace(1, 1e-5, T + 1)`` (MDLM).
            noise_removal: After the grid, fill the remaining masks with argmax x_theta in
                one extra step (MDLM's default). If False, the last grid step fills them by
                sampling instead (as if s = 0).
            temperature: Softmax temperature, > 0.
            top_p: Nucleus mass in (0, 1].
            use_cache: Skip the call when no token changed (the "cache" of ddpm_cache).
        """
        super().__init__(mask_id=mask_id, num_steps=num_steps, grid=grid, exponent=1.0,
                         temperature=temperature, top_p=top_p, use_cache=use_cache)
        self.noise_removal = noise_removal

    def _unmask_prob_BL(
        self, out: DenoiserOutput, masked_BL: Tensor, t: float, s: float
    ) -> Tensor:
        """(t - s) / t whatever the denoiser's exponents (alpha = 1 - t)."""
        return self.reverse.unmask_prob(t, s, masked_BL.shape[1], masked_BL.device)

    def _last_step_fills(self) -> bool:
        """Without noise removal the last grid step fills everything."""
        return not self.noise_removal

    def _run(self, run: SamplingRun) -> Tensor:
        """The grid steps, then the optional argmax noise-removal step (index T)."""
        grid_T1 = super()._run(run)
        masked_BL = run.masked_BL()
        if self.noise_removal and bool(masked_BL.any()):
            run.num_steps += 1
            out = run.output()
            # argmax is unchanged by temperature and nucleus filtering.
            tokens = [self._log_probs(out.logits_BLV, rows_N2).argmax(-1)
                      for rows_N2 in self._row_chunks(masked_BL)]
            run.commit(masked_BL, torch.cat(tokens), self.num_steps)
        return grid_T1
