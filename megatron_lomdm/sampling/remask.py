"""A remasking sampler: ``top_margin`` whose decoded tokens may be masked again (``remask``).

ReMDM (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling",
arXiv 2503.00307) lets a decoded token return to [MASK] so a mistake made early can be undone;
the any-process MDM (Yang et al. 2025, method.md §5.8) learns when to. This sampler uses the
model's own confidence, with no extra network and no extra call:

On the T-step grid of ``top_margin`` (same K plan, same margin ranking, optional Gumbel noise),
every step k with 0 < k < T - 1 first **re-checks** up to ``checks`` decoded positions per row,
drawn uniformly without replacement among the positions this run decoded (never a prompt
position): they are masked for this step's one denoiser call. For each re-checked position i
holding token v, p_now = x_theta(v | context without i) under the sampling law; it is **remasked**
iff

    p_now < drop * p_dec,

p_dec being the probability v had when it was drawn (its confidence dropped to below ``drop`` of
it). The others get their tokens back (their unmask step is kept). Then the usual top-K step runs
on the masked positions, remasked ones included (their logits come from the same call); K counts
what is still masked against the plan, so remasked tokens are made up in later steps. Step 0 has
nothing to check and the last step checks nothing and fills every mask, so the result holds no
[MASK].

Budget: exactly one denoiser call per step, as ``top_margin`` (T calls at most); at most
``checks`` x (T - 2) re-checks and remasks per row. The price: the call of a step sees its
re-checked tokens masked, so the step's other predictions have up to ``checks`` fewer tokens of
context. ``SampleResult.num_remasked`` counts the remasks of the batch.

Shape legend:
    B  sequences in the batch
    L  sequence length
    T  grid steps
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.sampling.adaptive import TopMarginSampler, _Plan, select_top_k
from megatron_lomdm.sampling.base import DenoiserOutput, SamplingRun, gumbel_argmax
from megatron_lomdm.sampling.grids import GridLike


class RemaskSampler(TopMarginSampler):
    """``top_margin`` with confidence-drop remasking (``remask``)."""

    name = "remask"

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
        checks: int = 4,
        drop: float = 0.5,
    ) -> None:
        """Configure the sampler.

        Args:
            mask_id, num_steps, grid, family, exponent, temperature, top_p, use_cache,
                noise_scale: As for ``top_margin``.
            checks: Decoded positions re-checked per row and step, >= 0 (0: ``top_margin``).
            drop: A re-checked token is remasked when its probability falls below ``drop``
                times its probability when it was drawn; in [0, 1] (0: never).

        Raises:
            ValueError: For checks < 0 or drop outside [0, 1].
        """
        super().__init__(mask_id=mask_id, num_steps=num_steps, grid=grid, family=family,
                         exponent=exponent, temperature=temperature, top_p=top_p,
                         use_cache=use_cache, noise_scale=noise_scale)
        if checks < 0:
            raise ValueError(f"checks must be >= 0, got {checks}")
        if not 0 <= drop <= 1:
            raise ValueError(f"drop must be in [0, 1], got {drop}")
        self.checks = int(checks)
        self.drop = float(drop)

    def _recheck(self, run: SamplingRun, decoded_BL: Tensor) -> tuple[Tensor, Tensor]:
        """Mask up to ``checks`` random decoded positions per row; returns them and their tokens."""
        u_BL = torch.rand(decoded_BL.shape, dtype=torch.float64, device=decoded_BL.device,
                          generator=run.generator)
        k_B = torch.full((decoded_BL.shape[0],), self.checks, device=decoded_BL.device)
        check_BL = select_top_k(u_BL, decoded_BL, k_B)
        return check_BL, run.remask(check_BL)

    def _token_prob_N(self, out: DenoiserOutput, select_BL: Tensor, tokens_N: Tensor) -> Tensor:
        """The sampling law's probability of ``tokens_N`` at the selected positions, fp64 (N,)."""
        probs = []
        start = 0
        for rows_N2 in self._row_chunks(select_BL):
            logp_NV = self._log_probs(out.logits_BLV, rows_N2)
            tok_N = tokens_N[start: start + rows_N2.shape[0]].to(logp_NV.device)
            probs.append(logp_NV.gather(1, tok_N[:, None].long())[:, 0].exp())
            start += rows_N2.shape[0]
        return torch.cat(probs) if probs else torch.zeros(0, dtype=torch.float64)

    def _run(self, run: SamplingRun) -> Tensor:
        """T steps: re-check, one call, remask or restore, then the top-K margin step."""
        masked_BL = run.masked_BL()
        generated_BL = masked_BL.clone()  # the positions this run may write (never the prompt)
        plan = _Plan(masked_BL.sum(-1), self.planned_counts(masked_BL))
        p_dec_BL = torch.zeros(masked_BL.shape, dtype=torch.float64, device=masked_BL.device)
        for k in range(self.num_steps):
            if not bool(masked_BL.any()):
                break
            run.num_steps += 1
            check_BL = None
            if 0 < k < self.num_steps - 1 and self.checks > 0:
                check_BL, held_N = self._recheck(run, generated_BL & ~masked_BL)
            out = run.output()
            if check_BL is not None and bool(check_BL.any()):
                p_now_N = self._token_prob_N(out, check_BL, held_N)
                drop_N = p_now_N < self.drop * p_dec_BL[check_BL]
                keep_BL = check_BL.clone()
                keep_BL[check_BL] = ~drop_N
                run.restore(keep_BL, held_N[~drop_N])
                run.num_remasked += int(drop_N.sum())
            masked_BL = run.masked_BL()
            select_BL = select_top_k(self._score_BL(run, out, masked_BL, k), masked_BL,
                                     self._count_B(out, masked_BL, k, plan))
            tokens, probs = [], []
            for rows_N2 in self._row_chunks(select_BL):
                logp_NV = self._log_probs(out.logits_BLV, rows_N2)
                tok_N = gumbel_argmax(logp_NV, run.generator)
                tokens.append(tok_N)
                probs.append(logp_NV.gather(1, tok_N[:, None])[:, 0].exp())
            if tokens:
                run.commit(select_BL, torch.cat(tokens), k)
                p_dec_BL[select_BL] = torch.cat(probs).to(p_dec_BL.device)
            masked_BL = run.masked_BL()
        return self.grid_T1

    def extra_repr(self) -> str:
        """Options, for logging."""
        return f"{super().extra_repr()}, checks={self.checks}, drop={self.drop}"
