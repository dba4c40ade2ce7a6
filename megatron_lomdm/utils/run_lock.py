"""One trainer per run directory: an exclusive lock on `run.dir/train.lock`.

The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when the holding process
ends in any way (kill -9 included), so a requeued job never finds a stale lock, and processes the
trainer forks (checkpoint writers) do not inherit it. The file holds the holder's host and pid,
for the message a second trainer gets. Readers of a run (evaluate, sample, export) never take it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_NAME = "train.lock"


class RunDirInUse(ValueError):
    """Another live process trains in this run directory."""


def lock_run_dir(run_dir: str | Path) -> IO[str]:
    """Hold `run_dir/train.lock` until the returned file is closed or this process ends.

    Raises:
        RunDirInUse: another process holds it; the message names the holder's host and pid.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    f = path.open("a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "holder unknown"
        f.close()
        raise RunDirInUse(f"{run_dir} is in use by another trainer ({holder}, lock {path}); wait for it to "
                          f"end or choose another run.dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    return f
