"""Tokenized WebDataset shards: layouts, the writer, the manifest and random-access reading.

Folder written by ``write_shards`` (``tools/preprocess_data.py``)::

    OUT/manifest.json            written last; its presence marks the folder complete
    OUT/train-000000.tar ...     WebDataset shards of the train split
    OUT/valid-000000.tar ...     the valid split (when --valid-fraction > 0)
    OUT/wids-train.json ...      wids shard indexes (``wids.ShardListDataset(path)``)

Shard format. A *sample* of the dataset is one sequence of ``seq_length`` token ids. To keep the
tar overhead (512-byte headers and padding per member) small, sequences are stored in *blocks*
of up to ``block_rows`` rows; each block is one WebDataset sample with two members::

    {first_row:010d}.tokens.npy    (rows, seq_length) uint16 (vocab <= 65535) or int32
    {first_row:010d}.lengths.npy   (rows,) int32: real tokens of each row, >= 1

Positions ``>= length`` hold ``pad_id``. ``first_row`` numbers the sequences of a split from 0.
Tar headers are deterministic (mtime 0, no owner), so the same inputs give byte-identical shards
for any worker count; each shard's sha256 is in the manifest.

Layouts (``method.md`` §4.1):

* ``packed``: documents become ``[BOS] ids [EOS]`` (no BOS when the tokenizer has none or it
  equals EOS) and are concatenated into one stream per split, cut into rows of ``seq_length``.
  With ``frame_chunks`` (the MDLM/BD3LM ``wrap`` convention), documents become ``ids [EOS]`` and
  each row is ``[BOS] + seq_length-2 stream tokens + [EOS]``. The last row of a split is padded.
* ``padded``: one document per row, ``[BOS] ids [EOS]`` truncated to ``seq_length`` (keeping the
  final EOS), then padded.

Atomicity. Output goes to the hidden sibling ``.NAME.incomplete``; shards are written as
``*.tar.tmp`` and renamed when closed; the manifest is written last and the folder renamed to
``NAME`` at the very end. A crash therefore never leaves a folder with a ``manifest.json``.
A rerun removes a leftover ``.NAME.incomplete`` and starts over (no partial resume); a rerun
into a complete folder is refused unless ``overwrite``, and a folder this tool did not write (one
holding anything but a manifest of this format and the files it names) is never replaced. A write
that fails (full disk, read-only folder) raises ``OSError`` naming the file, after removing the
temporary folder.

Memory. Documents longer than ``tokenize.DOCUMENT_CHUNK_CHARS`` (256 Ki characters) are tokenized
in chunks (``tokenize.DocumentEncoder``), so one huge document costs about 15 bytes of memory per
byte of its record (its text, ~30 bytes per token of ids and packing, at most one token per byte)
plus ~40 MB of tokenizer working set per process, instead of ~150 bytes per byte. Measured peak
RSS for one 20 MB single-line JSONL document: 0.33 GB (was 2.9 GB).

Reading. ``ShardFile`` checks what it reads against the manifest (row lengths, token ids below
``vocab_size``, padding past each length); the loader also checks each local shard's size at every
open and its sha256 at the first open in a process (``verify_shard_file``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lomdm.data.tokenize import (
    DETOKENIZERS,
    ERROR_REASONS,
    BadRecord,
    DocumentEncoder,
    EncodedBatch,
    HFDatasetInput,
    TokenizerInfo,
    bad_record_message,
    batched_records,
    encode_in_worker,
    expand_inputs,
    init_worker,
    is_datasets_file,
    load_tokenizer,
)
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

FORMAT_NAME = "megatron_lomdm.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYOUTS = ("packed", "padded")
SPLITS = ("train", "valid")
# The shard names this tool writes: `SPLIT-NNNNNN.tar`. A manifest naming anything else is refused:
# names become file paths and are substituted into `pipe:` shell commands.
SHARD_NAME = re.compile(r"(?P<split>[A-Za-z0-9_]+)-[0-9]{6,}\.tar")
TOKENS_MEMBER = "tokens.npy"
LENGTHS_MEMBER = "lengths.npy"
_BLOCK = 512  # tar block size
_MAX_BLOCK_BYTES = 1 << 20  # target size of one block's tokens member


def storage_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype: uint16 when every id fits (vocab_size <= 65535), else int32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max else np.dtype(np.int32)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _naming(path: str | Path) -> Iterator[None]:
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


class _SplitWriter:
    """Writes the rows of one split into blocks and size-bounded shards."""

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
    ) -> None:
        self.folder, self.split, self.seq_length, self.dtype = folder, split, seq_length, dtype
        self.pad_id, self.shard_bytes, self.block_rows = pad_id, shard_bytes, block_rows
        self.block = np.full((block_rows, seq_length), pad_id, dtype=dtype)
        self.block_lengths = np.zeros(block_rows, dtype=np.int32)
        self.block_fill = 0
        self.rows_written = 0
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self.num_truncated = 0
        self._file: Any = None

    def add_rows(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Append rows ``(n, seq_length)`` with their real lengths ``(n,)``."""
        start = 0
        while start < len(rows):
            take = min(self.block_rows - self.block_fill, len(rows) - start)
            self.block[self.block_fill : self.block_fill + take] = rows[start : start + take]
            self.block_lengths[self.block_fill : self.block_fill + take] = lengths[
                start : start + take
            ]
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
        for member, array in (
            (TOKENS_MEMBER, self.block[:n]),
            (LENGTHS_MEMBER, self.block_lengths[:n]),
        ):
            data = _npy_bytes(array)
            self._write(
                _tar_header(f"{key}.{member}", len(data)) + data + b"\0" * (-len(data) % _BLOCK)
            )
        shard = self.shards[-1]
        shard["num_samples"] += n
        shard["num_tokens"] += int(self.block_lengths[:n].sum())
        shard["num_blocks"] += 1
        self.rows_written += n
        self.block_fill = 0
        self.block[:] = self.pad_id
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
        with _naming(self._file.name):
            self._file.write(data)
        self._hash.update(data)
        self.shards[-1]["bytes"] += len(data)

    def _close_shard(self) -> None:
        self._write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        with _naming(self._file.name):
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


