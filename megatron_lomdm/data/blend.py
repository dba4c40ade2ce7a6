"""Weighted blends of several shard sources, and the training-data entry points of ``build``.

``data.train`` may be a list of ``{source: SPEC, weight: W[, name: NAME]}`` (any spec of
``data.sources``). All sources must share one tokenizer and sequence length (checked from their
manifests; the error names both sources and both values).

Composition. Weights are shares of *sequences* (rows): global batch ``g`` has ``G`` rows, and row
``j`` of the whole blend stream (``g * G + j``) comes from the source picked by a smooth weighted
round robin over integer weights: every pick adds each source's weight to its credit and gives
the row to the source with the most credit (the lowest index on ties), which then pays the total.
The picks are interleaved and never more than about one row away from ``weight x rows`` for any
source, so the realised shares converge to the weights at rate ``1 / rows``, and each DP slice of
a batch holds a near-proportional mix. Each source has its own sample stream: its own seeded
per-epoch order (``ShardLoader.epoch_order``, window-shuffled, seeded by ``(seed, source
index)``), consumed in order; a small source with a large weight simply runs through more epochs.

The plan of a global batch depends only on ``(seed, weights, the sources, g)``, never on the
parallel layout; each DP rank reads only its contiguous slice. The state (per-source credits and
consumed rows at the current global batch) is a few integers, saved in every checkpoint, so a
resume continues the blend exactly, also under another DP size when saved at a step boundary.

Reporting (``stats()``): ``data/sample_share/NAME`` (exact, from the plan) and
``data/token_share/NAME``: the realised share of real (non-pad) tokens, summed over the
data-parallel group when one is given, cumulative since the start of training (up to the last
report before a resume). For packed sources the two agree; for padded sources they differ by the
sources' mean document lengths.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lomdm.data.loader import ShardLoader, check_resume_settings, reduce_counters
from megatron_lomdm.data.shards import Manifest, read_manifest
from megatron_lomdm.data.sources import (
    SourceOptions,
    is_source_spec,
    manifest_of,
    open_source,
    parse_spec,
)
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

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

_STATE_VERSION = 1
_WEIGHT_SCALE = 1 << 20  # weights become integers (sum ~ 2^20): exact, platform-independent picks
_ENTRY_KEYS = frozenset({"source", "weight", "name"})
_TOKENIZER_KEYS = (
    "tokenizer_json_sha256",
    "vocab_size",
    "model_vocab_size",
    "mask_id",
    "pad_id",
    "eos_id",
    "bos_id",
)


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlendEntry:
    """One source of a blend: its spec, its weight (> 0) and its name in the metrics."""

    source: str
    weight: float
    name: str


def _default_name(spec: str) -> str:
    parsed_text = str(spec).rstrip("/")
    parts = [p for p in re.split(r"[/\s]+", parsed_text) if p]
    for part in reversed(parts):
        if part.endswith((".json", ".tar", "-")) or "{" in part or part in ("-", "cat"):
            continue
        clean = re.sub(r"[^A-Za-z0-9_.-]", "_", part)
        if clean:
            return clean
    return "source"


def parse_blend(value: Sequence[Any]) -> list[BlendEntry]:
    """Validate a ``data.train`` list and name its sources (``name``, else from the spec).

    Raises:
        ValueError: not a non-empty list of ``{source, weight[, name]}`` mappings with a non-empty
            source string and a weight > 0, or two sources with one name.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("data.train: a blend is a non-empty list of {source, weight} mappings")
    entries: list[BlendEntry] = []
    for i, item in enumerate(value):
        where = f"data.train[{i}]"
        if isinstance(item, BlendEntry):
            entries.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a mapping {{source, weight}}, got {item!r}")
        unknown = set(item) - _ENTRY_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
            )
        source, weight = item.get("source"), item.get("weight", None)
        if not isinstance(source, (str, Path)) or not str(source).strip():
            raise ValueError(f"{where}.source: expected a non-empty string, got {source!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight: expected a number > 0, got {weight!r}")
        name = item.get("name") or _default_name(str(source))
        if not isinstance(name, str):
            raise ValueError(f"{where}.name: expected a string, got {name!r}")
        entries.append(BlendEntry(str(source), float(weight), name))
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f"data.train: two sources are named {name!r}; give them distinct `name:` keys"
            )
    return entries


