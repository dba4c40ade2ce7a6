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
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.apps.submit import main as submit_main  # the work: megatron_lomdm/apps/submit.py

    return submit_main(args, root=ROOT)


if __name__ == "__main__":
    sys.exit(main())
