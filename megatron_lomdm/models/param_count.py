"""Analytic parameter counts of the backbone (and of one scheduler head).

Two numbers:
    * ``backbone_param_count``: the exact count of what ``build_backbone`` creates (megatron's
      local or TE spec: biases on every Linear, LayerNorm weight + bias, untied embedding and LM
      head over the padded vocabulary, RoPE without parameters), with a per-component breakdown.
    * ``formula_param_count``: performance.md's formula ``N = L * 12 d^2 + 2 d V`` (12 d^2 per
      layer for a 4d MLP, untied input embedding + output projection), which ignores biases,
      LayerNorms and vocabulary padding. For owt_1b (24L, d2048, V 50258 -> 50304 padded) the two
      agree to 0.06%.

Both count the whole model (all pipeline stages, all TP slices together).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BackboneParamCount:
    """Exact parameter count of the backbone, by component (whole model)."""

    embedding: int
    """Word embedding, padded vocabulary x D."""
    attention: int
    """All layers: fused QKV Linear + output projection, with biases."""
    mlp: int
    """All layers: fc1 + fc2, with biases."""
    layernorms: int
    """All layers' two LayerNorms plus the final LayerNorm (weight + bias)."""
    output_layer: int
    """Untied LM head, padded vocabulary x D, no bias."""

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.layernorms + self.output_layer

    @property
    def non_embedding(self) -> int:
        """Everything except the word embedding and the LM head."""
        return self.attention + self.mlp + self.layernorms

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "non_embedding": self.non_embedding}


def backbone_param_count(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    padded_vocab_size: int,
    num_heads: int,
    num_query_groups: int | None = None,
) -> BackboneParamCount:
    """Exact parameter count of ``build_backbone``'s model.

    Args:
        num_layers: L.
        hidden_size: d.
        ffn_hidden_size: MLP inner size f.
        padded_vocab_size: the vocabulary after ``pad_vocab_size``.
        num_heads: attention heads (head dim d / heads).
        num_query_groups: key/value heads (GQA); default = num_heads.

    Returns:
        The breakdown; ``.total`` equals ``sum(p.numel() for p in model.parameters())``.
    """
    d, f, L = hidden_size, ffn_hidden_size, num_layers
    head_dim = d // num_heads
    kv = (num_query_groups or num_heads) * head_dim
    qkv_out = d + 2 * kv
    attention = (d * qkv_out + qkv_out) + (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    return BackboneParamCount(
        embedding=padded_vocab_size * d,
        attention=L * attention,
        mlp=L * mlp,
        layernorms=L * 2 * (2 * d) + 2 * d,
        output_layer=padded_vocab_size * d,
    )


def formula_param_count(*, num_layers: int, hidden_size: int, vocab_size: int) -> int:
    """performance.md's count: ``L * 12 d^2 + 2 d V`` (untied embedding + output, MLP 4d)."""
    return num_layers * 12 * hidden_size**2 + 2 * hidden_size * vocab_size


def scheduler_head_param_count(hidden_size: int, mlp_ratio: int = 4) -> int:
    """Exact count of one ``SchedulerHead`` (block + LayerNorm-Linear-GELU-Linear(1))."""
    d, f = hidden_size, mlp_ratio * hidden_size
    block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * (2 * d) + (d * f + f) + (f * d + d)
    head = 2 * d + (d * d + d) + (d + 1)
    return block + head
