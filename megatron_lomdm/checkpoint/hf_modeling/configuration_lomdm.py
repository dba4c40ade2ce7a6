"""Configuration of the exported LoMDM / OeMDM diffusion LM (``model_type = "lomdm"``).

Runs without ``megatron_lomdm``: it imports ``transformers`` and, through ``oemdm_math``, the
project's family registry, whose rules check the family's settings (``save_pretrained`` copies this
file next to the weights, the exporter ships ``oemdm_math`` and what it imports, and
``from_pretrained(..., trust_remote_code=True)`` loads them from there).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .oemdm_math import FAMILY_SPECS


class LoMDMConfig(PretrainedConfig):
    """Backbone shape, the OeMDM family and its schedule constants, and the special ids.

    Args:
        vocab_size: V, the tokenizer's vocabulary including [MASK] (the exported logits' width;
            the training run's vocabulary padding is trimmed).
        hidden_size: D.
        num_hidden_layers: transformer layers.
        num_attention_heads: attention heads.
        num_key_value_heads: key/value groups of the fused QKV weight (= heads: no GQA).
        intermediate_size: MLP width (4 D in the paper's setting).
        max_position_embeddings: the training sequence length L (default length of
            ``generate``; rotary positions work for any length).
        layer_norm_eps: LayerNorm epsilon of the backbone.
        rope_theta: rotary base.
        hidden_act: MLP activation (``gelu``: the exact erf GELU).
        family: OeMDM family: mdlm, poly, arm, bd3lm, genmd4, lomdm or multivariate.
        c1: mean exponent (poly, lomdm, multivariate).
        c2: exponent spread (lomdm, multivariate).
        block_size: block length L' (bd3lm; arm is 1).
        eps_t: smallest training time (informational).
        mask_id: the [MASK] id.
        pad_token_id / bos_token_id / eos_token_id: special ids (None if absent).
        head_num_attention_heads: heads of the scheduler heads' transformer block.
        head_mlp_ratio: MLP width of the scheduler heads as a multiple of D.
        head_layer_norm_eps: LayerNorm epsilon of the scheduler heads.
        head_center_logits: centre the heads' logits over the valid positions (exports before it: false).
        padded_vocab_size: the training run's padded vocabulary (re-import only).
        native_config: the training run's resolved config (re-import only).
    """

    model_type = "lomdm"

    def __init__(
        self,
        vocab_size: int = 50258,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        hidden_act: str = "gelu",
        family: str = "lomdm",
        c1: float = 0.7,
        c2: float = 0.65,
        block_size: int = 16,
        eps_t: float = 1e-3,
        mask_id: int = 50257,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        head_num_attention_heads: int | None = None,
        head_mlp_ratio: int = 4,
        head_layer_norm_eps: float = 1e-5,
        head_center_logits: bool = False,
        padded_vocab_size: int | None = None,
        native_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if family not in FAMILY_SPECS:
            raise ValueError(f"family must be one of {tuple(FAMILY_SPECS)}, got {family!r}")
        FAMILY_SPECS[family].check(c1=c1, c2=c2, block_size=block_size, seq_length=max_position_embeddings)
        if hidden_size % num_attention_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} must divide "
                             f"hidden_size={hidden_size}")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.family = family
        self.c1 = float(c1)
        self.c2 = float(c2)
        self.block_size = block_size
        self.eps_t = eps_t
        self.mask_id = mask_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.head_num_attention_heads = head_num_attention_heads or num_attention_heads
        self.head_mlp_ratio = head_mlp_ratio
        self.head_layer_norm_eps = head_layer_norm_eps
        self.head_center_logits = head_center_logits
        self.padded_vocab_size = padded_vocab_size or vocab_size
        self.native_config = native_config
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
