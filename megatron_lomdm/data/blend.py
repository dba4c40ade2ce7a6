"""The trainer's data entry points: the loaders of a ``DataConfig`` (one source or a blend).

``build_train_loader`` gives a ``loader.ShardLoader`` for a single ``data.train`` source and a
``loader.BlendLoader`` for a list of ``{source: SPEC, weight: W[, name: NAME]}`` (how a blend is
composed, resumed and reported: ``loader``'s docstring). Blend entries and their manifests are
resolved in ``sources`` (``parse_blend``, ``blend_manifest``, ``data_manifest``), re-exported here
for the callers that import them from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_lomdm.data.loader import BlendLoader, ShardLoader
from megatron_lomdm.data.sources import (
    BlendEntry,
    SourceOptions,
    blend_manifest,
    check_same_tokenizer,
    data_manifest,
    is_source_spec,
    manifest_of,
    open_source,
    parse_blend,
    parse_spec,
)

__all__ = [
    "BlendEntry",
    "BlendLoader",
    "blend_manifest",
    "build_train_loader",
    "check_same_tokenizer",
    "data_manifest",
    "parse_blend",
    "source_options",
    "valid_source",
]


def source_options(data: Any, run_dir: str | Path | None = None) -> SourceOptions:
    """``SourceOptions`` from a ``DataConfig``; the cache defaults to ``RUN_DIR/data_cache``."""
    cache = data.cache_dir or (Path(run_dir) / "data_cache" if run_dir is not None else None)
    return SourceOptions(
        cache_dir=cache,
        retries=data.retries,
        retry_wait_s=data.retry_wait_s,
        timeout_s=data.timeout_s,
        skip_bad_shards=data.skip_bad_shards,
        cache_max_gb=data.cache_max_gb,
        prefetch_shards=data.prefetch_shards,
    )


def build_train_loader(
    data: Any,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    run_dir: str | Path | None = None,
) -> ShardLoader | BlendLoader:
    """The training loader of a ``DataConfig``: ``ShardLoader``, or ``BlendLoader`` for a list."""
    options = source_options(data, run_dir)
    common = dict(
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        shuffle=data.shuffle,
        source_options=options,
    )
    if isinstance(data.train, (list, tuple)):
        return BlendLoader(parse_blend(data.train), **common)
    return ShardLoader(data.train, split=None, **common)


def valid_source(data: Any, run_dir: str | Path | None = None) -> tuple[str | Path, str]:
    """``(spec, split)`` of the validation data of a ``DataConfig``.

    ``data.valid`` when set (a pattern's own split, else its ``valid`` split if it has one, else
    ``train``); otherwise ``data.train``'s ``valid`` split (of the first source of a blend), or its
    ``train`` split when it has none. A plain local folder comes back as a ``Path``.
    """
    options = source_options(data, run_dir)
    if data.valid:
        spec: str = data.valid
    elif isinstance(data.train, (list, tuple)):
        spec = parse_blend(data.train)[0].source
    else:
        spec = data.train
    parsed = parse_spec(spec)
    if parsed.names is not None and data.valid:
        split = open_source(parsed, None, options).split
    else:
        split = "valid" if "valid" in manifest_of(parsed, options)["splits"] else "train"
    return (spec if is_source_spec(str(spec)) else Path(spec)), split
