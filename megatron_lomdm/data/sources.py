"""Shard sources: where the shards of a split live, and how a rank gets a verified local copy.

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

Remote shards (``http(s)://``, ``pipe:``) are downloaded on first use into a cache folder
(``cache_dir/<data fingerprint>/``): written to a temporary name while their sha256 is computed,
checked against the manifest's size and sha256, and renamed into place, so a file under its final
name is always complete and verified. Processes sharing the cache (the ranks of a node, or of the
whole job on a shared file system) take a per-shard ``flock`` so that a shard is downloaded once;
where the file system has no ``flock`` they download it independently (the rename keeps that
correct). The loader then reads them by random access (``mmap``) exactly as local shards, which
is why the global sample order, the data-parallel split and the resume position are the same for
every kind of source. Upcoming shards (in this rank's order of first use) are prefetched in
background threads; ``cache_max_gb`` bounds the cache by evicting the least recently used shards.

Failures. Every fetch attempt that fails (a ``pipe:`` command exiting non-zero or stalling for
``timeout_s``, an HTTP error, a short or corrupt download) is retried ``retries`` times with
exponential back-off; then the run stops with ``ShardUnavailableError`` naming the shard and its
location. Local shards are not retried: their size is checked at every open and their sha256 at
the first open in each process (``shards.verify_shard_file``); a missing, truncated or corrupt one
stops the run at once with ``ShardDataError`` naming the shard and the manifest's size and digest.
Every row read is checked too (lengths, token ids below the manifest's ``vocab_size``, padding;
``shards.ShardFile``). With ``skip_bad_shards`` a bad shard is skipped instead: its rows become
empty rows (``valid`` all False, no loss), it is counted and logged (on every rank), and a
``NAME.bad`` marker in the cache makes every process sharing the cache agree on the skip. Nothing
is ever skipped silently, and a loader that has skipped every shard of a source, or read a whole
epoch without a token, stops with ``NoDataError`` instead of training on nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import queue
import re
import select
import shlex
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from megatron_lomdm.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardDataError,
    ShardFile,
    parse_manifest,
    read_manifest,
    verify_shard_file,
)
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "NoDataError",
    "ShardDataError",
    "ShardSource",
    "ShardStore",
    "ShardUnavailableError",
    "SourceOptions",
    "SourceSpec",
    "default_cache_dir",
    "is_source_spec",
    "manifest_of",
    "open_source",
    "parse_spec",
    "read_source_manifest",
]

_SCHEMES = ("pipe:", "http:", "https:", "file:")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
# A shard file name inside a pipe command (the last one is the shard): no '/', ends in '.tar'.
_TAR_NAME = re.compile(r"[A-Za-z0-9_.+-]*[A-Za-z0-9_+-]\.tar(?![A-Za-z0-9_.+-])")
_JSON_NAME = re.compile(r"[A-Za-z0-9_.+-]*[A-Za-z0-9_+-]\.json(?![A-Za-z0-9_.+-])")
_CHUNK = 1 << 20
_MAX_BACKOFF_S = 60.0
_BAD_MARKER_GRACE_S = 600.0  # a peer's skip verdict older than the process start by this is stale
_PROCESS_START = time.time()
T = TypeVar("T")


class ShardUnavailableError(RuntimeError):
    """A shard (or a manifest) could not be read after all retries; the message names it."""


class NoDataError(ValueError):
    """Every shard of a source was skipped (``skip_bad_shards``), or an epoch gave no token."""


class _FetchError(Exception):
    """One failed attempt (retried)."""


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LOMDM_DATA_CACHE``, else ``$XDG_CACHE_HOME/megatron_lomdm/shards`` (``~/.cache/...``)."""
    if os.environ.get("LOMDM_DATA_CACHE"):
        return Path(os.environ["LOMDM_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megatron_lomdm" / "shards"


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How remote shards are fetched and cached (``data.*`` keys of the same names).

    Attributes:
        cache_dir: where remote shards are downloaded (``None``: ``default_cache_dir()``); use a
            node-local disk when the ranks of a node can share it, a shared file system to
            download each shard once for the whole job.
        retries: attempts after the first before a shard is declared unavailable.
        retry_wait_s: back-off before the first retry; doubles each retry (at most 60 s).
        timeout_s: an HTTP connection or read, or a ``pipe:`` command's output, that stalls this
            long fails the attempt.
        skip_bad_shards: skip (count, log) an unavailable shard instead of stopping.
        cache_max_gb: bound on the cache folder of one source; 0 means unbounded.
        prefetch_shards: upcoming shards downloaded ahead in background threads; 0 disables.
    """

    cache_dir: str | Path | None = None
    retries: int = 3
    retry_wait_s: float = 2.0
    timeout_s: float = 300.0
    skip_bad_shards: bool = False
    cache_max_gb: float = 0.0
    prefetch_shards: int = 4

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.retry_wait_s < 0 or self.timeout_s <= 0:
            raise ValueError("retry_wait_s must be >= 0 and timeout_s > 0")
        if self.cache_max_gb < 0 or self.prefetch_shards < 0:
            raise ValueError("cache_max_gb and prefetch_shards must be >= 0")

    @property
    def cache_root(self) -> Path:
        """The cache folder (absolute)."""
        return Path(self.cache_dir or default_cache_dir()).absolute()


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
        manifest = read_manifest(body)  # local folder / manifest file: read in place
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
# Streams (one attempt each)
# --------------------------------------------------------------------------------------------


class _PipeRegistry:
    """The ``pipe:`` processes running now, so that ``close()`` can stop them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen[bytes]] = set()

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)  # its own session: the command and its children
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


