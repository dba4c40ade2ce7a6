"""Scheduler networks g_phi (forward) and g_psi (reverse) of LoMDM (method.md section 3.1).

Shape legend: B batch, L sequence, D hidden, H heads, Q head dim.

One pre-LN bidirectional transformer block followed by LayerNorm -> Linear(D, D) -> GELU ->
Linear(D, 1); the last Linear is zero-initialised, so training starts at the polynomial schedule
(every logit 0). Input: backbone features f(.) [B, L, D] (the caller detaches them: stop-grad).
Output: one logit per position [B, L] in fp32, centred by default (minus its mean over the row's
valid positions): LoMDM's NormSig(v) = sigmoid(v) - mean sigmoid(v) is not invariant to a shift of
all logits, so an uncentred head can drift every logit into sigmoid saturation, where the spread
and its gradient are ~0 (a flat order the heads cannot leave; bench/RESULTS.md, issue 16). Centring
makes the common shift a null direction and leaves the order unchanged at initialisation. The math runs in fp32 whatever the parameters'
dtype (bf16 runs cast the whole model) and with autocast off: early in training the per-position
logit differences (~1e-3) are below bf16's resolution, and they are the learned order.

Plain torch, not tensor-parallel: the heads are replicated on every TP rank and must stay
bit-identical there (``megatron_lomdm.distributed.init.broadcast_head_params`` /
``assert_replicated``); their gradients are averaged over data-parallel ranks only. Dropout uses
the default torch RNG, which ``init_distributed`` seeds identically on all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Fp32Linear(nn.Linear):
    """`nn.Linear` computed in fp32 from parameters of any dtype (same names, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class _Fp32LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` computed in fp32 from parameters of any dtype (same names, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class _SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.num_heads = num_heads
        self.qkv = _Fp32Linear(hidden_size, 3 * hidden_size)
        self.proj = _Fp32Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x_BLD: torch.Tensor, keep_B11L: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads)
        q_BHLQ, k_BHLQ, v_BHLQ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHLQ = F.scaled_dot_product_attention(
            q_BHLQ, k_BHLQ, v_BHLQ, attn_mask=keep_B11L, is_causal=False,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out_BHLQ.transpose(1, 2).reshape(B, L, D))


class SchedulerHead(nn.Module):
    """g(f): features [B, L, D] -> per-position scheduler logits [B, L], computed in fp32.

    Args:
        hidden_size: D, the backbone's hidden size.
        num_heads: attention heads of the block.
        dropout: dropout on attention probabilities and on both residual branches.
        mlp_ratio: the block's MLP width as a multiple of D.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0,
                 mlp_ratio: int = 4, center: bool = True) -> None:
        super().__init__()
        self.center = center
        self.norm_attn = _Fp32LayerNorm(hidden_size)
        self.attn = _SelfAttention(hidden_size, num_heads, dropout)
        self.norm_mlp = _Fp32LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            _Fp32Linear(hidden_size, mlp_ratio * hidden_size),
            nn.GELU(),
            _Fp32Linear(mlp_ratio * hidden_size, hidden_size),
        )
        self.drop = nn.Dropout(dropout)
        self.out = nn.Sequential(
            _Fp32LayerNorm(hidden_size),
            _Fp32Linear(hidden_size, hidden_size),
            nn.GELU(),
            _Fp32Linear(hidden_size, 1),
        )
        self.reset_output_layer()

    @torch.no_grad()
    def reset_output_layer(self) -> None:
        """Zero the last Linear, so every logit is exactly 0 (the polynomial schedule)."""
        self.out[-1].weight.zero_()
        self.out[-1].bias.zero_()

    def forward(
        self, features_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None,
        free_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scheduler logits.

        Args:
            features_BLD: backbone features [B, L, D] (already detached by the caller).
            valid_BL: bool [B, L], False at padding; pads are excluded as attention keys.
            free_BL: bool [B, L], the positions to generate (valid and not conditioned): the
                centring's mean runs over them; None: over ``valid_BL``.

        Returns:
            logits [B, L] in fp32 (values at pad positions are meaningless).
        """
        x_BLD = features_BLD.float()
        center_BL = valid_BL if free_BL is None else free_BL
        keep_B11L = None
        if valid_BL is not None:
            valid_BL = valid_BL.bool()
            valid_BL = valid_BL | ~valid_BL.any(dim=1, keepdim=True)  # no empty softmax rows
            keep_B11L = valid_BL[:, None, None, :]
        with torch.autocast(x_BLD.device.type, enabled=False):  # fp32 math (module docstring)
            x_BLD = x_BLD + self.drop(self.attn(self.norm_attn(x_BLD), keep_B11L))
            x_BLD = x_BLD + self.drop(self.mlp(self.norm_mlp(x_BLD)))
            logits_BL = self.out(x_BLD).squeeze(-1)
        return center_logits(logits_BL, center_BL) if self.center else logits_BL


def center_logits(logits_BL: torch.Tensor, valid_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Logits minus their mean over each row's valid positions (all positions when None)."""
    if valid_BL is None:
        return logits_BL - logits_BL.mean(-1, keepdim=True)
    w_BL = valid_BL.to(logits_BL.dtype)
    mean_B1 = (logits_BL * w_BL).sum(-1, keepdim=True) / w_BL.sum(-1, keepdim=True).clamp_min(1.0)
    return logits_BL - mean_B1
