"""Atomic, resumable checkpoints: `checkpoints/step_XXXXXXX/` plus a `latest` pointer.

The model and optimizer go through megatron-core `dist_checkpointing` into `dist/` (every rank
writes its shard, collectively); everything else a rank owns (its TP/PP slice of the EMA, RNG,
and the shared train/loader state) goes to `rank_TTT_PPP.pt`, written by data-parallel rank 0 of
each model-parallel slice. All of it lands in `step_XXXXXXX.tmp/`; after a barrier rank 0 renames
the folder to `step_XXXXXXX/` and only then rewrites `latest` (temp file, fsync, rename). A save
killed at any point therefore leaves the previous checkpoint as `latest`, complete and loadable.
Loading uses `torch.load(weights_only=True)`.

Resharding: the `dist/` part is reshardable across data-parallel sizes (the distributed
optimizer uses `dp_reshardable`); the per-rank files (EMA) tie a checkpoint to its TP x PP
layout, so a different TP/PP is refused with a clear error. `tools/convert_to_hf.py` reads any
layout.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from collections.abc import Callable
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

    def save(self, step: int, state: dict[str, Any], sharded_writer: Callable[[Path], None] | None = None) -> Path:
        """Write this rank's shard of checkpoint `step` and publish it atomically.

        Args:
            step: the optimizer step the state belongs to.
            state: this rank's plain state (saved by DP rank 0 of its model-parallel slice).
            sharded_writer: a collective writer of the sharded model/optimizer state, given the
                `dist/` folder inside the temporary checkpoint folder.
        """
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "dist").mkdir()
        _barrier()
        if sharded_writer is not None:
            sharded_writer(tmp / "dist")
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

    def folder(self, step: int) -> Path:
        """The folder of checkpoint `step`."""
        return self.root / f"step_{step:07d}"

    def load(self, step: int) -> dict[str, Any]:
        """This rank's shard of checkpoint `step` (tensors on CPU); the sharded part is in `folder(step)/dist`."""
        folder = self.folder(step)
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
