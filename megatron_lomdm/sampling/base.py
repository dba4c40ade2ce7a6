"""Sampler building blocks: the denoiser protocol, results, the SUBS sampling law, schedules.

A sampler never sees a backbone. It calls a **denoiser** ``denoise(z_BL) -> DenoiserOutput``:
one call is one backbone pass that yields the logits and, for learned-order models, the
reverse scheduler's exponents e_R computed from the same pass's hidden states (method.md
§3.5). ``denoiser_from_backbone`` wires a backbone (+ reverse head) for the families of
``megatron_lomdm.diffusion``. Samplers apply SUBS themselves (method.md §1.2): the [MASK]
logit is -inf and unmasked positions are carried over (a sampler only ever writes masked
positions).

Wiring by hand (what ``denoiser_from_backbone`` does for a LoMDM model at TP = 1)::

    def denoise(z_BL):
        logits_BLV, hidden_BLD = backbone(z_BL)               # one pass
        e_BL = family.exponents(rev_head(hidden_BLD))         # e_R from the same pass
        return DenoiserOutput(logits_BLV, e_BL)

    result = build_sampler("ancestral", mask_id=mask_id, num_steps=256).sample(
        denoise, batch_size=8, seq_length=1024, generator=torch.Generator(device).manual_seed(0),
        device=device)

For context-free families return ``DenoiserOutput(logits_BLV)`` and build the sampler with
``family=...`` (or ``exponent=...``).

Caching (MDLM ``ddpm_cache``): the backbone is not time-conditioned (method.md §1.1, §6.10),
so if no token changed since the last call the logits and e_R are unchanged and the call is
skipped. Cached and uncached runs consume the generator identically and give equal samples.

Dtypes: sampling laws (log-probs, unmask probabilities, Gumbel noise) are fp64 whatever the
logits' dtype (method.md §3.5, Zheng et al. 2024); logits are upcast chunk by chunk, so at
most a (``CHUNK_ROWS``, V) fp64 block exists at a time.

Shape legend:
    B  sequences in the batch
    L  sequence length
    V  vocabulary size (including [MASK])
    N  selected (b, l) rows, flattened in row-major order
    T  grid steps
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.reverse import (  # noqa: F401  (re-exported; their home is diffusion/)
    FamilyReverse,
    PowerReverse,
    ReverseSchedule,
)

# Rows of fp64 (rows, V) blocks processed at once (256 x 50k x 8 B = 100 MB per block).
CHUNK_ROWS = 256
_F64 = torch.float64


@dataclass
class DenoiserOutput:
    """What one backbone pass gives a sampler.

    Attributes:
        logits_BLV: Raw backbone logits over the full vocabulary (any float dtype), (B, L, V).
            SUBS is applied by the sampler.
        velocity_exponents_BL: Reverse-scheduler exponents e_R > 0 with
            alpha_R = 1 - t^{e_R} (method.md §3.2), (B, L); None for context-free families,
            whose reverse schedule the sampler takes from its own configuration.
    """

    logits_BLV: Tensor
    velocity_exponents_BL: Tensor | None = None


Denoiser = Callable[[Tensor], DenoiserOutput]


@dataclass
class SampleResult:
    """The output of one ``Sampler.sample`` call.

    Attributes:
        tokens_BL: Generated token ids (no [MASK] left), (B, L).
        num_calls: Denoiser calls made (<= num_steps; fewer when the cache hit).
        unmask_step_BL: Step index at which each position was unmasked; -1 for fixed
            (prompt) positions, (B, L) int64.
        grid: The time grid used, (T + 1,) fp64, for grid samplers; (B, S + 1) event times
            for ``exact``; None for ``entropy_bound``.
        num_steps: Steps executed (steps that started with at least one [MASK]).
        num_remasked: Decoded tokens masked again (``remask``; 0 for every other sampler).
    """

    tokens_BL: Tensor
    num_calls: int
    unmask_step_BL: Tensor
    grid: Tensor | None
    num_steps: int
    num_remasked: int = 0


class Confidence(NamedTuple):
    """Per-row confidence of the sampling distribution (fp64, (N,) each)."""

    max_prob_N: Tensor
    margin_N: Tensor
    entropy_N: Tensor


# --------------------------------------------------------------------------------------
# The per-position sampling law.
# --------------------------------------------------------------------------------------


def sampling_log_probs(
    logits_NV: Tensor, *, mask_id: int, temperature: float = 1.0, top_p: float = 1.0
) -> Tensor:
    """The law tokens are drawn from: SUBS, temperature, then nucleus (top-p) filtering.

    Args:
        logits_NV: Logits of masked rows (any float dtype), (N, V).
        mask_id: Token id of [MASK]; its probability is 0 (SUBS).
        temperature: Logits are divided by it; > 0.
        top_p: Keep the smallest set of most likely tokens whose mass is >= top_p, then
            renormalise; 1 keeps everything.

    Returns:
        Normalised log-probs, fp64, (N, V); -inf outside the support.
    """
    logits_NV = logits_NV.to(_F64, copy=True)  # one fp64 copy, edited in place below
    logits_NV[:, mask_id] = -math.inf
    if temperature != 1.0:
        logits_NV.div_(temperature)
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    if top_p >= 1.0:
        return logp_NV
    prob_sorted_NV, order_NV = torch.sort(logp_NV.exp(), dim=-1, descending=True)
    mass_before_NV = prob_sorted_NV.cumsum(-1) - prob_sorted_NV
    drop_sorted_NV = mass_before_NV >= top_p  # the most likely token always stays
    drop_NV = torch.empty_like(drop_sorted_NV).scatter_(-1, order_NV, drop_sorted_NV)
    return torch.log_softmax(logp_NV.masked_fill(drop_NV, -math.inf), dim=-1)


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device | str,
                 generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel draws -log(-log U), fp64, of ``shape``."""
    u = torch.rand(shape, dtype=_F64, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(_F64).tiny)))


