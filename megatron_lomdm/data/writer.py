"""Rows -> tar shards: the writing side of the shard format (``format``), and the two layouts.

``SplitWriter`` writes the rows of one split into blocks and size-bounded shards (written as
``*.tar.tmp``, renamed when closed, each one's sha256 recorded); ``Packer`` (``packed``) and
``Padder`` (``padded``) turn tokenized documents into rows. ``preprocess.write_shards`` drives
them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lomdm.data.format import (
    COND_MEMBER,
    LENGTHS_MEMBER,
    TAR_BLOCK,
    TOKENS_MEMBER,
    pack_cond,
)
from megatron_lomdm.data.tokenize import TokenizerInfo

__all__ = ["CONDITIONING_NEEDS_PADDED", "Packer", "Padder", "SplitWriter", "make_layout", "naming"]

CONDITIONING_NEEDS_PADDED = (
    "prompt/response records (--prompt-key) need --layout padded: one record per row, so that "
    "every row starts with its own prompt (packed rows would cut records across rows)"
)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an ``OSError`` of a write (ENOSPC, EFBIG...: they carry no file name) the file's."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(
        stream, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False
    )
    return stream.getvalue()


class SplitWriter:
    """Writes the rows of one split into blocks and size-bounded shards.

    With ``conditioned`` every block also gets the ``cond`` member (``format``).
    """

    def __init__(
        self,
        folder: Path,
        split: str,
        *,
        seq_length: int,
        dtype: np.dtype,
        pad_id: int,
        shard_bytes: int,
        block_rows: int,
        conditioned: bool = False,
    ) -> None:
        self.folder, self.split, self.seq_length, self.dtype = folder, split, seq_length, dtype
        self.conditioned = conditioned
        self.block_cond = np.zeros((block_rows, seq_length) if conditioned else (0, 0), dtype=bool)
        self.num_cond_tokens = 0
        self.pad_id, self.shard_bytes, self.block_rows = pad_id, shard_bytes, block_rows
        self.block = np.full((block_rows, seq_length), pad_id, dtype=dtype)
        self.block_lengths = np.zeros(block_rows, dtype=np.int32)
        self.block_fill = 0
        self.rows_written = 0
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self.num_truncated = 0
        self._file: Any = None

    def add_rows(
        self, rows: np.ndarray, lengths: np.ndarray, cond: np.ndarray | None = None
    ) -> None:
        """Append rows ``(n, seq_length)`` with their real lengths ``(n,)`` and, for a
        conditioned writer, their conditioning masks ``(n, seq_length)`` bool."""
        if (cond is not None) != self.conditioned:
            raise ValueError("a conditioned writer takes a cond mask with every row, no other does")
        start = 0
        while start < len(rows):
            take = min(self.block_rows - self.block_fill, len(rows) - start)
            self.block[self.block_fill : self.block_fill + take] = rows[start : start + take]
            self.block_lengths[self.block_fill : self.block_fill + take] = lengths[
                start : start + take
            ]
            if cond is not None:
                self.block_cond[self.block_fill : self.block_fill + take] = cond[start : start + take]
            self.block_fill += take
            start += take
            if self.block_fill == self.block_rows:
                self._flush_block()

    def _flush_block(self) -> None:
        if self.block_fill == 0:
            return
        if self._file is None:
            self._open_shard()
        key = f"{self.rows_written:010d}"
        n = self.block_fill
        members = [(TOKENS_MEMBER, self.block[:n]), (LENGTHS_MEMBER, self.block_lengths[:n])]
        if self.conditioned:
            members.append((COND_MEMBER, pack_cond(self.block_cond[:n])))
            self.num_cond_tokens += int(self.block_cond[:n].sum())
        for member, array in members:
            data = _npy_bytes(array)
            self._write(
                _tar_header(f"{key}.{member}", len(data)) + data + b"\0" * (-len(data) % TAR_BLOCK)
            )
        shard = self.shards[-1]
        shard["num_samples"] += n
        shard["num_tokens"] += int(self.block_lengths[:n].sum())
        shard["num_blocks"] += 1
        self.rows_written += n
        self.block_fill = 0
        self.block[:] = self.pad_id
        self.block_cond[:] = False
        if shard["bytes"] >= self.shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = open(self.folder / (name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self.shards.append(
            {"name": name, "num_samples": 0, "num_tokens": 0, "num_blocks": 0, "bytes": 0}
        )

    def _write(self, data: bytes) -> None:
        with naming(self._file.name):
            self._file.write(data)
        self._hash.update(data)
        self.shards[-1]["bytes"] += len(data)

    def _close_shard(self) -> None:
        self._write(b"\0" * (2 * TAR_BLOCK))  # end-of-archive marker
        with naming(self._file.name):
            self._file.close()
        self._file = None
        shard = self.shards[-1]
        shard["sha256"] = self._hash.hexdigest()
        os.replace(self.folder / (shard["name"] + ".tmp"), self.folder / shard["name"])

    def finish(self) -> dict[str, Any]:
        """Flush and close; return this split's manifest entry."""
        self._flush_block()
        if self._file is not None:
            self._close_shard()
        return {
            "num_samples": self.rows_written,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_documents": self.num_documents,
            "num_truncated_documents": self.num_truncated,
            **({"num_cond_tokens": self.num_cond_tokens} if self.conditioned else {}),
            "shards": self.shards,
        }


