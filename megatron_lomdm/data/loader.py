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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lomdm.data.shards import Manifest, ShardFile, check_tokenizer_compat, read_manifest

__all__ = ["ShardLoader", "check_tokenizer_compat", "read_manifest"]

_STATE_VERSION = 1
_MAX_OPEN_SHARDS = 16


class ShardLoader:
    """Iterate micro-batches of one DP rank over a shard folder (infinite unless ``num_epochs``).

    Args:
        path: the shard folder (or its ``manifest.json``).
        micro_batch_size: rows per yielded micro-batch.
        global_batch_size: rows per optimizer step over all DP ranks; a multiple of
            ``dp_size * micro_batch_size``.
        dp_rank: this process's data-parallel rank (from megatron ``parallel_state``).
        dp_size: the data-parallel world size.
        seed: seeds the per-epoch order.
        split: ``train`` or ``valid``.
        shuffle: shuffle (else the stored order every epoch).
        shuffle_window_shards: shards whose samples are shuffled together.
        drop_last: drop the last incomplete global batch of each epoch; otherwise fill it up with
            empty rows (``valid`` all False).
        num_epochs: stop after this many epochs; ``None`` iterates forever.

    Raises:
        ValueError: inconsistent batch sizes or ranks, or a split smaller than one global batch.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        split: str = "train",
        shuffle: bool = True,
        shuffle_window_shards: int = 8,
        drop_last: bool = True,
        num_epochs: int | None = None,
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
        self.manifest: Manifest = read_manifest(path)
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
        shards = self.manifest.split(split)["shards"]
        self._paths = self.manifest.shard_paths(split)
        self._shard_rows = np.array([s["num_samples"] for s in shards], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)
        self.num_samples = int(self._shard_start[-1])
        full, rest = divmod(self.num_samples, global_batch_size)
        self.batches_per_epoch = full if drop_last or not rest else full + 1
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {self.manifest.root} has {self.num_samples} samples, "
                f"fewer than "
                f"global_batch_size={global_batch_size}"
            )
        self.rows_per_rank = global_batch_size // dp_size
        self.num_micro_batches = self.rows_per_rank // micro_batch_size
        self.fingerprint = self.manifest.fingerprint(split)
        self._split_code = zlib.crc32(split.encode())
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._files: collections.OrderedDict[int, ShardFile] = collections.OrderedDict()
        self._global_batch = 0
        self._micro_batch = 0

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

    def _shard(self, shard: int) -> ShardFile:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        reader = ShardFile(
            self._paths[shard],
            dtype=self.manifest.dtype,
            seq_length=self.seq_length,
            expected_rows=int(self._shard_rows[shard]),
        )
        self._files[shard] = reader
        if len(self._files) > _MAX_OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return reader

    def read_samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read samples by split index (-1: an empty filler row).

        Returns:
            ``tokens`` (n, L) int64 and ``lengths`` (n,) int64.
        """
        tokens = np.full((len(indices), self.seq_length), self.pad_id, dtype=np.int64)
        lengths = np.zeros(len(indices), dtype=np.int64)
        real = np.flatnonzero(indices >= 0)
        shard_of = np.searchsorted(self._shard_start, indices[real], side="right") - 1
        for shard in np.unique(shard_of).tolist():
            rows = real[shard_of == shard]
            got, got_lengths = self._shard(shard).read(indices[rows] - self._shard_start[shard])
            tokens[rows] = got
            lengths[rows] = got_lengths
        return tokens, lengths

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        g, m = self._global_batch, self._micro_batch
        epoch = g // self.batches_per_epoch
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration
        first = self.dp_rank * self.rows_per_rank + m * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        tokens, lengths = self.read_samples(self.global_batch_indices(g)[positions])
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
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {_STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"loader state was saved for data with fingerprint {state['fingerprint'][:16]}... "
                f"but split {self.split!r} of {self.manifest.path} has fingerprint "
                f"{self.fingerprint[:16]}...: the data changed"
            )
        for key in (
            "split",
            "seed",
            "shuffle",
            "shuffle_window_shards",
            "drop_last",
            "global_batch_size",
        ):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}"
                )
        if state["micro_batch"] and (state["micro_batch_size"], state["dp_size"]) != (
            self.micro_batch_size,
            self.dp_size,
        ):
            raise ValueError(
                f"loader state was saved at micro-batch {state['micro_batch']} with "
                f"micro_batch_size={state['micro_batch_size']}, dp_size={state['dp_size']}; "
                f"it can only resume mid-step with the same "
                f"(here {self.micro_batch_size}, {self.dp_size})"
            )
        consumed = int(state["consumed_global_batches"])
        if consumed // self.batches_per_epoch != state["epoch"]:
            raise ValueError(
                f"loader state is inconsistent: epoch {state['epoch']} at global batch {consumed}"
            )
        self._global_batch, self._micro_batch = consumed, int(state["micro_batch"])

    def close(self) -> None:
        """Release the open shards."""
        while self._files:
            self._files.popitem()[1].close()
