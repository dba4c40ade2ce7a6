"""The training entry: `python -m megatron_lomdm.train --config FILE [dotted.key=value ...]` (console script lomdm-train).

Loads the config (defaults < YAML < CLI), then hands it to the training loop. Re-running the
same command with the same `run.dir` resumes from its latest checkpoint. Exit codes: 0 done,
2 bad config or input (also: no loadable checkpoint, a refused checkpoint, the run directory in
use by another trainer, disk full while saving), 3 preempted after saving a checkpoint (the launcher should requeue).
"""

from __future__ import annotations

import argparse
import sys

from megatron_lomdm.config import dump_config, load_config
from megatron_lomdm.utils.proc import quick_exit_gc

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lomdm-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (may list `defaults:`)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    quick_exit_gc()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        sys.stderr.write(f"lomdm-train: {err}\n")
        return EXIT_BAD_INPUT
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    from megatron_lomdm.apps.artifacts import eval_artifacts  # heavy imports only when training
    from megatron_lomdm.training.loop import run_training

    try:
        preempted = run_training(cfg, on_eval=eval_artifacts if cfg.tracking.artifacts else None)
    except ValueError as err:
        sys.stderr.write(f"lomdm-train: {err}\n")
        return EXIT_BAD_INPUT
    return EXIT_PREEMPTED if preempted else 0
