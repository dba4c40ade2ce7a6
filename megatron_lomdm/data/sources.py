"""Shard sources: where the shards of a split live, and their manifests (local, remote, blend).

``data.train`` / ``data.valid`` (and ``ShardLoader``'s ``path``) accept, as WebDataset users
expect:

=====================================================  =========================================
spec                                                   meaning
=====================================================  =========================================
``/data/owt`` or ``/data/owt/manifest.json``           a local folder (read in place, no copy)
``file:///data/owt[/manifest.json]``                   the same
``https://host/owt/`` or ``https://host/owt/manifest.json``  the manifest at that URL; shards at
                                                       the same prefix
``pipe:aws s3 cp s3://bucket/owt/manifest.json -``     a command that writes the manifest to
                                                       stdout; a shard's command is the same with
                                                       ``manifest.json`` replaced by its name
``pipe:aws s3 cp s3://b/owt/train-{000000..000511}.tar -``  brace-expanded shard locations (any
``https://host/owt/train-{000000..000511}.tar``        of the forms above): exactly these shards
``/data/owt/train-{000000..000003}.tar``               of one split, in this order
=====================================================  =========================================

The manifest travels with the shards: for a pattern it is found by replacing the shard file name
of its first location with ``manifest.json`` (same prefix, same kind of source). A pattern names
the shards of one split; asking a pattern source for another split (e.g. the ``valid`` split of a
``train-{...}.tar`` pattern) gives that whole split, located the same way.

This module is the one place where a ``data.train`` / ``data.valid`` value becomes manifests:
``read_manifest`` takes a local folder, any source spec, or a blend (a list of ``{source, weight[,
name]}``: its first source's manifest, after checking that every source has one tokenizer and one
sequence length); ``open_source`` resolves one split of one source (its shards and where they
are); remote manifests are fetched (``fetch``) and kept next to the cached shards. Getting the
shards themselves is ``cache.ShardStore``'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import threading
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lomdm.data.fetch import (
    NoDataError,
    ShardUnavailableError,
    SourceOptions,
    default_cache_dir,
    fetch_bytes,
)
from megatron_lomdm.data.format import MANIFEST_NAME, Manifest, parse_manifest, read_local_manifest
from megatron_lomdm.data.reader import ShardDataError, ShardFile

__all__ = [
    "BlendEntry",
    "NoDataError",
    "ShardDataError",
    "ShardSource",
    "ShardUnavailableError",
    "SourceOptions",
    "SourceSpec",
    "blend_manifest",
    "check_same_tokenizer",
    "check_tokenizer_compat",
    "data_manifest",
    "default_cache_dir",
    "is_source_spec",
    "manifest_of",
    "open_source",
    "parse_blend",
    "parse_spec",
    "read_manifest",
    "read_source_manifest",
    "read_split",
]

_SCHEMES = ("pipe:", "http:", "https:", "file:")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
# A shard file name inside a pipe command (the last one is the shard): no '/', ends in '.tar'.
_TAR_NAME = re.compile(r"[A-Za-z0-9_.+-]*[A-Za-z0-9_+-]\.tar(?![A-Za-z0-9_.+-])")
_JSON_NAME = re.compile(r"[A-Za-z0-9_.+-]*[A-Za-z0-9_+-]\.json(?![A-Za-z0-9_.+-])")
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
# Specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec.

    Attributes:
        text: the spec as given (URL slashes that ``pathlib`` collapsed restored).
        kind: ``local``, ``http`` or ``pipe``.
        prefix, suffix: a shard ``NAME`` lives at ``prefix + NAME + suffix``.
        manifest_location: where the manifest is (a path, URL or ``pipe:`` command).
        names: the shards a pattern (or a single shard location) lists, in order; ``None`` when
            the spec names a folder / manifest (then a split's shards are all of its shards).
    """

    text: str
    kind: str
    prefix: str
    suffix: str
    manifest_location: str
    names: tuple[str, ...] | None = None

    @property
    def remote(self) -> bool:
        """Whether shards have to be fetched into the cache."""
        return self.kind != "local"

    def location(self, name: str) -> str:
        """Where the shard (or file) ``name`` of this source lives.

        In a ``pipe:`` command the name is one shell-quoted word; the rest of the command is the
        user's own and keeps its shell syntax.
        """
        return f"{self.prefix}{shlex.quote(name) if self.kind == 'pipe' else name}{self.suffix}"


