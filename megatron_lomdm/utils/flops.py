"""Analytic FLOP counts (performance.md §A1): bidirectional attention is not halved.

Per token, one backbone forward costs 2·(layers·(4d² + 2·d·ffn) + d·V) for the GEMMs plus
4·layers·T·d for QKᵀ and AV. Training is 3× forward (forward, weight grad, input grad).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor peak per device (performance.md §A1); MFU is reported against these.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int


def forward_flops_per_token(s: Shape, *, with_logits: bool = True) -> float:
    """Backbone forward FLOPs per token (GEMMs + bidirectional attention [+ LM head])."""
    d, n = s.hidden_size, s.num_layers
    gemm = n * (4 * d * d + 2 * d * s.ffn_hidden_size)
    attn = 4 * n * s.seq_length * d
    return 2 * gemm + attn + (2 * d * s.vocab_size if with_logits else 0)


def head_forward_flops_per_token(s: Shape) -> float:
    """One scheduler head (one block with MLP ratio 4 + LN-Linear-GELU-Linear) forward, per token."""
    d = s.hidden_size
    return 2 * (12 * d * d + d * d + d) + 4 * s.seq_length * d


def step_flops(s: Shape, *, unique_sequences: int, num_corruptions: int, clean_pass: bool, heads: bool) -> float:
    """FLOPs of one optimizer step over `unique_sequences` sequences.

    A clean no-grad pass (LoMDM) costs one forward without the LM head; each corruption costs a
    forward and backward; the forward head trains on B sequences, the reverse head on K·B.
    """
    tokens = unique_sequences * s.seq_length
    total = 3 * forward_flops_per_token(s) * tokens * num_corruptions
    if clean_pass:
        total += forward_flops_per_token(s, with_logits=False) * tokens
    if heads:
        total += 3 * head_forward_flops_per_token(s) * tokens * (1 + num_corruptions)
    return total


def peak_flops_of_device(name: str) -> float:
    """Peak dense bf16 FLOP/s for a CUDA device name, 0.0 when unknown (e.g. CPU)."""
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return 0.0
