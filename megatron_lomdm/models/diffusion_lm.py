"""The diffusion LM of one training step: backbone + scheduler heads + OeMDM family.

`DiffusionLM.forward` runs the whole two-phase step of method.md §3.4 for one micro-batch and
returns `LossTerms`; the family decides which parts run (no family names here):

1. phase one (families with `needs_clean_features`, i.e. LoMDM; driven by `training.step`, which
   pipelines it like any forward pass): the backbone on clean x under no_grad gives f(x) on the
   last stage; the forward head g_phi turns it into per-position logits (graph to phi kept); the
   logits' values are broadcast to every pipeline stage so masks are drawn where tokens enter;
2. the forward schedule at the sample's time t; K corruptions drawn from counter-based uniforms
   (a function of seed, step and the sample's index in the global batch only);
3. phase two: one batched backbone pass over the K*B corruptions -> vocab-parallel logits and
   hidden states; SUBS log p of the true token; the reverse velocity from the reverse head on
   detached hidden states (LoMDM), from the denoiser mixture (GenMD4) or the forward schedule;
4. the NELBO terms and the RLOO surrogate (`losses.objective`), plus order diagnostics and the
   forward head's gradient signal-to-noise sums (`losses.grad_snr`).

Conditioning (method.md §5.9): `cond_BL` marks given (prompt) positions. Attention and padding
use `valid_BL`; everything about generation (the schedule's NormSig mean, the mask draws, the loss
and its token count, log q, the order diagnostics) uses `free_BL = valid_BL & ~cond_BL`, so a
conditioned position is clean in every corruption and contributes nothing to the NELBO.

Legend: B sequences, K corruptions, L positions, V vocabulary (this TP rank's slice), D hidden.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor, nn

from megatron_lomdm.diffusion.base import DiffusionFamily, ForwardSchedule
from megatron_lomdm.diffusion.noise import mask_uniforms, time_uniforms
from megatron_lomdm.diffusion.time_sampling import bin_loss_sums, low_discrepancy_t, proposal_t, proposal_weight
from megatron_lomdm.losses.grad_snr import SNR_KEYS, corruption_grad_snr_sums
from megatron_lomdm.losses.objective import LossTerms, compute_loss_terms
from megatron_lomdm.models.vocab_parallel import (
    expected_token_rate_vocab_parallel,
    subs_logp_true_vocab_parallel,
)
from megatron_lomdm.utils.stats import row_pearson


class DiffusionLM(MegatronModule):
    """Backbone, scheduler heads and family, wired for one micro-batch of the training step.

    A `MegatronModule`, so DDP wraps it whole and `sharded_state_dict` covers everything: the
    backbone shards its own tensors; heads and family are saved as TP-replicated tensors.

    Args:
        backbone: `models.backbone.Backbone`; returns (vocab-parallel logits, hidden).
        family: the OeMDM family member (owns GenMD4's learnable exponents).
        fwd_head / rev_head: scheduler heads g_phi / g_psi, or None when the family needs none.
        mask_id: id of [MASK].
        seed: `train.seed`; with the step and the sample index it fixes all diffusion noise.
        global_batch_size: unique sequences per step (the antithetic t grid spans them all).
        eps_t: smallest time of the antithetic sampler; 0 for families whose NELBO estimator needs
            no floor (`needs_time_floor` False: ARM, BD3LM), so that it stays exactly unbiased.
        clean_pass_dropout: `model.clean_pass_dropout`; False runs the clean pass in eval mode.

    P-POTS time sampling (`training.ppots` sets these; both off by default): while
    `time_bins` > 0, training forwards report per-bin loss sums as ``diag["time_stats"]``; while
    `time_mass` is set, training forwards draw t from that proposal and weight each sequence
    by u(t)/p(t). Evaluation (eval mode or a negative step) always uses the uniform sampler.

    While `grad_snr` is set (the loop sets it on log steps), training forwards with a forward head
    also report the signal and noise sums of its logit gradient (`order_grad_snr`).
    """

    def __init__(self, backbone: nn.Module, family: DiffusionFamily, fwd_head: nn.Module | None,
                 rev_head: nn.Module | None, *, mask_id: int, seed: int, global_batch_size: int,
                 eps_t: float, clean_pass_dropout: bool = False) -> None:
        super().__init__(config=backbone.config)  # megatron schedules and DDP read the TransformerConfig
        self.backbone = backbone
        self.family = family
        self.fwd_head = fwd_head
        self.rev_head = rev_head
        self.mask_id = mask_id
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.eps_t = eps_t if family.needs_time_floor else 0.0
        self.time_bins = 0  # P-POTS: bins of the loss statistics to report (0: none)
        self.time_mass: Tensor | None = None  # P-POTS proposal: bin probabilities, (bins,); None: uniform
        self.grad_snr = False  # the loop turns it on for log steps: forward-head gradient SNR sums
        self.model_type = backbone.model_type
        self.pre_process = backbone.pre_process  # megatron's pipeline schedules look these up
        self.post_process = backbone.post_process
        self.share_embeddings_and_output_weights = False  # untied: nothing to sync across stages
        self.clean_pass_dropout = clean_pass_dropout

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's default, minus the family parameters off the last stage (they are copies there)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.post_process:
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{prefix}family.")}
        return sd

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Pipeline hook: the activation received from the previous stage goes to the backbone."""
        self.backbone.set_input_tensor(input_tensor)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters replicated over TP and averaged over DP only: heads and family exponents."""
        heads = [m for m in (self.fwd_head, self.rev_head) if m is not None]
        return [p for m in heads for p in m.parameters()] + list(self.family.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def _time_proposal(self, step: int) -> Tensor | None:
        """The P-POTS proposal in force: training forwards only (evaluation stays uniform)."""
        return self.time_mass if self.training and step >= 0 else None

    def draw_time(self, index_B: Tensor, step: int) -> Tensor:
        """The antithetic time of each sequence, from its index in the global batch (through the
        P-POTS proposal's inverse CDF when one is in force)."""
        u_B = time_uniforms(seed=self.seed, step=step, index_B=index_B)
        mass = self._time_proposal(step)
        if mass is None:
            return low_discrepancy_t(u_B, index_B, self.global_batch_size, eps=self.eps_t)
        return proposal_t(u_B, index_B, self.global_batch_size, mass, eps=self.eps_t)

    def time_weight(self, t_B: Tensor, step: int) -> Tensor | None:
        """Importance weight u(t)/p(t) of each sequence under the P-POTS proposal; None without one."""
        mass = self._time_proposal(step)
        return None if mass is None else proposal_weight(t_B, mass, eps=self.eps_t)

    def clean_features(self, tokens_BL: Tensor, valid_BL: Tensor) -> Tensor:
        """Phase one: the backbone on clean x (the caller disables grad). On the last pipeline stage
        the final hidden states f(x) [B, L, D]; elsewhere this stage's output activations. Without
        `clean_pass_dropout` the backbone runs in eval mode (no dropout, no dropout RNG draws)."""
        was_training = self.backbone.training
        self.backbone.train(was_training and self.clean_pass_dropout)
        try:
            out = self.backbone(tokens_BL, valid_BL, compute_logits=False)
        finally:
            self.backbone.train(was_training)
        return out[1] if self.backbone.post_process else out

    def forward_head_logits(self, hidden_x_BLD: Tensor, valid_BL: Tensor, free_BL: Tensor | None = None) -> Tensor:
        """g_phi on stop-grad clean features; the graph to phi is kept for phase two's backward.
        `free_BL`: the positions to generate (the logits' centring runs over them)."""
        return self.fwd_head(hidden_x_BLD.detach(), valid_BL, free_BL)  # stop-grad: f(x) (method.md §3.1)

    def forward(self, tokens_BL: Tensor, valid_BL: Tensor, index_B: Tensor, step: int,
                fwd_logits_BL: Tensor | None = None,
                cond_BL: Tensor | None = None) -> tuple[LossTerms, dict[str, Tensor]] | Tensor:
        """Phase two on this pipeline stage.

        Every stage derives t, the forward schedule and the masks (cheap, and identical everywhere
        because the noise is counter-based and `fwd_logits_BL` is the same tensor on all stages);
        the first stage embeds the corruptions, the last computes the loss.

        Args:
            tokens_BL, valid_BL: the clean micro-batch and its non-pad mask.
            index_B: each sequence's index in the global batch (fixes its noise).
            step: optimizer step (negative for evaluation noise).
            fwd_logits_BL: forward-head logits from phase one (families with
                `needs_clean_features`); with the graph to phi on the last stage.
            cond_BL: given (prompt) positions, never masked nor counted; None: none.
        Returns:
            On the last stage (LossTerms, diagnostics); elsewhere the stage's output activations.
        """
        family = self.family
        B, L = tokens_BL.shape
        K = family.num_corruptions
        free_BL = free_positions(valid_BL, cond_BL)
        t_B = self.draw_time(index_B, step)
        sched = family.estimator_schedule(x_BL=tokens_BL, t_B=t_B, fwd_logits_BL=fwd_logits_BL, valid_BL=free_BL)
        u_KBL = mask_uniforms(seed=self.seed, step=step, index_B=index_B, num_corruptions=K, seq_length=L)
        mask_KBL = family.sample_masks(sched, u_KBL) & free_BL  # pads and given tokens are never masked
        z_KBL = torch.where(mask_KBL, self.mask_id, tokens_BL.expand(K, B, L))

        z_NL = z_KBL.reshape(K * B, L)
        valid_NL = valid_BL.repeat(K, 1)
        out = self.backbone(z_NL, valid_NL)
        if not self.backbone.post_process:
            return out
        logits_NLV, hidden_NLD = out
        x_NL = tokens_BL.repeat(K, 1)
        logp_true_KBL = subs_logp_true_vocab_parallel(
            logits_NLV, z_NL, x_NL, self.mask_id, vocab_size=self.backbone.true_vocab_size
        ).view(K, B, L)

        rev_logits_KBL = None
        if family.needs_reverse_head:
            # stop-grad: the reverse scheduler reads f(z_t) features; psi learns, theta does not
            rev_logits_KBL = self.rev_head(hidden_NLD.detach(), valid_NL, free_BL.repeat(K, 1)).view(K, B, L)
        rate_KBL = None
        if family.needs_expected_rate:
            rate_NL = expected_token_rate_vocab_parallel(logits_NLV, family.token_exponents(), self.mask_id)
            rate_KBL = rate_NL.view(K, B, L)
        velocity_hat_KBL = family.estimator_reverse_velocity(
            sched=sched,
            t_KB=t_B.expand(K, B), rev_logits_KBL=rev_logits_KBL, expected_rate_KBL=rate_KBL, valid_BL=free_BL
        )
        log_q_KB = family.log_q(sched, mask_KBL, free_BL)
        terms = compute_loss_terms(
            family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=logp_true_KBL,
            velocity_hat_KBL=velocity_hat_KBL, log_q_KB=log_q_KB, valid_BL=free_BL,
            weight_B=self.time_weight(t_B, step),
        )
        diag = order_diagnostics(sched, mask_KBL, logp_true_KBL, free_BL)
        diag.update(order_grad_snr(terms, fwd_logits_BL if self.grad_snr else None, free_BL))
        if self.time_bins and self.training and step >= 0:  # P-POTS loss-scale statistics
            diag["time_stats"] = bin_loss_sums(t_B, terms.seq_nelbo, self.time_bins, self.eps_t,
                                               keep_B=free_BL.any(-1))
        return terms, diag


def free_positions(valid_BL: Tensor, cond_BL: Tensor | None) -> Tensor:
    """The positions to generate: valid and not conditioned (method.md §5.9)."""
    return valid_BL if cond_BL is None else valid_BL & ~cond_BL.bool()


DIAG_KEYS = ("exp_n", "exp_sum", "exp_sq", "corr_sum", "corr_seqs", *SNR_KEYS)


@torch.no_grad()
def order_diagnostics(sched: ForwardSchedule, mask_KBL: Tensor, logp_true_KBL: Tensor, valid_BL: Tensor) -> dict[str, Tensor]:
    """Sums from which the loop derives the learned-order statistics of method.md §4.3.

    The scaled forward velocity a = A·t (the exponent e for power schedules) is summarised over
    valid positions (mean, std). Its link with the backbone's confidence in the true token,
    p = <x_theta, x> (the "Figure 4" curriculum signal), is the Pearson correlation of a and p over
    the masked valid positions of ONE corrupted sequence, where every position shares t, summed
    over the K·B corrupted sequences that have >= 3 such positions and non-constant a and p.
    Pooling positions of different t instead confounds it: high-a positions are masked mostly at
    large t, where p is low, which makes the pooled correlation negative with no relation at all.
    Sums are returned so micro-batches, data-parallel ranks and steps combine exactly.
    """
    a_BL = (sched.velocity_BL * sched.t_B[:, None]).detach().double()
    v_BL = valid_BL.double()
    K, B, L = mask_KBL.shape
    c_NL = logp_true_KBL.detach().double().exp().reshape(K * B, L)
    m_NL = (mask_KBL & valid_BL).reshape(K * B, L)
    corr_N = row_pearson(a_BL.expand(K, B, L).reshape(K * B, L), c_NL, m_NL, min_count=3)
    defined_N = ~corr_N.isnan()
    return {
        "exp_n": v_BL.sum(), "exp_sum": (a_BL * v_BL).sum(), "exp_sq": (a_BL.square() * v_BL).sum(),
        "corr_sum": torch.where(defined_N, corr_N, 0.0).sum(), "corr_seqs": defined_N.double().sum(),
    }


def order_grad_snr(terms: LossTerms, fwd_logits_BL: Tensor | None, valid_BL: Tensor) -> dict[str, Tensor]:
    """Signal and noise sums of the gradient w.r.t. the forward-head logits (`losses.grad_snr`).

    Zeros where there is none: no forward head (families without `needs_clean_features`) or not
    asked for (`fwd_logits_BL` None), no RLOO, or no graph (evaluation).
    """
    surrogate_KB = terms.surrogate_KB
    if (fwd_logits_BL is None or surrogate_KB is None or not surrogate_KB.requires_grad
            or not fwd_logits_BL.requires_grad):
        zero = torch.zeros((), dtype=torch.float64, device=valid_BL.device)
        return dict.fromkeys(SNR_KEYS, zero)
    return corruption_grad_snr_sums(surrogate_KB, fwd_logits_BL, valid_BL)


class ModelChunks(nn.ModuleList):
    """A rank's model chunks under interleaved pipeline stages (`parallel.virtual_stages` > 1).

    Chunk i is a `DiffusionLM` over the backbone layers of virtual stage i; the last chunk of the
    last pipeline stage holds the final LayerNorm, the LM head and the scheduler heads. Every chunk
    has its own copy of the family (masks are drawn where tokens enter; `training.step` keeps the
    copies equal to the trained one). Parameter names carry the chunk number (``0.backbone…``);
    `sharded_state_dict` keeps megatron's keys, which number layers globally, so a checkpoint
    written with chunks resumes on any layout and the other way round.
    """

    def __init__(self, chunks: list[DiffusionLM]) -> None:
        super().__init__(chunks)

    @property
    def config(self):  # noqa: ANN201  (megatron's TransformerConfig, shared by the chunks)
        return self[0].config

    @property
    def family(self) -> DiffusionFamily:
        """The family copy of the last chunk (the trained one on the last pipeline stage)."""
        return self[-1].family

    @property
    def mask_id(self) -> int:
        return self[-1].mask_id

    def _set_all(self, name: str, value) -> None:  # noqa: ANN001
        for chunk in self:
            setattr(chunk, name, value)

    grad_snr = property(lambda self: self[-1].grad_snr, lambda self, v: self._set_all("grad_snr", v))
    time_bins = property(lambda self: self[-1].time_bins, lambda self, v: self._set_all("time_bins", v))
    time_mass = property(lambda self: self[-1].time_mass, lambda self, v: self._set_all("time_mass", v))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The chunks' sharded entries in one flat dict: dict keys are the chunk-numbered parameter
        names (what `load_state_dict` and `named_parameters` use), checkpoint keys megatron's."""
        out = {}
        for i, chunk in enumerate(self):
            out.update({f"{i}.{k}": v for k, v in chunk.sharded_state_dict(prefix, sharded_offsets, metadata).items()})
        return out
