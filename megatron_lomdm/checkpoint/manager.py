"""Atomic, resumable checkpoints: `checkpoints/step_XXXXXXX/` plus a `latest` pointer.

Every tensor of the run goes through megatron-core `dist_checkpointing` into `dist/` (every rank
writes its shard, collectively): the model, the optimizer, and the EMA shadows, sharded exactly
like the parameters they track (format 2, `checkpoint/sharded.py`). The small plain state goes to
`rank_TTT_PPP.pt`, written by data-parallel rank 0 of each model-parallel slice: the RNG states
of that slice and the train/loader/P-POTS state every rank shares. All of it lands in `step_XXXXXXX.tmp/`; after a barrier rank 0 renames
the folder to `step_XXXXXXX/` and only then rewrites `latest` (temp file, fsync, rename). A save
killed at any point therefore leaves the previous checkpoint as `latest`, complete and loadable.
Loading uses `torch.load(weights_only=True)`.

`meta.pt` also records the save order (`seq`) and the size of every file of the checkpoint, so
pruning keeps the newest checkpoints by save order (never the one `latest` names), a lost
`latest` resumes from the newest complete checkpoint, and a truncated or missing file is found
(`check`) before anything is loaded. A full disk fails the save with `CheckpointWriteError`,
leaving `latest` as it was.

Resharding: `dist/` reshards across TP, PP and DP (the distributed optimizer uses
`dp_reshardable`), so a format-2 checkpoint resumes on any layout: on another TP x PP every rank
reads the shared state from `rank_000_000.pt` and keeps its freshly seeded RNG (`load`). Format 1
(written before the EMA moved into `dist/`: the EMA in the rank files) loads on its own layout
only; a different TP/PP is refused with a message that says how to convert it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# torch's zip writer and megatron's writer processes report a failed write only as text
_WRITE_FAILURE_TEXT = ("No space left", "Disk quota exceeded", "file write failed", "inline_container.cc")


FORMAT = 2  # 1: EMA in the rank files (layout-bound); 2: EMA in dist/ (any layout)


class LayoutMismatch(ValueError):
    """A checkpoint that cannot be resumed on this run's layout."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full); `latest` still names the last complete one."""


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


def _causes(err: BaseException) -> list[BaseException]:
    """`err`, what it was raised from, and the per-rank failures torch's checkpointing collects."""
    out: list[BaseException] = []
    todo = [err]
    while todo:
        seen = todo.pop()
        if seen is None or any(seen is o for o in out):
            continue
        out.append(seen)
        todo += [seen.__cause__, seen.__context__]
        if isinstance(seen, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in seen.failures.values()]
    return out