def check_same_tokenizer(named: Sequence[tuple[str, Manifest]]) -> None:
    """All manifests must have one tokenizer (identity and special ids) and one sequence length.

    Raises:
        ValueError: naming both sources, the field and both values.
    """
    (first_name, first), *rest = named
    for name, manifest in rest:
        for key in _TOKENIZER_KEYS:
            a, b = first.tokenizer.get(key), manifest.tokenizer.get(key)
            if a != b:
                raise ValueError(
                    f"data.train blend: sources must share one tokenizer, but tokenizer {key} is "
                    f"{a!r} in {first_name!r} ({first.location}) and {b!r} in {name!r} "
                    f"({manifest.location})"
                )
        if first.seq_length != manifest.seq_length:
            raise ValueError(
                f"data.train blend: seq_length is {first.seq_length} in {first_name!r} "
                f"({first.location}) but {manifest.seq_length} in {name!r} ({manifest.location})"
            )


def blend_manifest(value: Sequence[Any], options: SourceOptions | None = None) -> Manifest:
    """The first source's manifest, after checking that every source has the same tokenizer."""
    entries = parse_blend(value)
    named = [(e.name, _source_manifest(e.source, options)) for e in entries]
    check_same_tokenizer(named)
    return named[0][1]


def _source_manifest(spec: str, options: SourceOptions | None) -> Manifest:
    return open_source(spec, None, options).manifest


def data_manifest(train: str | Sequence[Any], options: SourceOptions | None = None) -> Manifest:
    """The manifest that defines the model's data fields for a ``data.train`` value."""
    if isinstance(train, (list, tuple)):
        return blend_manifest(train, options)
    if not str(train).strip():
        raise ValueError("data.train is empty: name a shard folder, a source URL or a blend")
    return read_manifest(train) if options is None else open_source(train, None, options).manifest


# --------------------------------------------------------------------------------------------
# The blend loader
# --------------------------------------------------------------------------------------------


def _source_seed(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) % 2**63, index]).generate_state(1, np.uint64)[0] % 2**63
    )


def _integer_weights(weights: Sequence[float]) -> list[int]:
    total = float(sum(weights))
    return [max(1, round(w / total * _WEIGHT_SCALE)) for w in weights]