def gumbel_argmax(logp_NV: Tensor, generator: torch.Generator | None) -> Tensor:
    """One categorical draw per row by Gumbel-max, in fp64.

    Args:
        logp_NV: Log-probs (fp64 recommended), (N, V).
        generator: Source of the uniforms (on ``logp_NV``'s device); None = global RNG.

    Returns:
        Token ids, int64, (N,).
    """
    gumbel_NV = gumbel_noise(logp_NV.shape, logp_NV.device, generator)
    return torch.argmax(logp_NV.to(_F64) + gumbel_NV, dim=-1)


def confidence(logp_NV: Tensor) -> Confidence:
    """Max probability, top-2 margin and entropy of each row's law (Kim et al.; EB-sampler).

    Args:
        logp_NV: Normalised log-probs, (N, V), V >= 2.

    Returns:
        The three scores, fp64, (N,) each.
    """
    return Confidence(*(confidence_score(logp_NV, kind) for kind in Confidence._fields))


def confidence_score(logp_NV: Tensor, kind: str) -> Tensor:
    """One field of ``Confidence`` (``max_prob_N``, ``margin_N`` or ``entropy_N``), computed
    alone: the adaptive samplers need one score per step over every masked row, so the others
    are not paid for.

    Args:
        logp_NV: Normalised log-probs, (N, V), V >= 2.
        kind: The field name.

    Returns:
        fp64, (N,).
    """
    logp_NV = logp_NV.to(_F64)
    if kind == "entropy_N":
        # clamp: -inf outside the support becomes the most negative finite value, so 0 * it = 0
        return -(logp_NV.exp() * logp_NV.clamp_min(torch.finfo(_F64).min)).sum(-1)
    top2_N2 = torch.topk(logp_NV, k=2, dim=-1).values.exp()  # exp is monotone: top-2 of log-probs
    if kind == "max_prob_N":
        return top2_N2[:, 0]
    if kind == "margin_N":
        return top2_N2[:, 0] - top2_N2[:, 1]
    raise ValueError(f"unknown confidence kind {kind!r}; valid: {', '.join(Confidence._fields)}")


# --------------------------------------------------------------------------------------
# Context-free reverse schedules (``diffusion.reverse``; each family supplies its own).
# --------------------------------------------------------------------------------------


def reverse_schedule(
    family: DiffusionFamily | None = None, exponent: float | None = None
) -> ReverseSchedule | None:
    """Resolve a sampler's ``family`` / ``exponent`` options to a reverse schedule.

    Args:
        family: An OeMDM family; its ``reverse_schedule()`` (power families: ``PowerReverse``;
            other context-free families: ``FamilyReverse``; lomdm and genmd4: a ``PowerReverse``
            of their mean exponent that requires the denoiser to return e_R).
        exponent: A constant exponent instead of a family.

    Returns:
        The schedule, or None if neither option is given (the denoiser must then return
        the exponents).

    Raises:
        ValueError: If both options are given or the family type is unsupported.
    """
    if family is not None and exponent is not None:
        raise ValueError("give either family or exponent, not both")
    if exponent is not None:
        return PowerReverse(exponent)
    if family is None:
        return None
    return family.reverse_schedule()


