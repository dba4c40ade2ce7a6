"""SIGTERM / SIGUSR1 (what Slurm sends before a kill) -> finish the step, checkpoint, exit 3.

The handler only sets a flag, so a second signal arriving during the save changes nothing. Ranks
agree on the flag with an all-reduce (MAX), so a signal seen by one rank stops all of them at the
same step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)


class PreemptionFlag:
    """Installs handlers for SIGTERM and SIGUSR1; `requested()` is collective when distributed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self._received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            log.warning("received %s: will checkpoint after this step and exit", signal.Signals(signum).name)
        self._received = signum

    def requested(self, device: torch.device) -> bool:
        flag = torch.tensor(1 if self._received is not None else 0, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
