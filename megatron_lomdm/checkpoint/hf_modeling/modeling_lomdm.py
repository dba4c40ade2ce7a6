"""The exported LoMDM / OeMDM masked diffusion LM in plain torch (``trust_remote_code`` model).

Self-contained: imports only torch, transformers, math and the sibling configuration file, because
``save_pretrained`` copies this file next to the weights and ``from_pretrained(...,
trust_remote_code=True)`` runs it from there, without ``megatron_lomdm`` installed.

Shape legend: B batch, L sequence, D hidden, H heads, G key/value groups, Q head dim,
V vocabulary (the tokenizer's, including [MASK]; the training run's padding is trimmed).

The backbone reproduces the training backbone (megatron-core ``GPTModel``, local layer spec) op by
op in fp32: token embedding (no position term) -> per layer [LayerNorm -> fused QKV -> rotary on
q, k (megatron's non-interleaved rotate-half, base ``rope_theta``) -> softmax(q k^T / sqrt(Q)) with
key padding filled with -10000 -> output projection -> residual; LayerNorm -> fc1 -> exact erf
GELU -> fc2 -> residual] -> final LayerNorm (= the features f(.)) -> untied LM head, no bias.
Attention is bidirectional. The fused QKV weight keeps megatron's layout: for each key/value
group g, the rows ``[q heads of g | k_g | v_g]``, each Q rows per head (as GPT-NeoX).

The model also carries what sampling needs (method.md §3.2, §3.5):
    * lomdm: the reverse scheduler head g_psi: e_R = c1 + c2 NormSig(g_psi(f(z_t))); the forward
      head g_phi is exported too (training only: it is needed to fine-tune, not to sample);
    * genmd4: the per-token exponents w = softplus(token_exponent_raw); e_R = sum_v mu_v w_v and
      tokens are drawn from x~_v ∝ w_v mu_v (the OeMDM form of GenMD4);
    * multivariate: one order logit per position; e_R = c1 + c2 NormSig(order_logits), the same
      for every sequence (context-free; sequences must have the training length L);
    * mdlm / poly: the constant exponent 1 / c1; arm / bd3lm: the block slot schedule.
``generate`` runs the OeMDM ancestral sampler on the grid linspace(1, 0, T + 1): a masked
position unmasks from t to s with probability 1 - (s/t)^{e_R} (stay-masked (s/t)^{e_R}), draws
its token from SUBS x_theta (the [MASK] logit is -inf; unmasked tokens are carried over), every
remaining mask is filled at s = 0, one backbone call per step (skipped when nothing changed since
the last call), and all sampling laws and categorical draws are fp64.
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

_MASKED_SCORE = -10000.0  # megatron's attention_mask_func fill value
_CHUNK_ROWS = 256  # rows of fp64 (rows, V) blocks in the token draws
_F64 = torch.float64


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

    def forward(self, features_BLD: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x_BLD = features_BLD.to(self.norm_attn.weight.dtype)
        keep_B11L = None
        if attention_mask is not None:
            keep_B11L = ~key_padding_mask(attention_mask)
        x_BLD = x_BLD + self.attn(self.norm_attn(x_BLD), keep_B11L)
        x_BLD = x_BLD + self.mlp(self.norm_mlp(x_BLD))
        logits_BL = self.out(x_BLD).squeeze(-1).float()
        if not self.center:
            return logits_BL
        w_BL = torch.ones_like(logits_BL) if attention_mask is None else attention_mask.to(logits_BL.dtype)
        mean_B1 = (logits_BL * w_BL).sum(-1, keepdim=True) / w_BL.sum(-1, keepdim=True).clamp_min(1.0)
        return logits_BL - mean_B1  # centred over the valid positions, as in training


def normsig(logits_BL: torch.Tensor, valid_BL: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(v) minus its mean over the valid positions of each row."""
    sig_BL = torch.sigmoid(logits_BL)
    if valid_BL is None:
        return sig_BL - sig_BL.mean(-1, keepdim=True)
    valid_BL = valid_BL.bool().expand_as(sig_BL)
    count_B1 = valid_BL.sum(-1, keepdim=True).clamp_min(1)
    return sig_BL - torch.where(valid_BL, sig_BL, 0.0).sum(-1, keepdim=True) / count_B1


# ---------------------------------------------------------------------------------------------
# Sampling laws (fp64)
# ---------------------------------------------------------------------------------------------


def sampling_log_probs(logits_NV: torch.Tensor, *, mask_id: int, temperature: float = 1.0,
                       top_p: float = 1.0) -> torch.Tensor:
    """SUBS ([MASK] gets probability 0), temperature, then nucleus filtering; fp64 log-probs."""
    logits_NV = logits_NV.to(_F64)
    logits_NV = logits_NV.index_fill(1, torch.tensor([mask_id], device=logits_NV.device), -math.inf)
    logp_NV = torch.log_softmax(logits_NV / temperature, dim=-1)
    if top_p >= 1.0:
        return logp_NV
    prob_sorted, order = torch.sort(logp_NV.exp(), dim=-1, descending=True)
    drop_sorted = (prob_sorted.cumsum(-1) - prob_sorted) >= top_p  # the top token always stays
    drop_NV = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.log_softmax(logp_NV.masked_fill(drop_NV, -math.inf), dim=-1)


