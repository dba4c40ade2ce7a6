"""Random access to one local shard, checked against its manifest.

``ShardFile`` maps a shard (``mmap``: no copy, no cache folder) and checks what it reads against
the manifest (row lengths, token ids below ``vocab_size``, padding past each length);
``verify_shard_file`` checks a shard's size (at every open) and its sha256 (at the first open in
a process). A violation raises ``ShardDataError`` naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lomdm.data.format import (
    COND_MEMBER,
    LENGTHS_MEMBER,
    TAR_BLOCK,
    TOKENS_MEMBER,
    unpack_cond,
)

__all__ = ["ShardDataError", "ShardFile", "verify_shard_file"]


class ShardDataError(ValueError):
    """A shard's bytes or rows disagree with its manifest; the message names the shard."""


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) hashed here
_VERIFIED_LOCK = threading.Lock()


def verify_shard_file(
    path: Path, entry: dict[str, Any], manifest: str, *, digest: bool = True
) -> None:
    """Check a local shard against its manifest entry: the size always, the sha256 (``digest``)
    once per file per process (again if the file changes). About 0.6 GB/s of sha256 per core,
    paid at the first open of each shard; the loader's own reads touch far fewer bytes per step.

    Raises:
        ShardDataError: missing, truncated, replaced or corrupt, naming the shard and the
            manifest's size and digest.
    """
    want_size, want_sha = entry.get("bytes"), entry.get("sha256")
    expected = f"the manifest {manifest} says {want_size} bytes, sha256 {want_sha}"
    try:
        st = path.stat()
    except OSError as err:
        raise ShardDataError(f"shard {path}: cannot be read ({err.strerror}); {expected}") from err
    if want_size is not None and st.st_size != int(want_size):
        raise ShardDataError(
            f"shard {path}: {st.st_size} bytes but {expected}: truncated or replaced; copy it "
            "again or rerun tools/preprocess_data.py"
        )
    if not want_sha or not digest:
        return
    key = (str(path), st.st_size, st.st_mtime_ns, want_sha)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return
    got = _sha256(path, expected)
    if got != want_sha:
        raise ShardDataError(
            f"shard {path}: sha256 {got} but {expected}: the file is corrupt; "
            "copy it again or rerun tools/preprocess_data.py"
        )
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


def _sha256(path: Path, expected: str) -> str:
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    except OSError as err:
        raise ShardDataError(f"shard {path}: cannot be read ({err.strerror}); {expected}") from err
    return hasher.hexdigest()