_COLLAPSED_URL = re.compile(r"(?<![A-Za-z0-9+.-])(s3|gs|gcs|az|abfss?|hf|https?):/(?!/)")


def _restore_slashes(text: str) -> str:
    """``Path("http://h/x")`` reads ``http:/h/x``; give such URLs back their ``//``.

    The same for object-store URLs inside a ``pipe:`` command (``s3:/b/x`` -> ``s3://b/x``), so a
    spec that went through ``pathlib`` still works.
    """
    for scheme in ("http", "https"):
        head = f"{scheme}:/"
        if text.startswith(head) and not text.startswith(head + "/"):
            return f"{scheme}://{text[len(head) :]}"
    if text.startswith("pipe:"):
        return "pipe:" + _COLLAPSED_URL.sub(r"\1://", text[len("pipe:") :])
    return text


def _kind(text: str) -> str:
    if text.startswith("pipe:"):
        return "pipe"
    if text.startswith(("http://", "https://")):
        return "http"
    return "local"


def _file_path(text: str) -> str:
    """``file:///a/b`` / ``file:/a/b`` / ``file://localhost/a/b`` -> ``/a/b``; others unchanged."""
    if not text.startswith("file:"):
        return text
    parsed = urllib.parse.urlsplit(text)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{text}: file:// URLs must name a local path (host {parsed.netloc!r})")
    return urllib.parse.unquote(parsed.path)


def _has_braces(text: str) -> bool:
    return bool(_BRACES.search(text))


def is_source_spec(text: str) -> bool:
    """Whether ``text`` needs ``data.sources`` (not a plain local folder / manifest path)."""
    text = str(text).strip()
    if text.startswith(_SCHEMES):
        return True
    if Path(text).exists():
        return text.endswith(".tar")
    return _has_braces(text) or text.endswith(".tar")


