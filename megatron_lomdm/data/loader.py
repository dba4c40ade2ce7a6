"""The loader: a layout-independent, exactly resumable order over the shards of one source or of
a weighted blend of sources.

One implementation, in three parts: ``SourceReader`` (one split of one source: its seeded order
per epoch and checked random access to its samples, through ``cache.ShardStore``), ``_Batches``
(what every loader shares: the batch geometry, the position, iteration, the resume checks and
the data counters) and two plans of which rows make a global batch: ``ShardLoader`` (one source,
epoch by epoch) and ``BlendLoader`` (several sources by weight).

One source (``ShardLoader``). Global batch composition does not depend on the parallel layout.
For each epoch ``e`` there is one deterministic order of all samples of the split (seeded by ``(seed, e, split)``): the shard
order is shuffled, then the samples are shuffled within windows of ``shuffle_window_shards``
consecutive shards (I/O locality). Global batch ``g`` (counted from the start of training,
across epochs) is::

    order_e[b * G : (b + 1) * G]          e = g // batches_per_epoch, b = g % batches_per_epoch

DP rank ``r`` of ``dp`` takes the contiguous slice ``[r * G/dp, (r + 1) * G/dp)`` of it and yields
it as ``G / dp / micro_batch_size`` micro-batches. TP/PP peers (same DP rank) get identical
batches; the concatenation of the DP slices is the DP=1 batch. Each rank reads only its rows,
by random access into the tar shards (``reader.ShardFile``: mmap, no copy). The last incomplete
global batch of an epoch is dropped (``drop_last=True``) or completed with empty filler rows
whose ``valid`` is all False (``drop_last=False``, for evaluation).

The position is ``(consumed global batches, micro-batch within the current one)``; the order is
a pure function of the seed, so ``load_state_dict`` restores the stream exactly, also under a
different DP size or micro-batch size when saved at a step boundary.

Sources (``data.sources``): ``path`` may also be a ``file://``, ``http(s)://`` or ``pipe:`` source
or a brace pattern of shard locations. The order is defined over the manifest's shard entries
(never over where they are), remote shards are fetched into a local cache (verified against the
manifest's sha256) and then read by the same random access, so global batches, the DP split and
the resume position are identical for a local folder and for its copy behind a URL. The shards
this rank will need next (in its order of first use) are prefetched in the background. A shard
that stays unavailable after ``retries`` stops the iteration with ``ShardUnavailableError`` naming
it, or, with ``skip_bad_shards``, gives empty rows (``valid`` all False) and is counted in
``stats()``. A local shard is checked against the manifest (size at every open, sha256 at the first
open in a process) and every row read is validated (length, token ids, padding): a bad one raises
``ShardDataError`` naming the shard and the row, or is skipped likewise. When every shard has been
skipped, or a whole epoch gave this rank no token, the loader raises ``NoDataError``.

Each micro-batch is a dict (shapes: B = micro_batch_size, L = seq_length)::

    tokens         (B, L) int64      token ids, pad_id beyond each row's length
    valid          (B, L) bool       False on padding
    cond           (B, L) bool       True on given (prompt) positions, never masked; all False
                                     for shards without a conditioning mask (``format``)
    sample_index   (B,) int64        position of each row within the global batch, 0..G-1
    global_batch   int               index of the global batch since the start of training
    epoch          int
    micro_batch    int               index of this micro-batch within the step, 0..M-1
    num_micro_batches int            M = G / dp / B

Blends (``BlendLoader``). ``data.train`` may be a list of ``{source: SPEC, weight: W[, name: NAME]}``
(any spec of ``data.sources``). All sources must share one tokenizer and sequence length (checked
from their manifests; the error names both sources and both values).

Composition. Weights are shares of *sequences* (rows): global batch ``g`` has ``G`` rows, and row
``j`` of the whole blend stream (``g * G + j``) comes from the source picked by a smooth weighted
round robin over integer weights: every pick adds each source's weight to its credit and gives
the row to the source with the most credit (the lowest index on ties), which then pays the total.
The picks are interleaved and never more than about one row away from ``weight x rows`` for any
source, so the realised shares converge to the weights at rate ``1 / rows``, and each DP slice of
a batch holds a near-proportional mix. Each source has its own sample stream: its own seeded
per-epoch order (``SourceReader.epoch_order``, window-shuffled, seeded by ``(seed, source
index)``), consumed in order; a small source with a large weight simply runs through more epochs.

The plan of a global batch depends only on ``(seed, weights, the sources, g)``, never on the
parallel layout; each DP rank reads only its contiguous slice. The state (per-source credits and
consumed rows at the current global batch) is a few integers, saved in every checkpoint, so a
resume continues the blend exactly, also under another DP size when saved at a step boundary.

Reporting (``stats()``): ``data/sample_share/NAME`` (exact, from the plan) and
``data/token_share/NAME``: the realised share of real (non-pad) tokens, summed over the
data-parallel group when one is given, cumulative since the start of training (up to the last
report before a resume). For packed sources the two agree; for padded sources they differ by the
sources' mean document lengths. The data counters (``data/skipped_shards``, ``data/fetched_gb``...)
are those of ``ShardLoader.stats``, summed over the sources.

A blend's micro-batches additionally carry ``source`` (B,) int64: the index of each row's source.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lomdm.data.cache import ShardStore
from megatron_lomdm.data.fetch import NoDataError, SourceOptions
from megatron_lomdm.data.format import Manifest
from megatron_lomdm.data.reader import ShardDataError, ShardFile
from megatron_lomdm.data.sources import (
    BlendEntry,
    ShardSource,
    check_same_tokenizer,
    check_tokenizer_compat,
    open_source,
    parse_blend,
    read_manifest,
)
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "BlendLoader",
    "ShardLoader",
    "SourceOptions",
    "SourceReader",
    "check_resume_settings",
    "check_tokenizer_compat",
    "read_manifest",
    "reduce_counters",
]

_STATE_VERSION = 1
_MAX_OPEN_SHARDS = 16
_WEIGHT_SCALE = 1 << 20  # weights become integers (sum ~ 2^20): exact, platform-independent picks
#: Per-source counters (summed over sources and DP ranks): ``data/NAME`` in ``stats()``.
_COUNTERS = (
    "skipped_samples",
    "fetched_shards",
    "fetched_gb",
    "fetch_s",
    "failed_attempts",
    "cache_evictions",
)


def reduce_counters(
    sums: np.ndarray, maxes: np.ndarray, group: Any = None, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``sums`` and take the max of ``maxes`` over ``group`` (no-op without one)."""
    import torch.distributed as dist

    if group is None or not dist.is_available() or not dist.is_initialized():
        return sums, maxes
    if dist.get_world_size(group) == 1:
        return sums, maxes
    a = torch.as_tensor(sums, dtype=torch.float64, device=device)
    b = torch.as_tensor(maxes, dtype=torch.float64, device=device)
    dist.all_reduce(a, group=group)
    dist.all_reduce(b, op=dist.ReduceOp.MAX, group=group)
    return a.cpu().numpy(), b.cpu().numpy()