def _stream(
    location: str, kind: str, timeout_s: float, procs: _PipeRegistry | None
) -> Iterator[bytes]:
    """The bytes at ``location`` in chunks; raises ``_FetchError`` on any failure."""
    if kind == "pipe":
        yield from _stream_pipe(location[len("pipe:") :], timeout_s, procs)
    elif kind == "http":
        yield from _stream_http(location, timeout_s)
    else:
        try:
            with open(location, "rb") as stream:
                yield from iter(lambda: stream.read(_CHUNK), b"")
        except OSError as err:
            raise _FetchError(f"{type(err).__name__}: {err}") from err


def _stream_http(url: str, timeout_s: float) -> Iterator[bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "megatron_lomdm"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            expected = response.headers.get("Content-Length")
            got = 0
            while chunk := response.read(_CHUNK):
                got += len(chunk)
                yield chunk
            if expected is not None and got != int(expected):
                raise _FetchError(f"connection closed after {got} of {expected} bytes")
    except urllib.error.HTTPError as err:
        raise _FetchError(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _FetchError(f"cannot reach {url}: {err.reason}") from err
    except TimeoutError as err:
        raise _FetchError(f"no data for {timeout_s:g} s (timeout)") from err
    except (OSError, ValueError) as err:  # ConnectionReset, IncompleteRead, bad URL...
        raise _FetchError(f"{type(err).__name__}: {err}") from err


def _stream_pipe(command: str, timeout_s: float, procs: _PipeRegistry | None) -> Iterator[bytes]:
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        if procs is not None:
            with procs.lock:
                procs.procs.add(proc)
        finished = False
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while True:
                ready, _, _ = select.select([fd], [], [], timeout_s)
                if not ready:
                    raise _FetchError(f"the command wrote nothing for {timeout_s:g} s (timeout)")
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    break
                yield chunk
            rc = proc.wait(timeout=timeout_s)
            finished = True
            if rc != 0:
                stderr.seek(0)
                tail = stderr.read()[-600:].decode("utf-8", "replace").strip()
                raise _FetchError(f"exit status {rc}" + (f": {tail}" if tail else ""))
        except subprocess.TimeoutExpired as err:
            raise _FetchError(f"the command did not exit {timeout_s:g} s after its output") from err
        finally:
            if not finished:
                _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if procs is not None:
                with procs.lock:
                    procs.procs.discard(proc)


def _retrying(what: str, options: SourceOptions, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` up to ``1 + retries`` times; ``ShardUnavailableError`` names ``what``."""
    errors: list[str] = []
    for k in range(options.retries + 1):
        try:
            return attempt()
        except _FetchError as err:
            errors.append(str(err))
            if k < options.retries:
                wait = min(options.retry_wait_s * 2**k, _MAX_BACKOFF_S)
                logger.warning(
                    "%s: attempt %d of %d failed (%s); retrying in %.1f s",
                    what,
                    k + 1,
                    options.retries + 1,
                    err,
                    wait,
                )
                time.sleep(wait)
    raise ShardUnavailableError(
        f"{what}: failed {len(errors)} attempt(s) (data.retries={options.retries}); last error: "
        f"{errors[-1]}"
    )


def _fetch_bytes(location: str, kind: str, options: SourceOptions) -> bytes:
    def attempt() -> bytes:
        return b"".join(_stream(location, kind, options.timeout_s, None))

    return _retrying(f"reading {location}", options, attempt)


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
        return read_manifest(spec.manifest_location)
    key = (spec.manifest_location, str(options.cache_root))
    with _MANIFESTS_LOCK:
        if key in _MANIFESTS:
            return _MANIFESTS[key]
    raw = _fetch_bytes(spec.manifest_location, spec.kind, options)
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
    listed = parsed.names is not None
    if listed:
        own = _pattern_split(parsed, manifest)
        if split is None or split == own:
            split, names = own, list(parsed.names or ())
        else:
            names = [s["name"] for s in manifest.split(split)["shards"]]
    else:
        split = split or "train"
        names = [s["name"] for s in manifest.split(split)["shards"]]
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
        from megatron_lomdm.data.blend import blend_manifest  # noqa: PLC0415 (cycle)

        return blend_manifest(spec, options)
    parsed = parse_spec(spec)
    if parsed.names is not None:
        return open_source(parsed, None, options).manifest  # checks the listed shards
    return manifest_of(parsed, options)


# --------------------------------------------------------------------------------------------
# The store: local copies of a source's shards
# --------------------------------------------------------------------------------------------


class _Prefetcher:
    """Daemon threads running fetches, started on demand and gone after ``_IDLE_S`` idle seconds.

    Daemon threads, so that a finishing or preempted process never waits for a download
    (``concurrent.futures`` pools are joined at exit); idle exit, so that loaders that are never
    closed (one per evaluation) leave no threads behind.
    """

    _IDLE_S = 30.0

    def __init__(self, workers: int, fetch: Callable[[int], Path]) -> None:
        self.workers, self.fetch = workers, fetch
        self.tasks: queue.Queue[tuple[int, Future[Path]]] = queue.Queue()
        self.lock = threading.Lock()
        self.running = 0

    def submit(self, index: int) -> Future[Path]:
        future: Future[Path] = Future()
        self.tasks.put((index, future))
        with self.lock:
            if self.running < self.workers:
                self.running += 1
                threading.Thread(target=self._run, name="shard-prefetch", daemon=True).start()
        return future

    def _run(self) -> None:
        while True:
            try:
                index, future = self.tasks.get(timeout=self._IDLE_S)
            except queue.Empty:
                with self.lock:
                    if self.tasks.empty():
                        self.running -= 1
                        return
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.fetch(index))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                future.set_exception(err)

    def close(self) -> None:
        """Cancel what has not started (running fetches stop at their next attempt)."""
        while True:
            try:
                _, future = self.tasks.get_nowait()
            except queue.Empty:
                return
            future.cancel()


class ShardStore:
    """Opens the shards of a ``ShardSource`` (fetching remote ones into the cache) with retries.

    Thread-safe: background threads prefetch while the loader opens shards.
    """

    def __init__(self, source: ShardSource, options: SourceOptions | None = None) -> None:
        self.source = source
        self.options = options or SourceOptions()
        self.folder = (
            self.options.cache_root / source.manifest.fingerprint()[:24] if source.remote else None
        )
        self._lock = threading.Lock()
        self._shard_locks: dict[int, threading.Lock] = {}
        self._futures: dict[int, Future[Path]] = {}
        self._prefetcher: _Prefetcher | None = None
        self._closed = False
        self._procs = _PipeRegistry()
        self.bad: dict[int, str] = {}
        self.counters = {
            "fetched_shards": 0,
            "fetched_bytes": 0,
            "fetch_seconds": 0.0,
            "failed_attempts": 0,
            "cache_evictions": 0,
        }
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()

    # ---- public --------------------------------------------------------------------------------

    def name(self, index: int) -> str:
        """The shard's file name."""
        return self.source.shards[index]["name"]

    def describe(self, index: int) -> str:
        """``NAME (location)`` for messages."""
        return f"shard {self.name(index)} ({self.source.locations[index]})"

    def open(self, index: int, *, dtype: np.dtype, seq_length: int) -> ShardFile | None:
        """Open shard ``index`` for random access; ``None`` when it is skipped (bad).

        Raises:
            ShardUnavailableError: after all retries, unless ``skip_bad_shards``.
        """
        if index in self.bad:
            return None
        try:
            if not self.source.remote:
                return self._open_local(index, dtype, seq_length)
            path = self._local_copy(index)
            try:
                return self._shard_file(index, path, dtype, seq_length)
            except (OSError, ValueError) as err:  # evicted by another process meanwhile, or bad
                logger.warning(
                    "%s: reopening the cached copy failed (%s); fetching it again",
                    self.describe(index),
                    err,
                )
                with contextlib.suppress(OSError):
                    path.unlink()
                path = self._fetch(index)
                return self._shard_file(index, path, dtype, seq_length)
        except (ShardUnavailableError, ShardDataError) as err:
            if not self.options.skip_bad_shards:
                raise
            self.skip(index, str(err))
            return None

    def check_local_sizes(self) -> None:
        """Local sources: check every shard's size now (a ``stat`` each), so that a missing or
        truncated shard stops the run (or is skipped) before the first step."""
        if self.source.remote:
            return
        manifest = self.source.manifest.location
        pairs = zip(self.source.shards, self.source.locations, strict=True)
        for index, (entry, path) in enumerate(pairs):
            try:
                verify_shard_file(Path(path), entry, manifest, digest=False)
            except ShardDataError as err:
                if not self.options.skip_bad_shards:
                    raise
                self.skip(index, str(err))

    def verify_until_good(self) -> None:
        """Local sources: verify (sha256) the shards not yet skipped, in order, until one is good,
        skipping the bad ones. Called when nothing good has been read yet, so that a source whose
        every shard is bad is found out at once (not one shard at a time while training on empty
        rows); when the data is fine it costs the digest of about one shard, due anyway."""
        if self.source.remote:
            return
        for index, path in enumerate(self.source.locations):
            if index in self.bad:
                continue
            try:
                entry = self.source.shards[index]
                verify_shard_file(Path(path), entry, self.source.manifest.location)
                return
            except ShardDataError as err:
                if not self.options.skip_bad_shards:
                    raise
                self.skip(index, str(err))

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start downloading these shards in the background (remote sources; no-op otherwise)."""
        if not self.source.remote or self.options.prefetch_shards == 0:
            return
        with self._lock:
            if self._closed:
                return
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(min(self.options.prefetch_shards, 4), self._fetch)
            for index in indices:
                if index in self._futures or index in self.bad or self._cached(index) is not None:
                    continue
                self._futures[index] = self._prefetcher.submit(index)

    def stats(self) -> dict[str, float]:
        """Counters: fetched shards/bytes/seconds, failed attempts, skipped shards."""
        with self._lock:
            out: dict[str, float] = dict(self.counters)
            out["skipped_shards"] = len(self.bad)
        return out

    def close(self) -> None:
        """Stop prefetching (running ``pipe:`` commands are killed)."""
        with self._lock:
            self._closed = True
            prefetcher, self._prefetcher = self._prefetcher, None
            futures, self._futures = self._futures, {}
        for future in futures.values():
            future.cancel()
        self._procs.kill_all()
        if prefetcher is not None:
            prefetcher.close()

    # ---- local ---------------------------------------------------------------------------------

    def _open_local(self, index: int, dtype: np.dtype, seq_length: int) -> ShardFile:
        """Verify (size; sha256 once per process) and open a local shard; no retries: a local
        file that is wrong now stays wrong."""
        path = Path(self.source.locations[index])
        verify_shard_file(path, self.source.shards[index], self.source.manifest.location)
        try:
            return self._shard_file(index, path, dtype, seq_length)
        except OSError as err:
            raise ShardDataError(f"shard {path}: cannot be read ({err})") from err

    def _shard_file(self, index: int, path: Path, dtype: np.dtype, seq_length: int) -> ShardFile:
        shard, tokenizer = self.source.shards[index], self.source.manifest.tokenizer
        return ShardFile(
            path,
            dtype=dtype,
            seq_length=seq_length,
            expected_rows=int(shard["num_samples"]),
            expected_tokens=shard.get("num_tokens"),
            vocab_size=tokenizer.get("vocab_size"),
            pad_id=tokenizer.get("pad_id"),
        )

    def _retry(self, index: int, attempt: Callable[[], T]) -> T:
        def counted() -> T:
            try:
                return attempt()
            except _FetchError:
                with self._lock:
                    self.counters["failed_attempts"] += 1
                raise

        return _retrying(self.describe(index), self.options, counted)

    # ---- remote --------------------------------------------------------------------------------

    def _cached(self, index: int) -> Path | None:
        assert self.folder is not None
        path = self.folder / self.name(index)
        try:
            if path.stat().st_size == int(self.source.shards[index]["bytes"]):
                return path
        except FileNotFoundError:
            pass
        return None

    def _local_copy(self, index: int) -> Path:
        with self._lock:
            future = self._futures.pop(index, None)
        if future is not None and not future.cancelled():
            return future.result()  # its ShardUnavailableError is final: it already retried
        return self._fetch(index)

    def _shard_lock(self, index: int) -> threading.Lock:
        with self._lock:
            return self._shard_locks.setdefault(index, threading.Lock())

    @contextlib.contextmanager
    def _file_lock(self, index: int) -> Iterator[None]:
        """Exclusive per shard across processes sharing the cache (where ``flock`` works)."""
        import fcntl

        assert self.folder is not None
        with self._shard_lock(index), open(self.folder / f".{self.name(index)}.lock", "a+b") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError as err:  # e.g. a file system mounted without flock support
                if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            yield

    def _fetch(self, index: int) -> Path:
        """The verified local copy of a remote shard, downloading it if needed (with retries)."""
        with self._file_lock(index):
            path = self._cached(index)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: evicted last
                return path
            peer = self._peer_verdict(index)
            if peer is not None:
                raise ShardUnavailableError(peer)
            try:
                return self._retry(index, lambda: self._download(index))
            except ShardUnavailableError as err:
                if self.options.skip_bad_shards:
                    self._write_marker(index, str(err))
                raise

    def _download(self, index: int) -> Path:
        assert self.folder is not None
        if self._closed:
            raise ShardUnavailableError(f"{self.describe(index)}: the loader was closed")
        shard = self.source.shards[index]
        dest = self.folder / shard["name"]
        self._make_room(int(shard["bytes"]))
        tmp = (
            self.folder
            / f".{shard['name']}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp"
        )
        digest, size, t0 = hashlib.sha256(), 0, time.perf_counter()
        try:
            with open(tmp, "wb") as out:
                for chunk in _stream(
                    self.source.locations[index],
                    self.source.spec.kind,
                    self.options.timeout_s,
                    self._procs,
                ):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if size != int(shard["bytes"]):
                raise _FetchError(f"got {size} bytes, the manifest says {shard['bytes']}")
            if digest.hexdigest() != shard["sha256"]:
                raise _FetchError(
                    f"sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
                    f"{shard['sha256'][:16]}..."
                )
            os.replace(tmp, dest)
        except OSError as err:
            raise _FetchError(f"{type(err).__name__}: {err}") from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with self._lock:
            self.counters["fetched_shards"] += 1
            self.counters["fetched_bytes"] += size
            self.counters["fetch_seconds"] += time.perf_counter() - t0
        return dest

    def _remove_stale_temporaries(self) -> None:
        """Remove partial downloads of dead processes of this host (``.NAME.HOST.PID.TID.tmp``)."""
        assert self.folder is not None
        host = socket.gethostname()
        for shard in self.source.shards:
            head = f".{shard['name']}."
            for tmp in self.folder.glob(f"{head}*.tmp"):
                owner = tmp.name[len(head) : -len(".tmp")].rsplit(".", 2)  # host, pid, thread
                if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
                    continue
                try:
                    os.kill(int(owner[1]), 0)
                except ProcessLookupError:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                except PermissionError:
                    pass

    def _make_room(self, need: int) -> None:
        """Evict the least recently used shards of this cache folder beyond ``cache_max_gb``."""
        if not self.options.cache_max_gb:
            return
        assert self.folder is not None
        budget = int(self.options.cache_max_gb * 1e9)
        files = []
        for path in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
        used = sum(f[1] for f in files)
        for _, size, path in sorted(files):
            if used + need <= budget:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a process that has it mapped keeps reading it (POSIX)
                used -= size
                with self._lock:
                    self.counters["cache_evictions"] += 1

    # ---- skipping ------------------------------------------------------------------------------

    def _marker(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.name(index)}.bad"

    def _peer_verdict(self, index: int) -> str | None:
        if not self.options.skip_bad_shards:
            return None
        marker = self._marker(index)
        try:
            if marker.stat().st_mtime >= _PROCESS_START - _BAD_MARKER_GRACE_S:
                return (
                    f"{self.describe(index)}: skipped by a process sharing the cache: "
                    + marker.read_text()
                )
        except (FileNotFoundError, OSError):
            pass
        return None

    def _write_marker(self, index: int, error: str) -> None:
        marker = self._marker(index)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(error, encoding="utf-8")
            os.replace(tmp, marker)

    def skip(self, index: int, error: str) -> None:
        """Mark shard ``index`` bad (``skip_bad_shards``): logged once, its rows become empty."""
        with self._lock:
            first = index not in self.bad
            self.bad[index] = error
        if first:
            logger.error(
                "SKIPPING %s (data.skip_bad_shards=true): its %d samples become empty rows. %s",
                self.describe(index),
                self.source.shards[index]["num_samples"],
                error,
            )