def _frame_documents(
    ids: np.ndarray, lengths: np.ndarray, prefix: list[int], suffix: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``prefix``/``suffix`` ids around each document of a concatenation (vectorized)."""
    framed = lengths + len(prefix) + len(suffix)
    out = np.empty(int(framed.sum()), dtype=np.int64)
    starts = np.cumsum(framed) - framed
    content = np.ones(out.size, dtype=bool)
    for k, token in enumerate(prefix):
        out[starts + k] = token
        content[starts + k] = False
    for k, token in enumerate(suffix):
        pos = starts + len(prefix) + lengths + k
        out[pos] = token
        content[pos] = False
    out[content] = ids
    return out, framed


class Packer:
    """``packed`` layout: documents -> one stream -> fixed-length rows."""

    def __init__(
        self, writer: SplitWriter, *, bos_id: int | None, eos_id: int, frame_chunks: bool
    ) -> None:
        self.writer = writer
        self.frame = [bos_id, eos_id] if frame_chunks else []
        if frame_chunks:
            self.doc_prefix: list[int] = []
        else:
            self.doc_prefix = [bos_id] if bos_id is not None and bos_id != eos_id else []
        self.doc_suffix = [eos_id]
        self.content = writer.seq_length - len(self.frame)
        self.carry = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray, lengths: np.ndarray, given: np.ndarray | None = None) -> None:
        if given is not None:
            raise ValueError(CONDITIONING_NEEDS_PADDED)
        stream, _ = _frame_documents(ids, lengths, self.doc_prefix, self.doc_suffix)
        self.writer.num_documents += len(lengths)
        stream = np.concatenate([self.carry, stream])
        n_full = len(stream) // self.content
        if n_full:
            body = stream[: n_full * self.content].reshape(n_full, self.content)
            self.writer.add_rows(
                self._rows(body), np.full(n_full, self.writer.seq_length, np.int32)
            )
        self.carry = stream[n_full * self.content :]

    def _rows(self, body: np.ndarray) -> np.ndarray:
        if not self.frame:
            return body
        n = len(body)
        return np.concatenate(
            [np.full((n, 1), self.frame[0]), body, np.full((n, 1), self.frame[1])], axis=1
        )

    def finish(self) -> None:
        if not len(self.carry):
            return
        row = self._rows(self.carry[None, :])[0]
        padded = np.full((1, self.writer.seq_length), self.writer.pad_id, dtype=np.int64)
        padded[0, : len(row)] = row
        self.writer.add_rows(padded, np.array([len(row)], np.int32))
        self.carry = np.zeros(0, dtype=np.int64)


class Padder:
    """``padded`` layout: one document per row, truncated (keeping EOS) and padded.

    With ``given`` (conditioned records: one bool per id, True at a given token: the prompt of a
    prompt/response record, the ``cond`` of a pre-tokenized one), ``[BOS]`` and the given ids are
    the row's conditioned positions; ``[EOS]`` is not (it is generated, as a response's end). The
    caller guarantees that a record's given ids fit in the row (``max_prompt_tokens``) and that
    it keeps a free id.
    """

    def __init__(self, writer: SplitWriter, *, bos_id: int | None, eos_id: int) -> None:
        self.writer = writer
        self.prefix = [bos_id] if bos_id is not None else []
        self.eos_id = eos_id
        self.room = writer.seq_length - len(self.prefix) - 1

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves one response token and EOS in a row."""
        return self.room - 1

    def add(self, ids: np.ndarray, lengths: np.ndarray, given: np.ndarray | None = None) -> None:
        n, seq_length = len(lengths), self.writer.seq_length
        rows = np.full((n, seq_length), self.writer.pad_id, dtype=np.int64)
        kept = np.minimum(lengths, self.room)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        p = len(self.prefix)
        if p:
            rows[:, 0] = self.prefix[0]
        for i in range(n):
            rows[i, p : p + kept[i]] = ids[offsets[i] : offsets[i] + kept[i]]
        rows[np.arange(n), p + kept] = self.eos_id
        self.writer.num_documents += n
        self.writer.num_truncated += int((lengths > self.room).sum())
        cond = None
        if given is not None:
            cond = np.zeros((n, seq_length), dtype=bool)
            cond[:, :p] = True
            for i in range(n):
                doc = given[offsets[i] : offsets[i] + lengths[i]]
                if doc[kept[i] :].any() or doc[: kept[i]].all():
                    raise AssertionError("a record's given tokens do not fit the row")
                cond[i, p : p + kept[i]] = doc[: kept[i]]
        self.writer.add_rows(rows, (p + kept + 1).astype(np.int32), cond)

    def finish(self) -> None:
        pass

def make_layout(
    layout: str, writer: SplitWriter, info: TokenizerInfo, frame_chunks: bool
) -> Packer | Padder:
    """The ``packed`` or ``padded`` layout writing into ``writer``."""
    if layout == "packed":
        return Packer(writer, bos_id=info.bos_id, eos_id=info.eos_id, frame_chunks=frame_chunks)
    return Padder(writer, bos_id=info.bos_id, eos_id=info.eos_id)