class ShardFile:
    """Random access to the rows of one shard through ``mmap`` (no copy, no cache folder).

    Opening walks the tar headers once (two members per block), checks the npy headers and the
    row lengths (``0 <= length <= seq_length``, and their sum when ``expected_tokens`` is given).
    ``read`` checks the rows it returns: ids below ``vocab_size`` and ``pad_id`` past each length
    (when given). A violation raises ``ShardDataError`` naming the shard, the block and the value.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: np.dtype,
        seq_length: int,
        expected_rows: int | None = None,
        expected_tokens: int | None = None,
        vocab_size: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype, self.seq_length = np.dtype(dtype), seq_length
        self.vocab_size, self.pad_id = vocab_size, pad_id
        with open(self.path, "rb") as stream:
            self._mm = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        self._read_blocks()
        self._check_lengths(expected_rows, expected_tokens)

    def _read_blocks(self) -> None:
        """The blocks (from the tar headers) and every row's length."""
        tokens, lengths, cond = self._index()
        keys = sorted(tokens)
        if sorted(lengths) != keys:
            raise ShardDataError(
                f"{self.path}: blocks without both {TOKENS_MEMBER} and {LENGTHS_MEMBER}"
            )
        self.block_keys = keys
        self.block_rows = np.array([tokens[k][1] for k in keys], dtype=np.int64)
        self.tokens_offset = np.array([tokens[k][0] for k in keys], dtype=np.int64)
        self.lengths_offset = np.array([lengths[k][0] for k in keys], dtype=np.int64)
        for k in keys:
            if lengths[k][1] != tokens[k][1]:
                raise ShardDataError(
                    f"{self.path}: block {k} has {tokens[k][1]} rows but {lengths[k][1]} lengths"
                )
        self._read_cond_index(keys, tokens, cond)
        self.block_start = np.concatenate([[0], np.cumsum(self.block_rows)]).astype(np.int64)
        self.num_rows = int(self.block_start[-1])
        self.lengths = np.concatenate(
            [
                np.frombuffer(self._mm, np.int32, int(n), int(o))
                for n, o in zip(self.block_rows, self.lengths_offset, strict=True)
            ]
            or [np.zeros(0, np.int32)]
        ).astype(np.int64)

    def _read_cond_index(
        self,
        keys: list[str],
        tokens: dict[str, tuple[int, int]],
        cond: dict[str, tuple[int, int]],
    ) -> None:
        """The ``cond`` members' offsets: in every block or in none (``format``)."""
        self.conditioned = bool(cond)
        if cond and sorted(cond) != keys:
            raise ShardDataError(f"{self.path}: some blocks have a {COND_MEMBER} member, others not")
        for k in keys if cond else ():
            if cond[k][1] != tokens[k][1]:
                raise ShardDataError(
                    f"{self.path}: block {k} has {tokens[k][1]} rows but {cond[k][1]} cond rows"
                )
        self.cond_offset = np.array([cond[k][0] for k in keys] if cond else [], dtype=np.int64)

    def _check_lengths(self, expected_rows: int | None, expected_tokens: int | None) -> None:
        """Rows and their lengths against the manifest and ``seq_length``."""
        seq_length = self.seq_length
        if expected_rows is not None and self.num_rows != expected_rows:
            raise ShardDataError(
                f"{self.path}: {self.num_rows} samples but the manifest says {expected_rows}"
            )
        bad = np.flatnonzero((self.lengths < 0) | (self.lengths > seq_length))
        if len(bad):
            raise ShardDataError(
                f"{self.path}: {self._where(int(bad[0]))} has length {self.lengths[bad[0]]}, "
                f"outside [0, seq_length={seq_length}]"
            )
        if expected_tokens is not None and int(self.lengths.sum()) != expected_tokens:
            raise ShardDataError(
                f"{self.path}: its row lengths sum to {int(self.lengths.sum())} tokens but the "
                f"manifest says {expected_tokens}"
            )

    def _where(self, row: int) -> str:
        """``row R (sample KEY, row r of its block)`` for messages."""
        block = int(np.searchsorted(self.block_start, row, side="right") - 1)
        within = row - int(self.block_start[block])
        return f"row {row} (sample {self.block_keys[block]}, row {within} of its block)"

    def _index(
        self,
    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        mm, offset = self._mm, 0
        tokens: dict[str, tuple[int, int]] = {}
        lengths: dict[str, tuple[int, int]] = {}
        cond: dict[str, tuple[int, int]] = {}
        while offset + TAR_BLOCK <= len(mm):
            header = mm[offset : offset + TAR_BLOCK]
            if header.count(0) == TAR_BLOCK:
                break
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
            except tarfile.TarError as err:
                raise ShardDataError(
                    f"{self.path}: corrupt tar header at byte {offset} ({err})"
                ) from err
            data = offset + TAR_BLOCK
            key, _, member = info.name.partition(".")
            if member == TOKENS_MEMBER:
                tokens[key] = self._npy(data, info.size, (self.seq_length,), self.dtype)
            elif member == LENGTHS_MEMBER:
                lengths[key] = self._npy(data, info.size, (), np.dtype(np.int32))
            elif member == COND_MEMBER:
                cond[key] = self._npy(data, info.size, (self._cond_bytes,), np.dtype(np.uint8))
            offset = data + info.size + (-info.size % TAR_BLOCK)
        return tokens, lengths, cond

    @property
    def _cond_bytes(self) -> int:
        return -(-self.seq_length // 8)

    def _npy(
        self, offset: int, size: int, row_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[int, int]:
        stream = io.BytesIO(self._mm[offset : offset + min(size, 4096)])
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, found = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, found = np.lib.format.read_array_header_2_0(stream)
        if found != dtype or fortran or tuple(shape[1:]) != row_shape:
            raise ShardDataError(
                f"{self.path}: member at byte {offset} is {found}{tuple(shape)}, "
                f"expected {dtype}(rows, *{row_shape})"
            )
        return offset + stream.tell(), int(shape[0])

    def read(self, rows: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Read rows (indices within this shard).

        Returns:
            ``tokens`` (n, seq_length) in the stored dtype and ``lengths`` (n,) int64.
        """
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        blocks = np.searchsorted(self.block_start, rows, side="right") - 1
        within = rows - self.block_start[blocks]
        row_bytes = self.seq_length * self.dtype.itemsize
        starts = (self.tokens_offset[blocks] + within * row_bytes).tolist()
        tokens = np.empty((len(rows), self.seq_length), dtype=self.dtype)
        for i, start in enumerate(starts):
            tokens[i] = np.frombuffer(self._mm, self.dtype, self.seq_length, start)
        lengths = self.lengths[rows]
        self._check_rows(rows, tokens, lengths)
        return tokens, lengths

    def _check_rows(self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(rows):
            return
        # reductions first (cheap); the position is only looked for when something is wrong
        if self.vocab_size is not None and (
            tokens.max() >= self.vocab_size or (self.dtype.kind == "i" and tokens.min() < 0)
        ):
            i, j = (int(x[0]) for x in np.nonzero((tokens >= self.vocab_size) | (tokens < 0)))
            raise ShardDataError(
                f"{self.path}: {self._where(int(rows[i]))} holds token id {tokens[i, j]} at "
                f"position {j}, outside the manifest's vocab_size={self.vocab_size}"
            )
        if self.pad_id is None or lengths.min() >= self.seq_length:  # packed rows: mostly full
            return
        short = np.flatnonzero(lengths < self.seq_length)
        past = np.arange(self.seq_length)[None, :] >= lengths[short, None]
        wrong = past & (tokens[short] != self.pad_id)
        if wrong.any():
            k, j = (int(x[0]) for x in np.nonzero(wrong))
            i = int(short[k])
            raise ShardDataError(
                f"{self.path}: {self._where(int(rows[i]))} has length {lengths[i]} but token "
                f"{tokens[i, j]} (not pad_id={self.pad_id}) at position {j}: the length "
                "disagrees with the token array"
            )

    def read_cond(self, rows: Iterable[int], lengths: np.ndarray) -> np.ndarray:
        """The conditioning masks of rows (indices within this shard) whose ``lengths`` were
        just read: ``(n, seq_length)`` bool, all False for a shard without the member.

        Raises:
            ShardDataError: a conditioned position at or past its row's length.
        """
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        if not self.conditioned:
            return np.zeros((len(rows), self.seq_length), dtype=bool)
        blocks = np.searchsorted(self.block_start, rows, side="right") - 1
        within = rows - self.block_start[blocks]
        starts = (self.cond_offset[blocks] + within * self._cond_bytes).tolist()
        bits = np.empty((len(rows), self._cond_bytes), dtype=np.uint8)
        for i, start in enumerate(starts):
            bits[i] = np.frombuffer(self._mm, np.uint8, self._cond_bytes, start)
        cond = unpack_cond(bits, self.seq_length)
        past = cond & (np.arange(self.seq_length)[None, :] >= np.asarray(lengths)[:, None])
        if past.any():
            i, j = (int(x[0]) for x in np.nonzero(past))
            raise ShardDataError(
                f"{self.path}: {self._where(int(rows[i]))} is conditioned at position {j}, at or "
                f"past its length {int(lengths[i])}"
            )
        return cond

    def close(self) -> None:
        """Release the mapping."""
        self._mm.close()
