"""NELBO and test perplexity of a trained run; prints one JSON object (rank 0).

    python tools/evaluate.py --run-dir DIR [--checkpoint STEP] [--data DIR] [--split NAME]
                             [--t-draws D] [--ema/--no-ema] [--out FILE] [dotted.key=value ...]
    torchrun --nproc_per_node=N tools/evaluate.py --run-dir DIR parallel.tp=2 ...

The JSON has nelbo (per token, velocity term included), ppl = exp(nelbo), main, velocity,
num_tokens, num_sequences, t_draws and a fingerprint (checkpoint step + sha256 of its files, data
manifest fingerprint, t draws, weights, seed, precision, layout); see
megatron_lomdm/apps/evaluate.py for the protocol.

For ARM and BD3LM the NELBO's Monte-Carlo estimate has finite variance (see
megatron_lomdm/diffusion/bd3lm.py); ``--exact-ar`` adds an ARM run's exact AR NLL beside it.

``--score-jsonl FILE`` instead scores token sequences with an ARM run's exact autoregressive
likelihood (the judge of ``tools/sample.py --judge RUN_DIR``); it writes one JSON line per input
line to ``--score-out`` (default stdout).

Exit codes: 0 done, 2 bad input (no run/checkpoint, bad data, bad option).
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="training run directory")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data", default=None, help="shard folder to evaluate on (default: the run's validation data)")
    p.add_argument("--split", default=None, help="split of the shard folder (default: valid if present, else train)")
    p.add_argument("--t-draws", type=int, default=1, help="diffusion times per sequence (antithetic over the set)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="the live (non-EMA) weights")
    p.add_argument("--micro-batch-size", type=int, default=None, help="rows per micro-batch (default: the run's)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: train.seed)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate only the first N sequences")
    p.add_argument("--no-hash", action="store_true", help="skip the checkpoint sha256 (large checkpoints)")
    p.add_argument("--exact-ar", action="store_true",
                   help="ARM runs: also the exact autoregressive NLL/PPL of the eval set (one row per token, "
                        "no Monte-Carlo noise). The default NELBO estimate is already unbiased for it with "
                        "finite variance (one position per draw, weight L; slot families integrate the "
                        "block-local time out), so this is a noiseless cross-check")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--score-jsonl", default=None,
                   help="score the sequences of this JSONL file (token_ids or text) with the exact AR "
                        "likelihood of this ARM run, instead of evaluating")
    p.add_argument("--score-out", default=None, help="where --score-jsonl writes its JSON lines (default stdout)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. parallel.tp=2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.apps.evaluate import main as evaluate_main  # the work: megatron_lomdm/apps/evaluate.py

    return evaluate_main(args)


if __name__ == "__main__":
    sys.exit(main())
