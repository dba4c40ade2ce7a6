"""A background thread that sends items in batches, so that the caller never waits on a server.

Why not MLflow's own ``log_metrics(..., synchronous=False)`` (mlflow 3.17): its queue is unbounded,
its worker logs an error for every failed batch (a dead server prints one per step), and
``end_run`` drains whatever is queued, one timed-out request after another. Here the queue is
bounded (a full queue drops, and counts, the newest items), the first failure stops sending for
good (reported once, by ``on_error``) and ``close`` waits at most its timeout.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()


class BackgroundSender(Generic[T]):
    """``put`` enqueues (never blocks); one daemon thread calls ``send`` with up to `batch` items.

    Args:
        send: Sends one batch; runs on the sender thread; raising stops all sending.
        on_error: Called once, on the sender thread, with the first exception ``send`` raised.
        batch: The most items per ``send`` call.
        capacity: The most items waiting; ``put`` drops items beyond it (see ``dropped``).
    """

    def __init__(self, send: Callable[[list[T]], None], *, on_error: Callable[[Exception], None],
                 batch: int = 1000, capacity: int = 100_000, name: str = "tracking-sender") -> None:
        self._send, self._on_error, self._batch = send, on_error, batch
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.failed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, items: list[T]) -> None:
        """Queue `items` for sending; returns at once (drops them after a failure or when full)."""
        for item in items:
            if self.failed:
                return
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1

    def close(self, timeout: float) -> bool:
        """Send what is queued, waiting at most `timeout` seconds; True if everything was sent."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive() and not self.failed

    def _take(self) -> tuple[list[T], bool]:
        """Block for one item, then take what else is waiting, up to a batch; (items, stop seen)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        items = [first]
        while len(items) < self._batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return items, True
            items.append(item)
        return items, False

    def _run(self) -> None:
        stop = False
        while not stop:
            items, stop = self._take()
            if not items or self.failed:
                continue
            try:
                self._send(items)
            except Exception as err:  # noqa: BLE001 - reported once; the caller must never see it
                self.failed = True
                self._on_error(err)
