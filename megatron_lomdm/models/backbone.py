"""The diffusion backbone: megatron-core ``GPTModel`` with bidirectional attention.

Shape legend: B batch, L sequence, D hidden, V vocabulary (padded), V/tp this TP rank's slice.

The backbone knows nothing about diffusion. It maps tokens to (vocab-parallel logits, final hidden
states) in one pass: embedding -> rotary positions -> transformer layers -> final LayerNorm
(= ``hidden``, the feature extractor f(.) of method.md section 3.1) -> untied LM head (= logits).
There is no time conditioning. SUBS (mask logit -inf, carry-over) is applied by the consumers,
see ``megatron_lomdm.models.vocab_parallel``.

Sequence parallelism (``config.sequence_parallel``): inside the backbone the hidden states are
split along the sequence over the TP ranks ([L/tp, B, D]; megatron scatters them after the
embedding and gathers them in the LM head's column-parallel linear). ``forward`` gathers the final
hidden states too, so the scheduler heads, which attend over whole sequences, always see [B, L, D];
between pipeline stages the activations stay split ([L/tp, B, D]), as megatron's schedules expect.

``Backbone`` subclasses ``GPTModel`` only to replace ``forward``: parameters, state-dict keys,
``sharded_state_dict``, ``set_input_tensor`` (pipeline parallelism) and everything megatron's DDP,
optimizers and ``finalize_model_grads`` look for stay megatron's own.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lomdm.config.schema import META_INIT_UNSUPPORTED
from megatron_lomdm.models.layer_specs import (
    AttentionBackend,
    component_seed,
    get_backbone_block_spec,
    layout_independent_init,
    resolve_attention_backend,
)

Recompute = Literal["full", "selective"]


def pad_vocab_size(vocab_size: int, *, divisible_by: int = 128, tp: int = 1) -> int:
    """Round the vocabulary up to a multiple of ``lcm(divisible_by, tp)``.

    Unlike megatron's training scripts (multiple of ``divisible_by * tp``), the padding does not
    depend on TP for power-of-two TP sizes up to ``divisible_by``, so checkpoints keep one shape
    across parallel layouts. GPT-2 + [MASK] (50258) -> 50304.
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


