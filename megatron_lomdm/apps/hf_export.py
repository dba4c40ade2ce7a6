"""Native (megatron TP x PP) checkpoints <-> the self-contained HF model of ``hf_modeling``.

Three layers, each usable on its own:

1. State-dict adapter (pure functions on ``{name: tensor}``):
   ``merge_native_shards`` (TP shards + PP stages -> one TP=1/PP=1 state dict),
   ``split_native_state_dict`` / ``slice_for_rank`` (the inverse), ``native_to_hf`` /
   ``hf_to_native`` (names, vocabulary padding).
2. ``export_run``: run directory -> HF folder (config.json + auto_map, model.safetensors, the
   modeling files, tokenizer files, README.md model card), written to a temp folder that is
   renamed only when complete (and, with ``verify``, only after the logits check passed).
3. ``verify_export`` (the export reloaded with ``trust_remote_code`` in a fresh process against the
   native model rebuilt in-process at TP=1) and ``import_hf`` (HF folder -> a run directory with a
   step-0 checkpoint that ``python -m megatron_lomdm.train`` resumes, i.e. fine-tunes, from).

TP merge rules (megatron-core, names of the local layer spec; Transformer Engine's fused
``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*`` names are mapped to them first):
    column-parallel ``linear_qkv`` / ``linear_fc1`` weight and bias: concatenated on dim 0 (each
        rank holds whole key/value groups: rows ``[q heads | k | v]`` per group, so the ranks'
        blocks concatenate to the full fused layout);
    row-parallel ``linear_proj`` / ``linear_fc2`` weight: dim 1 (their bias is replicated);
    vocab-parallel ``embedding.word_embeddings`` / ``output_layer`` weight: dim 0; the rows at
        and above the true vocabulary (megatron's padding) are trimmed by ``native_to_hf``;
    everything else (LayerNorms, scheduler heads, GenMD4 exponents) is replicated and must be
    bit-identical across TP ranks; ``_extra_state`` entries are dropped.

PP stage key scheme (``rank_TTT_PPP.pt``, PPP = stage p of P; what megatron's ``state_dict()``
gives on each stage, and what ``split_native_state_dict`` writes):
    stage p holds the contiguous layers [o_p, o_p + n_p) of the whole model under *local* names
        ``backbone.decoder.layers.{0..n_p-1}.*``, o_p = n_0 + ... + n_{p-1} (megatron's default
        split: n_p = num_layers / P); merging renumbers them to ``o_p + j``;
    ``backbone.embedding.*`` only on stage 0;
    ``backbone.decoder.final_layernorm.*`` and ``backbone.output_layer.*`` only on stage P-1;
    ``fwd_head.*``, ``rev_head.*``, ``family.*`` are taken from stage P-1 (training builds a
        copy on every stage, but only the last stage's copy is used and trained; the split
        writes them on the last stage only).

Native -> HF names (``hf_modeling.modeling_lomdm``):
    backbone.embedding.word_embeddings.weight        -> model.embed_tokens.weight  (trimmed)
    backbone.decoder.layers.i.input_layernorm.*      -> model.layers.i.input_layernorm.*
    backbone.decoder.layers.i.self_attention.linear_qkv.*
                                                     -> model.layers.i.attention.query_key_value.*
    backbone.decoder.layers.i.self_attention.linear_proj.*
                                                     -> model.layers.i.attention.dense.*
    backbone.decoder.layers.i.pre_mlp_layernorm.*    -> model.layers.i.post_attention_layernorm.*
    backbone.decoder.layers.i.mlp.linear_fc{1,2}.*   -> model.layers.i.mlp.fc{1,2}.*
    backbone.decoder.final_layernorm.*               -> model.final_layernorm.*
    backbone.output_layer.weight                     -> lm_head.weight  (trimmed)
    rev_head.* / fwd_head.*                          -> reverse_head.* / forward_head.*
    family.raw_exponent_V                            -> token_exponent_raw
    family.order_logits_L                            -> order_logits
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_lomdm.checkpoint.hf_code import NO_PROJECT_IMPORTS
from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.checkpoint.safe_load import check_checkpoint_folder, load_torch_file
from megatron_lomdm.utils.finite import check_finite
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)

StateDict = dict[str, torch.Tensor]

# megatron-core TransformerConfig defaults the backbone uses (verified by ``verify_export``).
LAYER_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
HEAD_MLP_RATIO = 4
HEAD_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by SchedulerHead

_LAYER = re.compile(r"^backbone\.decoder\.layers\.(\d+)\.(.+)$")
_TE_TO_LOCAL = (
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$"),
     r".input_layernorm.\1"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r".pre_mlp_layernorm.\1"),
)
_VOCAB_KEYS = ("backbone.embedding.word_embeddings.weight", "backbone.output_layer.weight")
_SPLIT_DIM = (
    (re.compile(r"^backbone\.embedding\.word_embeddings\.weight$"), 0),
    (re.compile(r"^backbone\.output_layer\.weight$"), 0),
    (re.compile(r"\.self_attention\.linear_qkv\.(weight|bias)$"), 0),
    (re.compile(r"\.mlp\.linear_fc1\.(weight|bias)$"), 0),
    (re.compile(r"\.self_attention\.linear_proj\.weight$"), 1),
    (re.compile(r"\.mlp\.linear_fc2\.weight$"), 1),
)
_NATIVE_TO_HF = (
    (r"backbone\.embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"backbone\.decoder\.layers\.(\d+)\.input_layernorm\.(weight|bias)",
     r"model.layers.\1.input_layernorm.\2"),
    (r"backbone\.decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)",
     r"model.layers.\1.attention.query_key_value.\2"),
    (r"backbone\.decoder\.layers\.(\d+)\.self_attention\.linear_proj\.(weight|bias)",
     r"model.layers.\1.attention.dense.\2"),
    (r"backbone\.decoder\.layers\.(\d+)\.pre_mlp_layernorm\.(weight|bias)",
     r"model.layers.\1.post_attention_layernorm.\2"),
    (r"backbone\.decoder\.layers\.(\d+)\.mlp\.linear_fc(1|2)\.(weight|bias)",
     r"model.layers.\1.mlp.fc\2.\3"),
    (r"backbone\.decoder\.final_layernorm\.(weight|bias)", r"model.final_layernorm.\1"),
    (r"backbone\.output_layer\.weight", "lm_head.weight"),
    (r"rev_head\.(.+)", r"reverse_head.\1"),
    (r"fwd_head\.(.+)", r"forward_head.\1"),
    (r"family\.raw_exponent_V", "token_exponent_raw"),
    (r"family\.order_logits_L", "order_logits"),
)
def _invert_rules() -> tuple[tuple[re.Pattern, str], ...]:
    """HF -> native rules: each native pattern's groups become the HF template's backrefs."""
    rules = []
    for native_pat, hf_tpl in _NATIVE_TO_HF:
        groups = re.findall(r"\([^)]*\)", native_pat)
        hf_pat, native_tpl = re.escape(hf_tpl), native_pat
        for i, grp in enumerate(groups, start=1):
            hf_pat = hf_pat.replace(re.escape(f"\\{i}"), grp, 1)
            native_tpl = native_tpl.replace(grp, f"\\{i}", 1)
        rules.append((re.compile(f"^{hf_pat}$"), native_tpl.replace("\\.", ".")))
    return tuple(rules)


_NATIVE_TO_HF_RULES = tuple((re.compile(f"^{p}$"), t) for p, t in _NATIVE_TO_HF)
_HF_TO_NATIVE_RULES = _invert_rules()


# ---------------------------------------------------------------------------------------------
# State-dict adapter
# ---------------------------------------------------------------------------------------------


def canonical_native_key(key: str) -> str | None:
    """The local-spec name of a native key (TE names mapped), or None for ``_extra_state``."""
    if key.endswith("._extra_state") or key.endswith(".inv_freq"):
        return None
    for pattern, repl in _TE_TO_LOCAL:
        key = pattern.sub(repl, key)
    return key


def split_dim(key: str) -> int | None:
    """The dim a canonical native key is split on across TP ranks, or None if replicated."""
    if not key.startswith("backbone."):
        return None
    for pattern, dim in _SPLIT_DIM:
        if pattern.search(key):
            return dim
    return None


def _canonical(sd: Mapping[str, Any]) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        name = canonical_native_key(key)
        if name is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        out[name] = value
    return out


def merge_tp(shards: Sequence[Mapping[str, Any]]) -> StateDict:
    """Merge the TP shards of one pipeline stage (rank order) into one state dict.

    Raises:
        ValueError: the shards hold different keys, or a replicated tensor differs across ranks.
    """
    canon = [_canonical(sd) for sd in shards]
    keys = list(canon[0])
    for rank, sd in enumerate(canon[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ValueError(f"TP rank {rank} holds other tensors than rank 0: {diff}")
    merged: StateDict = {}
    for key in keys:
        parts = [sd[key] for sd in canon]
        dim = split_dim(key)
        if dim is not None:
            merged[key] = torch.cat(parts, dim=dim)
            continue
        for rank, part in enumerate(parts[1:], start=1):
            if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                raise ValueError(f"replicated tensor {key!r} differs between TP ranks 0 and {rank}")
        merged[key] = parts[0]
    return merged


def _layer_indices(sd: Mapping[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for key in sd if (m := _LAYER.match(key))})


def merge_pp(stages: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Merge TP-merged pipeline stages (stage order) by the module's PP stage key scheme.

    Raises:
        ValueError: a stage's local layer numbers are not 0..n-1, or a backbone tensor outside
            the layers appears on several stages with different values.
    """
    merged: StateDict = {}
    offset = 0
    last = len(stages) - 1
    for p, sd in enumerate(stages):
        layers = _layer_indices(sd)
        if layers != list(range(len(layers))):
            raise ValueError(f"pipeline stage {p} holds local layers {layers}, "
                             f"not 0..{len(layers) - 1}")
        for key, value in sd.items():
            m = _LAYER.match(key)
            if m:
                merged[f"backbone.decoder.layers.{offset + int(m.group(1))}.{m.group(2)}"] = value
            elif key.startswith("backbone."):
                if key in merged and not torch.equal(merged[key], value):
                    raise ValueError(f"{key!r} appears on several pipeline stages with "
                                     "different values")
                merged[key] = value
            elif p == last or key not in merged:
                merged[key] = value  # heads / family: the last stage's copy wins
        offset += len(layers)
    return merged