def power_unmask_prob(exponents_BL: Tensor, t: float, s: float) -> Tensor:
    """P(unmasked at s | masked at t) = 1 - (s/t)^e under alpha = 1 - t^e, fp64 (B, L).

    Args:
        exponents_BL: Exponents e > 0, (B, L).
        t: Current time, > 0.
        s: Next time, 0 <= s <= t.

    Returns:
        The unmask probabilities; exactly 1 when s = 0.
    """
    log_ratio = (math.log(s) if s > 0 else -math.inf) - math.log(t)
    return -torch.expm1(exponents_BL.to(_F64) * log_ratio)


# --------------------------------------------------------------------------------------
# Wiring a backbone into a denoiser.
# --------------------------------------------------------------------------------------


def denoiser_from_backbone(
    backbone: Callable[[Tensor], tuple[Tensor, Tensor]],
    *,
    family: DiffusionFamily,
    rev_head: nn.Module | None = None,
    given_BL: Tensor | None = None,
) -> Denoiser:
    """Wrap ``backbone(z_BL) -> (logits_BLV, hidden_BLD)`` into a one-pass denoiser.

    With ``given_BL`` (the prompt positions a sampler keeps fixed: its ``fixed_BL``), learned
    exponents normalise over the other positions, as training does for conditioned data
    (method.md §5.9); without it, over all positions.

    The family turns the pass into the sampler's logits and reverse exponents
    (``DiffusionFamily.denoiser_outputs``):

    - lomdm: e_R = c1 + c2 NormSig(rev_head(hidden)) from the same pass (method.md §3.5).
    - genmd4: e_R = sum_v softmax_SUBS(logits)_v w_v and the logits are tilted by log w, so
      tokens are drawn from x~_v ∝ w_v mu_v (the OeMDM form of GenMD4, method.md §2).
    - multivariate: its per-position exponents w (context-free, alpha_R = alpha_F = 1 - t^w),
      so every power-law sampler (ancestral, exact Plackett-Luce) follows the learned order.
    - other context-free families: no exponents (the sampler's ``family`` option supplies them).

    Args:
        backbone: Returns full-vocabulary logits (gather tensor-parallel slices first) and
            the final hidden states; e.g. ``lambda z: model.backbone(z)`` at TP = 1.
        family: The model's family.
        rev_head: The reverse scheduler head g_psi (lomdm only).
        given_BL: Bool (B, L), the positions given by a prompt; None: none.

    Returns:
        The denoiser.

    Raises:
        ValueError: If a lomdm family gets no ``rev_head``.
    """
    if family.needs_reverse_head and rev_head is None:
        raise ValueError(f"the {family.spec.name} family needs rev_head to compute e_R")

    def denoise(z_BL: Tensor) -> DenoiserOutput:
        logits_BLV, hidden_BLD = backbone(z_BL)
        free_BL = None if given_BL is None else ~given_BL.bool()
        return DenoiserOutput(*family.denoiser_outputs(logits_BLV, hidden_BLD, rev_head=rev_head, free_BL=free_BL))

    return denoise


# --------------------------------------------------------------------------------------
# Sampler base class.
# --------------------------------------------------------------------------------------


