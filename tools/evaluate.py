"""NELBO and test perplexity of a trained run; prints one JSON object (rank 0).

    python tools/evaluate.py --run-dir DIR [--checkpoint STEP] [--data DIR] [--split NAME]
                             [--t-draws D] [--ema/--no-ema] [--out FILE] [dotted.key=value ...]
    torchrun --nproc_per_node=N tools/evaluate.py --run-dir DIR parallel.tp=2 ...

The JSON has nelbo (per token, velocity term included), ppl = exp(nelbo), main, velocity,
num_tokens, num_sequences, t_draws and a fingerprint (checkpoint step + sha256 of its files, data
manifest fingerprint, t draws, weights, seed, precision, layout); see
megatron_lomdm/training/evaluate.py for the protocol.

For ARM and BD3LM the NELBO's Monte-Carlo estimate has finite variance (see
megatron_lomdm/diffusion/bd3lm.py); ``--exact-ar`` adds an ARM run's exact AR NLL beside it.

``--score-jsonl FILE`` instead scores token sequences with an ARM run's exact autoregressive
likelihood (the judge of ``tools/sample.py --judge RUN_DIR``); it writes one JSON line per input
line to ``--score-out`` (default stdout).

Exit codes: 0 done, 2 bad input (no run/checkpoint, bad data, bad option).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def _exact_ar(run, args: argparse.Namespace) -> dict:
    """Exact AR NLL per token of the eval set under an ARM run (same sequences as the NELBO)."""
    import math

    from megatron_lomdm.sampling.generate import ar_logprobs
    from megatron_lomdm.training.evaluate import read_eval_sequences

    seqs = read_eval_sequences(run, data=args.data, split=args.split, max_sequences=args.max_sequences)
    rows = ar_logprobs(run, seqs, use_ema=args.ema)
    count = sum(len(r) for r in rows)
    nll = -sum(float(r.sum()) for r in rows) / max(count, 1)
    return {"nll": nll, "ppl": math.exp(nll), "num_tokens": count}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.training.evaluate import RunNotReady, close_run, evaluate_run, is_rank0, open_run

    try:
        run = open_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        if args.score_jsonl is not None:
            from megatron_lomdm.sampling.generate import score_jsonl

            lines = score_jsonl(run, args.score_jsonl, use_ema=args.ema)
            if is_rank0():
                text = "".join(json.dumps(line) + "\n" for line in lines)
                if args.score_out:
                    Path(args.score_out).write_text(text)
                else:
                    sys.stdout.write(text)
            close_run()
            return 0
        result = evaluate_run(run, data=args.data, split=args.split, t_draws=args.t_draws, use_ema=args.ema,
                              micro_batch_size=args.micro_batch_size, seed=args.seed,
                              max_sequences=args.max_sequences, hash_checkpoint=not args.no_hash)
        report = result.to_dict()
        if args.exact_ar:
            report["exact_ar"] = _exact_ar(run, args)
    except (RunNotReady, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"evaluate.py: {err}\n")
        return EXIT_BAD_INPUT
    if is_rank0():
        text = json.dumps(report, indent=None)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    close_run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
