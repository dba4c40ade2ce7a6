"""The OeMDM family interface: forward schedule, mask draws, log q and reverse velocity.

Every OeMDM member (method.md §2) is a ``DiffusionFamily``. The training step talks only to
this interface, never to a family name, so MDLM, ARM, BD3LM, GenMD4 and LoMDM share one
loss path (design.md principle 3).

Conventions (method.md §1):
    alpha        keep probability of a position at time t (1 at t=0, 0 at t=1)
    1 - alpha    mask probability
    A            forward velocity  -d_t alpha / (1 - alpha)
    A_hat        reverse velocity (from the reverse scheduler)

Dtypes: all schedule math runs in fp32 (fp64 if the inputs are fp64), also under bf16
autocast: inputs are cast with ``compute_dtype`` before any arithmetic.

Shape legend:
    B  sequences in the micro-batch
    L  sequence length
    K  corruption samples per sequence (2 for learnable forward schedulers)
    V  vocabulary size (including [MASK])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from megatron_lomdm.config.families import FamilySpec
from megatron_lomdm.diffusion.reverse import FamilyReverse, ReverseSchedule

# method.md §3.6: velocities are clamped to >= 1e-6 before any log.
VELOCITY_FLOOR = 1e-6

# log(1 - alpha) is capped just below 0 before computing log(alpha) = log(-expm1(.)), so
# t == 1 (reachable by fp32 rounding of the time sampler) gives a finite log(alpha) ~ -69
# and finite gradients instead of log(0).
_LOG_MASK_PROB_CAP = -1e-30


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype scheduler and loss math runs in: fp32, or fp64 if any input is fp64.

    Args:
        *tensors: The inputs whose dtypes are considered.

    Returns:
        ``torch.float64`` if any input is fp64, else ``torch.float32`` (bf16/fp16 are upcast).
    """
    dtype = torch.float32
    for tensor in tensors:
        if tensor.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@dataclass
class ForwardSchedule:
    """The forward scheduler evaluated at (x, t): per-position masking law and velocity.

    All tensors are fp32 (or fp64) of shape (B, L). For learnable forward schedulers the
    tensors keep their autograd graph to the scheduler parameters.

    Attributes:
        log_mask_prob_BL: log(1 - alpha); -inf where a position cannot be masked yet.
        log_keep_prob_BL: log(alpha); -inf where a position is masked with certainty.
        velocity_BL: The forward velocity A >= 0, finite everywhere.
        t_B: The diffusion time of each sequence, in the same dtype.
    """

    log_mask_prob_BL: Tensor
    log_keep_prob_BL: Tensor
    velocity_BL: Tensor
    t_B: Tensor


def power_schedule(exponent_BL: Tensor, t_B: Tensor) -> ForwardSchedule:
    """The power schedule alpha = 1 - t^e (method.md §3.2), computed stably.

    log(1 - alpha) = e log t exactly, log(alpha) = log(-expm1(e log t)), A = e / t.

    Args:
        exponent_BL: Positive exponents e, (B, L) or broadcastable to it; the graph is kept.
        t_B: Times in (0, 1], shape (B,).

    Returns:
        The schedule in fp32 (fp64 if an input is fp64).
    """
    dtype = compute_dtype(exponent_BL, t_B)
    e_BL = exponent_BL.to(dtype)
    t_B = t_B.to(dtype)
    log_t_B1 = torch.log(t_B).unsqueeze(-1)
    log_mask_prob_BL = e_BL * log_t_B1
    log_keep_prob_BL = torch.log(-torch.expm1(log_mask_prob_BL.clamp(max=_LOG_MASK_PROB_CAP)))
    velocity_BL = e_BL / t_B.unsqueeze(-1)
    return ForwardSchedule(
        log_mask_prob_BL=log_mask_prob_BL,
        log_keep_prob_BL=log_keep_prob_BL,
        velocity_BL=velocity_BL,
        t_B=t_B,
    )