def merge_native_shards(shards: Mapping[tuple[int, int], Mapping[str, Any]], *, tp: int,
                        pp: int) -> StateDict:
    """All ``(tp_rank, pp_rank) -> state dict`` shards -> one TP=1/PP=1 state dict.

    Vocabulary rows stay padded; names are canonical (local spec); ``_extra_state`` is dropped.
    """
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise ValueError(f"checkpoint shards missing for (tp_rank, pp_rank) {missing}")
    stages = [merge_tp([shards[(t, p)] for t in range(tp)]) for p in range(pp)]
    return merge_pp(stages)


def resize_vocab_rows(weight: torch.Tensor, vocab_size: int, rows: int) -> torch.Tensor:
    """Keep the first ``vocab_size`` rows and zero-pad (or trim padding) to ``rows`` rows."""
    if rows < vocab_size:
        raise ValueError(f"cannot fit a vocabulary of {vocab_size} into {rows} rows")
    weight = weight[:vocab_size]
    if rows == vocab_size:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - vocab_size, *weight.shape[1:])])


def split_native_state_dict(full: Mapping[str, torch.Tensor], *, tp: int, pp: int,
                            layers_per_stage: Sequence[int] | None = None
                            ) -> dict[tuple[int, int], StateDict]:
    """The inverse of ``merge_native_shards`` (the module's PP stage key scheme).

    Args:
        full: a TP=1/PP=1 native state dict (canonical names).
        tp: tensor-parallel size (split dims must divide).
        pp: pipeline stages.
        layers_per_stage: n_p per stage; default an even split.

    Returns:
        ``(tp_rank, pp_rank) -> state dict`` with local layer numbers per stage.
    """
    num_layers = len(_layer_indices(full))
    if layers_per_stage is None:
        if num_layers % pp:
            raise ValueError(f"{num_layers} layers do not split evenly over pp={pp}")
        layers_per_stage = [num_layers // pp] * pp
    if sum(layers_per_stage) != num_layers or len(layers_per_stage) != pp:
        raise ValueError(f"layers_per_stage={list(layers_per_stage)} does not cover "
                         f"{num_layers} layers")
    starts = [sum(layers_per_stage[:p]) for p in range(pp)]
    out: dict[tuple[int, int], StateDict] = {(t, p): {} for t in range(tp) for p in range(pp)}
    for key, value in full.items():
        m = _LAYER.match(key)
        if m:
            layer = int(m.group(1))
            p = max(q for q in range(pp) if starts[q] <= layer)
            local, stage = f"backbone.decoder.layers.{layer - starts[p]}.{m.group(2)}", p
        elif key.startswith("backbone.embedding."):
            local, stage = key, 0
        else:
            local, stage = key, pp - 1
        dim = split_dim(key)
        for t in range(tp):
            out[(t, stage)][local] = value if dim is None else value.chunk(tp, dim=dim)[t].clone()
    return out


def slice_for_rank(template: Mapping[str, Any], full: Mapping[str, torch.Tensor], *,
                   tp_rank: int, tp: int, layer_numbers: Sequence[int], vocab_size: int
                   ) -> dict[str, Any]:
    """Fill one rank's state dict (as ``model.state_dict()`` gives it) from a full native one.

    Args:
        template: this rank's state dict (names, shapes, dtypes; ``_extra_state`` kept as is).
        full: TP=1/PP=1 native state dict, canonical names, any vocabulary padding.
        tp_rank / tp: this rank's TP coordinates.
        layer_numbers: global 0-based layer index of each of this rank's local layers.
        vocab_size: the true vocabulary (rows beyond it are padding, zero-filled if needed).

    Returns:
        A state dict for ``load_state_dict(strict=True)``, in the template's dtypes.
    """
    out: dict[str, Any] = {}
    for key, current in template.items():
        name = canonical_native_key(key)
        if name is None:
            out[key] = current
            continue
        m = _LAYER.match(name)
        if m:
            name = f"backbone.decoder.layers.{layer_numbers[int(m.group(1))]}.{m.group(2)}"
        if name not in full:
            raise ValueError(f"the weights have no tensor for {key!r} (looked for {name!r})")
        value = full[name]
        dim = split_dim(name)
        if name in _VOCAB_KEYS:
            value = resize_vocab_rows(value, vocab_size, current.shape[0] * tp)
        if dim is not None:
            value = value.chunk(tp, dim=dim)[tp_rank]
        if value.shape != current.shape:
            raise ValueError(f"{key!r}: weights have shape {tuple(value.shape)} for this rank, "
                             f"the model {tuple(current.shape)}")
        out[key] = value.to(current.dtype).clone()
    return out


def _rename(key: str, rules: Sequence[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, tpl in rules:
        if pattern.match(key):
            return pattern.sub(tpl, key)
    raise ValueError(f"no {what} name for tensor {key!r}")


def native_to_hf(full: Mapping[str, torch.Tensor], *, vocab_size: int,
                 dtype: torch.dtype = torch.float32) -> StateDict:
    """TP=1/PP=1 native state dict -> ``LoMDMForMaskedDiffusion`` state dict (vocab trimmed)."""
    out: StateDict = {}
    for key, value in full.items():
        if key in _VOCAB_KEYS:
            value = value[:vocab_size]
        out[_rename(key, _NATIVE_TO_HF_RULES, "HF")] = value.to(dtype).contiguous()
    return out


def hf_to_native(hf_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """``LoMDMForMaskedDiffusion`` state dict -> TP=1/PP=1 native state dict (unpadded vocab)."""
    return {_rename(k, _HF_TO_NATIVE_RULES, "native"): v for k, v in hf_sd.items()}


# ---------------------------------------------------------------------------------------------
# Reading native checkpoints and configs
# ---------------------------------------------------------------------------------------------


@dataclass
class NativeCheckpoint:
    """A merged native checkpoint: the full state dict and where it came from."""

    state_dict: StateDict
    step: int
    folder: Path
    tp: int
    pp: int
    ema: bool


def checkpoint_folder(run_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """``run_dir/checkpoints/step_XXXXXXX`` of ``step`` or of the ``latest`` pointer."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        step = CheckpointManager.reader(root).latest_step()  # `latest`, or the newest complete checkpoint
        if step is None:
            raise ValueError(f"{root} has no complete checkpoint; train first or pass --checkpoint")
    folder = root / f"step_{step:07d}"
    if not (folder / "meta.pt").is_file():
        available = sorted(p.name for p in root.glob("step_*") if (p / "meta.pt").is_file())
        raise ValueError(f"{folder} is not a complete checkpoint; available: {available}")
    return folder, step


def _shard_weights(shard: Mapping[str, Any], *, path: Path) -> dict[str, Any]:
    """A rank file's EMA weights (``ema.shadow``, over the legacy ``model`` entry if present)."""
    if "ema" not in shard or "shadow" not in shard["ema"]:
        raise ValueError(f"{path} holds no EMA weights; export the live weights with --no-ema")
    weights = dict(shard.get("model", {}))
    weights.update(shard["ema"]["shadow"])
    return weights


def _read_rank_files(folder: Path, tp: int, pp: int) -> dict[tuple[int, int], dict[str, Any]]:
    shards = {}
    for t in range(tp):
        for p in range(pp):
            path = folder / f"rank_{t:03d}_{p:03d}.pt"
            if not path.is_file():
                raise ValueError(f"{path} is missing (checkpoint written with tp={tp}, pp={pp})")
            shards[(t, p)] = load_torch_file(path)
    return shards


def weights_from_dist(cfg: Any, folder: Path, *, ema: bool = False) -> StateDict:
    """The live (or EMA) weights of a checkpoint's ``dist/`` part (megatron ``dist_checkpointing``).

    The tensors are the rebuilt model's own (no copy: a second copy of a 1.5B model is 6 GB).
    """
    with native_session(cfg.train.seed):
        model = native_model_from_dist(cfg, folder, ema=ema)
        return {k: v.detach() for k, v in _canonical(model.state_dict()).items()}


def native_model_from_dist(cfg: Any, folder: Path, *, ema: bool = False) -> torch.nn.Module:
    """The native TP=1 model (fp32) with a checkpoint's ``dist/`` weights; call inside ``native_session``.

    The model is rebuilt at TP=1/PP=1 in a world-1 session and the (reshardable) sharded checkpoint
    is loaded into it, so any saved TP x PP layout and either backend works. The EMA (format 2) is
    sharded like the weights (``checkpoint/sharded.py``) and loads the same way.
    """
    from megatron.core import dist_checkpointing

    from megatron_lomdm.checkpoint.sharded import ema_sharded_state_dict, model_sharded_state_dict

    dist_dir = folder / "dist"
    if not (dist_dir / "metadata.json").is_file():
        raise ValueError(f"{dist_dir} is not a megatron dist_checkpointing folder; "
                         "export the EMA weights (without --no-ema)")
    model = build_native_tp1(cfg, None)
    sharded = model_sharded_state_dict(model)
    if ema:
        shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        sharded = ema_sharded_state_dict(sharded, model, shadow)
    check_checkpoint_folder(dist_dir)
    state = dist_checkpointing.load(sharded, str(dist_dir))
    if ema:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
    else:
        missing = [k for k in model.load_state_dict(state, strict=False).missing_keys
                   if canonical_native_key(k) is not None]
        if missing:
            raise ValueError(f"{dist_dir} lacks model tensors {missing[:5]}")
    return model


def load_native_checkpoint(run_dir: str | Path, step: int | None = None, *,
                           ema: bool = True) -> NativeCheckpoint:
    """Load a checkpoint's weights (``weights_only``) and merge them to TP=1/PP=1.

    Args:
        run_dir: the run directory.
        step: the checkpoint step; default the ``latest`` one.
        ema: the EMA weights (the default for export: every rank file's ``ema.shadow``, merged
            by the TP/PP rules) instead of the live ones (the rank files' legacy ``model`` entry,
            else the ``dist/`` part, resharded by megatron).
    """
    folder, step = checkpoint_folder(run_dir, step)
    meta = load_torch_file(folder / "meta.pt")
    tp, pp = int(meta["tp"]), int(meta["pp"])
    if meta.get("format", 1) >= 2:  # every tensor in dist/: one reader for any layout and backend
        from megatron_lomdm.config import load_config

        cfg = load_config(Path(run_dir) / "config.yaml")
        if ema and cfg.optim.ema_decay <= 0:
            log.warning("%s: the run kept no EMA (optim.ema_decay=0); exporting the live weights", folder)
            ema = False
        full = weights_from_dist(cfg, folder, ema=ema)
        check_finite(full.items(), source=f"checkpoint {folder}", kind="ema weight" if ema else "model weight")
        return NativeCheckpoint(state_dict=full, step=step, folder=folder, tp=tp, pp=pp, ema=ema)
    shards = _read_rank_files(folder, tp, pp)  # format 1: the EMA per TP x PP slice in the rank files
    no_ema = not any(shard.get("ema", {}).get("shadow") for shard in shards.values())
    if ema and no_ema and not all("model" in shard for shard in shards.values()):
        log.warning("%s: the run kept no EMA (optim.ema_decay=0); exporting the live weights", folder)
        ema = False
    if ema:
        weights = {k: _shard_weights(v, path=folder / f"rank_{k[0]:03d}_{k[1]:03d}.pt")
                   for k, v in shards.items()}
        full = merge_native_shards(weights, tp=tp, pp=pp)
    elif all("model" in shard for shard in shards.values()):
        full = merge_native_shards({k: v["model"] for k, v in shards.items()}, tp=tp, pp=pp)
    else:
        from megatron_lomdm.config import load_config

        full = weights_from_dist(load_config(Path(run_dir) / "config.yaml"), folder)
    check_finite(full.items(), source=f"checkpoint {folder}", kind="ema weight" if ema else "model weight")
    return NativeCheckpoint(state_dict=full, step=step, folder=folder, tp=tp, pp=pp, ema=ema)


def hf_config_from_native(cfg: Any, *, padded_vocab_size: int,
                          tokenizer: Mapping[str, Any] | None = None) -> Any:
    """The ``LoMDMConfig`` of a resolved native ``Config``."""
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMConfig
    from megatron_lomdm.config.load import config_to_dict

    m, d = cfg.model, cfg.diffusion
    tok = tokenizer or {}
    return LoMDMConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.ffn_size,
        max_position_embeddings=m.seq_length, layer_norm_eps=LAYER_NORM_EPS, rope_theta=ROPE_THETA,
        family=d.name, c1=d.c1, c2=d.c2, block_size=d.block_size, eps_t=d.eps_t,
        mask_id=m.mask_id, pad_token_id=m.pad_id if m.pad_id >= 0 else None,
        bos_token_id=tok.get("bos_id"), eos_token_id=tok.get("eos_id"),
        head_num_attention_heads=m.head_num_heads or m.num_heads, head_mlp_ratio=HEAD_MLP_RATIO,
        head_layer_norm_eps=HEAD_LAYER_NORM_EPS, padded_vocab_size=padded_vocab_size,
        head_center_logits=m.head_center_logits,
        native_config=config_to_dict(cfg),
    )


def native_config_dict_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A native config dict (before overrides) from an exported ``config.json``."""
    data = json.loads(json.dumps(hf_config.get("native_config") or {}))
    model = data.setdefault("model", {})
    model.update(num_layers=hf_config["num_hidden_layers"], hidden_size=hf_config["hidden_size"],
                 num_heads=hf_config["num_attention_heads"],
                 ffn_hidden_size=hf_config["intermediate_size"],
                 seq_length=hf_config["max_position_embeddings"],
                 vocab_size=hf_config["vocab_size"], mask_id=hf_config["mask_id"],
                 head_num_heads=hf_config.get("head_num_attention_heads") or 0,
                 head_center_logits=bool(hf_config.get("head_center_logits", False)))
    if hf_config.get("pad_token_id") is not None:
        model["pad_id"] = hf_config["pad_token_id"]
    data.setdefault("diffusion", {}).update(
        name=hf_config["family"], c1=hf_config["c1"], c2=hf_config["c2"],
        block_size=hf_config["block_size"], eps_t=hf_config.get("eps_t", 1e-3))
    data["parallel"] = {**data.get("parallel", {}), "tp": 1, "pp": 1}
    return data


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    output: Path
    step: int
    ema: bool
    source_layout: tuple[int, int]
    tokenizer_files: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] | None = None


def _register_auto_classes(hf_config: Any) -> None:
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMConfig, LoMDMForMaskedDiffusion

    LoMDMConfig.register_for_auto_class()
    LoMDMForMaskedDiffusion.register_for_auto_class("AutoModel")
    model_cls = "modeling_lomdm.LoMDMForMaskedDiffusion"
    hf_config.auto_map = {"AutoConfig": "configuration_lomdm.LoMDMConfig",
                          "AutoModel": model_cls, "AutoModelForMaskedLM": model_cls}


def save_hf_model(hf_sd: Mapping[str, torch.Tensor], hf_config: Any, folder: Path, *,
                  max_shard_size: str | None = None) -> None:
    """Write config.json (+ auto_map), model.safetensors and the modeling files to ``folder``, with
    the project's OeMDM modules the modeling files import (``hf_code.write_shipped_code``).
    ``max_shard_size`` (e.g. ``"1GB"``): safetensors shards of at most that size plus
    ``model.safetensors.index.json`` (default: transformers', 50GB); serialising holds one shard's
    bytes at a time, so smaller shards also lower the writer's peak memory."""
    from megatron_lomdm.checkpoint.hf_code import write_shipped_code
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMForMaskedDiffusion

    _register_auto_classes(hf_config)
    with torch.device("meta"):
        model = LoMDMForMaskedDiffusion(hf_config)
    expected, got = set(model.state_dict()), set(hf_sd)
    if expected != got:
        raise ValueError(f"weights do not match the HF model: missing "
                         f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}")
    model.load_state_dict(dict(hf_sd), strict=True, assign=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_shipped_code(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer_source_files(tok: Mapping[str, Any]) -> list[Path]:
    """The local files of the manifest's tokenizer (a tokenizer.json file or a folder)."""
    from megatron_lomdm.data.tokenize import _TOKENIZER_FILES  # the files the manifest hashes

    path = Path(str(tok.get("name_or_path", "")))
    if path.is_file():
        siblings = ("tokenizer_config.json", "special_tokens_map.json")
        return [path] + [path.parent / n for n in siblings if (path.parent / n).is_file()]
    if path.is_dir():
        return [path / n for n in _TOKENIZER_FILES if (path / n).is_file()]
    return []


def _save_hub_tokenizer(name: str, folder: Path) -> list[str]:
    """Save a hub tokenizer from the local HF cache (offline); [] if it is not cached."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("tokenizer %r not found locally (%s): the export has no tokenizer files",
                    name, err)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir())
        for n in names:
            shutil.copy2(Path(tmp) / n, folder / n)
    return names


def _write_default_tokenizer_config(folder: Path, tok: Mapping[str, Any]) -> None:
    """A tokenizer_config.json for a bare tokenizer.json, so AutoTokenizer can load it."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("bos", "eos", "pad", "mask"):
        token_id = tok.get(f"{role}_id")
        if token_id is not None and (text := t.id_to_token(int(token_id))) is not None:
            config[f"{role}_token"] = text
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(tok: Mapping[str, Any] | None, folder: Path) -> list[str]:
    """Copy the manifest's tokenizer files into ``folder``; returns the names written.

    Local files are checked against the manifest's sha256. A hub tokenizer is saved from the local
    HF cache if it is there; otherwise nothing is copied (a warning; the model card says so).

    Raises:
        ValueError: a file changed since the data was tokenized (its sha256 differs).
    """
    if not tok:
        log.warning("no data manifest: the export has no tokenizer files")
        return []
    sources = _tokenizer_source_files(tok)
    if not sources:
        return _save_hub_tokenizer(str(tok.get("name_or_path")), folder)
    recorded = tok.get("files_sha256") or {}
    for src in sources:
        if src.name in recorded and _sha256(src) != recorded[src.name]:
            raise ValueError(f"tokenizer file {src} changed since the data was tokenized "
                             "(its sha256 differs from the data manifest's)")
        shutil.copy2(src, folder / src.name)
    written = [src.name for src in sources]
    if "tokenizer.json" in written and "tokenizer_config.json" not in written:
        _write_default_tokenizer_config(folder, tok)
        written.append("tokenizer_config.json")
    return written


def eval_records(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Validation records (``kind == "valid"``, finite nelbo) of metrics.jsonl up to ``step``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        nelbo = rec.get("nelbo")
        if (rec.get("kind") == "valid" and isinstance(nelbo, (int, float))
                and math.isfinite(nelbo) and int(rec.get("step", 0)) <= step):
            records.append(rec)
    return records


def model_card(cfg: Any, *, step: int, ema: bool, layout: tuple[int, int], fingerprint: str | None,
               evals: Sequence[Mapping[str, Any]], tokenizer_files: Sequence[str],
               verified: Mapping[str, float] | None = None) -> str:
    """The README.md of the export."""
    m, d = cfg.model, cfg.diffusion
    rows = [("family", d.name), ("c1, c2", f"{d.c1}, {d.c2}"), ("block_size", d.block_size),
            ("layers", m.num_layers), ("hidden size", m.hidden_size), ("heads", m.num_heads),
            ("MLP width", m.ffn_size), ("sequence length", m.seq_length),
            ("vocabulary (incl. [MASK])", m.vocab_size), ("[MASK] id", m.mask_id),
            ("training steps (checkpoint)", step), ("weights", "EMA" if ema else "live"),
            ("trained with", f"tp={layout[0]}, pp={layout[1]}"),
            ("data manifest fingerprint", fingerprint or "unknown (data folder not found)")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if evals:
        ev = evals[-1]
        ppl = ev.get("ppl")
        if not isinstance(ppl, (int, float)):
            ppl = math.exp(min(ev["nelbo"], 700.0))
        eval_text = (f"Validation at step {ev['step']}: NELBO {ev['nelbo']:.4f} nats/token, "
                     f"perplexity <= {ppl:.2f} ({ev.get('num_tokens', '?')} tokens).")
    else:
        eval_text = "No validation records in metrics.jsonl."
    tok_text = ", ".join(tokenizer_files) if tokenizer_files else "not included"
    if verified is not None:
        worst = ", ".join(f"{k} {v:.2g}" for k, v in verified.items())
        eval_text += ("\n\nVerified against the native model (fp32, fresh process, "
                      f"`trust_remote_code`): max |difference| {worst}.")
    return f"""---
library_name: transformers
tags: [masked-diffusion, lomdm, oemdm, megatron_lomdm]
---
# {d.name} masked diffusion LM (megatron_lomdm export)

Exported by `tools/convert_to_hf.py` from `{cfg.run.dir}`.
The modeling code is included: load it with `trust_remote_code=True`.

```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # reads config.json
ids = model.generate(num_samples=4, steps=128, seed=0)   # OeMDM ancestral sampler
texts = tokenizer.batch_decode(ids)
prompt = [tokenizer.bos_token_id] + tokenizer.encode("A prompt", add_special_tokens=False)
ids = model.generate(input_ids=[prompt], num_samples=2, seed=0)   # the prompt is never changed
# in place (e.g. a puzzle's givens): model.generate(prompt_ids=ids_BL, given_mask=given_BL)
```

`model(input_ids, attention_mask)` returns the raw logits over the vocabulary (SUBS: give
[MASK] probability 0 when sampling), the final hidden states and, for lomdm/genmd4, the reverse
scheduler exponents e_R. `tools/convert_to_hf.py --from-hf PATH --to-run-dir DIR` turns the
export back into a native checkpoint that `python -m megatron_lomdm.train` fine-tunes.

| setting | value |
|---|---|
{table}

{eval_text}

Tokenizer files: {tok_text}.
"""


def _data_identity(cfg: Any) -> tuple[dict[str, Any] | None, str | None]:
    from megatron_lomdm.data.shards import read_manifest

    try:
        manifest = read_manifest(cfg.data.train)
    except ValueError as err:
        log.warning("data manifest unavailable (%s): no tokenizer files, fingerprint unknown", err)
        return None, None
    return manifest.tokenizer, manifest.fingerprint("train")


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp (and transformers' temp files) are private
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)
    if output.exists():
        if not overwrite:
            raise ValueError(f"{output} exists; pass --overwrite to replace it")
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)


def export_run(run_dir: str | Path, output: str | Path, *, step: int | None = None,
               ema: bool = True, verify: bool = False, overwrite: bool = False,
               rtol: float | None = None, atol: float | None = None,
               max_shard_size: str | None = None) -> ExportResult:
    """Export a run's checkpoint (any TP x PP) as a ``trust_remote_code`` HF folder.

    Args:
        run_dir: the run directory (config.yaml, checkpoints/, metrics.jsonl).
        output: the export folder; written as a temp sibling and renamed when complete.
        step: checkpoint step; default ``latest``.
        ema: export the EMA weights (default) or the live ones.
        verify: compare the reloaded export's fp32 logits with the native model before publishing.
        overwrite: replace an existing ``output``.
        rtol / atol: ``torch.testing.assert_close`` tolerances of ``verify`` (default: fp32's).
        max_shard_size: safetensors shard size (``save_hf_model``); default one file up to 50GB.

    Returns:
        The ``ExportResult``.

    Raises:
        ValueError: bad run directory, checkpoint or output; ``ExportVerificationError`` when the
            verification fails (nothing is published then).
    """
    from megatron_lomdm.config import load_config

    run_dir, output = Path(run_dir), Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    cfg = load_config(run_dir / "config.yaml")
    log.info("export 1/4: reading checkpoint %s of %s", "latest" if step is None else step, run_dir)
    ckpt = load_native_checkpoint(run_dir, step, ema=ema)
    tok, fingerprint = _data_identity(cfg)
    padded = ckpt.state_dict["backbone.embedding.word_embeddings.weight"].shape[0]
    hf_config = hf_config_from_native(cfg, padded_vocab_size=padded, tokenizer=tok)
    hf_sd = native_to_hf(ckpt.state_dict, vocab_size=cfg.model.vocab_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        log.info("export 2/4: writing the HF folder (safetensors, config, modeling code, tokenizer)")
        save_hf_model(hf_sd, hf_config, tmp, max_shard_size=max_shard_size)
        tok_files = copy_tokenizer(tok, tmp)
        result = ExportResult(output=output, step=ckpt.step, ema=ckpt.ema,
                              source_layout=(ckpt.tp, ckpt.pp), tokenizer_files=tok_files)
        if verify:
            log.info("export 3/4: verifying the reloaded export against the native model (fresh process)")
            result.max_abs_diff = verify_export(tmp, cfg, ckpt.state_dict, rtol=rtol, atol=atol)
        card = model_card(cfg, step=ckpt.step, ema=ckpt.ema, layout=(ckpt.tp, ckpt.pp),
                          fingerprint=fingerprint, evals=eval_records(run_dir, ckpt.step),
                          tokenizer_files=tok_files, verified=result.max_abs_diff)
        (tmp / "README.md").write_text(card)
        log.info("export 4/4: model card, publishing %s", output)
        _publish(tmp, output, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported step %d of %s (tp=%d, pp=%d, %s weights) to %s", ckpt.step, run_dir,
             ckpt.tp, ckpt.pp, "EMA" if ckpt.ema else "live", output)
    if cfg.tracking.enabled:  # the export next to the run's metrics and evaluation artifacts
        from megatron_lomdm.tracking.mlflow_tracker import log_to_tracked_run

        where = f"hf_export/step_{ckpt.step:07d}"
        if log_to_tracked_run(run_dir, output, where, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                              tags={"hf_export": where, "hf_export_verified": str(result.max_abs_diff is not None)}):
            log.info("logged the export to the run's MLflow run under %s", where)
    return result


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


class ExportVerificationError(AssertionError):
    """The reloaded export does not reproduce the native model."""


_FRESH_PROCESS_SCRIPT = NO_PROJECT_IMPORTS + r"""
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

export, inputs, outputs = sys.argv[1:4]
model = AutoModel.from_pretrained(export, trust_remote_code=True, local_files_only=True,
                                  dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = load_file(inputs)
with torch.no_grad():
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
result = {"logits": out.logits, "last_hidden_state": out.last_hidden_state}
if out.reverse_exponents is not None:
    result["reverse_exponents"] = out.reverse_exponents
save_file({k: v.float().contiguous() for k, v in result.items()}, outputs)
"""


def fresh_process_env(hf_home: Path) -> dict[str, str]:
    """Environment of a fresh, offline python process with its own HF cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home),
               HF_MODULES_CACHE=str(hf_home / "modules"), TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
        env.pop(key, None)
    return env


def run_fresh_process(export_dir: Path, batch: Mapping[str, torch.Tensor],
                      timeout: float = 600) -> StateDict:
    """Forward ``batch`` through the export loaded with ``trust_remote_code`` in a new process."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="lomdm_verify_") as tmp_str:
        tmp = Path(tmp_str)
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp / "inputs.safetensors"))
        cmd = [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(Path(export_dir).resolve()),
               str(tmp / "inputs.safetensors"), str(tmp / "outputs.safetensors")]
        proc = subprocess.run(cmd, cwd=tmp, env=fresh_process_env(tmp / "hf_home"),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise ExportVerificationError(
                f"loading the export in a fresh process failed:\n{proc.stderr[-4000:]}")
        return load_file(str(tmp / "outputs.safetensors"))


def verification_batch(*, vocab_size: int, mask_id: int, pad_id: int, seq_length: int,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """3 sequences: random tokens, about half [MASK]; the last one right-padded by L/4."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, seq_length), generator=gen)
    ids = torch.where(torch.rand(3, seq_length, generator=gen) < 0.5, mask_id, ids)
    attention = torch.ones(3, seq_length, dtype=torch.long)
    pad = max(1, seq_length // 4)
    attention[2, -pad:] = 0
    ids[2, -pad:] = max(pad_id, 0)
    return {"input_ids": ids, "attention_mask": attention}


@contextlib.contextmanager
def native_session(seed: int) -> Iterator[Any]:
    """A world-1 megatron session (CPU shims on CPU); reuses an existing one."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_lomdm.distributed.init import destroy_distributed, init_distributed

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError("verify the export from a single process, not under torchrun")
        yield None
        return
    holder: dict[str, Any] = {}

    def install() -> None:
        from megatron_lomdm.distributed.cpu_compat import install_cpu_shims

        holder["shims"] = install_cpu_shims()

    hook = None if torch.cuda.is_available() else install
    try:
        yield init_distributed(tp=1, pp=1, seed=seed, before_rng_seed=hook)
    finally:
        destroy_distributed()
        if "shims" in holder:
            holder["shims"].uninstall()


def build_native_tp1(cfg: Any, full: Mapping[str, torch.Tensor] | None) -> Any:
    """The native ``DiffusionLM`` at TP=1/PP=1 in fp32 holding ``full`` (needs a session).

    With ``full=None`` the model keeps its fresh initialisation (to be loaded by the caller).
    """
    from megatron_lomdm.config.load import replace
    from megatron_lomdm.distributed.init import parallel_info
    from megatron_lomdm.training.build import build_model

    cfg1 = replace(cfg, parallel={"tp": 1, "pp": 1, "zero": 0, "backend": "megatron", "virtual_stages": 1,
                                  "sequence_parallel": False, "cpu_offload": False, "nvme_offload_dir": ""},
                   train={"precision": "fp32"}, model={"recompute": "none"})
    model = build_model(cfg1, parallel_info())
    if full is None:
        return model.eval()
    layers = list(range(cfg.model.num_layers))
    model.load_state_dict(slice_for_rank(model.state_dict(), full, tp_rank=0, tp=1,
                                         layer_numbers=layers, vocab_size=cfg.model.vocab_size))
    return model.eval()


@torch.no_grad()
def native_outputs(model: Any, batch: Mapping[str, torch.Tensor]) -> StateDict:
    """The native model's logits (true vocab), features and reverse exponents (lomdm, genmd4,
    multivariate) on CPU."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    valid = batch["attention_mask"].to(device).bool()
    logits, hidden = model.backbone(ids, valid)
    out = {"logits": logits[..., : model.backbone.true_vocab_size].float(),
           "last_hidden_state": hidden.float()}
    if model.rev_head is not None:
        rev_logits = model.rev_head(hidden, valid)
        out["reverse_exponents"] = model.family.exponents(rev_logits, valid)
    elif model.family.needs_expected_rate:  # GenMD4: e_R = E_{x_theta}[w]
        from megatron_lomdm.models.vocab_parallel import expected_token_rate_vocab_parallel

        out["reverse_exponents"] = expected_token_rate_vocab_parallel(
            logits, model.family.token_exponents(), model.backbone.mask_id)
    elif model.family.denoiser_exponents:  # context-free per-position exponents (multivariate): e_R = e_F = w
        out["reverse_exponents"] = model.family.exponents(valid)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def verify_export(export_dir: str | Path, cfg: Any, full: Mapping[str, torch.Tensor], *,
                  rtol: float | None = None, atol: float | None = None) -> dict[str, float]:
    """Compare the export (fresh process, ``trust_remote_code``) with the native model at TP=1.

    Args:
        export_dir: the HF folder.
        cfg: the run's resolved config.
        full: the merged native state dict that was exported.
        rtol / atol: ``assert_close`` tolerances (both or neither; default fp32's).

    Returns:
        max |HF - native| per compared output (logits, last_hidden_state, reverse_exponents).

    Raises:
        ExportVerificationError: an output differs beyond the tolerance, or loading failed.
    """
    m = cfg.model
    batch = verification_batch(vocab_size=m.vocab_size, mask_id=m.mask_id, pad_id=m.pad_id,
                               seq_length=m.seq_length, seed=cfg.train.seed)
    hf_out = run_fresh_process(Path(export_dir), batch)
    with native_session(cfg.train.seed):
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        ref = native_outputs(build_native_tp1(cfg, full), batch)
    diffs = {}
    for name, expected in ref.items():
        if name not in hf_out:
            raise ExportVerificationError(f"the export returned no {name}")
        diffs[name] = float((hf_out[name] - expected).abs().max())
        try:
            torch.testing.assert_close(hf_out[name], expected, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise ExportVerificationError(
                f"export {name} differs from the native model: {err}") from err
    log.info("verified export: max |HF - native| %s", {k: f"{v:.3g}" for k, v in diffs.items()})
    return diffs


# ---------------------------------------------------------------------------------------------
# Import (HF -> native run directory)
# ---------------------------------------------------------------------------------------------


def load_hf_state_dict(hf_dir: str | Path) -> StateDict:
    """The tensors of an export (``model.safetensors`` or an indexed set of shards)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise ValueError(f"{hf_dir} has no model.safetensors (or its index)")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: StateDict = {}
    for name in files:
        out.update(load_file(str(hf_dir / name)))
    return out


def import_hf(hf_dir: str | Path, run_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Turn an export into a run directory whose step-0 checkpoint the trainer resumes from.

    Works in one process (TP=1, PP=1) or under torchrun with ``parallel.tp=N`` / ``parallel.pp=M``
    overrides: every rank builds the run as the trainer does and loads its slice. The live
    weights and the EMA are both the export's weights; the optimizer and the data position start
    fresh. ``data.train`` (from the export's stored config, or an override) must name shards
    tokenized with the export's tokenizer.

    Args:
        hf_dir: the HF folder written by ``export_run``.
        run_dir: the new run directory (must hold no checkpoint yet).
        overrides: dotted ``key=value`` config overrides (e.g. ``data.train=...``,
            ``train.steps=...``, ``train.lr=...``).

    Returns:
        The checkpoint folder written.
    """
    from megatron_lomdm.config.load import config_from_dict, merge_dicts, parse_dotlist, replace, save_config
    from megatron_lomdm.data.shards import read_manifest
    from megatron_lomdm.training.build import build_run

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if hf_config.get("model_type") != "lomdm":
        raise ValueError(f"{hf_dir} is not a lomdm export "
                         f"(model_type={hf_config.get('model_type')!r})")
    if (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"{run_dir} already holds a checkpoint; import into a new run directory")
    data = native_config_dict_from_hf(hf_config)
    data = merge_dicts(data, {"run": {"dir": str(run_dir)}})
    cfg = config_from_dict(merge_dicts(data, parse_dotlist(list(overrides))))
    if not cfg.data.train:
        raise ValueError("pass data.train=DIR: shards tokenized with the export's tokenizer")
    try:
        read_manifest(cfg.data.train)
    except ValueError as err:
        raise ValueError(f"data.train={cfg.data.train}: {err}") from err
    hf_sd = load_hf_state_dict(hf_dir)
    check_finite(hf_sd.items(), source=f"HF folder {hf_dir}", kind="weight")
    full = hf_to_native(hf_sd)
    run = build_run(replace(cfg, tracking={"enabled": False}))
    try:
        _load_into_run(run, full, cfg.model.vocab_size)
        _prime_optimizer_state(run.engine)
        run.save_checkpoint()
        if run.info.rank == 0:
            save_config(cfg, run_dir / "config.yaml")
    finally:
        run.close()
    folder = run.ckpt.root / f"step_{run.state.step:07d}"
    log.info("imported %s into %s (tp=%d, pp=%d)", hf_dir, folder, run.info.tp, run.info.pp)
    return folder


def _load_into_run(run: Any, full: Mapping[str, torch.Tensor], vocab_size: int) -> None:
    model = run.model
    layers = [layer.layer_number - 1 for layer in model.backbone.decoder.layers]
    sd = slice_for_rank(model.state_dict(), full, tp_rank=run.info.tp_rank, tp=run.info.tp,
                        layer_numbers=layers, vocab_size=vocab_size)
    model.load_state_dict(sd, strict=True)
    optimizer = getattr(run.engine, "optimizer", None)
    if not hasattr(optimizer, "reload_model_params"):
        raise ValueError(f"cannot refresh the optimizer of parallel.backend="
                         f"{run.cfg.parallel.backend} after loading the weights; import with "
                         "parallel.backend=megatron")
    optimizer.reload_model_params()  # fp32 main params (bf16, distributed optimizer) follow
    exact = slice_for_rank(dict(model.named_parameters()), _as_fp32(full), tp_rank=run.info.tp_rank,
                           tp=run.info.tp, layer_numbers=layers, vocab_size=vocab_size)
    with torch.no_grad():
        for name, value in exact.items():  # the EMA keeps the export's fp32 values exactly
            if name in run.ema.shadow:
                run.ema.shadow[name].copy_(value.float())


def _prime_optimizer_state(engine: Any) -> None:
    """Create the optimizer's (zero) Adam moments without changing any weight.

    A checkpoint saved before any step has no Adam moments, and the sharded optimizer load of a
    resume expects them. One step with zero gradients at LR 0 creates them: the moments stay 0
    and AdamW leaves the weights bit-identical. The step counter stays at 1 (megatron does not
    save a zero step), so the first fine-tuning update is bias-corrected as Adam's second step
    (about 0.74x the size of a fresh first step; the LR warmup makes this immaterial).
    """
    engine.zero_grad()
    engine.set_lr(0.0)
    applied, _ = engine.step()
    assert applied, "a zero-gradient step was not applied"
    engine.zero_grad()


def _as_fp32(full: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.float() for k, v in full.items()}
