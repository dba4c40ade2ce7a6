"""Submitting a training run through submitit (Slurm, or the local executor): ``slurm/submit.py``
after its flags are parsed.

The submitting side resolves the config, snapshots the code revision and the resolved config into
RUN_DIR/launch/ and submits ``TrainTask``; every task exports the torch.distributed variables,
relays submitit's preemption signal to the trainer, calls ``megatron_lomdm.apps.train.main`` and, when
the trainer has saved and returned 3, requeues through submitit's Checkpointable protocol. The
whole protocol is described in ``slurm/submit.py``. ``TrainTask`` is pickled by reference (this
module), so a task imports it from the installed package.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from megatron_lomdm.config import dump_config, load_config
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the checkout whose revision a launch record names
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


# ----------------------------------------------------------------------------------------------
# what runs in every task


def _relay_preemption_signal(sig: int) -> Any:
    """Route submitit's signal to the trainer's preemption flag; returns submitit's own handler.

    submitit's handler would requeue at once and exit, losing the steps since the last checkpoint.
    Instead the trainer's SIGUSR1 handler (installed when training starts) sets its flag; the task
    calls submitit's handler itself once the checkpoint is on disk. A signal that arrives before the
    trainer has a handler has nothing to save and goes straight to submitit.
    """
    submitit_handler = signal.getsignal(sig)

    def relay(signum: int, frame: Any) -> None:
        trainer_handler = signal.getsignal(signal.SIGUSR1)
        if callable(trainer_handler):
            trainer_handler(signum, frame)
        elif callable(submitit_handler):
            submitit_handler(signum, frame)

    signal.signal(sig, relay)
    return submitit_handler


def _record_start(run_dir: Path, job_env: Any) -> None:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = run_dir / "launch" / f"{stamp}-job{job_env.job_id}-r{restart}-task.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"launcher: slurm/submit.py (task start)\ntime: {datetime.datetime.now().isoformat()}\n"
                    f"host: {socket.gethostname()}\njob_id: {job_env.job_id}\nrestart_count: {restart}\n"
                    f"cluster: {job_env.cluster}\nntasks: {job_env.num_tasks}\nnodes: {job_env.num_nodes}\n")


class TrainTask(submitit.helpers.Checkpointable):
    """Train (resuming from run.dir); requeued with the same arguments on preemption or time-out.

    The inherited `checkpoint(argv, run_dir)` returns `DelayedSubmission(self, argv, run_dir)`: the
    training state itself lives in run.dir, so the callable needs no state of its own.
    """

    def __call__(self, argv: list[str], run_dir: str) -> int:
        return _run_task(argv, run_dir)


def _run_task(argv: list[str], run_dir: str) -> int:
    job_env = submitit.JobEnvironment()
    # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (port derived from the job id, so it is the
    # same after a requeue); all GPUs stay visible and the trainer picks cuda:LOCAL_RANK.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    usr_sig = job_env._usr_sig()
    submitit_handler = _relay_preemption_signal(usr_sig)
    if job_env.global_rank == 0:
        _record_start(Path(run_dir), job_env)

    from megatron_lomdm.apps.train import main

    rc = main(argv)
    if rc != EXIT_PREEMPTED:
        return rc  # 0 done, 2 bad config or input
    if job_env.global_rank == 0 and callable(submitit_handler):
        try:  # checkpoint() -> DelayedSubmission(self, argv, run_dir) is pickled, then requeue + exit
            submitit_handler(usr_sig, None)
        except subprocess.CalledProcessError as err:  # e.g. Slurm is already requeueing it (preemption)
            log.error("submit.py: requeue failed (%s); the job is probably being requeued already", err)
            sys.exit(-1)
    if job_env.cluster == "slurm":
        # Other ranks: returning would leave a stale per-task result for the submitter while rank 0
        # requeues the job; wait for the requeue to end this process (default SIGTERM action).
        # (The local executor restarts only once every task has exited: return at once there.)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
    return rc


# ----------------------------------------------------------------------------------------------
# the submitting side


# ----------------------------------------------------------------------------------------------
# the submitting side


def _git(*cmd: str, root: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def snapshot(run_dir: Path, resolved: str, info: dict[str, Any], *, root: Path = ROOT) -> Path:
    """Write RUN_DIR/launch/<time>-submit.txt (+ .patch of uncommitted changes of ``root``); returns its path."""
    launch = run_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    record = launch / f"{stamp}-submit.txt"
    rev = (_git("rev-parse", "HEAD", root=root) or "unknown").strip()
    diff = _git("diff", "HEAD", root=root) if rev != "unknown" else None
    untracked = (_git("ls-files", "--others", "--exclude-standard", root=root) or "").split()
    if diff:
        rev += "+dirty"
        record.with_suffix(".patch").write_text(diff)
    lines = ["launcher: slurm/submit.py", f"time: {datetime.datetime.now().isoformat()}",
             f"host: {socket.gethostname()}", f"git_rev: {rev}",
             *(f"{k}: {v}" for k, v in info.items()),
             f"untracked_files: {len(untracked)}", "--- resolved config ---", resolved]
    record.write_text("\n".join(lines) + ("" if resolved.endswith("\n") else "\n"))
    return record


def _extra_sbatch(items: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        extra[key.lstrip("-").replace("-", "_")] = value if sep else True
    return extra


def _parameters(args: argparse.Namespace, config: Path, tasks: int) -> dict[str, Any]:
    """submitit's executor parameters for the flags (the Slurm ones only without ``--local``)."""
    params: dict[str, Any] = dict(name=args.job_name or f"lomdm-{config.stem}", nodes=args.nodes,
                                  tasks_per_node=tasks, timeout_min=args.time_min)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
        # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch
        params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if not args.local:
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
        if args.exclusive:
            params["slurm_exclusive"] = True
        params["slurm_signal_delay_s"] = args.signal_delay_s
        params["slurm_additional_parameters"] = {"requeue": True, **_extra_sbatch(args.slurm_arg)}
    return params