class Backbone(GPTModel):
    """``GPTModel`` (rotary, untied embeddings, bidirectional) returning logits and hidden states.

    Attributes:
        true_vocab_size: the tokenizer's vocabulary including [MASK]; ids >= it are padding.
        mask_id: the [MASK] token id.
        attention_backend: ``te``, ``sdpa`` or ``local``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        true_vocab_size: int,
        padded_vocab_size: int,
        seq_length: int,
        mask_id: int,
        attention_backend: str,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(
            config,
            get_backbone_block_spec(config, attention_backend, vp_stage),  # type: ignore[arg-type]
            vocab_size=padded_vocab_size,
            max_sequence_length=seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        self.true_vocab_size = true_vocab_size
        self.mask_id = mask_id
        self.attention_backend = attention_backend

    def pad_attention_mask(
        self, valid_BL: torch.Tensor | None, B: int, L: int, device: torch.device
    ) -> torch.Tensor | None:
        """Key-padding mask [B, 1, 1, L] (True = masked out, broadcast over heads and queries).

        ``None`` when there is nothing to mask, except on Transformer Engine, whose padding mask
        type needs an explicit mask. A sequence with no valid token attends everywhere, so no
        softmax row is empty; pad positions' outputs are meaningless and must be ignored.
        Transformer Engine turns the mask into sequence lengths, so there the valid tokens must be
        a prefix of each row (right padding, as the padded data layout writes them).
        """
        if valid_BL is None:
            if self.attention_backend != "te":
                return None
            valid_BL = torch.ones(B, L, dtype=torch.bool, device=device)
        valid_BL = valid_BL.bool()
        valid_BL = valid_BL | ~valid_BL.any(dim=1, keepdim=True)
        return ~valid_BL[:, None, None, :]

    def forward(  # type: ignore[override]
        self,
        tokens_BL: torch.Tensor,
        valid_BL: torch.Tensor | None = None,
        *,
        compute_logits: bool = True,
    ):
        """One pass through the backbone.

        Args:
            tokens_BL: token ids [B, L] (on a non-first pipeline stage only its shape is used).
            valid_BL: bool [B, L], False at padding; pads are excluded from attention as keys.
            compute_logits: False skips the LM head (e.g. the no-grad clean-x feature pass).

        Returns:
            On the last pipeline stage ``(logits_BLV, hidden_BLD)``: this TP rank's vocabulary
            slice of the logits [B, L, V/tp] (``None`` if ``compute_logits`` is False) and the
            final hidden states after the final LayerNorm [B, L, D], the LM head's input. Both
            are batch-first views of megatron's sequence-first tensors (no copy; under sequence
            parallelism the hidden states are first gathered over TP). On other stages the stage's
            output hidden states [L, B, D] ([L/tp, B, D] under sequence parallelism),
            sequence-first, as the pipeline sends them.
        """
        B, L = tokens_BL.shape
        mask = self.pad_attention_mask(valid_BL, B, L, tokens_BL.device)
        decoder_input_LBD = None
        if self.pre_process:
            # rotary positions: the embedding adds no position term, position_ids are unused
            decoder_input_LBD = self.embedding(input_ids=tokens_BL, position_ids=None)
        rotary_len = self.rotary_pos_emb.get_rotary_seq_len(
            None, self.decoder, decoder_input_LBD, self.config, None
        )
        hidden_LBD = self.decoder(
            hidden_states=decoder_input_LBD,
            attention_mask=mask,
            rotary_pos_emb=self.rotary_pos_emb(rotary_len),
        )
        if not self.post_process:
            return hidden_LBD
        logits_LBV = self.output_layer(hidden_LBD)[0] if compute_logits else None
        logits_BLV = None if logits_LBV is None else logits_LBV.transpose(0, 1)
        if self.config.sequence_parallel:
            # [L/tp, B, D] -> [L, B, D]; its backward keeps this rank's slice of the gradient
            hidden_LBD = gather_from_sequence_parallel_region(hidden_LBD, tensor_parallel_output_grad=False)
        return logits_BLV, hidden_LBD.transpose(0, 1)


def use_cpu_initialization(init_device: str, *, cuda_available: bool | None = None) -> bool:
    """Whether ``model.init_device`` draws the weights on the CPU (megatron's
    ``use_cpu_initialization``): ``auto`` means on the GPU when CUDA is available.

    Raises:
        ValueError: naming ``model.init_device`` for ``cuda`` without CUDA and for ``meta``.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if init_device == "meta":
        raise ValueError(f"model.init_device: {META_INIT_UNSUPPORTED}")
    if init_device == "cuda" and not cuda:
        raise ValueError("model.init_device=cuda needs a CUDA device and this process has none; "
                         "use model.init_device=auto or cpu")
    if init_device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"model.init_device must be auto, cpu, cuda or meta, not {init_device!r}")
    return init_device == "cpu" or (init_device == "auto" and not cuda)


def _recompute_fields(recompute: str | None) -> dict:
    if recompute is None:
        return {}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    raise ValueError(f"model.recompute must be None, 'full' or 'selective', not {recompute!r}")


def build_backbone(*, pre_process: bool = True, post_process: bool = True, **kwargs) -> Backbone:
    """The backbone of this pipeline stage, without interleaving (see ``build_backbone_chunks``)."""
    (model,) = build_backbone_chunks(stage_ends=[(pre_process, post_process)], **kwargs)
    return model