class BlendLoader:
    """Micro-batches of one DP rank over a weighted blend of sources (infinite).

    Same interface as ``ShardLoader`` for the trainer (iteration, ``next_global_batch``,
    ``num_micro_batches``, ``state_dict``/``load_state_dict``, ``stats``, ``close``); each
    micro-batch additionally carries ``source`` (B,) int64: the index of each row's source.

    Args:
        entries: the sources (``BlendEntry`` or ``{source, weight[, name]}`` mappings).
        micro_batch_size, global_batch_size, dp_rank, dp_size, seed: as for ``ShardLoader``.
        split: the split of every source (``None``: a pattern's own split, else ``train``).
        shuffle, shuffle_window_shards: each source's order, as for ``ShardLoader``.
        source_options: fetching / caching / retries / skipping (``data.sources``).

    Raises:
        ValueError: bad entries, sources with different tokenizers or lengths, bad batch sizes.
    """

    def __init__(
        self,
        entries: Sequence[BlendEntry | Mapping[str, Any]],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        split: str | None = None,
        shuffle: bool = True,
        shuffle_window_shards: int = 8,
        source_options: SourceOptions | None = None,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of dp_size={dp_size} x "
                f"micro_batch_size={micro_batch_size}"
            )
        self.entries = parse_blend(list(entries))
        self.names = [e.name for e in self.entries]
        self.weights = [e.weight for e in self.entries]
        self._int_weights = _integer_weights(self.weights)
        self._total_weight = sum(self._int_weights)
        self.seed, self.shuffle, self.shuffle_window_shards = (
            int(seed),
            bool(shuffle),
            shuffle_window_shards,
        )
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows_per_rank = global_batch_size // dp_size
        self.num_micro_batches = self.rows_per_rank // micro_batch_size
        self.sources = [
            ShardLoader(
                e.source,
                micro_batch_size=1,
                global_batch_size=1,
                dp_rank=0,
                dp_size=1,
                seed=_source_seed(seed, k),
                split=split,
                shuffle=shuffle,
                shuffle_window_shards=shuffle_window_shards,
                source_options=source_options,
            )
            for k, e in enumerate(self.entries)
        ]
        check_same_tokenizer(
            [(e.name, s.manifest) for e, s in zip(self.entries, self.sources, strict=True)]
        )
        self.manifest = self.sources[0].manifest
        self.seq_length = self.manifest.seq_length
        self.pad_id = int(self.manifest.tokenizer["pad_id"])
        self.fingerprints = [s.fingerprint for s in self.sources]
        K = len(self.sources)
        self._global_batch = 0
        self._micro_batch = 0
        self._credit = [0] * K  # at the start of the current global batch
        self._consumed = [0] * K
        self._plan_cache: tuple[int, np.ndarray, np.ndarray, list[int], list[int]] | None = None
        self._tokens_local = np.zeros(K, dtype=np.float64)
        self._rows_local = np.zeros(K, dtype=np.float64)
        self._tokens_base = np.zeros(K, dtype=np.float64)
        self._rows_base = np.zeros(K, dtype=np.float64)
        self._tokens_reported = np.zeros(K, dtype=np.float64)
        self._prefetched: list[tuple[int, int]] = [(-1, -1)] * K
        logger.info(
            "data blend: %s",
            ", ".join(
                f"{e.name}={e.weight:g} ({s.num_samples} samples)"
                for e, s in zip(self.entries, self.sources, strict=True)
            ),
        )

    # ---- the plan ----------------------------------------------------------------------------

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Source and position in its stream of every row of the current global batch."""
        g = self._global_batch
        if self._plan_cache is not None and self._plan_cache[0] == g:
            return self._plan_cache[1], self._plan_cache[2]
        G, W, total = self.global_batch_size, self._int_weights, self._total_weight
        credit, consumed = list(self._credit), list(self._consumed)
        src = np.empty(G, dtype=np.int64)
        pos = np.empty(G, dtype=np.int64)
        K = len(W)
        for j in range(G):
            best = 0
            for k in range(K):
                credit[k] += W[k]
                if credit[k] > credit[best]:
                    best = k
            credit[best] -= total
            src[j], pos[j] = best, consumed[best]
            consumed[best] += 1
        self._plan_cache = (g, src, pos, credit, consumed)
        return src, pos

    def global_batch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """``(source, position in that source's stream)`` of each row of the next global batch."""
        src, pos = self._plan()
        return src.copy(), pos.copy()

    def _rows_of(self, k: int, positions: np.ndarray) -> np.ndarray:
        """Sample indices (into source ``k``'s split) of stream positions."""
        source = self.sources[k]
        n = source.num_samples
        epochs, within = np.divmod(positions, n)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = source.epoch_order(epoch)[within[sel]]
        return out

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> BlendLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        g, m = self._global_batch, self._micro_batch
        src, pos = self._plan()
        if m == 0:
            self._prefetch(src, pos)
        B, L = self.micro_batch_size, self.seq_length
        first = self.dp_rank * self.rows_per_rank + m * B
        positions = np.arange(first, first + B, dtype=np.int64)
        tokens = np.full((B, L), self.pad_id, dtype=np.int64)
        lengths = np.zeros(B, dtype=np.int64)
        row_src = src[positions]
        for k in np.unique(row_src).tolist():
            sel = np.flatnonzero(row_src == k)
            got, got_lengths = self.sources[k].read_samples(self._rows_of(k, pos[positions[sel]]))
            tokens[sel], lengths[sel] = got, got_lengths
            self._tokens_local[k] += float(got_lengths.sum())
            self._rows_local[k] += len(sel)
        valid = np.arange(L)[None, :] < lengths[:, None]
        self._micro_batch = m + 1
        if self._micro_batch == self.num_micro_batches:
            _, _, _, credit, consumed = self._plan_cache  # type: ignore[misc]
            self._credit, self._consumed = list(credit), list(consumed)
            self._global_batch, self._micro_batch = g + 1, 0
        return {
            "tokens": torch.from_numpy(tokens),
            "valid": torch.from_numpy(valid),
            "sample_index": torch.from_numpy(positions),
            "source": torch.from_numpy(row_src.copy()),
            "global_batch": g,
            "epoch": self.source_epochs[0],
            "micro_batch": m,
            "num_micro_batches": self.num_micro_batches,
        }

    def next_global_batch(self) -> list[dict[str, Any]]:
        """This rank's micro-batches of the next global batch (see ``ShardLoader``)."""
        if self._micro_batch:
            raise ValueError(f"the loader is at micro-batch {self._micro_batch} of a global batch")
        return [next(self) for _ in range(self.num_micro_batches)]

    def _prefetch(self, src: np.ndarray, pos: np.ndarray) -> None:
        """Per remote source: the next shards of its stream from this batch on."""
        for k, source in enumerate(self.sources):
            ahead = source.source_options.prefetch_shards
            if not source.source.remote or not ahead or not (src == k).any():
                continue
            start = int(pos[src == k].min())
            epoch, within = divmod(start, source.num_samples)
            if self._prefetched[k] == (epoch, within // max(1, self.global_batch_size)):
                continue
            self._prefetched[k] = (epoch, within // max(1, self.global_batch_size))
            order = source.epoch_order(epoch)[within : within + 64 * self.global_batch_size]
            shard_of = np.searchsorted(source._shard_start, order, side="right") - 1
            shards, first = np.unique(shard_of, return_index=True)
            upcoming = shards[np.argsort(first, kind="stable")][:ahead]
            source._store.prefetch(upcoming.tolist())

    @property
    def consumed_global_batches(self) -> int:
        """Global batches fully yielded so far."""
        return self._global_batch

    @property
    def consumed_samples(self) -> int:
        """Rows of all DP ranks consumed by completed global batches."""
        return self._global_batch * self.global_batch_size

    @property
    def consumed_per_source(self) -> list[int]:
        """Rows taken from each source by completed global batches (all DP ranks)."""
        return list(self._consumed)

    @property
    def source_epochs(self) -> list[int]:
        """The epoch each source's stream is in."""
        return [c // s.num_samples for c, s in zip(self._consumed, self.sources, strict=True)]

    @property
    def epoch(self) -> int:
        """The first source's epoch."""
        return self.source_epochs[0]

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The blend position and what it is relative to (plain Python values)."""
        return {
            "version": _STATE_VERSION,
            "kind": "blend",
            "sources": [
                {"name": e.name, "weight": e.weight, "fingerprint": fp, "split": s.split}
                for e, fp, s in zip(self.entries, self.fingerprints, self.sources, strict=True)
            ],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window_shards": self.shuffle_window_shards,
            "global_batch_size": self.global_batch_size,
            "consumed_global_batches": self._global_batch,
            "micro_batch": self._micro_batch,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "credit": list(self._credit),
            "consumed": list(self._consumed),
            "token_totals": self._tokens_reported.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        Raises:
            ValueError: a single-source state, other sources / weights / data (fingerprints),
                another seed, shuffle or global batch size, or a mid-step state under another
                micro-batch size or DP size.
        """
        if state.get("kind") != "blend":
            raise ValueError(
                "loader state was saved by a single-source loader but data.train is now a blend; "
                "start a new run (or point data.train back at the single source)"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"blend state version {state.get('version')} is not {_STATE_VERSION}")
        saved = [(s["name"], float(s["weight"]), s["fingerprint"]) for s in state["sources"]]
        ours = [
            (e.name, e.weight, fp) for e, fp in zip(self.entries, self.fingerprints, strict=True)
        ]
        if [(n, w) for n, w, _ in saved] != [(n, w) for n, w, _ in ours]:
            raise ValueError(
                f"loader state was saved for the blend {[(n, w) for n, w, _ in saved]} but "
                f"data.train "
                f"is {[(n, w) for n, w, _ in ours]}: the blend (sources or weights) changed"
            )
        for (name, _, a), (_, _, b) in zip(saved, ours, strict=True):
            if a != b:
                raise ValueError(
                    f"loader state was saved for source {name!r} with data fingerprint {a[:16]}... "
                    f"but it now has {b[:16]}...: the data changed"
                )
        check_resume_settings(self, state, ("seed", "shuffle", "shuffle_window_shards", "global_batch_size"))
        if sum(state["consumed"]) != int(state["consumed_global_batches"]) * self.global_batch_size:
            raise ValueError("blend state is inconsistent: consumed rows != batches x global batch")
        self._global_batch = int(state["consumed_global_batches"])
        self._micro_batch = int(state["micro_batch"])
        self._credit = [int(c) for c in state["credit"]]
        self._consumed = [int(c) for c in state["consumed"]]
        self._plan_cache = None
        self._tokens_base = np.asarray(
            state.get("token_totals", [0.0] * len(self.sources)), dtype=np.float64
        )
        self._tokens_reported = self._tokens_base.copy()
        self._tokens_local[:] = 0
        self._rows_local[:] = 0

    # ---- reporting ---------------------------------------------------------------------------

    def stats(
        self, group: Any = None, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """Blend shares and data counters (see the module docstring and ``ShardLoader.stats``).

        Args:
            group: the data-parallel process group to sum the token counts and counters over
                (every rank of it must call ``stats`` at the same step); ``None``: this rank.
            device: where the reduction tensor lives (the rank's device for NCCL).
        """
        K = len(self.sources)
        per_source = [s.stats() for s in self.sources]
        sums = np.concatenate(
            [
                self._tokens_local,
                [sum(p["data/skipped_samples"] for p in per_source)],
                [sum(p["data/fetched_shards"] for p in per_source)],
                [sum(p["data/fetched_gb"] for p in per_source)],
                [sum(p["data/failed_attempts"] for p in per_source)],
            ]
        )
        maxes = np.array([sum(p["data/skipped_shards"] for p in per_source)], dtype=np.float64)
        sums, maxes = reduce_counters(sums, maxes, group, device)
        tokens = self._tokens_base + sums[:K]
        self._tokens_reported = tokens.copy()
        consumed = np.asarray(self._consumed, dtype=np.float64)
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            out[f"data/sample_share/{name}"] = float(consumed[k] / max(consumed.sum(), 1.0))
            out[f"data/token_share/{name}"] = float(tokens[k] / max(tokens.sum(), 1.0))
        out.update(
            {
                "data/skipped_samples": float(sums[K]),
                "data/fetched_shards": float(sums[K + 1]),
                "data/fetched_gb": float(sums[K + 2]),
                "data/failed_attempts": float(sums[K + 3]),
                "data/skipped_shards": float(maxes[0]),
            }
        )
        return out

    @property
    def skipped_shards(self) -> dict[str, str]:
        """Shards skipped so far in this process: ``{source/name: error}``."""
        return {
            f"{e.name}/{n}": err
            for e, s in zip(self.entries, self.sources, strict=True)
            for n, err in s.skipped_shards.items()
        }

    def close(self) -> None:
        """Release every source."""
        for source in self.sources:
            source.close()


# --------------------------------------------------------------------------------------------
# Entry points for the trainer
# --------------------------------------------------------------------------------------------


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
