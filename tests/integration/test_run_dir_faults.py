"""Checkpoints and the run directory under faults: pruning, a lost or garbage `latest`, damaged
checkpoints, two trainers on one run directory, a full disk, and kill -9 during a save.

The manager tests drive `CheckpointManager` directly (no process group); the CLI tests run the
tiny CPU config for a few steps.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_lomdm.checkpoint.manager import CheckpointManager, CheckpointWriteError
from megatron_lomdm.train import EXIT_BAD_INPUT
from megatron_lomdm.utils.run_lock import RunDirInUse, lock_run_dir
from tests.helpers.runs import ROOT, clean_env, losses, read_metrics, train, train_cmd, wait_for_step

SHORT = ("train.steps=4", "checkpoint.interval=2")


def _manager(root: Path, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(root, tp_rank=0, pp_rank=0, dp_rank=0, tp=1, pp=1, is_rank0=True, keep_last=keep_last)


def _kept(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


# ---- CheckpointManager ----------------------------------------------------------------------------

def test_prune_keeps_newest_by_save_order_and_latest(tmp_path: Path) -> None:
    """After a rollback the new, lower-numbered checkpoint is `latest`: pruning must keep it."""
    manager = _manager(tmp_path)
    for step in (10, 20, 30):
        manager.save(step, {"step": step})
    manager.save(15, {"step": 15})  # resumed from an older checkpoint (rollback)
    assert manager.latest_step() == 15
    assert _kept(tmp_path) == ["step_0000015", "step_0000030"]  # the two newest saves
    manager.save(16, {"step": 16})
    assert _kept(tmp_path) == ["step_0000015", "step_0000016"]
    assert manager.load(16) == {"step": 16}


def test_lost_latest_names_newest_complete_checkpoint(tmp_path: Path) -> None:
    manager = _manager(tmp_path, keep_last=3)
    for step in (5, 9, 7):  # 7 saved last
        manager.save(step, {"step": step})
    (tmp_path / "step_0000011").mkdir()  # a folder without meta.pt is not complete
    (tmp_path / "latest").unlink()
    assert manager.latest_step() == 7
    assert manager.resume_candidates() == [7, 9, 5]


def test_latest_with_binary_garbage_names_the_file(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(1, {"step": 1})
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match=r"latest does not hold a checkpoint folder name"):
        manager.latest_step()


def _write_dist(folder: Path) -> None:
    (folder / "__0_0.distcp").write_bytes(b"x" * 1000)
    (folder / ".metadata").write_bytes(b"m" * 10)


def test_check_names_truncated_and_missing_files(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(2, {"step": 2}, sharded_writer=_write_dist)
    assert manager.check(2) is None
    distcp = tmp_path / "step_0000002" / "dist" / "__0_0.distcp"
    distcp.write_bytes(b"x" * 400)
    assert f"{distcp} is 400 bytes, 1000 when saved" in manager.check(2)
    distcp.unlink()
    assert manager.check(2) == f"{distcp} is missing"


def test_disk_full_during_save_keeps_latest(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(1, {"step": 1})

    def full_disk(folder: Path) -> None:
        (folder / "__0_0.distcp").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "__0_0.distcp"))

    with pytest.raises(CheckpointWriteError) as info:
        manager.save(2, {"step": 2}, sharded_writer=full_disk)
    assert str(info.value).startswith(
        f"no space left on {tmp_path} while writing checkpoint step 2; the last complete checkpoint is step 1")
    assert manager.latest_step() == 1
    assert not (tmp_path / "step_0000002.tmp").exists()  # the space is given back
    manager.save(2, {"step": 2})
    assert manager.latest_step() == 2


def test_remove_stale_tmp(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    (tmp_path / "step_0000004.tmp" / "dist").mkdir(parents=True)
    manager.remove_stale_tmp()
    assert not (tmp_path / "step_0000004.tmp").exists()


# ---- the run directory lock -----------------------------------------------------------------------

def test_run_dir_lock_names_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_lomdm.utils.run_lock import lock_run_dir; "
                               f"held = lock_run_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"in use by another trainer \(host=\S+ pid={holder.pid} "):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    lock_run_dir(tmp_path).close()


# ---- through the CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """A finished 4-step run with checkpoints at steps 2 and 4, and its losses."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    out = train(run_dir, tiny_shards, *SHORT)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, losses(run_dir)


