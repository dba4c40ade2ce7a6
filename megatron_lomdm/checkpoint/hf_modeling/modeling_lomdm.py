"""The exported LoMDM / OeMDM masked diffusion LM in plain torch (``trust_remote_code`` model).

Runs without ``megatron_lomdm``: it imports torch, transformers, the sibling configuration file and
``oemdm_math``, through which it uses the project's own pure OeMDM code. ``save_pretrained`` copies
this file next to the weights and the exporter (``checkpoint/hf_code.py``) ships the project's
``diffusion/`` modules and ancestral sampler beside it, so each formula exists once: this file
holds the network, the family's math is the project's.

Shape legend: B batch, L sequence, D hidden, H heads, G key/value groups, Q head dim,
V vocabulary (the tokenizer's, including [MASK]; the training run's padding is trimmed).

The backbone reproduces the training backbone (megatron-core ``GPTModel``, local layer spec) op by
op in fp32: token embedding (no position term) -> per layer [LayerNorm -> fused QKV -> rotary on
q, k (megatron's non-interleaved rotate-half, base ``rope_theta``) -> softmax(q k^T / sqrt(Q)) with
key padding filled with -10000 -> output projection -> residual; LayerNorm -> fc1 -> exact erf
GELU -> fc2 -> residual] -> final LayerNorm (= the features f(.)) -> untied LM head, no bias.
Attention is bidirectional. The fused QKV weight keeps megatron's layout: for each key/value
group g, the rows ``[q heads of g | k_g | v_g]``, each Q rows per head (as GPT-NeoX).

The OeMDM family (``config.family``) is the project's ``DiffusionFamily``, built by its registry
from the config (``family()``); what sampling needs comes from it (method.md §3.2, §3.5):
    * lomdm: the reverse scheduler head g_psi: e_R = c1 + c2 NormSig(g_psi(f(z_t))); the forward
      head g_phi is exported too (training only: it is needed to fine-tune, not to sample);
    * genmd4: the per-token exponents w = softplus(token_exponent_raw); e_R = sum_v mu_v w_v and
      tokens are drawn from x~_v ∝ w_v mu_v (the OeMDM form of GenMD4);
    * multivariate: one order logit per position; e_R = c1 + c2 NormSig(order_logits), the same
      for every sequence (context-free; sequences must have the training length L);
    * mdlm / poly: the constant exponent 1 / c1; arm / bd3lm: the block slot schedule.
The family's learnable parameters are this model's, under the export's weight names
(``token_exponent_raw``, ``order_logits``). ``generate`` is the project's OeMDM ancestral sampler
on the grid linspace(1, 0, T + 1): a masked position unmasks from t to s with probability
1 - (s/t)^{e_R} (the family's reverse schedule for context-free families), draws its token from
SUBS x_theta, every remaining mask is filled at s = 0, one backbone call per step (skipped when
nothing changed since the last call), and all sampling laws and categorical draws are fp64.
Given a prompt (``input_ids`` as a prefix, or ``prompt_ids`` + ``given_mask`` in place) it never
changes the given tokens and normalises e_R over the positions to generate only (the scheduler
head's centring and NormSig), as training and the native samplers do for conditioned data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_lomdm import LoMDMConfig
from .oemdm_math import (FAMILIES, AncestralSampler, DiffusionFamily, build_family, center_logits,
                         denoiser_from_backbone)

_MASKED_SCORE = -10000.0  # megatron's attention_mask_func fill value
# The family's parameter names -> the export's weight names (kept stable across exports).
_EXPORT_NAMES = {"raw_exponent_V": "token_exponent_raw", "order_logits_L": "order_logits"}


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """x W^T, then + b, as megatron's linear layers compute it (not a fused addmm)."""
    out = torch.matmul(x, layer.weight.t())
    return out if layer.bias is None else out + layer.bias


