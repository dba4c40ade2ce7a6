#!/usr/bin/env python
"""Submit a megatron_lomdm training run through submitit: Slurm, or the local executor.

    python slurm/submit.py --config FILE --nodes N --gpus-per-node G [options] [dotted.key=value ...]
    python slurm/submit.py --config FILE --cpu-tasks 2 --local --wait [dotted.key=value ...]

What it does, in order:
  1. resolves the config (defaults < YAML < overrides) and fails fast (exit 2) on a bad one;
  2. snapshots the code revision (+ a patch of uncommitted changes) and the resolved config into
     RUN_DIR/launch/<time>-submit.txt (the run directory is the config's run.dir, never the job id);
  3. submits one task per GPU (or --cpu-tasks per node where there are none) through submitit's
     AutoExecutor, with its logs in RUN_DIR/submitit/ unless --folder says otherwise;
  4. each task exports the torch.distributed variables (TorchDistributedEnvironment) and calls
     `megatron_lomdm.train.main([...])`, which resumes from run.dir by itself.

Preemption and time limits: Slurm sends submitit's signal (USR2, --signal-delay-s before the limit,
or on preemption when the cluster sends user signals). Every task relays it to the trainer, which
finishes the step, saves a checkpoint and returns 3; rank 0 then runs submitit's Checkpointable
protocol (`checkpoint()` returns a DelayedSubmission of the same callable and arguments) and
requeues the job. Exit code of this script: 0 submitted (or, with --wait, all tasks finished with
0), 2 bad config or arguments, 1 the job failed.
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

ROOT = Path(__file__).resolve().parents[1]
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

    from megatron_lomdm.train import main

    rc = main(argv)
    if rc != EXIT_PREEMPTED:
        return rc  # 0 done, 2 bad config or input
    if job_env.global_rank == 0 and callable(submitit_handler):
        try:  # checkpoint() -> DelayedSubmission(self, argv, run_dir) is pickled, then requeue + exit
            submitit_handler(usr_sig, None)
        except subprocess.CalledProcessError as err:  # e.g. Slurm is already requeueing it (preemption)
            print(f"submit.py: requeue failed ({err}); the job is probably being requeued already",
                  file=sys.stderr, flush=True)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slurm/submit.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (may list `defaults:`)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    res = p.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    res.add_argument("--cpu-tasks", type=int, default=None,
                     help="tasks per node without GPUs (gloo); default 1 when --gpus-per-node is 0")
    res.add_argument("--cpus-per-task", type=int, default=None)
    res.add_argument("--mem-gb", type=float, default=None)
    res.add_argument("--time-min", type=int, default=24 * 60, help="time limit per (re)start, minutes")
    slurm = p.add_argument_group("slurm (ignored by --local)")
    slurm.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"))
    slurm.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"))
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--constraint", default=None)
    slurm.add_argument("--exclusive", action="store_true")
    slurm.add_argument("--signal-delay-s", type=int, default=180,
                       help="submitit's USR2 this long before the time limit: time to save a checkpoint")
    slurm.add_argument("--max-requeues", type=int, default=100,
                       help="requeues after time-outs before giving up (preemptions are not counted)")
    slurm.add_argument("--slurm-arg", action="append", default=[], metavar="KEY[=VALUE]",
                       help="extra sbatch option, e.g. --slurm-arg overcommit --slurm-arg mail-type=END")
    p.add_argument("--job-name", default=None, help="default: lomdm-<config name>")
    p.add_argument("--folder", default=None, help="submitit logs and pickles (default RUN_DIR/submitit)")
    p.add_argument("--local", action="store_true", help="run through submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    args = p.parse_intermixed_args(argv)
    if args.gpus_per_node and args.cpu_tasks:
        p.error("--gpus-per-node and --cpu-tasks are exclusive (one task per GPU)")
    return args


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def snapshot(run_dir: Path, resolved: str, info: dict[str, Any]) -> Path:
    """Write RUN_DIR/launch/<time>-submit.txt (+ .patch of uncommitted changes); returns its path."""
    launch = run_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    record = launch / f"{stamp}-submit.txt"
    rev = (_git("rev-parse", "HEAD") or "unknown").strip()
    diff = _git("diff", "HEAD") if rev != "unknown" else None
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").split()
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Path(args.config).resolve()
    try:
        cfg = load_config(config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"submit.py: {err}", file=sys.stderr)
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
        print(f"submit.py: {err} (use --local to run here)", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    executor.update_parameters(**params)

    record = snapshot(run_dir, dump_config(cfg), {
        "executor": executor.cluster, "config": config, "overrides": " ".join(args.overrides),
        "nodes": args.nodes, "tasks_per_node": tasks, "gpus_per_node": args.gpus_per_node,
        "submitit_folder": folder, "parameters": params})
    job = executor.submit(TrainTask(), task_argv, str(run_dir))
    with record.open("a") as f:
        f.write(f"--- submitted ---\njob_id: {job.job_id}\n")
    print(f"submitted job {job.job_id} ({executor.cluster}, {args.nodes} node(s) x {tasks} task(s))")
    print(f"  run dir: {run_dir}\n  logs:    {folder}/{job.job_id}_<task>_log.{{out,err}}\n"
          f"  record:  {record}", flush=True)
    if not args.wait:
        return 0
    try:
        results = job.results()
    except Exception as err:  # submitit re-raises the task's failure with its traceback
        print(f"submit.py: job {job.job_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: task results {results}")
    return max(int(r) for r in results)


if __name__ == "__main__":
    sys.exit(main())
