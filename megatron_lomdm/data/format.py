"""The shard format: names, the manifest and its validation (no reading, no writing).

A shard folder (written by ``preprocess.write_shards``, ``tools/preprocess_data.py``)::

    OUT/manifest.json            written last; its presence marks the folder complete
    OUT/train-000000.tar ...     WebDataset shards of the train split
    OUT/valid-000000.tar ...     the valid split (when --valid-fraction > 0)
    OUT/wids-train.json ...      wids shard indexes (``wids.ShardListDataset(path)``)

Shard format. A *sample* of the dataset is one sequence of ``seq_length`` token ids. To keep the
tar overhead (512-byte headers and padding per member) small, sequences are stored in *blocks*
of up to ``block_rows`` rows; each block is one WebDataset sample with two members::

    {first_row:010d}.tokens.npy    (rows, seq_length) uint16 (vocab <= 65535) or int32
    {first_row:010d}.lengths.npy   (rows,) int32: real tokens of each row, >= 1

and, in a *conditioned* folder (prompt/response records; manifest ``"conditioned": true``,
``format_version`` 2), a third member::

    {first_row:010d}.cond.npy      (rows, ceil(seq_length / 8)) uint8: ``np.packbits`` of the
                                   per-position conditioning mask (True = a given prompt token,
                                   never masked; only ever True below the row's length)

Folders without it (format_version 1, every folder written before conditioning existed) read
as all False: no conditioning. Positions ``>= length`` hold ``pad_id``. ``first_row`` numbers the sequences of a split from 0.
Tar headers are deterministic (mtime 0, no owner), so the same inputs give byte-identical shards
for any worker count; each shard's sha256 is in the manifest.

Layouts (``method.md`` §4.1):

* ``packed``: documents become ``[BOS] ids [EOS]`` (no BOS when the tokenizer has none or it
  equals EOS) and are concatenated into one stream per split, cut into rows of ``seq_length``.
  With ``frame_chunks`` (the MDLM/BD3LM ``wrap`` convention), documents become ``ids [EOS]`` and
  each row is ``[BOS] + seq_length-2 stream tokens + [EOS]``. The last row of a split is padded.
* ``padded``: one document per row, ``[BOS] ids [EOS]`` truncated to ``seq_length`` (keeping the
  final EOS), then padded. A prompt/response record becomes ``[BOS] prompt response [EOS]``
  with ``[BOS] prompt`` conditioned; a long response is truncated (keeping EOS), a prompt that
  leaves no room for one response token is a bad record. Conditioning needs this layout: packed
  rows are refused (a row would start inside another record's response).

Where the package's modules sit (each imports only the ones above it in this list)::

    format    tokenize                 the format; text -> ids
    reader    fetch                    random access to a local shard; bytes from a location
    writer                             rows -> shards (the format's writing side)
    sources                            specs and manifest resolution: local, remote, blend
    cache                              verified local copies of a source's shards
    loader                             the one loader (a single source, or a weighted blend)
    preprocess                         text -> shard folder, in stages (tools/preprocess_data.py)
    shards    blend                    public faces: the shard API; the trainer's entry points
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUTS",
    "COND_FORMAT_VERSION",
    "PLAIN_FORMAT_VERSION",
    "COND_MEMBER",
    "LENGTHS_MEMBER",
    "MANIFEST_NAME",
    "SHARD_NAME",
    "SPLITS",
    "TAR_BLOCK",
    "TOKENS_MEMBER",
    "Manifest",
    "parse_manifest",
    "read_local_manifest",
    "pack_cond",
    "storage_dtype",
    "unpack_cond",
]

FORMAT_NAME = "megatron_lomdm.shards"
FORMAT_VERSION = 2
# Unconditioned folders are still written as version 1 (byte-identical to before); a conditioned
# one is version 2, so code that predates the cond member refuses it instead of ignoring it.
PLAIN_FORMAT_VERSION = 1
COND_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
LAYOUTS = ("packed", "padded")
SPLITS = ("train", "valid")
# The shard names this tool writes: `SPLIT-NNNNNN.tar`. A manifest naming anything else is refused:
# names become file paths and are substituted into `pipe:` shell commands.
SHARD_NAME = re.compile(r"(?P<split>[A-Za-z0-9_]+)-[0-9]{6,}\.tar")
TOKENS_MEMBER = "tokens.npy"
LENGTHS_MEMBER = "lengths.npy"
COND_MEMBER = "cond.npy"
TAR_BLOCK = 512  # tar block size


def storage_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype: uint16 when every id fits (vocab_size <= 65535), else int32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def pack_cond(cond_NL: np.ndarray) -> np.ndarray:
    """The on-disk ``cond`` member of rows ``(n, L)`` bool: ``(n, ceil(L / 8))`` uint8 bits."""
    return np.packbits(cond_NL.astype(bool), axis=1)


def unpack_cond(bits_NC: np.ndarray, seq_length: int) -> np.ndarray:
    """Inverse of ``pack_cond``: ``(n, seq_length)`` bool."""
    return np.unpackbits(bits_NC, axis=1, count=seq_length).astype(bool)


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
    def conditioned(self) -> bool:
        """Whether rows carry a conditioning mask (prompt/response records)."""
        return bool(self.data.get("conditioned", False))

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



def read_local_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of a local shard folder (or its ``manifest.json``).

    Raises:
        ValueError: no manifest (not a shard folder, or an incomplete one), another format, a
            newer format version, or a manifest not marked complete.
    """
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise ValueError(
            f"{file}: no manifest; {file.parent} is not a complete shard folder written by "
            "tools/preprocess_data.py"
        )
    data = parse_manifest(file.read_bytes(), str(file))
    return Manifest(path=file.resolve(), data=data)



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

