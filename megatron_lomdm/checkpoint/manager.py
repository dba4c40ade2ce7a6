"""Atomic, resumable checkpoints: `checkpoints/step_XXXXXXX/` plus a `latest` pointer.

Each rank writes its own shard file (`rank_TTT_PPP_DDD.pt`: its TP/PP slice of the model, its
optimizer state, EMA, RNG, and the shared train/loader state) into `step_XXXXXXX.tmp/`. After a
barrier, rank 0 renames the folder to `step_XXXXXXX/` and only then rewrites `latest` (write to a
temp file, fsync, rename). A save killed at any point therefore leaves the previous checkpoint
as `latest`, complete and loadable. Loading uses `torch.load(weights_only=True)`.

Resharding: this format restores only onto the same TP x PP layout (the data-parallel size may
change: model and optimizer state are replicated over DP). A different layout is refused with a
clear error.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank constructs it with its coordinates."""

    def __init__(self, root: str | Path, *, tp_rank: int, pp_rank: int, dp_rank: int, tp: int, pp: int,
                 is_rank0: bool, keep_last: int) -> None:
        self.root = Path(root)
        self.tp_rank, self.pp_rank, self.dp_rank = tp_rank, pp_rank, dp_rank
        self.tp, self.pp = tp, pp
        self.is_rank0 = is_rank0
        self.keep_last = keep_last
        if is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()

    def _shard_name(self) -> str:
        # Data-parallel replicas hold identical model/optimizer state; only DP rank 0 writes it.
        return f"rank_{self.tp_rank:03d}_{self.pp_rank:03d}.pt"

    def latest_step(self) -> int | None:
        """The step named by `latest`, or None when the run has no complete checkpoint."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        match = _STEP_DIR.match(name)
        if not match or not (self.root / name / "meta.pt").exists():
            raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint folder")
        return int(match.group(1))

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write this rank's shard of checkpoint `step` and publish it atomically."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if self.dp_rank == 0:
            torch.save(state, tmp / self._shard_name())
        _barrier()
        if self.is_rank0:
            torch.save({"step": step, "tp": self.tp, "pp": self.pp, "format": 1}, tmp / "meta.pt")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_write(self.root / "latest", final.name + "\n")
            self._prune()
            log.info("saved checkpoint %s", final)
        _barrier()
        return final

    def load(self, step: int) -> dict[str, Any]:
        """This rank's shard of checkpoint `step` (tensors on CPU)."""
        folder = self.root / f"step_{step:07d}"
        meta = torch.load(folder / "meta.pt", weights_only=True)
        if (meta["tp"], meta["pp"]) != (self.tp, self.pp):
            raise ValueError(
                f"{folder} was written with parallel.tp={meta['tp']}, parallel.pp={meta['pp']}; this run uses "
                f"tp={self.tp}, pp={self.pp}. Convert it with tools/convert_to_hf.py or keep the layout."
            )
        return torch.load(folder / self._shard_name(), map_location="cpu", weights_only=True)

    def _prune(self) -> None:
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(self.root / f"step_{old:07d}", ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