def rotary_angles(seq_len: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Rotary angles [L, Q] (fp32): megatron's ``RotaryEmbedding`` (non-interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1).to(device)


def apply_rotary(x_BLHQ: torch.Tensor, angles_L1Q: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1] (megatron's bshd path)."""
    cos = torch.cos(angles_L1Q).to(x_BLHQ.dtype)
    sin = torch.sin(angles_L1Q).to(x_BLHQ.dtype)
    x1, x2 = torch.chunk(x_BLHQ, 2, dim=-1)
    return x_BLHQ * cos + torch.cat((-x2, x1), dim=-1) * sin


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, 1, L] bool, True = key masked out; a row with no valid token attends everywhere."""
    if attention_mask is None:
        return None
    valid_BL = attention_mask.bool()
    valid_BL = valid_BL | ~valid_BL.any(dim=1, keepdim=True)
    return ~valid_BL[:, None, None, :]


class LoMDMAttention(nn.Module):
    """Bidirectional self-attention with megatron's fused QKV layout and rotary positions."""

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_out)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x_BLD: torch.Tensor, angles_L1Q: torch.Tensor,
                mask_B11L: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        H, G, Q = self.num_heads, self.num_groups, self.head_dim
        qkv = _linear(x_BLD, self.query_key_value).view(B, L, G, (H // G + 2) * Q)
        q, k, v = torch.split(qkv, [H // G * Q, Q, Q], dim=3)
        q_BLHQ = apply_rotary(q.reshape(B, L, H, Q), angles_L1Q)
        k_BLGQ = apply_rotary(k, angles_L1Q)
        if H != G:
            k_BLGQ = k_BLGQ.repeat_interleave(H // G, dim=2)
            v = v.repeat_interleave(H // G, dim=2)
        q_NLQ = q_BLHQ.transpose(1, 2).reshape(B * H, L, Q)
        k_NQL = k_BLGQ.transpose(1, 2).reshape(B * H, L, Q).transpose(1, 2)
        v_NLQ = v.transpose(1, 2).reshape(B * H, L, Q)
        scores = torch.baddbmm(
            torch.empty(B * H, L, L, dtype=q_NLQ.dtype, device=q_NLQ.device), q_NLQ, k_NQL,
            beta=0.0, alpha=self.softmax_scale,
        ).view(B, H, L, L)
        if mask_B11L is not None:
            scores = scores.masked_fill(mask_B11L, _MASKED_SCORE)
        probs = torch.softmax(scores.float(), dim=-1).to(v_NLQ.dtype)
        ctx = torch.bmm(probs.view(B * H, L, L), v_NLQ).view(B, H, L, Q)
        return _linear(ctx.transpose(1, 2).reshape(B, L, H * Q), self.dense)


class LoMDMMLP(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (the exact erf GELU), "
                             f"got {config.hidden_act!r}")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return _linear(F.gelu(_linear(x_BLD, self.fc1)), self.fc2)


class LoMDMLayer(nn.Module):
    """Pre-LN transformer layer (megatron ``TransformerLayer``, no dropout)."""

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = LoMDMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LoMDMMLP(config)

    def forward(self, h_BLD: torch.Tensor, angles_L1Q: torch.Tensor,
                mask_B11L: torch.Tensor | None) -> torch.Tensor:
        h_BLD = h_BLD + self.attention(self.input_layernorm(h_BLD), angles_L1Q, mask_B11L)
        return h_BLD + self.mlp(self.post_attention_layernorm(h_BLD))


class LoMDMBackbone(nn.Module):
    """Embedding -> layers -> final LayerNorm; returns the features [B, L, D]."""

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LoMDMLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple | None]:
        cfg = self.config
        L = input_ids.shape[1]
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        angles_L1Q = rotary_angles(L, head_dim, cfg.rope_theta, input_ids.device)[:, None, :]
        mask_B11L = key_padding_mask(attention_mask)
        h_BLD = self.embed_tokens(input_ids)
        all_hidden = [h_BLD] if output_hidden_states else None
        for layer in self.layers:
            h_BLD = layer(h_BLD, angles_L1Q, mask_B11L)
            if all_hidden is not None:
                all_hidden.append(h_BLD)
        features_BLD = self.final_layernorm(h_BLD)
        return features_BLD, None if all_hidden is None else tuple(all_hidden)


# ---------------------------------------------------------------------------------------------
# Scheduler heads (megatron_lomdm.models.scheduler_head.SchedulerHead, same parameter names)
# ---------------------------------------------------------------------------------------------


class LoMDMHeadAttention(nn.Module):
    """The scheduler head's self-attention: qkv laid out [q | k | v], each (H, Q)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BLD: torch.Tensor, keep_B11L: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_B11L, is_causal=False)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class LoMDMSchedulerHead(nn.Module):
    """g(f): features [B, L, D] -> one scheduler logit per position [B, L] (fp32)."""

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.head_layer_norm_eps
        self.norm_attn = nn.LayerNorm(D, eps=eps)
        self.attn = LoMDMHeadAttention(D, config.head_num_attention_heads)
        self.norm_mlp = nn.LayerNorm(D, eps=eps)
        width = config.head_mlp_ratio * D
        self.mlp = nn.Sequential(nn.Linear(D, width), nn.GELU(), nn.Linear(width, D))
        self.out = nn.Sequential(nn.LayerNorm(D, eps=eps), nn.Linear(D, D), nn.GELU(),
                                 nn.Linear(D, 1))
        self.center = bool(getattr(config, "head_center_logits", False))

    def forward(self, features_BLD: torch.Tensor, attention_mask: torch.Tensor | None = None,
                free_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Scheduler logits [B, L]; with ``center``, minus their mean over ``free_BL`` (the
        positions to generate, when a prompt is given) or else over ``attention_mask``'s valid
        positions, as in training (the package's ``center_logits``)."""
        x_BLD = features_BLD.to(self.norm_attn.weight.dtype)
        keep_B11L = None
        if attention_mask is not None:
            keep_B11L = ~key_padding_mask(attention_mask)
        x_BLD = x_BLD + self.attn(self.norm_attn(x_BLD), keep_B11L)
        x_BLD = x_BLD + self.mlp(self.norm_mlp(x_BLD))
        logits_BL = self.out(x_BLD).squeeze(-1).float()
        if not self.center:
            return logits_BL
        center_BL = free_BL if free_BL is not None else attention_mask
        return center_logits(logits_BL, None if center_BL is None else center_BL.bool())


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class LoMDMOutput(ModelOutput):
    """Output of ``LoMDMForMaskedDiffusion.forward``.

    Attributes:
        logits: raw backbone logits over the vocabulary [B, L, V] (SUBS is applied by the
            sampler / loss: the [MASK] logit is not yet -inf here).
        last_hidden_state: the features f(z) after the final LayerNorm [B, L, D].
        reverse_exponents: e_R [B, L] fp32: lomdm c1 + c2 NormSig(g_psi(f)); genmd4 the expected
            token exponent under SUBS x_theta; multivariate c1 + c2 NormSig(order_logits); None
            for the other context-free families.
        hidden_states: embedding output and every layer's output, if requested.
    """

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    reverse_exponents: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class LoMDMPreTrainedModel(PreTrainedModel):
    """Weight init and the transformers plumbing."""

    config_class = LoMDMConfig
    base_model_prefix = "model"
    _no_split_modules = ["LoMDMLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LoMDMSchedulerHead):  # zero last layer: the polynomial schedule
            nn.init.zeros_(module.out[-1].weight)
            nn.init.zeros_(module.out[-1].bias)
        if isinstance(module, LoMDMForMaskedDiffusion):  # the family's own initialisation
            with torch.no_grad():
                for name, value in module.new_family().named_parameters():
                    getattr(module, _EXPORT_NAMES[name]).copy_(value)


class LoMDMForMaskedDiffusion(LoMDMPreTrainedModel):
    """Backbone + LM head + the family's reverse scheduler, with ``generate``.

    Parameters: ``model.*`` (backbone), ``lm_head.weight``, and per family
    ``reverse_head.*`` + ``forward_head.*`` (lomdm), ``token_exponent_raw`` (genmd4) or
    ``order_logits`` [L] (multivariate): the family's own parameters under their export names.
    """

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__(config)
        self.model = LoMDMBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        family = self.new_family()
        self.reverse_head = LoMDMSchedulerHead(config) if family.needs_reverse_head else None
        self.forward_head = LoMDMSchedulerHead(config) if family.needs_clean_features else None
        for name, value in family.named_parameters():
            self.register_parameter(_EXPORT_NAMES[name], nn.Parameter(value.detach().clone()))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ---- the family -------------------------------------------------------------------------
    def new_family(self, seq_length: int | None = None) -> DiffusionFamily:
        """A freshly initialised family of the config for sequences of ``seq_length`` (default L),
        built by the project's registry (its ``from_config`` checks the settings)."""
        cfg = self.config
        return build_family(cfg.family, vocab_size=cfg.vocab_size, mask_id=cfg.mask_id,
                            seq_length=seq_length or cfg.max_position_embeddings,
                            c1=cfg.c1, c2=cfg.c2, block_size=cfg.block_size)

    def family(self, seq_length: int | None = None) -> DiffusionFamily:
        """The model's family for sequences of ``seq_length``: ``new_family`` holding this model's
        parameters (so the family's math reads the loaded weights).

        Raises:
            ValueError: If ``seq_length`` does not suit the family (e.g. a bd3lm block size that
                does not divide it, or multivariate order logits of another length).
        """
        family = self.new_family(seq_length)
        for name, fresh in list(family.named_parameters()):
            mine = getattr(self, _EXPORT_NAMES[name])
            if mine.shape != fresh.shape:
                raise ValueError(f"the {self.config.family} family's {_EXPORT_NAMES[name]} has shape "
                                 f"{tuple(mine.shape)}; sequences of length {family.seq_length} need "
                                 f"{tuple(fresh.shape)}")
            setattr(family, name, mine)
        return family

    # ---- forward ------------------------------------------------------------------------------
    def _pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              output_hidden_states: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """One backbone call: (logits [B, L, V], features [B, L, D], all hidden states or None)."""
        features_BLD, all_hidden = self.model(input_ids, attention_mask, output_hidden_states)
        return torch.matmul(features_BLD, self.lm_head.weight.t()), features_BLD, all_hidden

    def reverse_exponents(self, logits_BLV: torch.Tensor, features_BLD: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """e_R of the family from one backbone pass (None where the family's reverse schedule
        sets them: context-free families)."""
        if not FAMILIES[self.config.family].denoiser_exponents:
            return None
        valid_BL = None if attention_mask is None else attention_mask.bool()
        _, e_BL = self.family(logits_BLV.shape[1]).denoiser_outputs(
            logits_BLV, features_BLD, rev_head=self.reverse_head, valid_BL=valid_BL)
        return e_BL

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> LoMDMOutput | tuple:
        """One backbone pass.

        Args:
            input_ids: token ids [B, L] ([MASK] = ``config.mask_id`` at corrupted positions).
            attention_mask: [B, L], 1 = token, 0 = padding (excluded as attention key).
            output_hidden_states: also return every layer's output.
            return_dict: return a ``LoMDMOutput`` (default) or a tuple.

        Returns:
            ``LoMDMOutput`` (logits [B, L, V], last_hidden_state, reverse_exponents, ...).
        """
        logits_BLV, features_BLD, all_hidden = self._pass(input_ids, attention_mask,
                                                          bool(output_hidden_states))
        rev_BL = self.reverse_exponents(logits_BLV, features_BLD, attention_mask)
        out = LoMDMOutput(logits=logits_BLV, last_hidden_state=features_BLD,
                          reverse_exponents=rev_BL, hidden_states=all_hidden)
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def forward_exponents(self, input_ids: torch.LongTensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """lomdm's forward exponents e_F = c1 + c2 NormSig(g_phi(f(x))) of clean x [B, L]."""
        if self.forward_head is None:
            raise ValueError(f"family {self.config.family!r} has no forward scheduler head")
        features_BLD, _ = self.model(input_ids, attention_mask)
        valid_BL = None if attention_mask is None else attention_mask.bool()
        fwd_logits_BL = self.forward_head(features_BLD, attention_mask)
        return self.family(input_ids.shape[1]).exponents(fwd_logits_BL, valid_BL)

    # ---- sampling -----------------------------------------------------------------------------
    def _prompt(self, input_ids: torch.Tensor | list[list[int]] | None, prompt_ids: torch.Tensor | None,
                given_mask: torch.Tensor | None, num_samples: int, L: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sampler's initial tokens and given positions ([B, L] each, B = prompts x
        ``num_samples``), or None for unconditional generation.

        ``input_ids``: prompts placed at positions 0..P-1 (a [B, P] tensor, or a list of id lists
        of any lengths < L); ``prompt_ids``: [B, L] tokens given in place where ``given_mask`` is
        True (default: where they are not [MASK]).
        """
        mask_id, V = self.config.mask_id, self.config.vocab_size
        if input_ids is not None and prompt_ids is not None:
            raise ValueError("give input_ids (prefix prompts) or prompt_ids (in place), not both")
        if input_ids is None and prompt_ids is None:
            if given_mask is not None:
                raise ValueError("given_mask needs prompt_ids (the tokens to keep)")
            return None
        if input_ids is not None:
            if given_mask is not None:
                raise ValueError("given_mask goes with prompt_ids; input_ids are given at 0..P-1")
            rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(r) for r in input_ids]
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
            if not rows:
                raise ValueError("input_ids holds no prompt")
            prompt_BL = torch.full((len(rows), L), mask_id, dtype=torch.long)
            given_BL = torch.zeros(len(rows), L, dtype=torch.bool)
            for b, ids in enumerate(rows):
                if len(ids) >= L:
                    raise ValueError(f"prompt {b} has {len(ids)} tokens; the model generates {L}: "
                                     "nothing left to generate")
                prompt_BL[b, : len(ids)] = torch.tensor([int(i) for i in ids], dtype=torch.long)
                given_BL[b, : len(ids)] = True
        else:
            if prompt_ids.dim() != 2:
                raise ValueError(f"prompt_ids must be [B, L], got shape {tuple(prompt_ids.shape)}")
            prompt_BL = prompt_ids.detach().to("cpu", torch.long)
            given_BL = prompt_BL != mask_id if given_mask is None else given_mask.detach().to("cpu", torch.bool)
            if given_BL.shape != prompt_BL.shape:
                raise ValueError(f"given_mask has shape {tuple(given_BL.shape)}, prompt_ids "
                                 f"{tuple(prompt_BL.shape)}")
        given = prompt_BL[given_BL]
        if bool(((given < 0) | (given >= V) | (given == mask_id)).any()):
            raise ValueError(f"a given token is [MASK] or outside the vocabulary [0, {V})")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return (prompt_BL.repeat_interleave(num_samples, 0).to(self.device),
                given_BL.repeat_interleave(num_samples, 0).to(self.device))

    @torch.no_grad()
    def generate(self, num_samples: int = 1, steps: int | None = None, seed: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seq_length: int | None = None,
                 prompt_ids: torch.Tensor | None = None, use_cache: bool = True,
                 return_dict: bool = False, *, input_ids: torch.Tensor | list[list[int]] | None = None,
                 given_mask: torch.Tensor | None = None) -> torch.LongTensor | dict:
        """Unconditional or conditioned generation with the project's OeMDM ancestral sampler.

        Conditioning (a prompt): the given tokens are never changed; the other positions are
        sampled with the native samplers' rules, the learned reverse exponents normalised over the
        positions to generate only (as training does for conditioned data, method.md §5.9).

        Args:
            num_samples: B; with a prompt, the samples per prompt (consecutive rows).
            steps: T grid steps on linspace(1, 0, T + 1); default L.
            seed: seeds a private ``torch.Generator`` (None: the global RNG).
            temperature: softmax temperature of the token draws, > 0.
            top_p: nucleus mass in (0, 1].
            seq_length: L; default ``config.max_position_embeddings`` (or ``prompt_ids``'s).
            prompt_ids: [B, L] tokens given in place (infilling, e.g. a Sudoku's givens): the
                positions where ``given_mask`` is True are kept, the others generated.
            use_cache: skip the backbone call when no token changed since the last one.
            return_dict: also return the number of backbone calls and executed steps.
            input_ids: prefix prompts: a [B, P] tensor or a list of id lists (any lengths < L),
                given at positions 0..P-1 of each row (the layout of the project's conditioned
                data: ``[BOS] prompt`` then the response).
            given_mask: bool [B, L] with ``prompt_ids``; default ``prompt_ids != mask_id``.

        Returns:
            Token ids [B, L] with no [MASK] left (ids < ``config.vocab_size``), or a dict with
            ``sequences``, ``num_calls``, ``num_steps`` and ``given_mask``.
        """
        L = prompt_ids.shape[-1] if prompt_ids is not None else seq_length or self.config.max_position_embeddings
        prompt = self._prompt(input_ids, prompt_ids, given_mask, num_samples, L)
        prompt_BL, given_BL = prompt if prompt is not None else (None, None)
        family = self.family(L)
        denoise = denoiser_from_backbone(lambda z_BL: self._pass(z_BL)[:2], family=family,
                                         rev_head=self.reverse_head, given_BL=given_BL)
        sampler = AncestralSampler(mask_id=self.config.mask_id, num_steps=steps or L, family=family,
                                   temperature=temperature, top_p=top_p, use_cache=use_cache)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        if prompt_BL is None:
            res = sampler.sample(denoise, batch_size=num_samples, seq_length=L, generator=generator,
                                 device=self.device)
        else:
            res = sampler.sample(denoise, prompt_BL=prompt_BL, fixed_BL=given_BL, generator=generator)
        if return_dict:
            given_BL = torch.zeros_like(res.tokens_BL, dtype=torch.bool) if given_BL is None else given_BL
            return {"sequences": res.tokens_BL, "num_calls": res.num_calls, "num_steps": res.num_steps,
                    "given_mask": given_BL}
        return res.tokens_BL