class _Packer:
    """``packed`` layout: documents -> one stream -> fixed-length rows."""

    def __init__(
        self, writer: _SplitWriter, *, bos_id: int | None, eos_id: int, frame_chunks: bool
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

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
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


class _Padder:
    """``padded`` layout: one document per row, truncated (keeping EOS) and padded."""

    def __init__(self, writer: _SplitWriter, *, bos_id: int | None, eos_id: int) -> None:
        self.writer = writer
        self.prefix = [bos_id] if bos_id is not None else []
        self.eos_id = eos_id
        self.room = writer.seq_length - len(self.prefix) - 1

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
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
        self.writer.add_rows(rows, (p + kept + 1).astype(np.int32))

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` and where it was read from.

    Indexing (``manifest["layout"]``) reads the raw JSON; the properties are typed shortcuts.
    ``source`` is empty for a local folder; for a remote source (``http(s)://``, ``pipe:``; see
    ``data.sources``) it is where the manifest came from, and ``path`` is its copy in the shard
    cache (the folder the shards are downloaded to).
    """

    path: Path
    data: dict[str, Any]
    source: str = ""

    @property
    def location(self) -> str:
        """Where the manifest was read from: its URL / ``pipe:`` command, or its local path."""
        return self.source or str(self.path)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def root(self) -> Path:
        """The shard folder."""
        return self.path.parent

    @property
    def layout(self) -> str:
        """``packed`` or ``padded``."""
        return self.data["layout"]

    @property
    def seq_length(self) -> int:
        """Tokens per sequence."""
        return int(self.data["seq_length"])

    @property
    def dtype(self) -> np.dtype:
        """The on-disk token dtype."""
        return np.dtype(self.data["dtype"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer identity and special ids (``TokenizerInfo.to_dict()``)."""
        return self.data["tokenizer"]

    def split(self, name: str) -> dict[str, Any]:
        """One split's entry (``num_samples``, ``num_tokens``, ``shards``...).

        Raises:
            ValueError: the split does not exist in this folder.
        """
        splits = self.data["splits"]
        if name not in splits:
            raise ValueError(f"{self.path}: no split {name!r} (available: {sorted(splits)})")
        return splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        """Absolute paths of a split's shards, in manifest order."""
        return [self.root / shard["name"] for shard in self.split(split)["shards"]]

    def fingerprint(self, split: str | None = None) -> str:
        """A hash of what defines the data (format, layout, tokenizer, shard contents).

        Paths, timings and the command line are left out, so a moved or copied folder keeps its
        fingerprint.
        """
        keys = ("format", "format_version", "layout", "frame_chunks", "seq_length", "dtype")
        content: dict[str, Any] = {k: self.data.get(k) for k in keys}
        content["tokenizer"] = self.tokenizer.get("tokenizer_json_sha256")
        names = [split] if split is not None else sorted(self.data["splits"])
        content["splits"] = {
            n: [
                (s["name"], s["num_samples"], s["num_tokens"], s["sha256"])
                for s in self.split(n)["shards"]
            ]
            for n in names
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | Path | list[Any]) -> Manifest:
    """Read and validate the manifest of a shard folder or of any shard source.

    Args:
        path: the folder written by ``tools/preprocess_data.py`` or its ``manifest.json``; or any
            source spec of ``data.sources`` (``file://``, ``http(s)://``, ``pipe:``, a brace
            pattern of shard locations), whose manifest is fetched from next to the shards; or a
            ``data.train`` blend (a list of ``{source, weight}``), which gives the manifest of its
            first source after checking that every source has the same tokenizer and length.

    Raises:
        ValueError: no manifest (not a shard folder, or an incomplete one), another format, a
            newer format version, or a manifest not marked complete.
    """
    if isinstance(path, (list, tuple)) or _is_source_spec(str(path)):
        from megatron_lomdm.data.sources import read_source_manifest  # noqa: PLC0415 (cycle)

        return read_source_manifest(path)
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise ValueError(
            f"{file}: no manifest; {file.parent} is not a complete shard folder written by "
            "tools/preprocess_data.py"
        )
    data = parse_manifest(file.read_bytes(), str(file))
    return Manifest(path=file.resolve(), data=data)


def _is_source_spec(text: str) -> bool:
    from megatron_lomdm.data.sources import is_source_spec  # noqa: PLC0415 (cycle)

    return is_source_spec(text)


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and validate the bytes of a ``manifest.json`` read from ``where`` (for messages).

    Raises:
        ValueError: not JSON, another format, a newer format version, or not marked complete.
    """
    file = where
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{file}: format {got!r} is not {FORMAT_NAME!r}")
    if int(data.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {data.get('format_version')} is newer than this code "
            f"reads ({FORMAT_VERSION})"
        )
    if data.get("complete") is not True:
        raise ValueError(f"{file}: the manifest is not marked complete")
    _check_shard_names(data, file)
    return data


def _check_shard_names(data: dict[str, Any], where: str) -> None:
    """Every shard of a split is named `SPLIT-NNNNNN.tar` after that split, as the writer names it."""
    splits = data.get("splits")
    for split, entry in (splits.items() if isinstance(splits, dict) else ()):
        shards = entry.get("shards") if isinstance(entry, dict) else None
        for shard in shards if isinstance(shards, list) else ():
            name = shard.get("name") if isinstance(shard, dict) else shard
            match = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
            if match is None or match["split"] != split:
                raise ValueError(
                    f"{where}: shard name {name!r} of split {split!r} is not one this tool writes "
                    f"({split}-NNNNNN.tar); refusing the manifest (shard names become file paths and "
                    "pipe: commands)"
                )


def check_tokenizer_compat(
    manifest: Manifest | str | Path,
    *,
    vocab_size: int | None = None,
    mask_id: int | None = None,
    pad_id: int | None = None,
    seq_length: int | None = None,
) -> None:
    """Check that a model config agrees with the shards; ``None`` arguments are not checked.

    ``vocab_size`` is the model's embedding size: it must be at least the manifest's
    ``model_vocab_size`` (a larger, e.g. TP-padded, vocabulary is fine) and above ``mask_id``.
    ``mask_id``, ``pad_id`` and ``seq_length`` must equal the manifest's.

    Raises:
        ValueError: naming the config value, the manifest value and the manifest path.
    """
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    tok, where = manifest.tokenizer, manifest.path
    if vocab_size is not None and vocab_size < tok["model_vocab_size"]:
        virtual = " (tokenizer vocab + a virtual [MASK] id)" if tok.get("mask_is_virtual") else ""
        raise ValueError(
            f"vocab_size={vocab_size} in the config but the shards need model_vocab_size="
            f"{tok['model_vocab_size']}{virtual} ({where})"
        )
    for name, value, expected in (
        ("mask_id", mask_id, tok["mask_id"]),
        ("pad_id", pad_id, tok["pad_id"]),
        ("seq_length", seq_length, manifest.seq_length),
    ):
        if value is not None and int(value) != int(expected):
            raise ValueError(f"{name}={value} in the config but {name}={expected} in {where}")
    if vocab_size is not None and mask_id is not None and mask_id >= vocab_size:
        raise ValueError(f"mask_id={mask_id} is outside vocab_size={vocab_size} ({where})")


# --------------------------------------------------------------------------------------------
# Reading (random access)
# --------------------------------------------------------------------------------------------


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
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    except OSError as err:
        raise ShardDataError(f"shard {path}: cannot be read ({err.strerror}); {expected}") from err
    if hasher.hexdigest() != want_sha:
        raise ShardDataError(
            f"shard {path}: sha256 {hasher.hexdigest()} but {expected}: the file is corrupt; "
            "copy it again or rerun tools/preprocess_data.py"
        )
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


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
        tokens, lengths = self._index()
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
        self.block_start = np.concatenate([[0], np.cumsum(self.block_rows)]).astype(np.int64)
        self.num_rows = int(self.block_start[-1])
        self.lengths = np.concatenate(
            [
                np.frombuffer(self._mm, np.int32, int(n), int(o))
                for n, o in zip(self.block_rows, self.lengths_offset, strict=True)
            ]
            or [np.zeros(0, np.int32)]
        ).astype(np.int64)
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

    def _index(self) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        mm, offset = self._mm, 0
        tokens: dict[str, tuple[int, int]] = {}
        lengths: dict[str, tuple[int, int]] = {}
        while offset + _BLOCK <= len(mm):
            header = mm[offset : offset + _BLOCK]
            if header.count(0) == _BLOCK:
                break
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
            except tarfile.TarError as err:
                raise ShardDataError(
                    f"{self.path}: corrupt tar header at byte {offset} ({err})"
                ) from err
            data = offset + _BLOCK
            key, _, member = info.name.partition(".")
            if member == TOKENS_MEMBER:
                tokens[key] = self._npy(data, info.size, (self.seq_length,), self.dtype)
            elif member == LENGTHS_MEMBER:
                lengths[key] = self._npy(data, info.size, (), np.dtype(np.int32))
            offset = data + info.size + (-info.size % _BLOCK)
        return tokens, lengths

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

    def close(self) -> None:
        """Release the mapping."""
        self._mm.close()


def read_split(
    manifest: Manifest | str | Path, split: str = "train"
) -> Iterable[tuple[np.ndarray, int]]:
    """Yield ``(tokens row, length)`` for every sample of a split in stored order (inspection)."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    for shard, path in zip(
        manifest.split(split)["shards"], manifest.shard_paths(split), strict=True
    ):
        reader = ShardFile(
            path,
            dtype=manifest.dtype,
            seq_length=manifest.seq_length,
            expected_rows=shard["num_samples"],
            expected_tokens=shard.get("num_tokens"),
            vocab_size=manifest.tokenizer.get("vocab_size"),
            pad_id=manifest.tokenizer.get("pad_id"),
        )
        tokens, lengths = reader.read(range(reader.num_rows))
        reader.close()
        yield from zip(tokens, lengths.tolist(), strict=True)


# --------------------------------------------------------------------------------------------
# write_shards
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
    """Running totals and a tqdm bar with docs/s, MB/s and tokens/s."""

    enabled: bool
    total_bytes: int | None
    start: float = dataclasses.field(default_factory=time.perf_counter)
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    _last: float = 0.0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_bytes,
            unit="B",
            unit_scale=True,
            disable=not self.enabled,
            desc="tokenizing",
            mininterval=0.5,
            smoothing=0.1,
        )

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        self.bar.update(num_bytes)
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.5:
            self._last = now
            self.bar.set_postfix_str(self._rates_str(), refresh=False)

    def rates(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {
            "seconds": seconds,
            "docs_per_s": self.documents / seconds,
            "mb_per_s": self.bytes / 1e6 / seconds,
            "tokens_per_s": self.tokens / seconds,
        }

    def _rates_str(self) -> str:
        r = self.rates()
        return f"{r['docs_per_s']:.0f} docs/s, {r['tokens_per_s'] / 1e3:.0f}k tok/s"

    def close(self) -> None:
        if self.enabled:
            self.bar.set_postfix_str(self._rates_str(), refresh=False)
        self.bar.close()


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise ValueError(
            f"{out} already holds a complete shard folder; pass --overwrite to replace it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        foreign = _foreign_entries(out)
        if foreign:
            raise ValueError(
                f"{out} is not a shard folder written by tools/preprocess_data.py (it holds "
                f"{', '.join(foreign)}); refusing to replace it, with or without --overwrite: "
                "choose another --output-dir or remove it yourself"
            )
    tmp = out.parent / f".{out.name}.incomplete"
    if tmp.exists():
        logger.warning("removing %s left by an interrupted run; starting over", tmp)
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:  # e.g. a read-only parent: name what the user asked for
        raise OSError(err.errno, err.strerror, str(out)) from err
    return tmp


def _foreign_entries(out: Path) -> list[str]:
    """What in ``out`` this tool did not write (at most 5 names); [] for one of its datasets:
    a ``manifest.json`` of this format plus the shards and ``wids-*.json`` files it names."""
    if not out.is_dir():
        return [f"{out.name} (not a folder)"]
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        ours = {MANIFEST_NAME} | {
            name
            for split, entry in data["splits"].items()
            for name in (f"wids-{split}.json", *(s["name"] for s in entry["shards"]))
        }
        if data.get("format") != FORMAT_NAME:
            ours = set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = set()
    names = sorted(p.name for p in out.iterdir())
    return [n for n in names if n not in ours][:5] if ours else names[:5]


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``tmp`` folder (rename; the old folder is removed)."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _naming(tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _Consumer:
    """Turns encoded batches into rows of the two splits and applies the bad-record policy.

    With ``valid_last`` > 0 the valid split is the last ``valid_last`` documents of the input
    order (held back until the end; the earlier ones go to train as soon as they are known not to
    be among the last).
    """

    def __init__(
        self,
        files: Sequence[Any],
        splits: dict[str, Any],
        skip_bad: bool,
        progress: _Progress,
        valid_last: int = 0,
    ) -> None:
        self.files, self.splits, self.skip_bad, self.progress = files, splits, skip_bad, progress
        self.rejected: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.valid_last = valid_last
        self.held: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self.held_docs = 0

    def __call__(self, batch: EncodedBatch) -> None:
        path = self.files[batch.file_index]
        for line, reason, detail in batch.rejected:
            if reason in ERROR_REASONS and not self.skip_bad:
                raise ValueError(bad_record_message(path, line, BadRecord(reason, detail)))
            self.rejected[reason] += 1
            if len(self.examples[reason]) < 5:
                self.examples[reason].append(f"{path}:{line}")
        doc_ends = np.cumsum(batch.lengths)
        if self.valid_last:
            self._hold(batch.ids, batch.lengths)
            self.progress.update(
                len(batch.lengths), int(doc_ends[-1]) if len(doc_ends) else 0, batch.num_bytes
            )
            return
        for name, selected in (("train", ~batch.to_valid), ("valid", batch.to_valid)):
            if not selected.any():
                continue
            if name not in self.splits:
                raise AssertionError("valid documents without a valid split")
            if selected.all():  # no copy (one huge document is many tokens)
                self.splits[name].add(batch.ids, batch.lengths)
                continue
            token_mask = np.repeat(selected, batch.lengths)
            self.splits[name].add(batch.ids[token_mask], batch.lengths[selected])
        self.progress.update(
            len(batch.lengths), int(doc_ends[-1]) if len(doc_ends) else 0, batch.num_bytes
        )

    def _hold(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        self.held.append((ids, lengths))
        self.held_docs += len(lengths)
        excess = self.held_docs - self.valid_last
        while excess > 0:
            first_ids, first_lengths = self.held[0]
            if len(first_lengths) <= excess:
                self.held.popleft()
                self.splits["train"].add(first_ids, first_lengths)
                self.held_docs -= len(first_lengths)
                excess -= len(first_lengths)
            else:
                cut = int(first_lengths[:excess].sum())
                self.splits["train"].add(first_ids[:cut], first_lengths[:excess])
                self.held[0] = (first_ids[cut:], first_lengths[excess:])
                self.held_docs -= excess
                excess = 0

    def finish(self) -> None:
        """Send the held-back last documents to the valid split."""
        while self.held:
            ids, lengths = self.held.popleft()
            self.splits["valid"].add(ids, lengths)
        self.held_docs = 0


def write_shards(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: str | Path,
    seq_length: int,
    layout: str = "packed",
    workers: int = 1,
    valid_fraction: float = 0.0,
    json_key: str = "text",
    text_mode: str = "file",
    shard_size_mb: float = 128.0,
    skip_bad: bool = False,
    seed: int = 0,
    frame_chunks: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
    batch_docs: int = 256,
    batch_mb: float = 4.0,
    hf_dataset: HFDatasetInput | None = None,
    valid_last_documents: int = 0,
    detokenizer: str | None = None,
) -> Manifest:
    """Tokenize raw text into WebDataset shards plus ``manifest.json`` (see the module docstring).

    Args:
        inputs: files, folders or globs: JSONL (by suffix: .jsonl/.json/.ndjson) or plain text,
            optionally .gz/.bz2/.xz/.zst; Parquet / Arrow files (and ``save_to_disk`` folders)
            are read through HF ``datasets``. May be empty when ``hf_dataset`` is given.
        output_dir: the folder to create.
        tokenizer: a local tokenizer file/folder or an HF hub name.
        seq_length: tokens per sequence.
        layout: ``packed`` or ``padded``.
        workers: tokenizer processes; 0 tokenizes in this process (tests, debugging).
        valid_fraction: fraction of documents (by a seeded hash of their text) in the valid split.
        json_key: the text field of JSONL records.
        text_mode: plain text as one document per ``file`` or per ``line``.
        shard_size_mb: target shard size (a shard closes at the first block boundary past it).
        skip_bad: skip and count bad records instead of raising.
        seed: seeds the train/valid split hash.
        frame_chunks: packed rows as ``[BOS] + seq_length-2 tokens + [EOS]`` (MDLM ``wrap``).
        overwrite: replace a complete (or foreign, non-empty) ``output_dir``.
        progress: show a tqdm bar.
        command: the command line to record (defaults to this process's ``sys.argv``).
        batch_docs: records per encoder task.
        batch_mb: raw megabytes per encoder task (whichever limit is hit first).
        hf_dataset: an HF ``datasets`` input (hub, streamed), read after ``inputs``.
        valid_last_documents: the valid split is the last N documents of the input order (the
            OpenWebText convention ``train[-100000:]``); exclusive with ``valid_fraction``.
        detokenizer: rewrite each document first (``DETOKENIZERS``: ``lm1b``).

    Returns:
        The manifest of the published folder.

    Raises:
        ValueError: bad arguments, a bad record (``file:line``) unless ``skip_bad``, an empty
            input, an existing output folder without ``overwrite``, or a folder this function did
            not write (never replaced). Nothing that looks complete is left behind.
        OSError: a file that cannot be written (full disk, read-only folder), its ``filename``
            set; the temporary output is removed.
    """
    _check_arguments(layout, valid_fraction, workers, shard_size_mb, frame_chunks)
    if valid_last_documents < 0 or (valid_last_documents and valid_fraction):
        raise ValueError("valid_last_documents must be >= 0 and not combined with valid_fraction")
    if detokenizer is not None and detokenizer not in DETOKENIZERS:
        raise ValueError(f"detokenizer must be one of {sorted(DETOKENIZERS)}, got {detokenizer!r}")
    files: list[Any] = expand_inputs(inputs) if inputs or hf_dataset is None else []
    if hf_dataset is not None:
        files.append(hf_dataset)
    tok, info = load_tokenizer(tokenizer)
    _check_seq_length(seq_length, layout, frame_chunks, info)
    out = Path(output_dir).absolute()
    dtype = storage_dtype(info.vocab_size)
    shard_bytes = max(int(shard_size_mb * 1e6), 1)
    block_rows = max(1, min(_MAX_BLOCK_BYTES, shard_bytes // 8) // (seq_length * dtype.itemsize))
    split_names = ["train", "valid"] if valid_fraction > 0 or valid_last_documents else ["train"]
    logger.info(
        "preprocessing %d input file(s) with %d worker(s) into %s", len(files), workers, out
    )
    tmp = _prepare_output(out, overwrite)
    try:
        writers = {
            name: _SplitWriter(
                tmp,
                name,
                seq_length=seq_length,
                dtype=dtype,
                pad_id=info.pad_id,
                shard_bytes=shard_bytes,
                block_rows=block_rows,
            )
            for name in split_names
        }
        layouts = {name: _make_layout(layout, w, info, frame_chunks) for name, w in writers.items()}
        unknown_size = any(
            not isinstance(p, Path)
            or is_datasets_file(p)
            or p.suffix.lower() in (".gz", ".bz2", ".xz", ".zst")
            for p in files
        )
        bar = _Progress(
            enabled=progress,
            total_bytes=None if unknown_size else sum(p.stat().st_size for p in files),
        )
        consumer = _Consumer(files, layouts, skip_bad, bar, valid_last=valid_last_documents)
        tasks = batched_records(
            files,
            text_mode=text_mode,
            max_docs=batch_docs,
            max_bytes=int(batch_mb * 1e6),
            text_field=json_key,
        )
        try:
            _run_encoders(
                tasks,
                consumer,
                workers,
                (tok.to_str(), json_key, valid_fraction, seed, detokenizer),
            )
        finally:
            bar.close()
        consumer.finish()
        for packer in layouts.values():
            packer.finish()
        results = {name: w.finish() for name, w in writers.items()}
        stats = {
            "num_input_files": len(files),
            "num_documents": bar.documents,
            "num_raw_tokens": bar.tokens,
            "input_bytes": bar.bytes,
            "rejected": dict(sorted(consumer.rejected.items())),
            "workers": workers,
            **{k: round(v, 3) for k, v in bar.rates().items()},
        }
        _check_results(inputs or [str(hf_dataset)], stats, results, valid_fraction)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": True,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": list(command) if command is not None else [sys.executable, *sys.argv],
            "inputs": [str(p) for p in files],
            "layout": layout,
            "frame_chunks": bool(frame_chunks),
            "seq_length": seq_length,
            "dtype": dtype.name,
            "sample_format": {
                "members": {
                    TOKENS_MEMBER: f"(rows, {seq_length}) {dtype.name}",
                    LENGTHS_MEMBER: "(rows,) int32",
                },
                "block_rows": block_rows,
                "pad_id": info.pad_id,
            },
            "tokenizer": info.to_dict(),
            "split_method": (
                {
                    "by": "the last documents of the input order",
                    "valid_last_documents": valid_last_documents,
                }
                if valid_last_documents
                else {
                    "by": "blake2b hash of the document text",
                    "seed": seed,
                    "valid_fraction": valid_fraction,
                }
            ),
            "detokenizer": detokenizer,
            "text_mode": text_mode,
            "json_key": json_key,
            "stats": stats,
            "splits": results,
        }
        _write_wids_indexes(tmp, out.name, results)
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_summary(out, manifest, consumer.examples)
    return read_manifest(out)


def _check_arguments(
    layout: str, valid_fraction: float, workers: int, shard_size_mb: float, frame_chunks: bool
) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    if frame_chunks and layout != "packed":
        raise ValueError("frame_chunks applies to the packed layout only")


def _check_seq_length(
    seq_length: int, layout: str, frame_chunks: bool, info: TokenizerInfo
) -> None:
    if frame_chunks and info.bos_id is None:
        raise ValueError(f"frame_chunks needs a BOS token; tokenizer {info.name_or_path} has none")
    if layout == "padded":
        min_length = 2 + (info.bos_id is not None)  # [BOS] >= 1 token [EOS]
    else:
        min_length = 3 if frame_chunks else 2
    if seq_length < min_length:
        raise ValueError(f"seq_length={seq_length} is too short for layout {layout!r} with BOS/EOS")


def _make_layout(
    layout: str, writer: _SplitWriter, info: TokenizerInfo, frame_chunks: bool
) -> _Packer | _Padder:
    if layout == "packed":
        return _Packer(writer, bos_id=info.bos_id, eos_id=info.eos_id, frame_chunks=frame_chunks)
    return _Padder(writer, bos_id=info.bos_id, eos_id=info.eos_id)


def _check_results(
    inputs: Sequence[str | Path],
    stats: dict[str, Any],
    results: dict[str, Any],
    valid_fraction: float,
) -> None:
    if stats["num_documents"] == 0:
        raise ValueError(
            f"empty input: no document found in {[str(p) for p in inputs]} "
            f"(rejected: {stats['rejected']})"
        )
    if results["train"]["num_samples"] == 0:
        raise ValueError("no training sample was produced (every document went to the valid split)")
    if "valid" in results and results["valid"]["num_samples"] == 0:
        logger.warning(
            "valid_fraction=%g selected no document: the valid split is empty", valid_fraction
        )


def _write_wids_indexes(folder: Path, name: str, results: dict[str, Any]) -> None:
    """``wids-SPLIT.json``: shard lists for ``wids.ShardListDataset`` (its samples are blocks)."""
    for split, result in results.items():
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{name}-{split}",
            "shardlist": [
                {"url": s["name"], "nsamples": s["num_blocks"], "filesize": s["bytes"]}
                for s in result["shards"]
            ],
        }
        _write_json_atomic(folder / f"wids-{split}.json", index)


def _run_encoders(
    tasks: Iterable[Any], consume: _Consumer, workers: int, encoder_args: tuple[Any, ...]
) -> None:
    """Encode tasks in order: in-process (``workers == 0``) or with a bounded process pool."""
    if workers == 0:
        encoder = DocumentEncoder(
            encoder_args[0],
            json_key=encoder_args[1],
            valid_fraction=encoder_args[2],
            seed=encoder_args[3],
            detokenizer=encoder_args[4] if len(encoder_args) > 4 else None,
        )
        for task in tasks:
            consume(encoder.encode(*task))
        return
    # spawn: never fork a process whose Rust thread pool may be running. A worker that dies (e.g.
    # an unguarded __main__ in the caller's script) breaks the executor instead of hanging.
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=encoder_args,
    )
    pending: collections.deque[Future[EncodedBatch]] = collections.deque()
    try:
        for task in tasks:
            pending.append(executor.submit(encode_in_worker, task))
            while len(pending) >= 2 * workers:  # bounded read-ahead: bounded memory
                consume(pending.popleft().result())
        while pending:
            consume(pending.popleft().result())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _log_summary(out: Path, manifest: dict[str, Any], examples: dict[str, list[str]]) -> None:
    stats = manifest["stats"]
    logger.info(
        "done in %.1f s: %d documents, %.2f MB, %d tokens "
        "(%.0f docs/s, %.2f MB/s, %.0f tokens/s, %d worker(s))",
        stats["seconds"],
        stats["num_documents"],
        stats["input_bytes"] / 1e6,
        stats["num_raw_tokens"],
        stats["docs_per_s"],
        stats["mb_per_s"],
        stats["tokens_per_s"],
        stats["workers"],
    )
    for name, split in manifest["splits"].items():
        logger.info(
            "  %s: %d documents -> %d sequences of %d (%d real tokens) in %d shard(s)%s",
            name,
            split["num_documents"],
            split["num_samples"],
            manifest["seq_length"],
            split["num_tokens"],
            len(split["shards"]),
            f", {split['num_truncated_documents']} truncated"
            if split["num_truncated_documents"]
            else "",
        )
    for reason, count in stats["rejected"].items():
        logger.info(
            "  skipped %d record(s): %s (e.g. %s)",
            count,
            reason,
            ", ".join(examples.get(reason, [])),
        )
    logger.info("wrote %s", out / MANIFEST_NAME)