class SamplingRun:
    """Mutable state of one ``sample`` call (internal to the samplers).

    It holds the tokens, the unmask steps, the call counter and the one-entry cache.
    """

    def __init__(
        self,
        denoise: Denoiser,
        z_BL: Tensor,
        *,
        mask_id: int,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> None:
        self.denoise = denoise
        self.z_BL = z_BL
        self.mask_id = mask_id
        self.generator = generator
        self.use_cache = use_cache
        self.unmask_step_BL = torch.full_like(z_BL, -1, dtype=torch.int64)
        self.num_calls = 0
        self.num_steps = 0
        self.num_remasked = 0
        self._out: DenoiserOutput | None = None

    def masked_BL(self) -> Tensor:
        """Bool mask of the positions still [MASK], (B, L)."""
        return self.z_BL == self.mask_id

    def output(self) -> DenoiserOutput:
        """The denoiser output for the current z: a cached one if no token changed."""
        if self._out is None or not self.use_cache:
            out = self.denoise(self.z_BL.clone())
            _check_output(out, self.z_BL, self.mask_id)
            self.num_calls += 1
            self._out = out
        return self._out

    def commit(self, select_BL: Tensor, tokens_N: Tensor, step: int) -> None:
        """Write tokens at the selected (masked) positions, row-major; invalidates the cache."""
        if tokens_N.numel() == 0:
            return
        assert bool((self.z_BL[select_BL] == self.mask_id).all()), "only masks are written"
        self.z_BL[select_BL] = tokens_N.to(self.z_BL.dtype)
        self.unmask_step_BL[select_BL] = step
        self._out = None

    def remask(self, select_BL: Tensor) -> Tensor:
        """Mask the selected (unmasked) positions again; returns their tokens, row-major (N,).

        The caller must never select a fixed (prompt) position; ``restore`` puts tokens back.
        """
        assert not bool((self.z_BL[select_BL] == self.mask_id).any()), "only tokens are remasked"
        held_N = self.z_BL[select_BL].clone()
        self.z_BL[select_BL] = self.mask_id
        self._out = None
        return held_N

    def restore(self, select_BL: Tensor, tokens_N: Tensor) -> None:
        """Put remasked tokens back at the selected positions (their unmask step is kept)."""
        assert bool((self.z_BL[select_BL] == self.mask_id).all()), "only masks are restored"
        self.z_BL[select_BL] = tokens_N.to(self.z_BL.dtype)
        self._out = None


def _check_output(out: DenoiserOutput, z_BL: Tensor, mask_id: int) -> None:
    """Raise ValueError if a denoiser output does not match z."""
    logits = out.logits_BLV
    if logits.dim() != 3 or logits.shape[:2] != z_BL.shape or logits.shape[2] <= mask_id:
        raise ValueError(
            f"denoiser logits have shape {tuple(logits.shape)}; expected "
            f"({z_BL.shape[0]}, {z_BL.shape[1]}, V) with V > mask_id={mask_id}"
        )
    e_BL = out.velocity_exponents_BL
    if e_BL is None:
        return
    if e_BL.shape != z_BL.shape:
        raise ValueError(f"velocity_exponents_BL has shape {tuple(e_BL.shape)}, expected "
                         f"{tuple(z_BL.shape)}")
    e_masked = e_BL[z_BL == mask_id]
    if not bool((torch.isfinite(e_masked) & (e_masked > 0)).all()):
        raise ValueError("velocity_exponents_BL must be finite and > 0 at masked positions")


class Sampler(abc.ABC):
    """Base of all samplers: options, prompt handling, the draw/commit helpers.

    Subclasses implement ``_run``; it must make at most one ``run.output()`` call per step
    and increment ``run.num_steps`` once per executed step.

    Attributes:
        name: The registry name.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        mask_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> None:
        """Store the options shared by all samplers.

        Args:
            mask_id: Token id of [MASK].
            temperature: Softmax temperature of every token draw, > 0.
            top_p: Nucleus mass in (0, 1]; 1 disables nucleus filtering.
            use_cache: Skip the denoiser call when no token changed since the last call.

        Raises:
            ValueError: For a non-positive temperature or top_p outside (0, 1].
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if mask_id < 0:
            raise ValueError(f"mask_id must be >= 0, got {mask_id}")
        self.mask_id = mask_id
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.use_cache = use_cache

    @torch.no_grad()  # inference only: no autograd graph through the denoiser
    def sample(
        self,
        denoise: Denoiser,
        *,
        batch_size: int | None = None,
        seq_length: int | None = None,
        prompt_BL: Tensor | None = None,
        fixed_BL: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> SampleResult:
        """Generate a batch, starting from all-[MASK] except the fixed (prompt) positions.

        Args:
            denoise: The one-pass denoiser (see module docstring).
            batch_size: B; required without ``prompt_BL``.
            seq_length: L; required without ``prompt_BL``.
            prompt_BL: Given tokens, (B, L); positions where ``fixed_BL`` is True are kept
                verbatim (prefix conditioning, infilling), the others are generated.
            fixed_BL: Bool, (B, L); default ``prompt_BL != mask_id``.
            generator: RNG for every draw (on the sampling device); None = global RNG.
            device: Device of the tokens without ``prompt_BL``; default CPU.

        Returns:
            The ``SampleResult``.

        Raises:
            ValueError: On inconsistent shapes or a fixed position holding [MASK].
        """
        z_BL = self._initial_tokens(batch_size, seq_length, prompt_BL, fixed_BL, device)
        run = SamplingRun(denoise, z_BL, mask_id=self.mask_id, generator=generator,
                   use_cache=self.use_cache)
        grid = self._run(run)
        return SampleResult(
            tokens_BL=run.z_BL,
            num_calls=run.num_calls,
            unmask_step_BL=run.unmask_step_BL,
            grid=grid,
            num_steps=run.num_steps,
            num_remasked=run.num_remasked,
        )

    @abc.abstractmethod
    def _run(self, run: SamplingRun) -> Tensor | None:
        """Run the reverse process in place on ``run``; return the grid for the result."""

    def _initial_tokens(
        self,
        batch_size: int | None,
        seq_length: int | None,
        prompt_BL: Tensor | None,
        fixed_BL: Tensor | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """z at t = 1: [MASK] everywhere except the fixed prompt positions, (B, L) int64."""
        if prompt_BL is None:
            if fixed_BL is not None:
                raise ValueError("fixed_BL needs prompt_BL (the tokens to keep)")
            if batch_size is None or seq_length is None or batch_size < 1 or seq_length < 1:
                raise ValueError("give prompt_BL, or batch_size >= 1 and seq_length >= 1")
            return torch.full((batch_size, seq_length), self.mask_id, dtype=torch.int64,
                              device=device)
        if prompt_BL.dim() != 2:
            raise ValueError(f"prompt_BL must be (B, L), got shape {tuple(prompt_BL.shape)}")
        if fixed_BL is None:
            fixed_BL = prompt_BL != self.mask_id
        if fixed_BL.shape != prompt_BL.shape:
            raise ValueError("fixed_BL and prompt_BL shapes differ")
        fixed_BL = fixed_BL.to(device=prompt_BL.device, dtype=torch.bool)
        if bool((prompt_BL[fixed_BL] == self.mask_id).any()):
            raise ValueError("a fixed position holds [MASK]")
        return torch.where(fixed_BL, prompt_BL.long(), self.mask_id)

    def _log_probs(self, logits_BLV: Tensor, rows_N2: Tensor) -> Tensor:
        """Sampling log-probs at the (b, l) rows ``rows_N2``, fp64 (N, V)."""
        logits_NV = logits_BLV[rows_N2[:, 0], rows_N2[:, 1]]
        return sampling_log_probs(
            logits_NV, mask_id=self.mask_id, temperature=self.temperature, top_p=self.top_p
        )

    @staticmethod
    def _row_chunks(select_BL: Tensor) -> list[Tensor]:
        """The selected (b, l) rows in row-major order, in chunks of <= CHUNK_ROWS, (N, 2)."""
        return list(torch.split(torch.nonzero(select_BL), CHUNK_ROWS))

    def _draw_and_commit(
        self, run: SamplingRun, out: DenoiserOutput, select_BL: Tensor, step: int
    ) -> None:
        """Draw a token for each selected (masked) position from x_theta and commit it."""
        tokens = [
            gumbel_argmax(self._log_probs(out.logits_BLV, rows_N2), run.generator)
            for rows_N2 in self._row_chunks(select_BL)
        ]
        if tokens:
            run.commit(select_BL, torch.cat(tokens), step)

    def _confidence_BL(self, out: DenoiserOutput, masked_BL: Tensor, kind: str) -> Tensor:
        """One ``Confidence`` field per masked position, fp64 (B, L); NaN where unmasked."""
        scores = [
            confidence_score(self._log_probs(out.logits_BLV, rows_N2), kind)
            for rows_N2 in self._row_chunks(masked_BL)
        ]
        score_BL = torch.full(masked_BL.shape, math.nan, dtype=_F64, device=masked_BL.device)
        if scores:
            score_BL[masked_BL] = torch.cat(scores)
        return score_BL

    def _exponents_BL(
        self, out: DenoiserOutput, reverse: ReverseSchedule | None, masked_BL: Tensor
    ) -> Tensor:
        """e_R for a power-law step: the denoiser's, else the constant schedule's (fp64)."""
        if out.velocity_exponents_BL is not None:
            return out.velocity_exponents_BL.to(_F64)
        if reverse is None or reverse.requires_denoiser_exponents:
            raise ValueError(
                f"sampler {self.name!r}: the denoiser returned no velocity_exponents_BL and "
                "no context-free reverse schedule (family= or exponent=) is configured"
            )
        if not isinstance(reverse, PowerReverse):
            raise ValueError(f"sampler {self.name!r} needs a power-law reverse schedule")
        return torch.full(masked_BL.shape, reverse.exponent, dtype=_F64, device=masked_BL.device)

    def extra_repr(self) -> str:
        """Options, for logging."""
        return f"mask_id={self.mask_id}, temperature={self.temperature}, top_p={self.top_p}"

    def __repr__(self) -> str:
        """Name and options."""
        return f"{type(self).__name__}({self.extra_repr()})"