def _copy(short_run: tuple[Path, list[float]], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(short_run[0], run_dir)
    return run_dir


def _craft(folder: Path, edit) -> None:  # noqa: ANN001
    """Rewrite the rank file with `edit` applied and record its new size, as a crafted checkpoint would."""
    path = folder / "rank_000_000.pt"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    meta["files"]["rank_000_000.pt"] = path.stat().st_size
    torch.save(meta, folder / "meta.pt")


def test_lost_latest_resumes_instead_of_starting_over(short_run, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = _copy(short_run, tmp_path)
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "step_0000006.tmp" / "dist").mkdir(parents=True)  # a save that never finished
    out = train(run_dir, tiny_shards, "train.steps=6", "checkpoint.interval=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "latest is missing; using the newest complete checkpoint step_0000004" in out.stderr
    assert "at step 4" in out.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    assert losses(run_dir)[:4] == short_run[1]  # steps 1-4 kept, not retrained from scratch
    assert not (run_dir / "checkpoints" / "step_0000006.tmp").exists()


@pytest.mark.parametrize("damage, names", [
    ("truncated_rank", "step_0000004/rank_000_000.pt is "),
    ("missing_distcp", "step_0000004/dist/__0_1.distcp is missing"),
    ("garbage_rank", "step_0000004/rank_000_000.pt is unreadable"),
])
def test_damaged_newest_checkpoint_falls_back(damage: str, names: str, short_run, tiny_shards: Path,
                                              tmp_path: Path) -> None:
    run_dir = _copy(short_run, tmp_path)
    newest = run_dir / "checkpoints" / "step_0000004"
    rank_file = newest / "rank_000_000.pt"
    if damage == "truncated_rank":
        rank_file.write_bytes(rank_file.read_bytes()[: rank_file.stat().st_size // 2])
    elif damage == "missing_distcp":
        (newest / "dist" / "__0_1.distcp").unlink()
    else:
        rank_file.write_bytes(os.urandom(rank_file.stat().st_size))
    out = train(run_dir, tiny_shards, "train.steps=6", "checkpoint.interval=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert names in out.stderr and "trying the one saved before it" in out.stderr
    assert "at step 2" in out.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    assert losses(run_dir)[:4] == short_run[1]  # steps 3-4 recomputed bit-exactly


def test_no_loadable_checkpoint_refuses_and_keeps_the_run(short_run, tiny_shards: Path, tmp_path: Path) -> None:
    """A crafted step (-5) and garbage RNG state: exit 2 naming both files; nothing is overwritten."""
    run_dir = _copy(short_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    _craft(ckpts / "step_0000004", lambda sd: sd["train_state"].update(step=-5))
    _craft(ckpts / "step_0000002", lambda sd: sd["rng"].update(torch="garbage"))
    metrics = (run_dir / "metrics.jsonl").read_text()
    out = train(run_dir, tiny_shards, "train.steps=6", "checkpoint.interval=2")
    assert out.returncode == EXIT_BAD_INPUT, out.stderr[-3000:]
    assert "step_0000004/rank_000_000.pt: train_state.step is -5, but the folder is step 4" in out.stderr
    assert "step_0000002/rank_000_000.pt: rng.torch is not a torch RNG state" in out.stderr
    assert "Traceback" not in out.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert _kept(ckpts) == ["step_0000002", "step_0000004"]


def test_second_trainer_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run_dir, tiny_shards, "train.steps=400", "checkpoint.interval=0"),
                             cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, 1, first)
        second = train(run_dir, tiny_shards, "train.steps=400", "checkpoint.interval=0")
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        assert "is in use by another trainer (host=" in second.stderr and f"pid={first.pid} " in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()  # kill -9 leaves no stale lock: a requeued job starts
        first.wait()
    out = train(run_dir, tiny_shards, "train.steps=2", "checkpoint.interval=0")
    assert out.returncode == 0, out.stderr[-3000:]


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces for a small tmpfs")
def test_disk_full_names_path_and_last_checkpoint(tiny_shards: Path, tmp_path: Path) -> None:
    """A 6 MiB tmpfs holds one tiny checkpoint (~4.8 MB), not two: the second save meets a full disk."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cmd = " ".join(train_cmd(run_dir, tiny_shards, *SHORT))
    script = (f"mount -t tmpfs -o size=6m tmpfs {run_dir} && {{ {cmd}; echo rc=$?; "
              f"cat {run_dir}/checkpoints/latest; ls {run_dir}/checkpoints; }}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert f"rc={EXIT_BAD_INPUT}" in out.stdout, out.stderr[-3000:]
    assert (f"no space left on {run_dir}/checkpoints while writing checkpoint step 4; "
            f"the last complete checkpoint is step 2") in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.split("rc=2\n")[1].split() == ["step_0000002", "latest", "step_0000002"]  # no .tmp left


def test_kill_during_save_leaves_no_writer_process(tiny_shards: Path, tmp_path: Path) -> None:
    """kill -9 while megatron's writer processes run: none of the trainer's children outlives it."""
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(train_cmd(run_dir, tiny_shards, "train.steps=400", "checkpoint.interval=1"),
                               cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(trainer.pid)
    seen: dict[int, psutil.Process] = {}
    deadline = time.time() + 120
    try:
        while time.time() < deadline and trainer.poll() is None:
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                break
            seen.update({c.pid: c for c in children})
            forked = [c for c in children if _cmdline(c) == _cmdline(parent)]  # a writer forked mid-save
            if forked and (run_dir / "checkpoints" / "latest").exists():
                break
            time.sleep(0.002)
        assert any(_cmdline(c) == _cmdline(parent) for c in seen.values()), "never saw a checkpoint writer"
    finally:
        trainer.kill()
        trainer.wait()
    time.sleep(5)
    # writers forked after the last look carry the trainer's command line, with its unique run.dir
    seen.update({c.pid: c for c in psutil.process_iter() if str(run_dir) in _cmdline(c)})
    survivors = [c for c in seen.values() if _alive(c)]
    for c in survivors:
        c.kill()
    assert not survivors, [(c.pid, _cmdline(c)) for c in survivors]


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
