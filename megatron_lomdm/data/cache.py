"""Caching: verified local copies of a source's shards, prefetching, and skipping bad shards.

Remote shards (``http(s)://``, ``pipe:``) are downloaded on first use into a cache folder
(``cache_dir/<data fingerprint>/``): written to a temporary name while their sha256 is computed,
checked against the manifest's size and sha256, and renamed into place, so a file under its final
name is always complete and verified. Processes sharing the cache (the ranks of a node, or of the
whole job on a shared file system) take a per-shard ``flock`` so that a shard is downloaded once;
where the file system has no ``flock`` they download it independently (the rename keeps that
correct). Upcoming shards are prefetched in background threads; ``cache_max_gb`` bounds the cache
by evicting the least recently used shards.

Local shards are read in place and not retried: their size is checked at every open and their
sha256 at the first open in each process (``reader.verify_shard_file``). With
``skip_bad_shards`` a bad shard is skipped instead of stopping the run: it is counted and logged
(on every rank), and a ``NAME.bad`` marker in the cache makes every process sharing the cache
agree on the skip.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import numpy as np

from megatron_lomdm.data.fetch import (
    FetchError,
    PipeRegistry,
    ShardUnavailableError,
    SourceOptions,
    retrying,
    stream,
)
from megatron_lomdm.data.reader import ShardDataError, ShardFile, verify_shard_file
from megatron_lomdm.data.sources import ShardSource
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["ShardStore"]

_BAD_MARKER_GRACE_S = 600.0  # a peer's skip verdict older than the process start by this is stale
_PROCESS_START = time.time()
T = TypeVar("T")


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
        self._procs = PipeRegistry()
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
            except FetchError:
                with self._lock:
                    self.counters["failed_attempts"] += 1
                raise

        return retrying(self.describe(index), self.options, counted)

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
        owner = f"{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
        tmp = self.folder / f".{shard['name']}.{owner}.tmp"
        digest, size, t0 = hashlib.sha256(), 0, time.perf_counter()
        try:
            with open(tmp, "wb") as out:
                for chunk in stream(
                    self.source.locations[index],
                    self.source.spec.kind,
                    self.options.timeout_s,
                    self._procs,
                ):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if size != int(shard["bytes"]):
                raise FetchError(f"got {size} bytes, the manifest says {shard['bytes']}")
            if digest.hexdigest() != shard["sha256"]:
                raise FetchError(
                    f"sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
                    f"{shard['sha256'][:16]}..."
                )
            os.replace(tmp, dest)
        except OSError as err:
            raise FetchError(f"{type(err).__name__}: {err}") from err
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
