"""The training loader: a layout-independent, exactly resumable order over the shards.

Global batch composition does not depend on the parallel layout. For each epoch ``e`` there is
one deterministic order of all samples of the split (seeded by ``(seed, e, split)``): the shard
order is shuffled, then the samples are shuffled within windows of ``shuffle_window_shards``
consecutive shards (I/O locality). Global batch ``g`` (counted from the start of training,
across epochs) is::

    order_e[b * G : (b + 1) * G]          e = g // batches_per_epoch, b = g % batches_per_epoch

DP rank ``r`` of ``dp`` takes the contiguous slice ``[r * G/dp, (r + 1) * G/dp)`` of it and yields
it as ``G / dp / micro_batch_size`` micro-batches. TP/PP peers (same DP rank) get identical
batches; the concatenation of the DP slices is the DP=1 batch. Each rank reads only its rows,
by random access into the tar shards (``shards.ShardFile``: mmap, no copy). The last incomplete
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
    sample_index   (B,) int64        position of each row within the global batch, 0..G-1
    global_batch   int               index of the global batch since the start of training
    epoch          int
    micro_batch    int               index of this micro-batch within the step, 0..M-1
    num_micro_batches int            M = G / dp / B
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lomdm.data.shards import (
    Manifest,
    ShardDataError,
    ShardFile,
    check_tokenizer_compat,
    read_manifest,
)
from megatron_lomdm.data.sources import (
    NoDataError,
    ShardSource,
    ShardStore,
    SourceOptions,
    open_source,
)

__all__ = ["ShardLoader", "SourceOptions", "check_tokenizer_compat", "read_manifest"]

_STATE_VERSION = 1
_MAX_OPEN_SHARDS = 16


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


class ShardLoader:
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
        seed: seeds the per-epoch order.
        split: ``train`` or ``valid``; ``None``: the split a pattern's shards belong to, else
            ``train``.
        shuffle: shuffle (else the stored order every epoch).
        shuffle_window_shards: shards whose samples are shuffled together.
        drop_last: drop the last incomplete global batch of each epoch; otherwise fill it up with
            empty rows (``valid`` all False).
        num_epochs: stop after this many epochs; ``None`` iterates forever.
        source_options: fetching, caching, retries and skipping for remote sources (and retries /
            skipping for local ones); ``None``: ``SourceOptions()``.

    Raises:
        ValueError: inconsistent batch sizes or ranks, or a split smaller than one global batch.
        ShardUnavailableError: (while iterating) a shard unreadable after all retries, unless
            ``source_options.skip_bad_shards``.
        ShardDataError: (while iterating) a shard or row that disagrees with the manifest, unless
            ``source_options.skip_bad_shards``.
        NoDataError: (while iterating) every shard skipped, or an epoch without a token.
    """

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
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of dp_size={dp_size} x "
                f"micro_batch_size={micro_batch_size}"
            )
        if shuffle_window_shards < 1:
            raise ValueError(f"shuffle_window_shards must be >= 1, got {shuffle_window_shards}")
        self.source_options = source_options or SourceOptions()
        self.source: ShardSource = (
            path if isinstance(path, ShardSource) else open_source(path, split, self.source_options)
        )
        self.manifest: Manifest = self.source.manifest
        split = self.source.split
        self.split, self.seed, self.shuffle = split, int(seed), bool(shuffle)
        self.shuffle_window_shards, self.drop_last, self.num_epochs = (
            shuffle_window_shards,
            drop_last,
            num_epochs,
        )
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_length = self.manifest.seq_length
        self.pad_id = int(self.manifest.tokenizer["pad_id"])
        shards = self.source.shards
        self._store = ShardStore(self.source, self.source_options)
        self._store.check_local_sizes()
        self._shard_rows = np.array([s["num_samples"] for s in shards], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)
        self.num_samples = int(self._shard_start[-1])
        full, rest = divmod(self.num_samples, global_batch_size)
        self.batches_per_epoch = full if drop_last or not rest else full + 1
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {self.source.spec.text} has {self.num_samples} samples, "
                f"fewer than "
                f"global_batch_size={global_batch_size}"
            )
        self.rows_per_rank = global_batch_size // dp_size
        self.num_micro_batches = self.rows_per_rank // micro_batch_size
        self.fingerprint = self.source.fingerprint
        self._split_code = zlib.crc32(split.encode())
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._files: collections.OrderedDict[int, ShardFile] = collections.OrderedDict()
        self._global_batch = 0
        self._micro_batch = 0
        self._skipped_samples = 0
        self._read_any = False  # a row of a good shard was read by this process
        # (epoch, read from its start by this process, real tokens read, rows read (no filler))
        self._epoch_tokens: tuple[int, bool, int, int] | None = None
        self._first_use: tuple[int, np.ndarray, np.ndarray] | None = None
        self._prefetched_upto: tuple[int, int] = (-1, -1)
        self._check_not_all_skipped()

    # ---- the order ---------------------------------------------------------------------------

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

    def global_batch_indices(self, global_batch: int) -> np.ndarray:
        """Sample indices (into the split) of a global batch, ``(G,)`` int64; -1: filler rows."""
        epoch, batch = divmod(global_batch, self.batches_per_epoch)
        G = self.global_batch_size
        indices = self.epoch_order(epoch)[batch * G : (batch + 1) * G]
        if len(indices) < G:
            indices = np.concatenate([indices, np.full(G - len(indices), -1, dtype=np.int64)])
        return indices

    # ---- reading -----------------------------------------------------------------------------

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
        """Read samples by split index (-1: an empty filler row).

        Rows of a skipped shard (``skip_bad_shards``) come back like filler rows (length 0).

        Returns:
            ``tokens`` (n, L) int64 and ``lengths`` (n,) int64.
        """
        tokens = np.full((len(indices), self.seq_length), self.pad_id, dtype=np.int64)
        lengths = np.zeros(len(indices), dtype=np.int64)
        real = np.flatnonzero(indices >= 0)
        shard_of = np.searchsorted(self._shard_start, indices[real], side="right") - 1
        for shard in np.unique(shard_of).tolist():
            rows = real[shard_of == shard]
            reader = self._shard(shard)
            if reader is not None:
                try:
                    got, got_lengths = reader.read(indices[rows] - self._shard_start[shard])
                except ShardDataError as err:
                    if not self.source_options.skip_bad_shards:
                        raise
                    self._files.pop(shard).close()
                    self._store.skip(shard, str(err))
                    reader = None
            if reader is None:
                self._skipped_samples += len(rows)
                if not self._read_any:
                    self._store.verify_until_good()
                self._check_not_all_skipped()
                continue
            self._read_any = True
            tokens[rows] = got
            lengths[rows] = got_lengths
        return tokens, lengths

    def _check_not_all_skipped(self) -> None:
        if len(self._store.bad) < len(self.source.shards):
            return
        first = next(iter(self._store.bad.values()))
        raise NoDataError(
            f"split {self.split!r} of {self.source.spec.text}: all {len(self.source.shards)} "
            f"shard(s) were skipped (data.skip_bad_shards=true), nothing is left to train on; "
            f"the first error: {first}"
        )

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

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        g, m = self._global_batch, self._micro_batch
        epoch = g // self.batches_per_epoch
        if self.num_epochs is not None and epoch >= self.num_epochs:
            self._count_epoch_tokens(epoch, g, m, 0, 0)
            raise StopIteration
        if m == 0 and self.source.remote:
            self._prefetch(g)
        first = self.dp_rank * self.rows_per_rank + m * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        indices = self.global_batch_indices(g)[positions]
        tokens, lengths = self.read_samples(indices)
        num_tokens = int(lengths.sum())
        rows = 1 if num_tokens else int(np.count_nonzero(indices >= 0))  # only 0 vs > 0 matters
        self._count_epoch_tokens(epoch, g, m, num_tokens, rows)
        valid = np.arange(self.seq_length)[None, :] < lengths[:, None]
        self._micro_batch = m + 1
        if self._micro_batch == self.num_micro_batches:
            self._global_batch, self._micro_batch = g + 1, 0
        return {
            "tokens": torch.from_numpy(tokens),
            "valid": torch.from_numpy(valid),
            "sample_index": torch.from_numpy(positions),
            "global_batch": g,
            "epoch": epoch,
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

    @property
    def epoch(self) -> int:
        """The epoch of the next micro-batch."""
        return self._global_batch // self.batches_per_epoch

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position and what it is relative to (plain Python values)."""
        return {
            "version": _STATE_VERSION,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window_shards": self.shuffle_window_shards,
            "drop_last": self.drop_last,
            "global_batch_size": self.global_batch_size,
            "epoch": self.epoch,
            "consumed_global_batches": self._global_batch,
            "micro_batch": self._micro_batch,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        Raises:
            ValueError: the state belongs to other data (fingerprint), another split, seed,
                shuffle settings or global batch size, or was saved mid-step under another
                micro-batch size or DP size.
        """
        if state.get("kind", "single") != "single":
            raise ValueError(
                f"loader state was saved by a {state.get('kind')} loader (data.train was a blend) "
                "but data.train is now a single source"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {_STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"loader state was saved for data with fingerprint {state['fingerprint'][:16]}... "
                f"but split {self.split!r} of {self.manifest.path} has fingerprint "
                f"{self.fingerprint[:16]}...: the data changed"
            )
        check_resume_settings(
            self, state, ("split", "seed", "shuffle", "shuffle_window_shards", "drop_last", "global_batch_size")
        )
        consumed = int(state["consumed_global_batches"])
        if consumed // self.batches_per_epoch != state["epoch"]:
            raise ValueError(
                f"loader state is inconsistent: epoch {state['epoch']} at global batch {consumed}"
            )
        self._global_batch, self._micro_batch = consumed, int(state["micro_batch"])

    def close(self) -> None:
        """Release the open shards and stop prefetching."""
        while self._files:
            self._files.popitem()[1].close()
        self._store.close()

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
        shard_of = np.searchsorted(self._shard_start, mine[keep], side="right") - 1
        shards, first = np.unique(shard_of, return_index=True)
        by_use = np.argsort(first, kind="stable")
        result = (shards[by_use], batch_of[keep][first[by_use]])
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
        maxes = np.array([store["skipped_shards"]], dtype=np.float64)
        sums, maxes = reduce_counters(sums, maxes, group, device)
        return {
            "data/skipped_shards": float(maxes[0]),
            "data/skipped_samples": float(sums[0]),
            "data/fetched_shards": float(sums[1]),
            "data/fetched_gb": float(sums[2]),
            "data/fetch_s": float(sums[3]),
            "data/failed_attempts": float(sums[4]),
            "data/cache_evictions": float(sums[5]),
        }

    @property
    def skipped_shards(self) -> dict[str, str]:
        """Shards skipped so far in this process: ``{name: error}``."""
        return {self._store.name(i): err for i, err in self._store.bad.items()}