def _split_at_name(text: str, kind: str) -> tuple[str, str, str] | None:
    """``(prefix, shard name, suffix)`` when ``text`` locates a ``.tar`` shard, else ``None``."""
    if kind == "pipe":
        matches = list(_TAR_NAME.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return text[: m.start()], m.group(0), text[m.end() :]
    if kind == "http":
        base, sep, query = text.partition("?")
        name = base.rsplit("/", 1)[-1]
        if not name.endswith(".tar"):
            return None
        return base[: len(base) - len(name)], name, sep + query
    if not text.endswith(".tar"):
        return None
    path = Path(text).absolute()
    return f"{path.parent}{os.sep}", path.name, ""


def parse_spec(spec: str | Path) -> SourceSpec:
    """Parse a source spec (see the module docstring).

    Raises:
        ValueError: a pattern whose shards do not share one folder / prefix, or a ``pipe:``
            command that names neither shards nor a manifest.
    """
    text = _restore_slashes(str(spec).strip())
    if not text:
        raise ValueError("empty data source")
    kind = _kind(text)
    body = _file_path(text) if kind == "local" else text
    if kind == "local" and Path(body).exists() and not body.endswith(".tar"):
        manifest = read_local_manifest(body)  # local folder / manifest file: read in place
        root = f"{manifest.root}{os.sep}"
        return SourceSpec(text, kind, root, "", str(manifest.path))
    items = _expand(body) if _has_braces(body) else [body]
    parts = [_split_at_name(item, kind) for item in items]
    if all(p is not None for p in parts):
        prefix, _, suffix = parts[0]  # type: ignore[misc]
        for item, part in zip(items, parts, strict=True):
            if (part[0], part[2]) != (prefix, suffix):  # type: ignore[index]
                raise ValueError(
                    f"data source {text!r}: all shards of a pattern must live next to one "
                    f"manifest, but {items[0]!r} and {item!r} differ in more than the file name"
                )
        names = tuple(part[1] for part in parts)  # type: ignore[index]
        if len(set(names)) != len(names):
            raise ValueError(f"data source {text!r} lists a shard twice")
        return SourceSpec(text, kind, prefix, suffix, prefix + MANIFEST_NAME + suffix, names)
    if len(items) > 1:
        raise ValueError(
            f"data source {text!r}: a brace pattern must expand to shard locations ending in .tar"
        )
    return _manifest_spec(text, body, kind)


def _expand(text: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(text))


def _manifest_spec(text: str, body: str, kind: str) -> SourceSpec:
    if kind == "http":
        base, sep, query = body.partition("?")
        if base.endswith(".json"):
            prefix = base[: base.rindex("/") + 1]
            return SourceSpec(text, kind, prefix, sep + query, body)
        prefix = base if base.endswith("/") else base + "/"
        return SourceSpec(text, kind, prefix, sep + query, prefix + MANIFEST_NAME + sep + query)
    if kind == "pipe":
        matches = list(_JSON_NAME.finditer(body))
        if not matches:
            raise ValueError(
                f"data source {text!r}: a pipe: command must fetch the manifest (…/manifest.json; "
                "each shard's command is then the same with the shard's name) or list the shards "
                "with a brace pattern (…/train-{000000..000099}.tar)"
            )
        m = matches[-1]
        return SourceSpec(text, kind, body[: m.start()], body[m.end() :], body)
    raise ValueError(
        f"data source {text!r} does not exist (a shard folder, its manifest.json, a file://, "
        "http(s):// or pipe: source, or a brace pattern of shard locations)"
    )


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """One split of a source, resolved: its manifest, the shards in use and where they are.

    Attributes:
        spec: the parsed spec.
        manifest: the manifest (``manifest.source`` is set for remote sources).
        split: the split name.
        shards: the manifest entries of the shards in use, in order.
        locations: where each shard is (a local path, URL or ``pipe:`` command).
        fingerprint: identifies the data (``Manifest.fingerprint(split)`` when every shard of the
            split is used; a hash of it and the listed names otherwise). Locations are left out,
            so a run can move between a local copy and a bucket and still resume.
    """

    spec: SourceSpec
    manifest: Manifest
    split: str
    shards: tuple[dict[str, Any], ...]
    locations: tuple[str, ...]
    fingerprint: str

    @property
    def remote(self) -> bool:
        """Whether shards are fetched into a cache."""
        return self.spec.remote

    @property
    def num_samples(self) -> int:
        """Samples (rows) of the shards in use."""
        return int(sum(s["num_samples"] for s in self.shards))


_MANIFESTS: dict[tuple[str, str], Manifest] = {}
_MANIFESTS_LOCK = threading.Lock()


def _load_manifest(spec: SourceSpec, options: SourceOptions) -> Manifest:
    if not spec.remote:
        return read_local_manifest(spec.manifest_location)
    key = (spec.manifest_location, str(options.cache_root))
    with _MANIFESTS_LOCK:
        if key in _MANIFESTS:
            return _MANIFESTS[key]
    raw = fetch_bytes(spec.manifest_location, spec.kind, options)
    data = parse_manifest(raw, spec.manifest_location)
    for name, split in data["splits"].items():
        for shard in split["shards"]:
            if not {"sha256", "bytes", "name"} <= set(shard):
                raise ValueError(
                    f"{spec.manifest_location}: shard entry {shard.get('name')!r} of split "
                    f"{name!r} has no sha256/bytes: remote shards cannot be verified"
                )
    probe = Manifest(path=Path(MANIFEST_NAME), data=data)
    folder = options.cache_root / probe.fingerprint()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    if not path.is_file() or path.read_bytes() != raw:
        tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    manifest = Manifest(path=path, data=data, source=spec.manifest_location)
    with _MANIFESTS_LOCK:
        _MANIFESTS[key] = manifest
    return manifest


def _pattern_split(spec: SourceSpec, manifest: Manifest) -> str:
    where = {s["name"]: n for n, split in manifest["splits"].items() for s in split["shards"]}
    missing = [n for n in spec.names or () if n not in where]
    if missing:
        raise ValueError(
            f"data source {spec.text!r}: shard {missing[0]!r} is not in {manifest.location} "
            f"(splits: {sorted(manifest['splits'])})"
        )
    splits = sorted({where[n] for n in spec.names or ()})
    if len(splits) != 1:
        raise ValueError(f"data source {spec.text!r} mixes shards of splits {splits}")
    return splits[0]


def open_source(
    spec: str | Path | SourceSpec, split: str | None = None, options: SourceOptions | None = None
) -> ShardSource:
    """Resolve one split of a source.

    Args:
        spec: a source spec (see the module docstring).
        split: the split; ``None``: the split a pattern's shards belong to, else ``train``.
        options: where remote manifests are cached (see ``SourceOptions``).

    Raises:
        ValueError: a bad spec, a shard not in the manifest, a missing split.
        ShardUnavailableError: a remote manifest that cannot be fetched.
    """
    options = options or SourceOptions()
    parsed = spec if isinstance(spec, SourceSpec) else parse_spec(spec)
    manifest = _load_manifest(parsed, options)
    split, names = _split_and_names(parsed, manifest, split)
    entries = {s["name"]: s for s in manifest.split(split)["shards"]}
    shards = tuple(entries[n] for n in names)
    if not shards:
        raise ValueError(f"split {split!r} of {manifest.location} has no shard")
    if names == [s["name"] for s in manifest.split(split)["shards"]]:
        fingerprint = manifest.fingerprint(split)
    else:
        fingerprint = hashlib.sha256(
            json.dumps([manifest.fingerprint(split), names]).encode()
        ).hexdigest()
    return ShardSource(
        spec=parsed,
        manifest=manifest,
        split=split,
        shards=shards,
        locations=tuple(parsed.location(n) for n in names),
        fingerprint=fingerprint,
    )


def _split_and_names(
    spec: SourceSpec, manifest: Manifest, split: str | None
) -> tuple[str, list[str]]:
    """The split and the names of its shards in use: a pattern's own shards (its split unless
    another is asked for, which is then used whole), else all the shards of ``split``."""
    if spec.names is not None:
        own = _pattern_split(spec, manifest)
        if split is None or split == own:
            return own, list(spec.names)
    split = split or "train"
    return split, [s["name"] for s in manifest.split(split)["shards"]]


def manifest_of(spec: str | Path | SourceSpec, options: SourceOptions | None = None) -> Manifest:
    """The manifest next to a source's shards (fetched and cached for remote sources)."""
    parsed = spec if isinstance(spec, SourceSpec) else parse_spec(spec)
    return _load_manifest(parsed, options or SourceOptions())


def read_source_manifest(
    spec: str | Path | Sequence[Any], options: SourceOptions | None = None
) -> Manifest:
    """The manifest of a source spec, or of a blend (``[{source, weight}, ...]``).

    For a blend it is the first source's manifest, after checking that all sources have the
    same tokenizer and sequence length (``check_same_tokenizer``): what the model is built from.
    """
    if isinstance(spec, (list, tuple)):
        return blend_manifest(spec, options)
    parsed = parse_spec(spec)
    if parsed.names is not None:
        return open_source(parsed, None, options).manifest  # checks the listed shards
    return manifest_of(parsed, options)


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
    if isinstance(path, (list, tuple)) or is_source_spec(str(path)):
        return read_source_manifest(path)
    return read_local_manifest(path)


def data_manifest(train: str | Sequence[Any], options: SourceOptions | None = None) -> Manifest:
    """The manifest that defines the model's data fields for a ``data.train`` value."""
    if isinstance(train, (list, tuple)):
        return blend_manifest(train, options)
    if not str(train).strip():
        raise ValueError("data.train is empty: name a shard folder, a source URL or a blend")
    return read_manifest(train) if options is None else open_source(train, None, options).manifest


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
# Blends: several sources with weights (the loader's ``BlendLoader`` reads them)
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