def check_resume_settings(loader: Any, state: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse a loader state saved with other order settings, or mid-step under another layout.

    Raises:
        ValueError: naming the setting and both values.
    """
    for key in keys:
        if state[key] != getattr(loader, key):
            raise ValueError(
                f"loader state has {key}={state[key]!r} but this loader has {key}={getattr(loader, key)!r}"
            )
    if state["micro_batch"] and (state["micro_batch_size"], state["dp_size"]) != (
        loader.micro_batch_size,
        loader.dp_size,
    ):
        raise ValueError(
            f"loader state was saved at micro-batch {state['micro_batch']} with "
            f"micro_batch_size={state['micro_batch_size']}, dp_size={state['dp_size']}; "
            f"it can only resume mid-step with the same (here {loader.micro_batch_size}, {loader.dp_size})"
        )


# --------------------------------------------------------------------------------------------
# One source: its order and its samples
# --------------------------------------------------------------------------------------------


class SourceReader:
    """One split of one source: its seeded order per epoch and checked random access to its
    samples (at most ``_MAX_OPEN_SHARDS`` shards open), skipping bad shards when asked to.

    Args:
        path: a shard folder (or its ``manifest.json``), any source spec of ``data.sources`` or
            an already resolved ``ShardSource``.
        seed: seeds the per-epoch order.
        split: ``train`` or ``valid``; ``None``: the split a pattern's shards belong to, else
            ``train``.
        shuffle: shuffle (else the stored order every epoch).
        shuffle_window_shards: shards whose samples are shuffled together.
        source_options: fetching, caching, retries and skipping; ``None``: ``SourceOptions()``.

    Raises:
        ValueError: ``shuffle_window_shards < 1``, a bad spec or split.
        ShardDataError: a local shard of the wrong size, unless ``skip_bad_shards``.
    """

    def __init__(
        self,
        path: str | Path | ShardSource,
        *,
        seed: int,
        split: str | None = None,
        shuffle: bool = True,
        shuffle_window_shards: int = 8,
        source_options: SourceOptions | None = None,
    ) -> None:
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        self.source_options = source_options or SourceOptions()
        self.source: ShardSource = (
            path if isinstance(path, ShardSource) else open_source(path, split, self.source_options)
        )
        self.manifest: Manifest = self.source.manifest
        self.split, self.seed, self.shuffle = self.source.split, int(seed), bool(shuffle)
        self.shuffle_window_shards = shuffle_window_shards
        self.seq_length = self.manifest.seq_length
        self.pad_id = int(self.manifest.tokenizer["pad_id"])
        self._store = ShardStore(self.source, self.source_options)
        self._store.check_local_sizes()
        self._shard_rows = np.array([s["num_samples"] for s in self.source.shards], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)
        self.num_samples = int(self._shard_start[-1])
        self.fingerprint = self.source.fingerprint
        self._split_code = zlib.crc32(self.split.encode())
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._files: collections.OrderedDict[int, ShardFile] = collections.OrderedDict()
        self._skipped_samples = 0
        self._read_any = False  # a row of a good shard was read by this process

    def batches_per_epoch_of(self, global_batch_size: int, drop_last: bool) -> int:
        """Global batches in one epoch (the last one incomplete unless ``drop_last``).

        Raises:
            ValueError: the split has fewer samples than one global batch.
        """
        full, rest = divmod(self.num_samples, global_batch_size)
        batches = full if drop_last or not rest else full + 1
        if batches == 0:
            raise ValueError(
                f"split {self.split!r} of {self.source.spec.text} has {self.num_samples} samples, "
                f"fewer than "
                f"global_batch_size={global_batch_size}"
            )
        return batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global sample order of one epoch: a permutation of ``0..num_samples-1`` (int64)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if not self.shuffle:
            order = np.arange(self.num_samples, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed % 2**63, epoch, self._split_code])
            shard_order = rng.permutation(len(self._shard_rows))
            pieces = []
            for start in range(0, len(shard_order), self.shuffle_window_shards):
                window = shard_order[start : start + self.shuffle_window_shards]
                rows = np.concatenate(
                    [np.arange(self._shard_start[s], self._shard_start[s + 1]) for s in window]
                )
                pieces.append(rng.permutation(rows))
            order = np.concatenate(pieces).astype(np.int64)
        self._order_cache = (epoch, order)
        return order

    def shards_by_first_use(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shards of sample ``indices`` (all >= 0) in order of first use, and where each is
        first used (an index into ``indices``)."""
        shard_of = np.searchsorted(self._shard_start, indices, side="right") - 1
        shards, first = np.unique(shard_of, return_index=True)
        by_use = np.argsort(first, kind="stable")
        return shards[by_use], first[by_use]

    def _shard(self, shard: int) -> ShardFile | None:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        reader = self._store.open(shard, dtype=self.manifest.dtype, seq_length=self.seq_length)
        if reader is None:  # skipped (skip_bad_shards)
            return None
        self._files[shard] = reader
        if len(self._files) > _MAX_OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return reader

    def read_samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``tokens`` (n, L) int64 and ``lengths`` (n,) int64 of ``read_rows``."""
        tokens, lengths, _ = self.read_rows(indices)
        return tokens, lengths

    def read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read samples by split index (-1: an empty filler row).

        Rows of a skipped shard (``skip_bad_shards``) come back like filler rows (length 0).

        Returns:
            ``tokens`` (n, L) int64, ``lengths`` (n,) int64 and ``cond`` (n, L) bool (the
            conditioning mask; all False for shards without one).
        """
        tokens = np.full((len(indices), self.seq_length), self.pad_id, dtype=np.int64)
        lengths = np.zeros(len(indices), dtype=np.int64)
        cond = np.zeros((len(indices), self.seq_length), dtype=bool)
        real = np.flatnonzero(indices >= 0)
        shard_of = np.searchsorted(self._shard_start, indices[real], side="right") - 1
        for shard in np.unique(shard_of).tolist():
            rows = real[shard_of == shard]
            got = self._read_shard(shard, indices[rows] - self._shard_start[shard])
            if got is None:
                self._skipped_samples += len(rows)
                if not self._read_any:
                    self._store.verify_until_good()
                self._check_not_all_skipped()
                continue
            self._read_any = True
            tokens[rows], lengths[rows], cond[rows] = got
        return tokens, lengths, cond

    def _read_shard(
        self, shard: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Rows of one shard; ``None`` when it is (or now becomes) skipped."""
        reader = self._shard(shard)
        if reader is None:
            return None
        try:
            tokens, lengths = reader.read(rows)
            return tokens, lengths, reader.read_cond(rows, lengths)
        except ShardDataError as err:
            if not self.source_options.skip_bad_shards:
                raise
            self._files.pop(shard).close()
            self._store.skip(shard, str(err))
            return None

    def _check_not_all_skipped(self) -> None:
        if len(self._store.bad) < len(self.source.shards):
            return
        first = next(iter(self._store.bad.values()))
        raise NoDataError(
            f"split {self.split!r} of {self.source.spec.text}: all {len(self.source.shards)} "
            f"shard(s) were skipped (data.skip_bad_shards=true), nothing is left to train on; "
            f"the first error: {first}"
        )

    def counters(self) -> tuple[np.ndarray, int]:
        """This process's ``_COUNTERS`` (in order) and its number of skipped shards."""
        store = self._store.stats()
        sums = np.array(
            [
                self._skipped_samples,
                store["fetched_shards"],
                store["fetched_bytes"] / 1e9,
                store["fetch_seconds"],
                store["failed_attempts"],
                store["cache_evictions"],
            ],
            dtype=np.float64,
        )
        return sums, int(store["skipped_shards"])

    @property
    def skipped_shards(self) -> dict[str, str]:
        """Shards skipped so far in this process: ``{name: error}``."""
        return {self._store.name(i): err for i, err in self._store.bad.items()}

    def close(self) -> None:
        """Release the open shards and stop prefetching."""
        while self._files:
            self._files.popitem()[1].close()
        self._store.close()


# --------------------------------------------------------------------------------------------
# What every loader shares
# --------------------------------------------------------------------------------------------


class _Batches:
    """The batch geometry, the position ``(global batch, micro-batch)``, iteration, the resume
    checks and the data counters; a loader supplies which rows make a micro-batch."""

    _KIND = ""  # the state's "kind" ("single" states have none before blends existed)
    _WRONG_KIND = ""  # the message for a state of the other kind
    _STATE_NAME = "loader state"  # for the version message
    _readers: list[SourceReader]
    seq_length: int

    def _init_batches(
        self, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of dp_size={dp_size} x "
                f"micro_batch_size={micro_batch_size}"
            )
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows_per_rank = global_batch_size // dp_size
        self.num_micro_batches = self.rows_per_rank // micro_batch_size
        self._global_batch = 0
        self._micro_batch = 0

    # ---- what a loader supplies ----------------------------------------------------------------

    def _start_micro_batch(self, global_batch: int, micro_batch: int) -> None:
        """Before reading (may stop the iteration, start prefetching)."""

    def _read_rows(
        self, global_batch: int, micro_batch: int, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``tokens`` (B, L) int64, ``lengths`` (B,) and extra fields (at least ``cond``) of the
        rows at ``positions`` of the global batch."""
        raise NotImplementedError

    def _end_global_batch(self) -> None:
        """After the last micro-batch of a global batch, before the position moves on."""

    def _batch_epoch(self, global_batch: int) -> int:
        raise NotImplementedError

    # ---- iteration -------------------------------------------------------------------------

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        g, m = self._global_batch, self._micro_batch
        self._start_micro_batch(g, m)
        first = self.dp_rank * self.rows_per_rank + m * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        tokens, lengths, extra = self._read_rows(g, m, positions)
        valid = np.arange(self.seq_length)[None, :] < lengths[:, None]
        self._micro_batch = m + 1
        if self._micro_batch == self.num_micro_batches:
            self._end_global_batch()
            self._global_batch, self._micro_batch = g + 1, 0
        return {
            "tokens": torch.from_numpy(tokens),
            "valid": torch.from_numpy(valid),
            "sample_index": torch.from_numpy(positions),
            **extra,
            "global_batch": g,
            "epoch": self._batch_epoch(g),
            "micro_batch": m,
            "num_micro_batches": self.num_micro_batches,
        }

    def next_global_batch(self) -> list[dict[str, Any]]:
        """The ``num_micro_batches`` micro-batches of this rank's share of the next global batch.

        Raises:
            ValueError: the loader stands in the middle of a global batch.
        """
        if self._micro_batch:
            raise ValueError(f"the loader is at micro-batch {self._micro_batch} of a global batch")
        return [next(self) for _ in range(self.num_micro_batches)]

    @property
    def consumed_global_batches(self) -> int:
        """Global batches fully yielded so far (since the start of training)."""
        return self._global_batch

    @property
    def consumed_samples(self) -> int:
        """Samples of all DP ranks consumed by completed global batches."""
        return self._global_batch * self.global_batch_size

    # ---- state -----------------------------------------------------------------------------

    def _position_state(self) -> dict[str, Any]:
        """The state keys of every loader: the order settings and the position."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,  # type: ignore[attr-defined]
            "shuffle": self.shuffle,  # type: ignore[attr-defined]
            "shuffle_window_shards": self.shuffle_window_shards,  # type: ignore[attr-defined]
            "global_batch_size": self.global_batch_size,
            "consumed_global_batches": self._global_batch,
            "micro_batch": self._micro_batch,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def _check_state(self, state: dict[str, Any], keys: Sequence[str]) -> None:
        """Refuse a state of the other kind, another version or other order settings."""
        if state.get("kind", "single") != self._KIND:
            raise ValueError(self._WRONG_KIND.format(kind=state.get("kind")))
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"{self._STATE_NAME} version {state.get('version')} is not {_STATE_VERSION}"
            )
        self._check_data(state)
        check_resume_settings(self, state, keys)

    def _check_data(self, state: dict[str, Any]) -> None:
        """Refuse a state saved for other data."""

    def _set_position(self, state: dict[str, Any]) -> None:
        self._global_batch = int(state["consumed_global_batches"])
        self._micro_batch = int(state["micro_batch"])

    # ---- counters --------------------------------------------------------------------------

    def _counter_stats(
        self, extra: np.ndarray, group: Any, device: torch.device | str | None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Reduce ``extra`` with the counters of every source over ``group``: the reduced
        ``extra`` and the ``data/...`` counters (``data/skipped_shards``: the most any rank
        skipped; the others: sums)."""
        totals, skipped = np.zeros(len(_COUNTERS), dtype=np.float64), 0
        for reader in self._readers:
            sums, bad = reader.counters()
            totals, skipped = totals + sums, skipped + bad
        n = len(extra)
        sums, maxes = reduce_counters(
            np.concatenate([extra, totals]), np.array([skipped], dtype=np.float64), group, device
        )
        out = {"data/skipped_shards": float(maxes[0])}
        out.update({f"data/{key}": float(v) for key, v in zip(_COUNTERS, sums[n:], strict=True)})
        return sums[:n], out


# --------------------------------------------------------------------------------------------
# One source
# --------------------------------------------------------------------------------------------


class ShardLoader(SourceReader, _Batches):
    """Iterate micro-batches of one DP rank over a shard folder (infinite unless ``num_epochs``).

    Args:
        path: the shard folder (or its ``manifest.json``), any source spec of
            ``data.sources`` (``file://``, ``http(s)://``, ``pipe:``, a brace pattern of shard
            locations) or an already resolved ``ShardSource``.
        micro_batch_size: rows per yielded micro-batch.
        global_batch_size: rows per optimizer step over all DP ranks; a multiple of
            ``dp_size * micro_batch_size``.
        dp_rank: this process's data-parallel rank (from megatron ``parallel_state``).
        dp_size: the data-parallel world size.
        seed, split, shuffle, shuffle_window_shards, source_options: as for ``SourceReader``.
        drop_last: drop the last incomplete global batch of each epoch; otherwise fill it up with
            empty rows (``valid`` all False).
        num_epochs: stop after this many epochs; ``None`` iterates forever.

    Raises:
        ValueError: inconsistent batch sizes or ranks, or a split smaller than one global batch.
        ShardUnavailableError: (while iterating) a shard unreadable after all retries, unless
            ``source_options.skip_bad_shards``.
        ShardDataError: (while iterating) a shard or row that disagrees with the manifest, unless
            ``source_options.skip_bad_shards``.
        NoDataError: (while iterating) every shard skipped, or an epoch without a token.
    """

    _KIND = "single"
    _WRONG_KIND = (
        "loader state was saved by a {kind} loader (data.train was a blend) "
        "but data.train is now a single source"
    )

    def __init__(
        self,
        path: str | Path | ShardSource,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        split: str | None = None,
        shuffle: bool = True,
        shuffle_window_shards: int = 8,
        drop_last: bool = True,
        num_epochs: int | None = None,
        source_options: SourceOptions | None = None,
    ) -> None:
        self._init_batches(micro_batch_size, global_batch_size, dp_rank, dp_size)
        SourceReader.__init__(
            self, path, seed=seed, split=split, shuffle=shuffle,
            shuffle_window_shards=shuffle_window_shards, source_options=source_options,
        )
        self.drop_last, self.num_epochs = drop_last, num_epochs
        self.batches_per_epoch = self.batches_per_epoch_of(global_batch_size, drop_last)
        self._readers = [self]
        # (epoch, read from its start here, real tokens read, rows read (no filler)): NoDataError
        self._epoch_tokens: tuple[int, bool, int, int] | None = None
        self._first_use: tuple[int, np.ndarray, np.ndarray] | None = None
        self._prefetched_upto: tuple[int, int] = (-1, -1)
        self._check_not_all_skipped()

    def global_batch_indices(self, global_batch: int) -> np.ndarray:
        """Sample indices (into the split) of a global batch, ``(G,)`` int64; -1: filler rows."""
        epoch, batch = divmod(global_batch, self.batches_per_epoch)
        G = self.global_batch_size
        indices = self.epoch_order(epoch)[batch * G : (batch + 1) * G]
        if len(indices) < G:
            indices = np.concatenate([indices, np.full(G - len(indices), -1, dtype=np.int64)])
        return indices

    @property
    def epoch(self) -> int:
        """The epoch of the next micro-batch."""
        return self._global_batch // self.batches_per_epoch

    # ---- the plan ----------------------------------------------------------------------------

    def _batch_epoch(self, global_batch: int) -> int:
        return global_batch // self.batches_per_epoch

    def _start_micro_batch(self, global_batch: int, micro_batch: int) -> None:
        epoch = global_batch // self.batches_per_epoch
        if self.num_epochs is not None and epoch >= self.num_epochs:
            self._count_epoch_tokens(epoch, global_batch, micro_batch, 0, 0)
            raise StopIteration
        if micro_batch == 0 and self.source.remote:
            self._prefetch(global_batch)

    def _read_rows(
        self, global_batch: int, micro_batch: int, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        indices = self.global_batch_indices(global_batch)[positions]
        tokens, lengths, cond = self.read_rows(indices)
        num_tokens = int(lengths.sum())
        rows = 1 if num_tokens else int(np.count_nonzero(indices >= 0))  # only 0 vs > 0 matters
        epoch = global_batch // self.batches_per_epoch
        self._count_epoch_tokens(epoch, global_batch, micro_batch, num_tokens, rows)
        return tokens, lengths, {"cond": torch.from_numpy(cond)}

    def _count_epoch_tokens(
        self, epoch: int, global_batch: int, micro_batch: int, tokens: int, rows: int
    ) -> None:
        """Stop when the rows (not filler) of an epoch this process read from its start gave
        this rank no token."""
        seen = self._epoch_tokens
        if seen is None or seen[0] != epoch:
            if seen is not None and seen[1] and seen[3] and not seen[2]:
                self._raise_empty_epoch(seen[0])
            starts = global_batch % self.batches_per_epoch == 0 and micro_batch == 0
            seen = (epoch, starts, 0, 0)
        self._epoch_tokens = (epoch, seen[1], seen[2] + tokens, seen[3] + rows)

    def _raise_empty_epoch(self, epoch: int) -> None:
        skipped = ", ".join(sorted(self.skipped_shards)) or "none"
        raise NoDataError(
            f"split {self.split!r} of {self.source.spec.text}: epoch {epoch} gave data-parallel "
            f"rank {self.dp_rank} no token (skipped shards: {skipped}); nothing to train on"
        )

    # ---- remote sources ----------------------------------------------------------------------

    def _rank_first_use(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's shards in order of first use in ``epoch``, and the batch of that use."""
        if self._first_use is not None and self._first_use[0] == epoch:
            return self._first_use[1], self._first_use[2]
        order = self.epoch_order(epoch)
        G, R = self.global_batch_size, self.rows_per_rank
        n_batches = -(-len(order) // G)
        padded = np.full(n_batches * G, -1, dtype=np.int64)
        padded[: len(order)] = order
        mine = padded.reshape(n_batches, G)[:, self.dp_rank * R : (self.dp_rank + 1) * R].ravel()
        batch_of = np.repeat(np.arange(n_batches), R)
        keep = mine >= 0
        shards, first = self.shards_by_first_use(mine[keep])
        result = (shards, batch_of[keep][first])
        self._first_use = (epoch, *result)
        return result

    def _prefetch(self, global_batch: int) -> None:
        """Ask the store for the next ``prefetch_shards`` shards this rank will open."""
        ahead = self.source_options.prefetch_shards
        if not ahead:
            return
        epoch, batch = divmod(global_batch, self.batches_per_epoch)
        shards, first_batch = self._rank_first_use(epoch)
        start = int(np.searchsorted(first_batch, batch, side="right"))
        if (epoch, start) == self._prefetched_upto:
            return
        self._prefetched_upto = (epoch, start)
        self._store.prefetch(shards[start : start + ahead].tolist())

    # ---- state and counters ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position and what it is relative to (plain Python values)."""
        return {
            **self._position_state(),
            "fingerprint": self.fingerprint,
            "split": self.split,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        Raises:
            ValueError: the state belongs to other data (fingerprint), another split, seed,
                shuffle settings or global batch size, or was saved mid-step under another
                micro-batch size or DP size.
        """
        keys = ("split", "seed", "shuffle", "shuffle_window_shards", "drop_last", "global_batch_size")
        self._check_state(state, keys)
        consumed = int(state["consumed_global_batches"])
        if consumed // self.batches_per_epoch != state["epoch"]:
            raise ValueError(
                f"loader state is inconsistent: epoch {state['epoch']} at global batch {consumed}"
            )
        self._set_position(state)

    def _check_data(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"loader state was saved for data with fingerprint {state['fingerprint'][:16]}... "
                f"but split {self.split!r} of {self.manifest.path} has fingerprint "
                f"{self.fingerprint[:16]}...: the data changed"
            )

    def stats(
        self, group: Any = None, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """Data counters for the metrics: skipped shards and samples, fetches, failed attempts.

        Keys: ``data/skipped_shards`` (the most any rank skipped), ``data/skipped_samples`` (rows
        that came from skipped shards as empty rows), ``data/fetched_shards``,
        ``data/fetched_gb``, ``data/fetch_s``, ``data/failed_attempts``,
        ``data/cache_evictions``: cumulative since this process started.

        Args:
            group: a process group (the data-parallel group) to sum the counters over; every rank
                of it must call ``stats`` at the same point. ``None``: this process only.
            device: where the reduction tensor lives (the rank's device for NCCL).
        """
        return self._counter_stats(np.zeros(0), group, device)[1]


# --------------------------------------------------------------------------------------------
# A weighted blend of sources
# --------------------------------------------------------------------------------------------


def _source_seed(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) % 2**63, index]).generate_state(1, np.uint64)[0] % 2**63
    )


def _integer_weights(weights: Sequence[float]) -> list[int]:
    total = float(sum(weights))
    return [max(1, round(w / total * _WEIGHT_SCALE)) for w in weights]


class BlendLoader(_Batches):
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

    _KIND = "blend"
    _WRONG_KIND = (
        "loader state was saved by a single-source loader but data.train is now a blend; "
        "start a new run (or point data.train back at the single source)"
    )
    _STATE_NAME = "blend state"

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
        self._init_batches(micro_batch_size, global_batch_size, dp_rank, dp_size)
        self.entries = parse_blend(list(entries))
        self.names = [e.name for e in self.entries]
        self.weights = [e.weight for e in self.entries]
        self._int_weights = _integer_weights(self.weights)
        self._total_weight = sum(self._int_weights)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.shuffle_window_shards = shuffle_window_shards
        self.sources = [
            self._open(e.source, _source_seed(seed, k), split, source_options)
            for k, e in enumerate(self.entries)
        ]
        self._readers = self.sources
        check_same_tokenizer(
            [(e.name, s.manifest) for e, s in zip(self.entries, self.sources, strict=True)]
        )
        self.manifest = self.sources[0].manifest
        self.seq_length = self.manifest.seq_length
        self.pad_id = int(self.manifest.tokenizer["pad_id"])
        self.fingerprints = [s.fingerprint for s in self.sources]
        self._init_plan(len(self.sources))
        blend = zip(self.entries, self.sources, strict=True)
        logger.info(
            "data blend: %s",
            ", ".join(f"{e.name}={e.weight:g} ({s.num_samples} samples)" for e, s in blend),
        )

    def _open(
        self, spec: str, seed: int, split: str | None, options: SourceOptions | None
    ) -> SourceReader:
        reader = SourceReader(
            spec,
            seed=seed,
            split=split,
            shuffle=self.shuffle,
            shuffle_window_shards=self.shuffle_window_shards,
            source_options=options,
        )
        reader.batches_per_epoch_of(1, True)  # at least one sample
        reader._check_not_all_skipped()
        return reader

    def _init_plan(self, K: int) -> None:
        self._credit = [0] * K  # at the start of the current global batch
        self._consumed = [0] * K
        self._plan_cache: tuple[int, np.ndarray, np.ndarray, list[int], list[int]] | None = None
        self._tokens_local = np.zeros(K, dtype=np.float64)
        self._tokens_base = np.zeros(K, dtype=np.float64)
        self._tokens_reported = np.zeros(K, dtype=np.float64)
        self._prefetched: list[tuple[int, int]] = [(-1, -1)] * K

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

    def _batch_epoch(self, global_batch: int) -> int:
        return self.source_epochs[0]

    def _start_micro_batch(self, global_batch: int, micro_batch: int) -> None:
        src, pos = self._plan()
        if micro_batch == 0:
            self._prefetch(src, pos)

    def _read_rows(
        self, global_batch: int, micro_batch: int, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        src, pos = self._plan()
        tokens = np.full((len(positions), self.seq_length), self.pad_id, dtype=np.int64)
        lengths = np.zeros(len(positions), dtype=np.int64)
        cond = np.zeros((len(positions), self.seq_length), dtype=bool)
        row_src = src[positions]
        for k in np.unique(row_src).tolist():
            sel = np.flatnonzero(row_src == k)
            got = self.sources[k].read_rows(self._rows_of(k, pos[positions[sel]]))
            tokens[sel], lengths[sel], cond[sel] = got
            self._tokens_local[k] += float(got[1].sum())
        return tokens, lengths, {"cond": torch.from_numpy(cond), "source": torch.from_numpy(row_src.copy())}

    def _end_global_batch(self) -> None:
        _, _, _, credit, consumed = self._plan_cache  # type: ignore[misc]
        self._credit, self._consumed = list(credit), list(consumed)

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
            shards, _ = source.shards_by_first_use(order)
            source._store.prefetch(shards[:ahead].tolist())

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
            **self._position_state(),
            "kind": "blend",
            "sources": [
                {"name": e.name, "weight": e.weight, "fingerprint": fp, "split": s.split}
                for e, fp, s in zip(self.entries, self.fingerprints, self.sources, strict=True)
            ],
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
        self._check_state(state, ("seed", "shuffle", "shuffle_window_shards", "global_batch_size"))
        if sum(state["consumed"]) != int(state["consumed_global_batches"]) * self.global_batch_size:
            raise ValueError("blend state is inconsistent: consumed rows != batches x global batch")
        self._set_position(state)
        self._credit = [int(c) for c in state["credit"]]
        self._consumed = [int(c) for c in state["consumed"]]
        self._plan_cache = None
        self._tokens_base = np.asarray(
            state.get("token_totals", [0.0] * len(self.sources)), dtype=np.float64
        )
        self._tokens_reported = self._tokens_base.copy()
        self._tokens_local[:] = 0

    def _check_data(self, state: dict[str, Any]) -> None:
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
        local_tokens, counters = self._counter_stats(self._tokens_local, group, device)
        tokens = self._tokens_base + local_tokens
        self._tokens_reported = tokens.copy()
        consumed = np.asarray(self._consumed, dtype=np.float64)
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            out[f"data/sample_share/{name}"] = float(consumed[k] / max(consumed.sum(), 1.0))
            out[f"data/token_share/{name}"] = float(tokens[k] / max(tokens.sum(), 1.0))
        out.update(counters)
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