def _disk_full(err: BaseException, folder: Path) -> str | None:
    """The failure's own message if `err` is a full disk or quota at `folder`, else None."""
    for seen in _causes(err):
        text = str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return text
        if any(marker in str(seen) for marker in _WRITE_FAILURE_TEXT[:2]):
            return text
        if any(marker in text for marker in _WRITE_FAILURE_TEXT[2:]):
            # torch's writer names no errno: ask the file system whether it is (nearly) full
            probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
            usage = shutil.disk_usage(probe)
            if usage.free < max(64 * 2**20, usage.total // 200):
                return text
    return None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank constructs it with its coordinates."""

    def __init__(self, root: str | Path, *, tp_rank: int, pp_rank: int, dp_rank: int, tp: int, pp: int,
                 is_rank0: bool, keep_last: int, dp: int = 1) -> None:
        self.root = Path(root)
        self.tp_rank, self.pp_rank, self.dp_rank = tp_rank, pp_rank, dp_rank
        self.tp, self.pp, self.dp = tp, pp, dp
        self.is_rank0 = is_rank0
        self.keep_last = keep_last
        self._warned_no_pointer = False
        if is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()

    @classmethod
    def reader(cls, root: str | Path) -> CheckpointManager:
        """A manager for finding a run's checkpoints without a process group (tools that only read)."""
        return cls(root, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=False, keep_last=1)

    def shard_name(self) -> str:
        # Data-parallel replicas hold identical model/optimizer state; only DP rank 0 writes it.
        return f"rank_{self.tp_rank:03d}_{self.pp_rank:03d}.pt"

    def latest_step(self) -> int | None:
        """The step named by `latest`, or None when the run has no complete checkpoint.

        Without `latest` (deleted, or lost in a crash right after a save) the newest complete
        checkpoint by save order is the latest one, with a warning: a run never restarts from
        scratch over its own checkpoints.
        """
        pointer = self.root / "latest"
        if not pointer.exists():
            steps = self.complete_steps()
            if steps and not self._warned_no_pointer:
                self._warned_no_pointer = True
                log.warning("%s is missing; using the newest complete checkpoint %s (of %s)", pointer,
                            self.folder(steps[-1]).name, ", ".join(self.folder(s).name for s in steps))
            return steps[-1] if steps else None
        try:
            name = pointer.read_text().strip()
        except UnicodeDecodeError:
            raise ValueError(f"{pointer} does not hold a checkpoint folder name (binary content); delete it "
                             f"to resume from the newest complete checkpoint") from None
        match = _STEP_DIR.match(name)
        if not match or not (self.root / name / "meta.pt").exists():
            raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint folder")
        return int(match.group(1))

    def meta(self, step: int) -> dict[str, Any]:
        """`meta.pt` of checkpoint `step` (format, layout, save order, file sizes)."""
        return torch.load(self.folder(step) / "meta.pt", weights_only=True)

    def same_layout(self, step: int) -> bool:
        """Whether checkpoint `step` was written with this run's TP x PP (each rank has its own file)."""
        meta = self.meta(step)
        return (meta["tp"], meta["pp"]) == (self.tp, self.pp)

    def state_file(self, step: int) -> Path:
        """The rank file this rank resumes from: its own slice's, or on another layout rank 0's."""
        name = self.shard_name() if self.same_layout(step) else "rank_000_000.pt"
        return self.folder(step) / name

    def _meta(self, step: int) -> dict[str, Any] | None:
        try:
            meta = torch.load(self.folder(step) / "meta.pt", weights_only=True)
        except Exception:  # noqa: BLE001  (a damaged meta.pt: `check` names it)
            return None
        return meta if isinstance(meta, dict) else None

    def _save_order(self) -> list[tuple[int, int]]:
        """(save sequence number, step) of every step folder, oldest save first; -1 = unknown
        (checkpoints from before `seq` existed, or a damaged meta.pt), ordered by step."""
        if not self.root.is_dir():
            return []
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        order = []
        for step in steps:
            meta = self._meta(step)
            seq = meta.get("seq", -1) if meta is not None else -1
            order.append((seq if isinstance(seq, int) else -1, step))
        return sorted(order)

    def complete_steps(self) -> list[int]:
        """Steps of the folders holding `meta.pt` (written last), oldest save first."""
        return [step for _, step in self._save_order() if (self.folder(step) / "meta.pt").is_file()]

    def resume_candidates(self) -> list[int]:
        """The latest checkpoint, then the complete ones saved before it, newest first."""
        latest = self.latest_step()
        if latest is None:
            return []
        steps = self.complete_steps()
        older = steps[: steps.index(latest)] if latest in steps else []
        return [latest, *reversed(older)]

    def check(self, step: int) -> str | None:
        """What is wrong with the files of checkpoint `step` (naming the file), or None.

        Compares the files with the sizes `meta.pt` recorded at save time: a truncated or missing
        file (a `.distcp`, a rank file) is found here, before any collective load starts.
        """
        folder = self.folder(step)
        meta = self._meta(step)
        if meta is None:
            return f"{folder / 'meta.pt'} is unreadable"
        if meta.get("step") != step:
            return f"{folder / 'meta.pt'} holds step {meta.get('step')!r}, not the folder's step {step}"
        for name, size in (meta.get("files") or {}).items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} is {path.stat().st_size} bytes, {size} when saved (truncated or altered)"
        return None

    def remove_stale_tmp(self) -> None:
        """Delete the `step_*.tmp` folders of saves that never finished (only the run's one trainer may)."""
        for stale in self.root.glob("step_*.tmp"):
            log.warning("removing %s, left by a save that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)

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
        try:
            self._write(step, tmp, state, sharded_writer)
            if self.is_rank0:
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                _fsync_write(self.root / "latest", final.name + "\n")
        except (OSError, RuntimeError, CheckpointException) as err:
            cause = _disk_full(err, tmp)
            if cause is None:
                raise
            if self.is_rank0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            last = self.latest_step()
            raise CheckpointWriteError(
                f"no space left on {self.root} while writing checkpoint step {step}; the last complete "
                f"checkpoint is {'step ' + str(last) if last is not None else 'none'} ({cause})") from None
        if self.is_rank0:
            self._prune()
            log.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _write(self, step: int, tmp: Path, state: dict[str, Any],
               sharded_writer: Callable[[Path], None] | None) -> None:
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "dist").mkdir()
        _barrier()
        if sharded_writer is not None:
            sharded_writer(tmp / "dist")
        if self.dp_rank == 0:
            torch.save(state, tmp / self.shard_name())
        _barrier()
        if self.is_rank0:
            seq = max((s for s, _ in self._save_order()), default=-1) + 1
            torch.save({"step": step, "tp": self.tp, "pp": self.pp, "dp": self.dp, "format": FORMAT, "seq": seq,
                        "files": _file_sizes(tmp)}, tmp / "meta.pt")

    def folder(self, step: int) -> Path:
        """The folder of checkpoint `step`."""
        return self.root / f"step_{step:07d}"

    def load(self, step: int) -> dict[str, Any]:
        """This rank's plain state of checkpoint `step` (tensors on CPU); the tensors are in `folder(step)/dist`.

        On another TP x PP layout (format 2 only) the state is rank 0's, with `rng` set to None:
        RNG streams belong to one rank of one layout.
        """
        folder = self.folder(step)
        meta = self.meta(step)
        same = (meta["tp"], meta["pp"]) == (self.tp, self.pp)
        if not same and meta.get("format", 1) < 2:
            raise LayoutMismatch(
                f"{folder} was written with parallel.tp={meta['tp']}, parallel.pp={meta['pp']} in checkpoint "
                f"format 1, which keeps the EMA per TP x PP slice; this run uses tp={self.tp}, pp={self.pp}. "
                f"Resume it once with its own layout (parallel.tp={meta['tp']} parallel.pp={meta['pp']}): the "
                f"next checkpoint it writes is format 2, which resumes on any layout.")
        state = torch.load(self.state_file(step), map_location="cpu", weights_only=True)
        if not same:
            state["rng"] = None
        return state

    def _prune(self) -> None:
        """Keep the `keep_last` newest checkpoints by save order, and always the one `latest` names."""
        order = [step for _, step in self._save_order()]
        latest = self.latest_step()
        for old in order[: -self.keep_last]:
            if old != latest:
                shutil.rmtree(self.folder(old), ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