def main(args: argparse.Namespace, *, root: Path = ROOT) -> int:
    """``slurm/submit.py`` with its parsed flags; returns the exit code (0 submitted or done, 2 bad input, 1 failed)."""
    config = Path(args.config).resolve()
    try:
        cfg = load_config(config, args.overrides)
    except (ValueError, OSError) as err:
        log.error("submit.py: %s", err)
        return EXIT_BAD_INPUT
    run_dir = Path(cfg.run.dir).resolve()
    # The task gets the resolved run.dir, so a relative one means the same after a requeue.
    task_argv = ["--config", str(config), *args.overrides, f"run.dir={run_dir}"]

    tasks = args.gpus_per_node or args.cpu_tasks or 1
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm",
                                         slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as err:  # no srun here
        log.error("submit.py: %s (use --local to run here)", err)
        return EXIT_BAD_INPUT
    params = _parameters(args, config, tasks)
    executor.update_parameters(**params)

    record = snapshot(run_dir, dump_config(cfg), {
        "executor": executor.cluster, "config": config, "overrides": " ".join(args.overrides),
        "nodes": args.nodes, "tasks_per_node": tasks, "gpus_per_node": args.gpus_per_node,
        "submitit_folder": folder, "parameters": params}, root=root)
    job = executor.submit(TrainTask(), task_argv, str(run_dir))
    with record.open("a") as f:
        f.write(f"--- submitted ---\njob_id: {job.job_id}\n")
    log.info("submitted job %s (%s, %d node(s) x %d task(s))\n  run dir: %s\n  logs:    %s/%s_<task>_log.{out,err}\n"
             "  record:  %s", job.job_id, executor.cluster, args.nodes, tasks, run_dir, folder, job.job_id, record)
    if not args.wait:
        return 0
    return _wait(job)


def _wait(job: Any) -> int:
    """``--wait``: the job's exit code (the largest task result; 1 when the job failed)."""
    try:
        results = job.results()
    except Exception as err:  # submitit re-raises the task's failure with its traceback
        log.error("submit.py: job %s failed: %s", job.job_id, err)
        return 1
    log.info("job %s finished: task results %s", job.job_id, results)
    return max(int(r) for r in results)
