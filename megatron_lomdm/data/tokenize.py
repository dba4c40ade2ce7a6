"""Text -> token ids: input discovery and reading, record decoding, tokenizer loading and training.

This is the library half of ``tools/preprocess_data.py`` and ``tools/train_tokenizer.py``.

Inputs are JSONL files (one JSON object per line, the text under ``json_key``) or plain text files
(one document per file or per line), optionally compressed (``.gz``, ``.bz2``, ``.xz``, and
``.zst`` when the ``zstandard`` module is importable). Folders are walked recursively and globs
expanded, both in sorted order, so the document order is deterministic.

HF ``datasets`` inputs go through one code path (``iter_dataset_rows``, streaming): a hub dataset
(``HFDatasetInput``: ``--hf-dataset NAME [--hf-config C] --split S``, for clusters that reach the
hub) and local Parquet / Arrow files (``.parquet``, ``.arrow``, or a folder written by
``Dataset.save_to_disk``), one row per document, the text in column ``json_key``. A row's text
gives exactly the document the same string gives as a JSONL record, so the shards are the same.

An optional detokenizer (``DETOKENIZERS``: ``lm1b``, the MDLM/SEDD one) rewrites each document
before tokenization (and before the train/valid hash).

Special-token policy (recorded in the manifest by ``shards.write_shards``):

* ``eos_id`` is required (documents are separated / terminated by it);
* ``bos_id`` is optional (``None`` when the tokenizer has none);
* ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token; validity of a position
  never comes from comparing with ``pad_id`` but from the stored per-sequence length;
* ``mask_id``: the tokenizer's mask token when it has one. Otherwise ``mask_id = vocab_size`` (a
  *virtual* id that never appears in the shards) and ``model_vocab_size = vocab_size + 1``: the
  model must have one more embedding row than the tokenizer.

Raw text never produces special ids: the tokenizer runs with ``encode_special_tokens=True``, so a
literal ``"[MASK]"`` in a document is tokenized as ordinary text.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

#: Special tokens of tokenizers trained by ``train_bpe_tokenizer`` (ids 0..3 in this order).
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN = "[PAD]", "[BOS]", "[EOS]", "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN)

JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
#: Files read through HF ``datasets`` (one row per document).
DATASETS_SUFFIXES = frozenset({".parquet", ".arrow"})
TEXT_MODES = ("file", "line")

#: Reasons a record is not turned into a document. ``ERROR_REASONS`` raise unless ``skip_bad``;
#: the others are benign and only counted.
ERROR_REASONS = (
    "malformed_json", "missing_field", "field_not_string", "undecodable", "empty_response",
    "prompt_too_long", "bad_ids", "bad_cond", "record_too_long", "nothing_to_generate",
)  # fmt: skip
BENIGN_REASONS = ("blank_line", "empty_text")

# Conventional spellings, tried in order, when a tokenizer file says nothing about its specials.
_CONVENTIONAL = {
    "bos": ("[BOS]", "<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
    "eos": ("[EOS]", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}
# Files that define a tokenizer (hashed for the manifest's tokenizer identity).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated file list.

    Args:
        paths: what the user passed as ``--input``; explicit paths keep their given order.

    Returns:
        The input files, in a deterministic order.

    Raises:
        ValueError: a path does not exist, a glob matches nothing, or nothing is left.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found = [path]
        elif path.is_dir() and _saved_dataset_files(path) is not None:
            found = _saved_dataset_files(path) or []
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        elif glob.has_magic(str(raw)):
            found = sorted(
                Path(p) for p in glob.glob(str(raw), recursive=True) if Path(p).is_file()
            )
            if not found:
                raise ValueError(f"input glob {str(raw)!r} matches no file")
        else:
            raise ValueError(f"input {str(raw)!r} does not exist")
        files.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise ValueError(f"empty input: no file found in {[str(p) for p in paths]}")
    return unique


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``Dataset.save_to_disk`` folder in row order (``None``: not one)."""
    state = folder / "state.json"
    if not (state.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        names = [
            f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state}: not a datasets save_to_disk state file ({err})") from err
    return [folder / name for name in names]


def is_datasets_file(path: Path) -> bool:
    """Whether ``path`` is read through HF ``datasets`` (Parquet or Arrow, by suffix)."""
    return isinstance(path, Path) and path.suffix.lower() in DATASETS_SUFFIXES


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in (".gz", ".bz2", ".xz", ".zst") else None


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` is read as JSONL (by its suffix, under any compression suffix)."""
    name = path.name.lower()
    if _compression(path):
        name = name[: -len(path.suffix)]
    return Path(name).suffix in JSONL_SUFFIXES


def open_input(path: Path) -> IO[bytes]:
    """Open an input file for binary reading, decompressing by suffix.

    Raises:
        ValueError: a ``.zst`` file while the ``zstandard`` module is not installed.
    """
    kind = _compression(path)
    if kind == ".gz":
        return gzip.open(path, "rb")
    if kind == ".bz2":
        return bz2.open(path, "rb")
    if kind == ".xz":
        return lzma.open(path, "rb")
    if kind == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise ValueError(
                f"{path}: reading .zst files needs the 'zstandard' module (pip install zstandard)"
            ) from err
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def iter_records(path: Path, *, text_mode: str = "file") -> Iterator[tuple[int, bytes]]:
    """Yield the raw records of one input file as ``(1-based line number, bytes)``.

    JSONL files and text files in ``line`` mode give one record per line; text files in ``file``
    mode give the whole (decompressed) file as one record at line 1.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    with open_input(path) as stream:
        if is_jsonl(path) or text_mode == "line":
            yield from enumerate(stream, start=1)
        else:
            yield 1, stream.read()


@dataclasses.dataclass(frozen=True)
class HFDatasetInput:
    """An input read with ``datasets.load_dataset(name, config, split=..., streaming=True)``.

    Attributes:
        name: a hub dataset (``Skylion007/openwebtext``) or a builder for local files
            (``parquet``, ``arrow``, ``json``...).
        config: the dataset configuration (``--hf-config``).
        split: the split (``train``, ``test``; slices such as ``train[:1000]`` need
            ``streaming=False``).
        data_files: files for a builder (local paths or URLs).
        revision: a hub revision (e.g. ``refs/convert/parquet``).
        streaming: stream rows (no full download, no Arrow cache).
    """

    name: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    revision: str | None = None
    streaming: bool = True

    @classmethod
    def local(cls, path: Path) -> HFDatasetInput:
        """The ``datasets`` input of one local Parquet / Arrow file."""
        builder = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
        return cls(name=builder, data_files=(str(path),))

    def __str__(self) -> str:
        if self.data_files and len(self.data_files) == 1 and self.name in ("parquet", "arrow"):
            return self.data_files[0]
        config = f"/{self.config}" if self.config else ""
        revision = f"@{self.revision}" if self.revision else ""
        files = f" {list(self.data_files)}" if self.data_files else ""
        return f"hf:{self.name}{config}{revision}:{self.split}{files}"


def iter_dataset_rows(
    source: HFDatasetInput, text_field: str = "text", *, batch_rows: int = 1024
) -> Iterator[tuple[int, bytes | tuple[str, str]]]:
    """Yield ``(1-based row, text as UTF-8 bytes)`` for each row of an HF ``datasets`` input.

    A row whose text is null or not a string gives ``(row, (reason, detail))`` instead (reported
    like a bad JSONL record).

    Raises:
        ValueError: ``datasets`` is not installed, the dataset cannot be loaded, or it has no
            column ``text_field``.
    """
    ds = _open_dataset(source, text_field)
    row = 0
    for batch in ds.iter(batch_size=batch_rows):
        values = batch.get(text_field)
        if values is None:
            values = [_MISSING] * len(next(iter(batch.values()), []))
        for value in values:
            row += 1
            yield row, _row_text(value, text_field)


def _open_dataset(source: HFDatasetInput, text_field: str) -> Any:
    """The (streamed) dataset of ``source``, reduced to its column ``text_field``."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{source}: reading it needs the 'datasets' package (pip install datasets)"
        ) from err
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(
            source.name,
            source.config,
            split=source.split,
            data_files=list(source.data_files) if source.data_files else None,
            revision=source.revision,
            streaming=source.streaming,
        )
    except Exception as err:  # noqa: BLE001 - any loading failure is an input error here
        raise ValueError(f"cannot load {source}: {type(err).__name__}: {err}") from err
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(
            f"{source}: no column {text_field!r} (columns: {columns}); pick one with --json-key"
        )
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([text_field])
    return ds


_MISSING = object()


def _row_text(value: Any, text_field: str) -> bytes | tuple[str, str]:
    """A row's text as UTF-8 bytes, or ``(reason, detail)`` when it has no string text."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if value is None or value is _MISSING:
        return ("missing_field", f"no value in column {text_field!r}")
    return ("field_not_string", f"column {text_field!r} holds {type(value).__name__}, not a string")


def decode_row(raw: bytes) -> str:
    """The document of a ``datasets`` row (its text as UTF-8 bytes), exactly as JSON would give it.

    Raises:
        BadRecord: a lone surrogate (``undecodable``) or a blank text (``empty_text``).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("undecodable", "the text holds a lone surrogate") from None
    if not text.strip():
        raise BadRecord("empty_text")
    return text


# --------------------------------------------------------------------------------------------
# Detokenizers (applied to each document before tokenization)
# --------------------------------------------------------------------------------------------


def _lm1b_detokenize(x: str) -> str:
    """Undo LM1B's tokenization (spaces around punctuation), as MDLM / SEDD / BD3LM do."""
    import re

    x = x.replace("http : / / ", "http://").replace("https : / / ", "https://")
    x = re.sub(r" \'(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    x = x.replace(" ? ", "? ")
    x = re.sub(r" \?$", "?", x)
    x = x.replace(" ! ", "! ")
    x = re.sub(r" \!$", "!", x)
    for spaced, joined in ((" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/")):
        x = x.replace(spaced, joined)
    x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
    x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
    x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    return x.replace("$ ", "$").replace("\u00a3 ", "\u00a3")


#: ``--detokenize`` choices.
DETOKENIZERS = {"lm1b": _lm1b_detokenize}


class BadRecord(Exception):
    """A record that does not give a document; ``reason`` is one of ERROR/BENIGN_REASONS."""

    def __init__(self, reason: str, detail: str = "", line_offset: int = 0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail or reason.replace("_", " ")
        self.line_offset = line_offset


def decode_record(raw: bytes, *, json_key: str | None, strip_newline: bool = False) -> str:
    """Turn one raw record into document text.

    Args:
        raw: the record's bytes (a JSONL line, a text line or a whole text file).
        json_key: the field holding the text for JSONL records; ``None`` for plain text.
        strip_newline: drop the trailing line break (text files in ``line`` mode).

    Returns:
        The document text.

    Raises:
        BadRecord: invalid UTF-8 (``line_offset`` locates the byte within a whole file), invalid
            JSON, a missing or non-string field, a blank line or an empty text.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(
            "undecodable",
            f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start}",
            raw.count(b"\n", 0, err.start),
        ) from None
    text = text.removeprefix("\ufeff")
    if strip_newline:
        text = text.rstrip("\r\n")
    if json_key is None and not text.strip():
        raise BadRecord("blank_line" if strip_newline else "empty_text")
    if json_key is not None:
        text = _json_text(text, json_key)
    if not text.strip():
        raise BadRecord("empty_text")
    return text


def _json_text(line: str, json_key: str) -> str:
    """The string under ``json_key`` of one JSONL line (``BadRecord`` as ``decode_record``)."""
    return _json_field(_json_object(line), json_key)


def _json_object(line: str) -> Any:
    """One JSONL line parsed (``BadRecord`` on a blank line or malformed JSON)."""
    if not line.strip():
        raise BadRecord("blank_line")
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecord(
            "malformed_json", f"malformed JSON ({err.msg}, column {err.colno})"
        ) from None


def _json_line_object(raw: bytes) -> Any:
    """One raw JSONL line decoded (a leading BOM dropped) and parsed; ``BadRecord`` as ``_json_object``
    or ``undecodable``."""
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise BadRecord(
            "undecodable", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start}"
        ) from None
    return _json_object(line)


def _json_field(obj: Any, json_key: str) -> str:
    """The string under ``json_key`` of a parsed record (``BadRecord`` as ``decode_record``)."""
    if not isinstance(obj, dict) or json_key not in obj:
        raise BadRecord("missing_field", f"no field {json_key!r} in the JSON record")
    text = obj[json_key]
    if not isinstance(text, str):
        raise BadRecord(
            "field_not_string", f"field {json_key!r} is {type(text).__name__}, not a string"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("undecodable", "the JSON string holds a lone surrogate escape") from None
    return text


def decode_prompt_record(raw: bytes, *, prompt_key: str, response_key: str) -> tuple[str, str]:
    """Turn one JSONL prompt/response record into ``(prompt, response)``.

    The prompt may be empty (an unconditioned record); the response may not.

    Raises:
        BadRecord: as ``decode_record`` (``missing_field`` names the missing key), or
            ``empty_response``.
    """
    obj = _json_line_object(raw)
    prompt, response = _json_field(obj, prompt_key), _json_field(obj, response_key)
    if not response.strip():
        raise BadRecord("empty_response", f"field {response_key!r} is empty")
    return prompt, response


def iter_texts(
    inputs: Sequence[str | Path],
    *,
    json_key: str = "text",
    text_mode: str = "file",
    skip_bad: bool = False,
) -> Iterator[str]:
    """Yield the documents of the inputs in order (single process; used to train tokenizers).

    Raises:
        ValueError: a bad record (``file:line``) unless ``skip_bad``, or no document at all.
    """
    count = 0
    for path in expand_inputs(inputs):
        if is_datasets_file(path):
            for row, raw in iter_dataset_rows(HFDatasetInput.local(path), json_key):
                try:
                    if isinstance(raw, tuple):
                        raise BadRecord(*raw)
                    yield decode_row(raw)
                    count += 1
                except BadRecord as bad:
                    if bad.reason in ERROR_REASONS and not skip_bad:
                        raise ValueError(bad_record_message(path, row, bad)) from None
            continue
        key = json_key if is_jsonl(path) else None
        for line, raw in iter_records(path, text_mode=text_mode):
            try:
                yield decode_record(
                    raw, json_key=key, strip_newline=key is None and text_mode == "line"
                )
                count += 1
            except BadRecord as bad:
                if bad.reason in ERROR_REASONS and not skip_bad:
                    raise ValueError(
                        bad_record_message(path, line + bad.line_offset, bad)
                    ) from None
    if count == 0:
        raise ValueError(f"empty input: no document in {[str(p) for p in inputs]}")


def bad_record_message(path: Path | str, line: int, bad: BadRecord) -> str:
    """The user-facing error for a bad record: ``file:line: detail``."""
    return f"{path}:{line}: {bad.detail} [{bad.reason}]; pass --skip-bad to skip such records"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """Identity and special ids of a tokenizer, as recorded in the manifest.

    Attributes:
        name_or_path: what the user passed (a local path is made absolute).
        kind: ``tokenizer.json``, ``gpt2-bpe-files`` or ``transformers``.
        vocab_size: ids the tokenizer can produce (``0..vocab_size-1``, added tokens included).
        model_vocab_size: embedding rows the model needs: ``vocab_size``, or ``vocab_size + 1``
            when ``mask_id`` is virtual.
        bos_id: the begin-of-sequence id, or ``None``.
        eos_id: the end-of-sequence / document separator id.
        pad_id: the padding id (``eos_id`` when the tokenizer has no pad token).
        mask_id: the ``[MASK]`` id used by the diffusion model.
        mask_is_virtual: True when ``mask_id == vocab_size`` was appended (no mask token).
        files_sha256: sha256 of each tokenizer file that was read (local tokenizers).
        tokenizer_json_sha256: sha256 of the serialized tokenizer actually used.
    """

    name_or_path: str
    kind: str
    vocab_size: int
    model_vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    mask_id: int
    mask_is_virtual: bool
    files_sha256: dict[str, str]
    tokenizer_json_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return dataclasses.asdict(self)


def load_tokenizer(name_or_path: str | Path) -> tuple[Any, TokenizerInfo]:
    """Load a fast tokenizer and work out its special ids.

    Accepted: a ``tokenizer.json`` file; a folder with ``tokenizer.json`` (special tokens read from
    ``tokenizer_config.json`` / ``special_tokens_map.json`` if present, else by conventional
    spelling); a folder with GPT-2-style ``vocab.json`` + ``merges.txt``; any other local HF
    tokenizer folder (offline); or an HF hub name (downloaded only where the hub is reachable).

    Returns:
        ``(tokenizers.Tokenizer, TokenizerInfo)``; the tokenizer encodes special-token text as
        plain text.

    Raises:
        ValueError: the tokenizer cannot be loaded, is not a fast tokenizer, or has no EOS token.
    """
    path = Path(name_or_path)
    tok, specials, kind, files = _open_tokenizer(name_or_path)
    files_sha = {p.name: _sha256_file(p) for p in files if p.is_file()}
    ident = str(path.resolve()) if path.exists() else str(name_or_path)
    tok.no_truncation()
    tok.no_padding()
    info = _make_info(tok, specials, ident, kind, files_sha)
    tok.encode_special_tokens = True
    return tok, info


def _open_tokenizer(name_or_path: str | Path) -> tuple[Any, dict[str, Any], str, list[Path]]:
    """``(tokenizer, special tokens, kind, the files that define it)`` (see ``load_tokenizer``)."""
    path = Path(name_or_path)
    specials: dict[str, Any] = {}
    files: list[Path] = []
    if path.is_file():
        tok, kind, files = _tokenizer_from_file(path), "tokenizer.json", [path]
        specials = _read_special_tokens(path.parent)
        files += [path.parent / n for n in ("tokenizer_config.json", "special_tokens_map.json")]
    elif path.is_dir() and (path / "tokenizer.json").is_file():
        tok, kind = _tokenizer_from_file(path / "tokenizer.json"), "tokenizer.json"
        specials = _read_special_tokens(path)
        files = [path / n for n in _TOKENIZER_FILES]
    elif path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok, kind = _gpt2_style_bpe(path), "gpt2-bpe-files"
        specials = _read_special_tokens(path)
        files = [path / n for n in _TOKENIZER_FILES]
    elif not path.exists() and _looks_like_path(str(name_or_path)):
        raise ValueError(f"tokenizer {name_or_path}: no such file or folder")
    else:
        tok, specials, kind = _load_with_transformers(str(name_or_path), local=path.is_dir())
        files = [path / n for n in _TOKENIZER_FILES] if path.is_dir() else []
    return tok, specials, kind, files


def _tokenizer_from_file(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust parser raises a bare Exception
        raise ValueError(f"{path}: not a valid tokenizer.json ({_one_line(err)})") from err


def _looks_like_path(name: str) -> bool:
    """Not an HF hub id (``name`` or ``namespace/name``): absolute, ``./``, deeper, or a file."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~"))
        or name.count("/") > 1
        or name.endswith((".json", ".txt", ".model"))
    )


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _make_info(
    tok: Any, specials: dict[str, str | None], ident: str, kind: str, files_sha: dict[str, str]
) -> TokenizerInfo:
    ids = {role: _find_special(tok, role, specials) for role in ("bos", "eos", "pad", "mask")}
    if ids["eos"] is None:
        raise ValueError(
            f"tokenizer {ident}: no end-of-sequence token found "
            f"(tried {list(_CONVENTIONAL['eos'])}); "
            "set eos_token in its tokenizer_config.json"
        )
    vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    mask_virtual = ids["mask"] is None
    mask_id = vocab_size if mask_virtual else ids["mask"]
    return TokenizerInfo(
        name_or_path=ident,
        kind=kind,
        vocab_size=vocab_size,
        model_vocab_size=vocab_size + int(mask_virtual),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["eos"] if ids["pad"] is None else ids["pad"],
        mask_id=mask_id,
        mask_is_virtual=mask_virtual,
        files_sha256=files_sha,
        tokenizer_json_sha256=hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),
    )


def _find_special(tok: Any, role: str, specials: dict[str, str | None]) -> int | None:
    declared = specials.get(role)
    if declared is not None:
        found = tok.token_to_id(declared)
        if found is None:
            raise ValueError(
                f"the tokenizer declares {role}_token={declared!r} but has no such token"
            )
        return int(found)
    for spelling in _CONVENTIONAL[role]:
        found = tok.token_to_id(spelling)
        if found is not None:
            return int(found)
    return None


def _read_special_tokens(folder: Path) -> dict[str, str | None]:
    """Special tokens declared in ``tokenizer_config.json`` / ``special_tokens_map.json``."""
    declared: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        for role, fallback in (("bos", "cls"), ("eos", "sep"), ("pad", None), ("mask", None)):
            value = data.get(f"{role}_token", data.get(f"{fallback}_token") if fallback else None)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                declared.setdefault(role, value)
    return declared


def _gpt2_style_bpe(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _load_with_transformers(name: str, *, local: bool) -> tuple[Any, dict[str, str | None], str]:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except Exception as err:  # noqa: BLE001 - any loading failure is a user error here
        what = "the folder holds no loadable tokenizer" if local else "not a local path; the hub"
        raise ValueError(f"tokenizer {name}: {what}: {_one_line(err)}") from err
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; convert it first")
    specials = {
        "bos": hf.bos_token or hf.cls_token,
        "eos": hf.eos_token or hf.sep_token,
        "pad": hf.pad_token,
        "mask": hf.mask_token,
    }
    return (
        hf.backend_tokenizer,
        {k: v for k, v in specials.items() if v is not None},
        "transformers",
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_bpe_tokenizer(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    vocab_size: int,
    json_key: str = "text",
    text_mode: str = "file",
    min_frequency: int = 2,
    skip_bad: bool = False,
) -> Path:
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` folder.

    The special tokens ``[PAD] [BOS] [EOS] [MASK]`` get ids 0..3. The folder holds
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` and loads with
    ``transformers.PreTrainedTokenizerFast.from_pretrained`` / ``AutoTokenizer`` and with
    ``load_tokenizer``.

    Args:
        inputs: files, folders or globs (as for preprocessing).
        output: the folder to write (created).
        vocab_size: target vocabulary size, special tokens and the 256 byte symbols included.
        json_key: the text field of JSONL inputs.
        text_mode: ``file`` or ``line`` for plain-text inputs.
        min_frequency: minimum pair count for a merge.
        skip_bad: skip bad records instead of raising.

    Returns:
        The output folder.

    Raises:
        ValueError: ``vocab_size`` too small, bad records (unless ``skip_bad``), empty input.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        specials = len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size={vocab_size} is below 256 byte symbols + {specials} specials")
    tok, trainer = _byte_level_bpe(vocab_size, min_frequency)
    texts = iter_texts(inputs, json_key=json_key, text_mode=text_mode, skip_bad=skip_bad)
    tok.train_from_iterator(texts, trainer)
    out = _save_tokenizer_folder(tok, output)
    logger.info("trained byte-level BPE: vocab %d -> %s", tok.get_vocab_size(), out)
    return out


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Any, Any]:
    """An empty byte-level BPE tokenizer and its trainer (the four specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def save_word_tokenizer(symbols: Sequence[str], output: str | Path) -> Path:
    """A word-level tokenizer: one token per whitespace-separated symbol, specials first.

    For synthetic corpora (``data/synthetic.py``) whose documents are symbol strings: ids 0..3 are
    ``[PAD] [BOS] [EOS] [MASK]``, then the symbols in the given order. The folder is the same kind
    ``train_bpe_tokenizer`` writes (loads with ``load_tokenizer`` and ``AutoTokenizer``).

    Raises:
        ValueError: On a repeated symbol, one containing whitespace, or one spelled like a special.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bad = [s for s in symbols if not s or s.split() != [s] or s in SPECIAL_TOKENS]
    if bad or len(set(symbols)) != len(symbols):
        raise ValueError(f"word-tokenizer symbols must be unique, non-special, without spaces; bad: {bad[:5]}")
    vocab = {s: i for i, s in enumerate([*SPECIAL_TOKENS, *symbols])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return _save_tokenizer_folder(tok, output)


def _save_tokenizer_folder(tok: Any, output: str | Path) -> Path:
    """Save ``tokenizer.json`` plus the config files that name the four specials."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "mask_token": MASK_TOKEN,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        **special_map,
    }
    config["clean_up_tokenization_spaces"] = False
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2) + "\n", encoding="utf-8"
    )
    return out


# --------------------------------------------------------------------------------------------
# Encoding (runs in worker processes)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodedBatch:
    """The result of encoding one batch of records of one file.

    Attributes:
        file_index: index of the input file.
        ids: the raw token ids of all good documents, concatenated (no BOS/EOS), int32.
        lengths: tokens per good document, int64.
        to_valid: per good document, whether the split hash sends it to the valid split.
        num_bytes: raw bytes of all records in the batch.
        rejected: ``(line, reason, detail)`` for every record that gave no document.
        prompt_lengths: per good document, the tokens of its prompt (the first ids of the
            document); ``None`` unless the records are prompt/response pairs.
        given: per id of ``ids``, whether it is given (conditioned); ``None`` unless the records
            are pre-tokenized.
    """

    file_index: int
    ids: np.ndarray
    lengths: np.ndarray
    to_valid: np.ndarray
    num_bytes: int
    rejected: list[tuple[int, str, str]]
    prompt_lengths: np.ndarray | None = None
    given: np.ndarray | None = None


def decode_pretokenized_record(raw: bytes, *, ids_key: str, cond_key: str, vocab_size: int,
                               max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One pre-tokenized JSONL record -> ``(ids int32, given bool)``.

    Raises:
        BadRecord: as ``decode_record``; ``bad_ids`` (not a non-empty list of ids in
            [0, vocab_size)), ``bad_cond`` (not a list of 0/1 as long as the ids),
            ``record_too_long`` (more than ``max_tokens`` ids: a pre-tokenized record is never
            truncated) or ``nothing_to_generate`` (every id given).
    """
    obj = _json_line_object(raw)
    for key in (ids_key, cond_key):
        if not isinstance(obj, dict) or key not in obj:
            raise BadRecord("missing_field", f"no field {key!r} in the JSON record")
    ids, cond = obj[ids_key], obj[cond_key]
    if (not isinstance(ids, list) or not ids
            or not all(type(i) is int and 0 <= i < vocab_size for i in ids)):
        raise BadRecord("bad_ids", f"field {ids_key!r} is not a non-empty list of token ids in "
                        f"[0, {vocab_size})")
    if (not isinstance(cond, list) or len(cond) != len(ids)
            or not all(c in (0, 1) and type(c) in (int, bool) for c in cond)):
        raise BadRecord("bad_cond", f"field {cond_key!r} is not a list of {len(ids)} 0/1 values "
                        f"(one per id of {ids_key!r})")
    if max_tokens is not None and len(ids) > max_tokens:
        raise BadRecord("record_too_long", f"the record has {len(ids)} ids; a row leaves room for "
                        f"{max_tokens} (pre-tokenized records are not truncated)")
    if all(cond):
        raise BadRecord("nothing_to_generate", f"every id is given ({cond_key!r} is all 1)")
    return np.asarray(ids, dtype=np.int32), np.asarray(cond, dtype=bool)


#: Documents longer than this (characters) are tokenized in chunks of at most this size, so
#: the tokenizer's working memory stays bounded (see ``DocumentEncoder._encode_long``).
DOCUMENT_CHUNK_CHARS = 1 << 18
_CUT_AT_SPACE = re.compile(r"(?<=\S)(?= \S)")
_CUT_TRIES = 16  # candidate cuts checked per chunk
_CUT_CONTEXT = 256  # characters on each side of a cut whose ids are compared


class DocumentEncoder:
    """Decode records, tokenize them and assign each document to the train or valid split.

    The split is decided by a seeded hash of the document text, so it does not depend on the
    worker count, the batch size or the order of the inputs, and duplicated documents always
    land in the same split. Documents over ``chunk_chars`` characters are tokenized in chunks
    cut where the ids do not change, so memory stays bounded for any document size.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        json_key: str,
        valid_fraction: float,
        seed: int,
        detokenizer: str | None = None,
        chunk_chars: int = DOCUMENT_CHUNK_CHARS,
        prompt_key: str | None = None,
        max_prompt_tokens: int | None = None,
        pretokenized: tuple[str, str, int | None] | None = None,
    ) -> None:
        """With ``prompt_key`` the records are JSONL prompt/response pairs (``json_key`` is the
        response field); a prompt of more than ``max_prompt_tokens`` ids is a bad record. With
        ``pretokenized = (ids_key, cond_key, max_tokens)`` they are pre-tokenized records
        (``decode_pretokenized_record``), not tokenized."""
        from tokenizers import Tokenizer

        self.prompt_key, self.max_prompt_tokens = prompt_key, max_prompt_tokens
        self.pretokenized = pretokenized
        self.chunk_chars = chunk_chars
        if detokenizer is not None and detokenizer not in DETOKENIZERS:
            raise ValueError(
                f"detokenizer must be one of {sorted(DETOKENIZERS)}, got {detokenizer!r}"
            )
        self.detokenize = DETOKENIZERS[detokenizer] if detokenizer else None

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        self.json_key = json_key
        self.valid_fraction = valid_fraction
        self.hash_key = hashlib.sha256(f"split-seed:{seed}".encode()).digest()[:32]
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=np.int32) for enc in encodings]

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text; texts over ``chunk_chars`` are encoded in chunks."""
        short = [i for i, text in enumerate(texts) if len(text) <= self.chunk_chars]
        out: list[np.ndarray | None] = [None] * len(texts)
        if short:
            for i, ids in zip(short, self._ids([texts[i] for i in short]), strict=True):
                out[i] = ids
        return [self._encode_long(texts[i]) if ids is None else ids for i, ids in enumerate(out)]

    def _encode_long(self, text: str) -> np.ndarray:
        """Encode a long text chunk by chunk, cutting where the ids do not change.

        The tokenizer's working memory grows with its input (about 150 bytes per character for a
        byte-level BPE), so one huge document is encoded in pieces of at most ``chunk_chars``
        characters. A cut is a single space between two non-spaces (or, without one, any
        position) where the ids of the text around it equal those of its two sides; without such
        a cut the rest is encoded whole (the same ids, unbounded memory).
        """
        pieces, start = [], 0
        while len(text) - start > self.chunk_chars:
            cut = self._find_cut(text, start)
            if cut is None:
                logger.warning(
                    "a %d-character document has no safe cut near character %d: tokenizing "
                    "the rest of it whole",
                    len(text),
                    start + self.chunk_chars,
                )
                break
            pieces += self._ids([text[start:cut]])
            start = cut
        pieces += self._ids([text[start:]])
        return np.concatenate(pieces)

    def _find_cut(self, text: str, start: int) -> int | None:
        lo, hi = start + self.chunk_chars // 2, start + self.chunk_chars
        spaces = [m.start() for m in _CUT_AT_SPACE.finditer(text, lo, hi)][-_CUT_TRIES:]
        for cut in [*reversed(spaces), *range(hi, hi - _CUT_TRIES, -1)]:
            left, right = text[max(cut - _CUT_CONTEXT, 0) : cut], text[cut : cut + _CUT_CONTEXT]
            both, a, b = self._ids([left + right, left, right])
            if np.array_equal(both, np.concatenate([a, b])):
                return cut
        return None

    def in_valid(self, text: str) -> bool:
        """Whether the seeded document hash sends ``text`` to the valid split."""
        if self.valid_fraction <= 0.0:
            return False
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.hash_key).digest()
        return int.from_bytes(digest, "little") / 2.0**64 < self.valid_fraction

    def _document(self, raw: Any, json_mode: bool, strip_newline: bool, rows: bool) -> str:
        """The (detokenized) document of one record; ``BadRecord`` when it gives none."""
        if rows:
            if isinstance(raw, tuple):
                raise BadRecord(*raw)
            text = decode_row(raw)
        else:
            json_key = self.json_key if json_mode else None
            text = decode_record(raw, json_key=json_key, strip_newline=strip_newline)
        return self.detokenize(text) if self.detokenize is not None else text

    def encode(
        self,
        file_index: int,
        json_mode: bool,
        strip_newline: bool,
        records: list[tuple[int, Any]],
        rows: bool = False,
    ) -> EncodedBatch:
        """Encode one batch of ``(line, raw bytes)`` records of one file.

        With ``rows`` the records are ``datasets`` rows (``iter_dataset_rows``): text bytes, or
        ``(reason, detail)`` for a row without a string text.
        """
        if self.prompt_key is not None:
            return self._encode_pairs(file_index, records)
        if self.pretokenized is not None:
            return self._encode_pretokenized(file_index, records)
        texts: list[str] = []
        rejected: list[tuple[int, str, str]] = []
        for line, raw in records:
            try:
                texts.append(self._document(raw, json_mode, strip_newline, rows))
            except BadRecord as bad:
                rejected.append((line + bad.line_offset, bad.reason, bad.detail))
        pieces = self._encode_texts(texts)
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise RuntimeError(
                f"tokenizer produced id {int(ids.max())} >= its vocab size {self.vocab_size}"
            )
        return EncodedBatch(
            file_index=file_index,
            ids=ids,
            lengths=np.array([len(p) for p in pieces], dtype=np.int64),
            to_valid=np.array([self.in_valid(t) for t in texts], dtype=bool),
            num_bytes=sum(len(raw) for _, raw in records if isinstance(raw, bytes)),
            rejected=rejected,
        )


    def _encode_pretokenized(self, file_index: int, records: list[tuple[int, Any]]) -> EncodedBatch:
        """``encode`` for pre-tokenized records: their ids and given flags as they are."""
        assert self.pretokenized is not None
        ids_key, cond_key, max_tokens = self.pretokenized
        docs: list[tuple[np.ndarray, np.ndarray]] = []
        rejected: list[tuple[int, str, str]] = []
        for line, raw in records:
            try:
                docs.append(decode_pretokenized_record(raw, ids_key=ids_key, cond_key=cond_key,
                                                       vocab_size=self.vocab_size, max_tokens=max_tokens))
            except BadRecord as bad:
                rejected.append((line + bad.line_offset, bad.reason, bad.detail))
        return EncodedBatch(
            file_index=file_index,
            ids=np.concatenate([d[0] for d in docs]) if docs else np.zeros(0, np.int32),
            lengths=np.array([len(d[0]) for d in docs], dtype=np.int64),
            to_valid=np.array([self.in_valid(" ".join(map(str, d[0].tolist()))) for d in docs], bool),
            num_bytes=sum(len(raw) for _, raw in records if isinstance(raw, bytes)),
            rejected=rejected,
            given=np.concatenate([d[1] for d in docs]) if docs else np.zeros(0, bool),
        )

    def _pair(self, raw: bytes) -> tuple[str, str]:
        """The (detokenized) prompt and response of one record; ``BadRecord`` when bad."""
        assert self.prompt_key is not None
        prompt, response = decode_prompt_record(
            raw, prompt_key=self.prompt_key, response_key=self.json_key
        )
        if self.detokenize is not None:
            prompt, response = self.detokenize(prompt), self.detokenize(response)
        return prompt, response

    def _encode_pairs(self, file_index: int, records: list[tuple[int, Any]]) -> EncodedBatch:
        """``encode`` for prompt/response records: ids = prompt ids + response ids."""
        pairs: list[tuple[int, str, str]] = []
        rejected: list[tuple[int, str, str]] = []
        for line, raw in records:
            try:
                pairs.append((line, *self._pair(raw)))
            except BadRecord as bad:
                rejected.append((line + bad.line_offset, bad.reason, bad.detail))
        prompts = self._encode_texts([p for _, p, _ in pairs])
        responses = self._encode_texts([r for _, _, r in pairs])
        limit = self.max_prompt_tokens
        keep = [i for i, ids in enumerate(prompts) if limit is None or len(ids) <= limit]
        for i in sorted(set(range(len(pairs))) - set(keep)):
            detail = f"the prompt has {len(prompts[i])} tokens; a row leaves room for {limit}"
            rejected.append((pairs[i][0], "prompt_too_long", detail))
        rejected.sort()
        pieces = [np.concatenate([prompts[i], responses[i]]) for i in keep]
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        return EncodedBatch(
            file_index=file_index,
            ids=ids.astype(np.int32),
            lengths=np.array([len(p) for p in pieces], dtype=np.int64),
            to_valid=np.array([self.in_valid(pairs[i][1] + "\n" + pairs[i][2]) for i in keep], bool),
            num_bytes=sum(len(raw) for _, raw in records if isinstance(raw, bytes)),
            rejected=rejected,
            prompt_lengths=np.array([len(prompts[i]) for i in keep], dtype=np.int64),
        )


_WORKER_ENCODER: DocumentEncoder | None = None


def init_worker(
    tokenizer_json: str,
    json_key: str,
    valid_fraction: float,
    seed: int,
    detokenizer: str | None = None,
    prompt_key: str | None = None,
    max_prompt_tokens: int | None = None,
    pretokenized: tuple[str, str, int | None] | None = None,
) -> None:
    """Pool initializer: build this worker's encoder (single-threaded Rust tokenizer)."""
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = DocumentEncoder(
        tokenizer_json,
        json_key=json_key,
        valid_fraction=valid_fraction,
        seed=seed,
        detokenizer=detokenizer,
        prompt_key=prompt_key,
        max_prompt_tokens=max_prompt_tokens,
        pretokenized=pretokenized,
    )


def encode_in_worker(task: tuple[Any, ...]) -> EncodedBatch:
    """Pool task: encode one batch with the worker's encoder."""
    assert _WORKER_ENCODER is not None, "init_worker was not run in this process"
    return _WORKER_ENCODER.encode(*task)


def batched_records(
    files: Iterable[Path | HFDatasetInput],
    *,
    text_mode: str,
    max_docs: int,
    max_bytes: int,
    text_field: str = "text",
) -> Iterator[tuple[Any, ...]]:
    """Group the records of each input into encoder tasks (a task never spans two inputs).

    Parquet / Arrow files and ``HFDatasetInput`` give ``datasets`` rows (tasks flagged ``rows``).
    """
    for file_index, item in enumerate(files):
        if isinstance(item, HFDatasetInput) or is_datasets_file(item):
            source = item if isinstance(item, HFDatasetInput) else HFDatasetInput.local(item)
            records: Iterable[tuple[int, Any]] = iter_dataset_rows(source, text_field)
            json_mode, strip, rows = False, False, True
        else:
            json_mode = is_jsonl(item)
            strip = not json_mode and text_mode == "line"
            records, rows = iter_records(item, text_mode=text_mode), False
        batch: list[tuple[int, Any]] = []
        size = 0
        for line, raw in records:
            batch.append((line, raw))
            size += len(raw) if isinstance(raw, bytes) else 0
            if len(batch) >= max_docs or size >= max_bytes:
                yield (
                    (file_index, json_mode, strip, batch, rows)
                    if rows
                    else (file_index, json_mode, strip, batch)
                )
                batch, size = [], 0
        if batch:
            yield (
                (file_index, json_mode, strip, batch, rows)
                if rows
                else (file_index, json_mode, strip, batch)
            )
