"""megatron-core layer specs for the bidirectional (non-causal) diffusion backbone.

Shape legend: B batch, L sequence, D hidden, H heads (per TP rank), G query groups, Q head dim.

Backends, chosen by ``resolve_attention_backend("auto")``:
    * ``te``: Transformer Engine spec (GPU, when ``transformer_engine`` imports).
    * ``sdpa``: the local spec with ``SDPACoreAttention``, i.e. fused
      ``torch.nn.functional.scaled_dot_product_attention(is_causal=False)`` instead of megatron's
      unfused DotProductAttention, which materialises a [B*H, L, L] score buffer (GPU without TE).
    * ``local``: megatron's local spec as is (CPU).

Sequence parallelism (``TransformerConfig.sequence_parallel``): megatron's Transformer Engine
norms support it; the local spec's ``WrappedTorchNorm`` refuses it (megatron could not tell its
weights apart from TP-split ones, whose gradients must not be summed over TP). The local and SDPA
specs therefore use ``SequenceParallelLayerNorm`` (a plain ``torch.nn.LayerNorm``, same state-dict
keys) whose parameters carry megatron's ``sequence_parallel`` mark, so ``finalize_model_grads``
all-reduces their gradients over the TP ranks, each of which saw 1/tp of the sequence.

Every spec uses ``AttnMaskType.padding``. With no mask passed that is exactly full bidirectional
attention on the local and SDPA paths (the mask is simply absent); Transformer Engine needs an
explicit key-padding mask for this type, which ``Backbone`` always passes on that backend.
GPU-only modules are imported inside functions, never at module import.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

AttentionBackend = Literal["auto", "te", "sdpa", "local"]
BIDIRECTIONAL_MASK_TYPE = AttnMaskType.padding

_INIT_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("init_seed", default=None)


def component_seed(base_seed: int, index: int) -> int:
    """The seed of one model component: 0 = embedding, i = global transformer layer i (1-based)."""
    return (base_seed + 1_000_003 * index) % (2**63)


@contextlib.contextmanager
def layout_independent_init(base_seed: int) -> Iterator[None]:
    """While active, every ``SeededTransformerLayer`` reseeds torch from its global layer number."""
    token = _INIT_SEED.set(base_seed)
    try:
        yield
    finally:
        _INIT_SEED.reset(token)


class SeededTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer, seeded from its *global* layer number before it is built.

    With ``use_cpu_initialization`` megatron draws every weight in full from the default torch RNG
    (then slices it for TP), so TP layouts already agree; reseeding each layer from its global
    number makes the weights independent of the pipeline split too. Outside
    ``layout_independent_init`` it is exactly TransformerLayer.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,  # noqa: ANN001
                 hidden_dropout: float | None = None, pg_collection=None,  # noqa: ANN001
                 vp_stage: int | None = None) -> None:
        base_seed = _INIT_SEED.get()
        if base_seed is not None:
            pp_group = getattr(pg_collection, "pp", None)
            pp_rank = None if pp_group is None else pp_group.rank()
            offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
            torch.manual_seed(component_seed(base_seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be imported (never true on the CPU machine)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install (e.g. no CUDA) counts as absent
        return False
    return True


def resolve_attention_backend(backend: AttentionBackend = "auto") -> str:
    """Turn ``auto`` into ``te`` (CUDA + TE), ``sdpa`` (CUDA, no TE) or ``local`` (CPU)."""
    if backend != "auto":
        if backend not in ("te", "sdpa", "local"):
            raise ValueError(f"attention backend must be auto, te, sdpa or local, not {backend!r}")
        return backend
    if torch.cuda.is_available():
        return "te" if transformer_engine_available() else "sdpa"
    return "local"


class SDPACoreAttention(MegatronModule):
    """Core attention through ``F.scaled_dot_product_attention``; a drop-in for a ModuleSpec.

    Takes megatron's layout ([L, B, H, Q] query, [L, B, G, Q] key/value) and returns [L, B, H*Q],
    like megatron's DotProductAttention. Bidirectional only (``no_mask`` or ``padding``); the
    optional mask is megatron's boolean convention (True = masked out), broadcastable to
    [B, 1, L, L]. Attention dropout draws from megatron's tensor-parallel RNG fork, as
    DotProductAttention does, since heads differ across TP ranks.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,  # noqa: ANN001  (megatron's ProcessGroupCollection)
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"SDPACoreAttention is bidirectional only, got {attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        tp_group = (
            pg_collection.tp
            if pg_collection is not None
            else parallel_state.get_tensor_model_parallel_group()
        )
        tp = tp_group.size()
        self.num_heads_per_partition = config.num_attention_heads // tp
        self.num_groups_per_partition = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides, then re-multiplies the scale: a no-op here.
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,  # noqa: ANN001
    ) -> torch.Tensor:
        """[L, B, H, Q] x [L, B, G, Q]^2 -> [L, B, H*Q]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports no attention_bias and no packed sequences")
        q_BHLQ, k_BGLQ, v_BGLQ = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        keep = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.num_groups_per_partition != self.num_heads_per_partition

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q_BHLQ, k_BGLQ, v_BGLQ, attn_mask=keep, dropout_p=dropout_p, is_causal=False,
                scale=self.softmax_scale, enable_gqa=gqa,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out_BHLQ = attend()
        else:
            out_BHLQ = attend()
        L, B = query.shape[0], query.shape[1]
        hidden = self.num_heads_per_partition * self.head_dim
        return out_BHLQ.permute(2, 0, 1, 3).reshape(L, B, hidden)


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built from megatron's norm arguments; under sequence parallelism its
    weight and bias are marked ``sequence_parallel`` (module docstring). Without it, exactly the
    LayerNorm megatron's ``WrappedTorchNorm`` builds."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "LayerNorm") -> None:
        if config.normalization != "LayerNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"SequenceParallelLayerNorm is a plain LayerNorm, not {config.normalization} "
                             f"(zero_centered_gamma={config.layernorm_zero_centered_gamma})")
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def get_backbone_block_spec(config: TransformerConfig, backend: AttentionBackend = "auto",
                            vp_stage: int | None = None) -> ModuleSpec | TransformerBlockSubmodules:
    """The spec ``GPTModel`` takes for this pipeline stage (model chunk ``vp_stage``).

    Transformer Engine: the layer spec (megatron pairs it with TE's norm, which handles sequence
    parallelism). Local and SDPA: the block's submodules, every norm a ``SequenceParallelLayerNorm``.
    """
    layer = get_backbone_layer_spec(backend)
    if resolve_attention_backend(backend) == "te":
        return layer
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelLayerNorm)


def get_backbone_layer_spec(backend: AttentionBackend = "auto") -> ModuleSpec:
    """The transformer-layer spec for the bidirectional backbone.

    Args:
        backend: ``auto``, ``te``, ``sdpa`` or ``local`` (see the module docstring).

    Returns:
        A fresh ModuleSpec of ``SeededTransformerLayer`` whose self-attention uses
        ``AttnMaskType.padding``.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    resolved = resolve_attention_backend(backend)
    if resolved == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec()
        if resolved == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.self_attention.params["attn_mask_type"] = BIDIRECTIONAL_MASK_TYPE
    assert spec.module is TransformerLayer, spec.module
    spec.module = SeededTransformerLayer
    return spec
