"""Fetching: the bytes at a location (a local path, an ``http(s)://`` URL or a ``pipe:`` command),
with timeouts and retries, and the options that govern fetching and caching (``data.*``).

Every attempt that fails (a ``pipe:`` command exiting non-zero or stalling for ``timeout_s``, an
HTTP error, a short read) raises ``FetchError``; ``retrying`` runs an attempt ``1 + retries``
times with exponential back-off and then raises ``ShardUnavailableError`` naming what it read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "FetchError",
    "NoDataError",
    "PipeRegistry",
    "ShardUnavailableError",
    "SourceOptions",
    "default_cache_dir",
    "fetch_bytes",
    "kill_process",
    "retrying",
    "stream",
]

_CHUNK = 1 << 20
_MAX_BACKOFF_S = 60.0
T = TypeVar("T")


class ShardUnavailableError(RuntimeError):
    """A shard (or a manifest) could not be read after all retries; the message names it."""


class NoDataError(ValueError):
    """Every shard of a source was skipped (``skip_bad_shards``), or an epoch gave no token."""



class FetchError(Exception):
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
# Streams (one attempt each)
# --------------------------------------------------------------------------------------------


class PipeRegistry:
    """The ``pipe:`` processes running now, so that ``close()`` can stop them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen[bytes]] = set()

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)  # its own session: the command and its children
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


def stream(
    location: str, kind: str, timeout_s: float, procs: PipeRegistry | None
) -> Iterator[bytes]:
    """The bytes at ``location`` in chunks; raises ``FetchError`` on any failure."""
    if kind == "pipe":
        yield from _stream_pipe(location[len("pipe:") :], timeout_s, procs)
    elif kind == "http":
        yield from _stream_http(location, timeout_s)
    else:
        try:
            with open(location, "rb") as fh:
                yield from iter(lambda: fh.read(_CHUNK), b"")
        except OSError as err:
            raise FetchError(f"{type(err).__name__}: {err}") from err


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
                raise FetchError(f"connection closed after {got} of {expected} bytes")
    except urllib.error.HTTPError as err:
        raise FetchError(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise FetchError(f"cannot reach {url}: {err.reason}") from err
    except TimeoutError as err:
        raise FetchError(f"no data for {timeout_s:g} s (timeout)") from err
    except (OSError, ValueError) as err:  # ConnectionReset, IncompleteRead, bad URL...
        raise FetchError(f"{type(err).__name__}: {err}") from err


def _stream_pipe(command: str, timeout_s: float, procs: PipeRegistry | None) -> Iterator[bytes]:
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
            yield from _read_until_eof(proc.stdout.fileno(), timeout_s)
            rc = proc.wait(timeout=timeout_s)
            finished = True
            if rc != 0:
                stderr.seek(0)
                tail = stderr.read()[-600:].decode("utf-8", "replace").strip()
                raise FetchError(f"exit status {rc}" + (f": {tail}" if tail else ""))
        except subprocess.TimeoutExpired as err:
            raise FetchError(f"the command did not exit {timeout_s:g} s after its output") from err
        finally:
            if not finished:
                kill_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if procs is not None:
                with procs.lock:
                    procs.procs.discard(proc)


def _read_until_eof(fd: int, timeout_s: float) -> Iterator[bytes]:
    """Chunks of ``fd`` up to its end; ``FetchError`` when nothing comes for ``timeout_s``."""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        if not ready:
            raise FetchError(f"the command wrote nothing for {timeout_s:g} s (timeout)")
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return
        yield chunk


def retrying(what: str, options: SourceOptions, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` up to ``1 + retries`` times; ``ShardUnavailableError`` names ``what``."""
    errors: list[str] = []
    for k in range(options.retries + 1):
        try:
            return attempt()
        except FetchError as err:
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


def fetch_bytes(location: str, kind: str, options: SourceOptions) -> bytes:
    """The whole content at ``location`` (a manifest), with ``options``' retries."""

    def attempt() -> bytes:
        return b"".join(stream(location, kind, options.timeout_s, None))

    return retrying(f"reading {location}", options, attempt)