class DiffusionFamily(nn.Module):
    """One member of the OeMDM family (method.md §2): a forward and a reverse scheduler.

    Subclasses implement ``forward_schedule`` and ``reverse_velocity`` and set the class
    attributes that tell the training step which extra inputs the family needs. What samplers
    need comes from the family too: its reverse schedule (``reverse_schedule``) and how one
    backbone pass becomes the sampler's logits and exponents (``denoiser_outputs``). Its
    settings rules are its ``spec`` (``config.families``), checked by the config and by the
    constructor; ``from_config`` passes each family the settings its constructor names.

    Attributes:
        spec: The registered family's settings schema (``diffusion.name`` and rules); set by
            every concrete family.
        needs_clean_features: The step must run a no-grad backbone pass on clean x and feed
            the forward scheduler head's logits to ``forward_schedule`` (LoMDM).
        needs_reverse_head: The step must feed reverse scheduler head logits computed from
            z_t to ``reverse_velocity`` (LoMDM).
        needs_expected_rate: The step must pass ``expected_rate_KBL`` = sum_v x_theta,v w_v
            with w = ``token_exponents()`` to ``reverse_velocity`` (GenMD4).
        num_corruptions: Corruptions K per sequence (an instance attribute where it is set
            from ``diffusion.num_corruptions``): >= 2 when the forward scheduler is learnable
            so that the RLOO score-function term applies (``spec`` checks it), else 1.
        needs_time_floor: The NELBO estimator's weights grow like 1/t as t -> 0, so training
            and evaluation draw t in [eps_t, 1] (method.md §3.6). False where the estimator is
            bounded (slot families): t is then drawn uniform on [0, 1), which keeps the
            estimate exactly unbiased.
        denoiser_exponents: ``denoiser_outputs`` returns reverse exponents e_R with the logits
            (LoMDM, GenMD4, multivariate); otherwise the sampler's reverse schedule sets them.
        autoregressive: The NELBO is the exact autoregressive NLL (ARM): position i is
            predicted from the clean x_<i with every position >= i masked, so a sequence can be
            scored exactly, one row per token (generative-perplexity judges).
    """

    spec: ClassVar[FamilySpec]
    needs_clean_features: bool = False
    needs_reverse_head: bool = False
    needs_expected_rate: bool = False
    num_corruptions: int = 1
    needs_time_floor: bool = True
    denoiser_exponents: bool = False
    autoregressive: bool = False

    def __init__(self, *, seq_length: int, mask_id: int) -> None:
        """Store the sequence length and [MASK] id shared by all families.

        Args:
            seq_length: Sequence length L the family is built for.
            mask_id: Token id of [MASK].
        """
        super().__init__()
        self.seq_length = seq_length
        self.mask_id = mask_id

    @classmethod
    def from_config(cls, **settings: Any) -> DiffusionFamily:
        """Build from ``diffusion.*`` settings plus ``seq_length``, ``mask_id`` and ``vocab_size``.

        A family declares what it takes by its constructor's keyword arguments; it gets exactly
        those (its defaults fill the ones not given) and ignores the rest, so one config can
        switch ``diffusion.name``. The constructor checks them against ``spec``.

        Returns:
            The family.

        Raises:
            ValueError: If a setting is invalid for this family; the message names the key.
        """
        takes = inspect.signature(cls.__init__).parameters
        return cls(**{key: value for key, value in settings.items() if key in takes})

    # ----------------------------------------------------------------------------------
    # Interface implemented by each family.
    # ----------------------------------------------------------------------------------

    def forward_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """Evaluate the forward scheduler alpha_F(x, t) (fp32 even under autocast).

        Args:
            x_BL: Clean token ids, (B, L).
            t_B: Diffusion times in (0, 1], (B,).
            fwd_logits_BL: Forward scheduler head logits g_phi(f(x)), (B, L); only for
                families with ``needs_clean_features``.
            valid_BL: Non-pad positions, (B, L) bool; None means all valid. Used where the
                schedule normalises over positions (LoMDM's NormSig).

        Returns:
            The ForwardSchedule, with its graph to the learnable scheduler parameters.
        """
        raise NotImplementedError

    def reverse_velocity(
        self,
        *,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """The reverse velocity A_hat(z_t, t) (fp32 even under autocast).

        Args:
            t_KB: Diffusion times, (K, B).
            rev_logits_KBL: Reverse scheduler head logits g_psi(f(z_t)) (LoMDM).
            expected_rate_KBL: sum_v softmax_SUBS(logits)_v w_v (GenMD4).
            valid_BL: Non-pad positions, (B, L) bool; None means all valid.

        Returns:
            A_hat, (K, B, L), finite and >= 0.
        """
        raise NotImplementedError

    def adjust_logp_true(
        self, *, logp_true_KBL: Tensor, sched: ForwardSchedule, velocity_hat_KBL: Tensor
    ) -> Tensor:
        """Map the backbone's log-prob of the true token to the OeMDM denoiser's.

        Identity for every family whose denoiser is the backbone's SUBS output. GenMD4
        overrides it (its OeMDM denoiser is a_v mu_v / A_hat, method.md §2).

        Args:
            logp_true_KBL: log <x_theta, x> from SUBS, (K, B, L).
            sched: The forward schedule.
            velocity_hat_KBL: A_hat, (K, B, L).

        Returns:
            The log-prob of the true token under the OeMDM denoiser, (K, B, L).
        """
        return logp_true_KBL

    # ----------------------------------------------------------------------------------
    # What samplers need (method.md §3.5).
    # ----------------------------------------------------------------------------------

    def reverse_schedule(self) -> ReverseSchedule:
        """The context-free reverse schedule a sampler steps with (fp64, ``diffusion.reverse``).

        Raises:
            ValueError: If the family has none.
        """
        raise ValueError(f"no reverse schedule for family type {type(self).__name__}")

    def denoiser_outputs(
        self,
        logits_BLV: Tensor,
        hidden_BLD: Tensor,
        *,
        rev_head: nn.Module | None = None,
        valid_BL: Tensor | None = None,
        free_BL: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """One backbone pass -> what a sampler draws from (``sampling.DenoiserOutput``'s fields).

        Args:
            logits_BLV: Full-vocabulary backbone logits of z_t, (B, L, V).
            hidden_BLD: The same pass's final hidden states, (B, L, D).
            rev_head: The reverse scheduler head g_psi (``needs_reverse_head`` families), called
                as ``rev_head(hidden_BLD)`` or, with ``valid_BL``, ``rev_head(hidden_BLD, valid_BL)``.
            valid_BL: Non-pad positions, (B, L) bool; None (samplers) means all valid. Where
                the exponents normalise over positions (NormSig) the mean runs over these.
            free_BL: The positions to generate (not given by a prompt, method.md §5.9), (B, L)
                bool; where set, NormSig's mean runs over these instead (as in training).

        Returns:
            ``(logits_BLV, e_R)``: the logits to draw tokens from and the reverse exponents
            (B, L), or None where the sampler's reverse schedule sets them (the default).
        """
        return logits_BLV, None

    # ----------------------------------------------------------------------------------
    # The Monte-Carlo NELBO estimator (training and evaluation; samplers never use it).
    # ----------------------------------------------------------------------------------

    def estimator_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """The law the one-sample NELBO estimator draws its corruption from at time t.

        Averaged over the time sampler's t and over ``sample_masks``, the estimate has the
        same mean as under ``forward_schedule``'s law: the NELBO. A family may integrate part
        of the noise out analytically to lower the variance: the slot families (ARM, BD3LM)
        return a ``SlotEstimatorSchedule`` whose masks and weights differ from
        ``forward_schedule``'s (finite instead of infinite variance) with the same mean.
        ``sample_masks`` and ``log_q`` follow the law of the schedule they are given.

        Args:
            x_BL: Clean token ids, (B, L).
            t_B: Diffusion times, (B,).
            fwd_logits_BL: Forward scheduler head logits (``needs_clean_features``).
            valid_BL: Non-pad positions, (B, L) bool; None means all valid.

        Returns:
            The schedule; by default ``forward_schedule``'s.
        """
        return self.forward_schedule(
            x_BL=x_BL, t_B=t_B, fwd_logits_BL=fwd_logits_BL, valid_BL=valid_BL
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
        """A_hat to pair with an ``estimator_schedule`` in the loss (fp32 even under autocast).

        Args:
            sched: The schedule from ``estimator_schedule``.
            t_KB, rev_logits_KBL, expected_rate_KBL, valid_BL: As in ``reverse_velocity``.

        Returns:
            A_hat, (K, B, L); by default ``reverse_velocity``'s.
        """
        return self.reverse_velocity(
            t_KB=t_KB,
            rev_logits_KBL=rev_logits_KBL,
            expected_rate_KBL=expected_rate_KBL,
            valid_BL=valid_BL,
        )

    # ----------------------------------------------------------------------------------
    # Shared by all families.
    # ----------------------------------------------------------------------------------

    def sample_masks(self, sched: ForwardSchedule, uniform_KBL: Tensor) -> Tensor:
        """Draw the corruption masks: position masked iff uniform < 1 - alpha.

        The caller supplies the uniforms, so the draws are reproducible from (seed, step,
        global sample index) whatever the parallel layout. Using the same uniforms at two
        times gives nested masks (the masking-time coupling of method.md §1.4).

        Args:
            sched: The forward schedule, tensors (B, L).
            uniform_KBL: Uniforms in [0, 1), (K, B, L).

        Returns:
            Bool mask, (K, B, L); True = [MASK]. It carries no gradient.

            A NaN probability masks its position (``uniform < NaN`` would be False: nothing masked
            and a NELBO of 0 from NaN weights), so the NaN reaches the loss, where the step is
            skipped or the evaluation reads NaN; this costs no host sync.
        """
        if uniform_KBL.shape[1:] != sched.log_mask_prob_BL.shape:
            raise ValueError(
                f"uniform_KBL has shape {tuple(uniform_KBL.shape)}, expected "
                f"(K, {', '.join(map(str, sched.log_mask_prob_BL.shape))})"
            )
        # stop-grad: mask draws are discrete; the scheduler gradient comes from log q.
        mask_prob_BL = torch.exp(sched.log_mask_prob_BL.detach())
        return ~(uniform_KBL.to(mask_prob_BL.dtype) >= mask_prob_BL.unsqueeze(0))

    def log_q(
        self, sched: ForwardSchedule, mask_KBL: Tensor, valid_BL: Tensor | None = None
    ) -> Tensor:
        """Return log q(z | x, t) = sum_i [M log(1 - alpha) + (1 - M) log alpha] over valid i.

        Args:
            sched: The forward schedule, tensors (B, L).
            mask_KBL: Bool masks, (K, B, L).
            valid_BL: Non-pad positions, (B, L) bool; pads contribute 0. None = all valid.

        Returns:
            log q per corruption and sequence, (K, B), with gradient to the forward
            scheduler parameters.
        """
        mask_KBL = mask_KBL.bool()
        # torch.where (not a product): the unselected branch may be -inf.
        log_q_KBL = torch.where(
            mask_KBL, sched.log_mask_prob_BL.unsqueeze(0), sched.log_keep_prob_BL.unsqueeze(0)
        )
        if valid_BL is not None:
            log_q_KBL = torch.where(valid_BL.bool().unsqueeze(0), log_q_KBL, 0.0)
        return log_q_KBL.sum(-1)

    def _check_length(self, x_BL: Tensor) -> None:
        """Raise ValueError if the batch's sequence length differs from ``seq_length``."""
        if x_BL.dim() != 2 or x_BL.shape[1] != self.seq_length:
            raise ValueError(
                f"x_BL has shape {tuple(x_BL.shape)}, expected (B, {self.seq_length}) "
                f"for seq_length={self.seq_length}"
            )


class ContextFreeFamily(DiffusionFamily):
    """A family whose schedule ignores the input (u = empty): alpha_F = alpha_R.

    The reverse velocity is the forward velocity evaluated at the same t, so the velocity
    term is exactly 0 (method.md §1.7), and a sampler steps with ``schedule`` itself.
    """

    def reverse_schedule(self) -> ReverseSchedule:
        """See ``DiffusionFamily.reverse_schedule``: alpha_R = alpha_F (``FamilyReverse``)."""
        return FamilyReverse(self)

    def schedule(self, t_N: Tensor) -> ForwardSchedule:
        """The input-free schedule at times t_N for all ``seq_length`` positions.

        Args:
            t_N: Times in (0, 1], (N,).

        Returns:
            The schedule, tensors (N, L).
        """
        raise NotImplementedError

    def forward_schedule(
        self,
        *,
        x_BL: Tensor,
        t_B: Tensor,
        fwd_logits_BL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> ForwardSchedule:
        """See ``DiffusionFamily.forward_schedule``; ``fwd_logits_BL`` is ignored."""
        self._check_length(x_BL)
        return self.schedule(t_B)

    def reverse_velocity(
        self,
        *,
        t_KB: Tensor,
        rev_logits_KBL: Tensor | None = None,
        expected_rate_KBL: Tensor | None = None,
        valid_BL: Tensor | None = None,
    ) -> Tensor:
        """See ``DiffusionFamily.reverse_velocity``: A_hat = A (input-free)."""
        K, B = t_KB.shape
        return self.schedule(t_KB.reshape(K * B)).velocity_BL.reshape(K, B, self.seq_length)
