"""The exact one-token-at-a-time sampler of the power-law reverse process (method.md §3.5).

Under alpha_R^(i) = 1 - t^{e_i} each masked position unmasks at hazard e_i / t, so from
state z_t with masked set S the next event happens at

    s* = t U^{1 / sum_{j in S} e_j},   U ~ U(0, 1),

and concerns position i with probability e_i / sum_{j in S} e_j: the generation order is
Plackett-Luce in e_R (method.md §3.2, Appendix B). e_R is re-read from the denoiser after
every event (context-dependent order); its token is drawn from x_theta^(i)(z). Each step
unmasks exactly one position per sequence, so a sequence with M masks takes M steps (one
call each); the event times are returned in ``SampleResult.grid``.

Shape legend:
    B  sequences in the batch
    L  sequence length
    S  executed steps
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.sampling.base import Sampler, SamplingRun, gumbel_argmax, reverse_schedule


class ExactSampler(Sampler):
    """Exact Plackett-Luce sampler on e_R (``exact``)."""

    name = "exact"

    def __init__(
        self,
        *,
        mask_id: int,
        num_steps: int | None = None,
        family: DiffusionFamily | None = None,
        exponent: float | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id: Token id of [MASK].
            num_steps: Optional step budget T; must be >= the number of masked positions
                (the sampler stops once nothing is masked, after at most that many calls).
            family: Power-law family (mdlm, poly) giving a constant exponent when the
                denoiser returns none; lomdm/genmd4 require denoiser exponents.
            exponent: A constant exponent instead of ``family`` (uniform random order).
            temperature: Softmax temperature, > 0.
            top_p: Nucleus mass in (0, 1].
            use_cache: Skip the call when no token changed (never happens here; kept for
                interface uniformity).
        """
        super().__init__(mask_id=mask_id, temperature=temperature, top_p=top_p,
                         use_cache=use_cache)
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.reverse = reverse_schedule(family, exponent)

    def _run(self, run: SamplingRun) -> Tensor:
        """One event per step until no mask is left; returns the event times (B, S + 1)."""
        masked_BL = run.masked_BL()
        needed = int(masked_BL.sum(-1).max()) if masked_BL.numel() else 0
        if self.num_steps is not None and needed > self.num_steps:
            raise ValueError(f"the exact sampler needs num_steps >= {needed} masked positions, "
                             f"got {self.num_steps}")
        t_B = torch.ones(masked_BL.shape[0], dtype=torch.float64, device=masked_BL.device)
        times = [t_B]
        for step in range(needed):
            run.num_steps += 1
            out = run.output()
            e_BL = self._exponents_BL(out, self.reverse, masked_BL)
            active_B = masked_BL.any(-1)
            # Plackett-Luce first choice among the masked set: Gumbel-max on log e.
            log_w_BL = torch.where(masked_BL, torch.log(e_BL), -math.inf)
            pos_B = gumbel_argmax(torch.where(active_B[:, None], log_w_BL, 0.0), run.generator)
            u_B = torch.rand(t_B.shape, dtype=torch.float64, device=t_B.device,
                             generator=run.generator)
            rate_B = torch.where(masked_BL, e_BL, 0.0).sum(-1)
            t_B = torch.where(active_B, t_B * u_B ** (1.0 / rate_B.clamp_min(1e-300)), 0.0)
            times.append(t_B)
            select_BL = torch.zeros_like(masked_BL)
            select_BL[torch.arange(pos_B.shape[0], device=pos_B.device), pos_B] = True
            self._draw_and_commit(run, out, select_BL & active_B[:, None], step)
            masked_BL = run.masked_BL()
        return torch.stack(times, dim=1)
