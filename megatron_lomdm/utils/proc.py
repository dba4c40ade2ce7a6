"""Process lifetime: child processes that die with their parent, and a quick interpreter exit.

megatron's checkpoint writer forks worker processes that send their results back through a pipe.
When the trainer is killed (kill -9) mid-save, a worker whose results fill the pipe blocks on it
forever, holding a copy of the trainer's memory. `forks_die_with_parent` makes every process forked
inside the block receive SIGKILL when its parent ends (Linux `PR_SET_PDEATHSIG`).

`quick_exit_gc` shortens the end of a command: with torch, megatron-core and torch._dynamo loaded
(every process that builds a torch optimizer loads dynamo), CPython's shutdown spends seconds in
garbage collections over millions of objects that are about to vanish anyway (bench/RESULTS.md).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import signal
import sys
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1
_active = False  # inside `forks_die_with_parent`
_registered = False
_parent_pid = 0  # the forking process, recorded just before each fork


def _record_parent() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _die_with_parent() -> None:
    if not _active:
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def forks_die_with_parent() -> Iterator[None]:
    """Inside the block, processes this process forks are killed when it ends (Linux; elsewhere a no-op)."""
    global _active, _registered
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _registered:
        os.register_at_fork(before=_record_parent, after_in_child=_die_with_parent)
        _registered = True
    _active = True
    try:
        yield
    finally:
        _active = False


def _freeze_heap() -> None:
    gc.freeze()  # the shutdown collections skip everything alive now


def quick_exit_gc() -> None:
    """At interpreter exit, move the heap to the GC's permanent generation so that shutdown's
    collections do not traverse it. Exit handlers (logging, MLflow, torch) still run and flush as
    before. What is skipped is only the collection of reference cycles at exit, which CPython never
    promises to finalize; every file this package writes is closed (or renamed into place) before
    `main` returns. Call it at the start of a command's `main`. A caller that runs `main` in its
    own interpreter (a test, a notebook) gets the same freeze at that interpreter's exit: its
    reference cycles alive then are not collected, which only matters to finalizers that were
    relying on shutdown's collection."""
    atexit.unregister(_freeze_heap)
    atexit.register(_freeze_heap)