def gumbel_argmax(logp_NV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row (Gumbel-max in fp64)."""
    u_NV = torch.rand(logp_NV.shape, dtype=_F64, device=logp_NV.device, generator=generator)
    gumbel_NV = -torch.log(-torch.log(u_NV.clamp_min(torch.finfo(_F64).tiny)))
    return torch.argmax(logp_NV.to(_F64) + gumbel_NV, dim=-1)


def power_unmask_prob(exponents_BL: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """P(unmasked at s | masked at t) = 1 - (s/t)^e under alpha = 1 - t^e (fp64)."""
    log_ratio = (math.log(s) if s > 0 else -math.inf) - math.log(t)
    return -torch.expm1(exponents_BL.to(_F64) * log_ratio)


def slot_log_mask_prob(t: float, seq_len: int, block_size: int,
                       device: torch.device) -> torch.Tensor:
    """log(1 - alpha(t)) of the block slot schedule (bd3lm; arm = block 1), fp64 [L]."""
    num_blocks = seq_len // block_size
    block_L = torch.arange(seq_len, device=device) // block_size + 1
    t_1 = torch.tensor([t], dtype=_F64, device=device)
    tau_1L = num_blocks * t_1.unsqueeze(-1) - (num_blocks - block_L).to(_F64)
    return torch.log(tau_1L.clamp(0.0, 1.0))[0]


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
        if isinstance(module, LoMDMForMaskedDiffusion) and module.token_exponent_raw is not None:
            nn.init.constant_(module.token_exponent_raw, math.log(math.expm1(1.0)))
        if isinstance(module, LoMDMForMaskedDiffusion) and module.order_logits is not None:
            nn.init.zeros_(module.order_logits)  # the polynomial schedule


class LoMDMForMaskedDiffusion(LoMDMPreTrainedModel):
    """Backbone + LM head + the family's reverse scheduler, with ``generate``.

    Parameters: ``model.*`` (backbone), ``lm_head.weight``, and per family
    ``reverse_head.*`` + ``forward_head.*`` (lomdm), ``token_exponent_raw`` (genmd4) or
    ``order_logits`` [L] (multivariate).
    """

    def __init__(self, config: LoMDMConfig) -> None:
        super().__init__(config)
        self.model = LoMDMBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        lomdm = config.family == "lomdm"
        self.reverse_head = LoMDMSchedulerHead(config) if lomdm else None
        self.forward_head = LoMDMSchedulerHead(config) if lomdm else None
        self.token_exponent_raw = (nn.Parameter(torch.zeros(config.vocab_size))
                                   if config.family == "genmd4" else None)
        self.order_logits = (nn.Parameter(torch.zeros(config.max_position_embeddings))
                             if config.family == "multivariate" else None)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ---- forward ------------------------------------------------------------------------------
    def token_exponents(self) -> torch.Tensor:
        """GenMD4's w = softplus(raw) [V] in fp32."""
        return F.softplus(self.token_exponent_raw.float())

    def reverse_exponents(self, logits_BLV: torch.Tensor, features_BLD: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """e_R of the family from one backbone pass (None for context-free families)."""
        cfg = self.config
        if cfg.family == "lomdm":
            rev_logits_BL = self.reverse_head(features_BLD, attention_mask)
            return cfg.c1 + cfg.c2 * normsig(rev_logits_BL.float(), attention_mask)
        if cfg.family == "genmd4":
            logits = logits_BLV.float().index_fill(
                -1, torch.tensor([cfg.mask_id], device=logits_BLV.device), -math.inf)
            return (torch.softmax(logits, dim=-1) * self.token_exponents()).sum(-1)
        if cfg.family == "multivariate":
            B, L = logits_BLV.shape[:2]
            if L != self.order_logits.shape[0]:
                raise ValueError(f"the multivariate family has one order logit per position: "
                                 f"sequences must have length {self.order_logits.shape[0]}, got {L}")
            v_L = self.order_logits.float()
            v_L = v_L - v_L.mean()  # centred, as in training
            if attention_mask is None:
                return (cfg.c1 + cfg.c2 * normsig(v_L)).expand(B, L)
            return cfg.c1 + cfg.c2 * normsig(v_L.expand(B, L), attention_mask)
        return None

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
        features_BLD, all_hidden = self.model(input_ids, attention_mask,
                                              bool(output_hidden_states))
        logits_BLV = torch.matmul(features_BLD, self.lm_head.weight.t())
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
        cfg = self.config
        return cfg.c1 + cfg.c2 * normsig(self.forward_head(features_BLD, attention_mask),
                                         attention_mask)

    # ---- sampling -----------------------------------------------------------------------------
    def _denoise(self, z_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone call: (logits to draw tokens from, e_R or None)."""
        out = self(input_ids=z_BL)
        if self.config.family == "genmd4":
            return out.logits.float() + self.token_exponents().log(), out.reverse_exponents
        return out.logits, out.reverse_exponents

    def _unmask_prob(self, e_BL: torch.Tensor | None, masked_BL: torch.Tensor, t: float,
                     s: float) -> torch.Tensor:
        cfg = self.config
        if e_BL is None and cfg.family in ("arm", "bd3lm"):
            block = 1 if cfg.family == "arm" else cfg.block_size
            L = masked_BL.shape[1]
            lm_t = slot_log_mask_prob(t, L, block, masked_BL.device)
            lm_s = slot_log_mask_prob(s, L, block, masked_BL.device)
            p_L = -torch.expm1(lm_s - lm_t)
            return torch.where(torch.isneginf(lm_t), 1.0, p_L).clamp(0.0, 1.0)
        if e_BL is None:
            exponent = 1.0 if cfg.family == "mdlm" else cfg.c1
            e_BL = torch.full(masked_BL.shape, exponent, dtype=_F64, device=masked_BL.device)
        return power_unmask_prob(e_BL, t, s)

    def _initial_tokens(self, num_samples: int, seq_length: int,
                        prompt_ids: torch.Tensor | None) -> torch.Tensor:
        mask_id = self.config.mask_id
        if prompt_ids is None:
            return torch.full((num_samples, seq_length), mask_id, dtype=torch.long,
                              device=self.device)
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, L], got shape {tuple(prompt_ids.shape)}")
        return prompt_ids.to(device=self.device, dtype=torch.long).clone()

    @torch.no_grad()
    def generate(self, num_samples: int = 1, steps: int | None = None, seed: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seq_length: int | None = None,
                 prompt_ids: torch.Tensor | None = None, use_cache: bool = True,
                 return_dict: bool = False) -> torch.LongTensor | dict:
        """Unconditional (or infilling) generation with the OeMDM ancestral sampler.

        Args:
            num_samples: B (ignored with ``prompt_ids``).
            steps: T grid steps on linspace(1, 0, T + 1); default L.
            seed: seeds a private ``torch.Generator`` (None: the global RNG).
            temperature: softmax temperature of the token draws, > 0.
            top_p: nucleus mass in (0, 1].
            seq_length: L; default ``config.max_position_embeddings``.
            prompt_ids: [B, L] tokens; positions != [MASK] are kept, the others generated.
            use_cache: skip the backbone call when no token changed since the last one.
            return_dict: also return the number of backbone calls and executed steps.

        Returns:
            Token ids [B, L] with no [MASK] left (ids < ``config.vocab_size``), or a dict with
            ``sequences``, ``num_calls`` and ``num_steps``.
        """
        cfg = self.config
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], "
                             f"got {temperature}, {top_p}")
        z_BL = self._initial_tokens(num_samples, seq_length or cfg.max_position_embeddings,
                                    prompt_ids)
        L = z_BL.shape[1]
        if cfg.family in ("arm", "bd3lm") and L % (1 if cfg.family == "arm" else cfg.block_size):
            raise ValueError(f"seq_length={L} is not a multiple of block_size={cfg.block_size}")
        steps = steps or L
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=_F64)
        cache, num_calls, num_steps = None, 0, 0
        for k in range(steps):
            masked_BL = z_BL == cfg.mask_id
            if not bool(masked_BL.any()):
                break
            num_steps += 1
            if cache is None or not use_cache:
                cache = self._denoise(z_BL.clone())
                num_calls += 1
            logits_BLV, e_BL = cache
            t, s = float(grid[k]), float(grid[k + 1])
            if k == steps - 1:
                p_BL = torch.ones(masked_BL.shape, dtype=_F64, device=masked_BL.device)
            else:
                p_BL = self._unmask_prob(e_BL, masked_BL, t, s).expand(masked_BL.shape)
            u_BL = torch.rand(masked_BL.shape, dtype=_F64, device=masked_BL.device,
                              generator=generator)
            select_BL = masked_BL & (u_BL < p_BL)
            tokens = [
                gumbel_argmax(sampling_log_probs(logits_BLV[rows[:, 0], rows[:, 1]],
                                                 mask_id=cfg.mask_id, temperature=temperature,
                                                 top_p=top_p), generator)
                for rows in torch.split(torch.nonzero(select_BL), _CHUNK_ROWS)
            ]
            new_N = torch.cat(tokens) if tokens else z_BL.new_empty(0)
            if new_N.numel():
                z_BL[select_BL] = new_N.to(z_BL.dtype)
                cache = None
        if return_dict:
            return {"sequences": z_BL, "num_calls": num_calls, "num_steps": num_steps}
        return z_BL