def build_backbone_chunks(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
    seq_length: int,
    mask_id: int,
    dropout: float = 0.0,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    recompute: str | None = None,
    use_cpu_initialization: bool,
    stage_ends: list[tuple[bool, bool]],
    sequence_parallel: bool = False,
    init_method_std: float = 0.02,
    attention_backend: AttentionBackend = "auto",
    vocab_divisible_by: int = 128,
) -> list[Backbone]:
    """Build this rank's backbone chunks for the current megatron parallel layout.

    ``init_distributed`` (or ``parallel_state.initialize_model_parallel``) must have run. With
    ``use_cpu_initialization`` every TP-split weight is drawn in full from the CPU RNG and then
    sliced, and every layer is seeded from its global number, so the model is identical for any
    TP x PP (x virtual stages) layout given the same default-RNG state (``init_distributed`` seeds
    all ranks alike); the model is then moved to the current CUDA device when there is one.
    Without it (initialisation on the accelerator) megatron allocates each weight on the current
    CUDA device and draws only this rank's slice there, from megatron's model-parallel RNG for
    TP-split weights: nothing the size of the model passes through host memory, and the values
    depend on the TP layout.

    Args:
        num_layers: transformer layers in the whole model (split over pipeline stages and chunks).
        hidden_size: D.
        num_heads: attention heads (divisible by TP).
        ffn_hidden_size: MLP inner size (4 D in the paper's setting).
        vocab_size: the tokenizer's vocabulary including [MASK] (padded internally).
        seq_length: L, the maximum sequence length.
        mask_id: the [MASK] id.
        dropout: hidden and attention dropout.
        params_dtype: parameter dtype; ``torch.bfloat16`` together with ``bf16=True``.
        bf16: bf16 training (megatron's flag).
        recompute: activation recompute: None, ``full`` (every layer) or ``selective`` (core attn).
        use_cpu_initialization: draw weights on the CPU (layout-independent init).
        stage_ends: one ``(pre_process, post_process)`` per model chunk of this rank: whether the
            chunk holds the embedding (first stage, first chunk) and the final LayerNorm and LM head
            (last stage, last chunk). More than one chunk: interleaved pipeline stages, which
            ``initialize_model_parallel`` must have been told about (virtual pipeline size).
        sequence_parallel: megatron sequence parallelism (needs TP > 1).
        init_method_std: std of the normal weight init.
        attention_backend: ``auto`` (TE on GPU if installed, else SDPA on GPU, local on CPU),
            ``te``, ``sdpa`` or ``local``.
        vocab_divisible_by: vocabulary padding multiple (see ``pad_vocab_size``).

    Returns:
        The chunks, in model order.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = len(stage_ends)
    if hidden_size % num_heads or num_heads % tp:
        raise ValueError(
            f"model.num_heads={num_heads} must divide model.hidden_size={hidden_size} and be "
            f"divisible by parallel.tp={tp}"
        )
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} outside the vocabulary [0, {vocab_size})")
    if bf16 != (params_dtype == torch.bfloat16):
        raise ValueError(f"bf16={bf16} needs params_dtype=torch.bfloat16 (and only then); "
                         f"got {params_dtype}")
    if sequence_parallel and (tp == 1 or seq_length % tp):
        raise ValueError(f"parallel.sequence_parallel needs parallel.tp > 1 dividing model.seq_length={seq_length}; "
                         f"got tp={tp}")
    if vp > 1 and parallel_state.get_virtual_pipeline_model_parallel_world_size() != vp:
        raise ValueError(f"{vp} model chunks, but megatron's virtual pipeline size is "
                         f"{parallel_state.get_virtual_pipeline_model_parallel_world_size()}")
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=bf16,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=init_method_std,
        use_cpu_initialization=use_cpu_initialization,
        sequence_parallel=sequence_parallel,
        # a torch.cuda.synchronize() after batched p2p; pointless (and CUDA-only) on CPU
        batch_p2p_sync=torch.cuda.is_available(),
        **_recompute_fields(recompute),
    )
    # Layout-independent init (with use_cpu_initialization): the embedding draws from seed 0 of a
    # base taken from the (rank-synchronised) default RNG, layer i from seed i; the LM head follows
    # the last layer on the last stage's last chunk, so it matches too. Afterwards the default RNG
    # continues from a state that does not depend on the layout either.
    base_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
    torch.manual_seed(component_seed(base_seed, 0))
    chunks = []
    with layout_independent_init(base_seed):
        for vp_stage, (pre_process, post_process) in enumerate(stage_ends):
            chunks.append(Backbone(
                config,
                true_vocab_size=vocab_size,
                padded_vocab_size=pad_vocab_size(vocab_size, divisible_by=vocab_divisible_by, tp=tp),
                seq_length=seq_length,
                mask_id=mask_id,
                attention_backend=resolve_attention_backend(attention_backend),
                pre_process=pre_process,
                post_process=post_process,
                vp_stage=vp_stage if vp > 1 else None,
            ))
    torch.manual_seed(component_seed(base_seed, num_layers + 1))
    if use_cpu_initialization and torch.cuda.is_available():
        for model in chunks:
            model.cuda(torch.cuda.current_device())
    return chunks
