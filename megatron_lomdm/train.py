"""`python -m megatron_lomdm.train --config FILE [dotted.key=value ...]` (console script lomdm-train).

The entry point; the command lives in `megatron_lomdm/apps/train.py` (it wires the training loop
to the evaluation artifacts of `apps/artifacts.py`, which training/ may not import). Exit codes:
0 done, 2 bad config or input, 3 preempted after saving a checkpoint (the launcher should requeue).
"""

from __future__ import annotations

import sys

from megatron_lomdm.apps.train import EXIT_BAD_INPUT, EXIT_PREEMPTED, main, parse_args

__all__ = ["EXIT_BAD_INPUT", "EXIT_PREEMPTED", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
