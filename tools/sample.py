"""Unconditional or prefix-conditioned samples from a trained run, fully fingerprinted.

    python tools/sample.py --run-dir DIR --sampler NAME --steps T --num-samples N [--out FILE]
                           [--prefix TEXT | --prompts FILE.jsonl|valid] [--judge DIR] [--batch-size B] [--seed S]
                           [--temperature X] [--top-p P] [--grid uniform|beta ...] [--gamma G] [--noise-scale S]
                           [--checkpoint STEP] [--no-ema] [dotted.key=value ...]
    torchrun --nproc_per_node=N tools/sample.py ...   (TP/PP as in the run's config; DP splits batches)

NAME: ancestral (reverse-scheduler order), exact (one token at a time, Plackett-Luce),
mdlm_cache, top_prob, top_margin, lomdm_top_margin (learned count, margin x learned wish), remask
(top_margin + confidence-drop remasking), entropy_bound (docs/puzzles.md).

Writes JSONL (default RUN_DIR/samples/<sampler>_T<steps>_seed<seed>_step<ckpt>.jsonl): one line per
sample with text, token_ids, its batch's number of backbone calls, Kendall tau, unigram entropy and
the run/sampler fingerprint (checkpoint step + sha256, weights, sampler, steps, grid, temperature,
top_p, seed, batch size, prefix, precision, layout). Next to it: ``.order.png`` (position x
progress heat map) and ``.summary.json``, which is also printed: number of backbone calls, mean
Kendall tau vs left-to-right, per-position mean exponent, unigram entropy, and with ``--judge``
(a local HF causal-LM folder, or a run dir of an ARM run) the generative perplexity.

Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2
SAMPLER_NAMES = ("ancestral", "exact", "mdlm_cache", "top_prob", "top_margin", "lomdm_top_margin", "remask",
                 "entropy_bound")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--sampler", required=True, choices=SAMPLER_NAMES)
    p.add_argument("--steps", type=int, required=True,
                   help="sampling steps T (exact: the step budget, >= positions to generate; entropy_bound: unused)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", default=None, help="JSONL file (default under RUN_DIR/samples/)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per sampler call (default min(N, 16))")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: train.seed)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--grid", choices=("uniform", "beta"), default=None, help="time grid (default: the sampler's)")
    p.add_argument("--grid-t-min", type=float, default=None, help="last grid time (default: the sampler's)")
    p.add_argument("--grid-a", type=float, default=1.0, help="beta grid shape a")
    p.add_argument("--grid-b", type=float, default=1.0, help="beta grid shape b")
    p.add_argument("--no-sin2", action="store_true", help="beta grid without the sin^2 map")
    p.add_argument("--gamma", type=float, default=None, help="entropy_bound error budget (nats)")
    p.add_argument("--noise-scale", type=float, default=None, help="top-K samplers: Gumbel noise on the score (Kim: 0.5)")
    p.add_argument("--no-cache", action="store_true", help="never reuse a backbone call")
    p.add_argument("--prefix", default=None, help="prefix text: generation continues it (BOS + text fixed)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl|valid",
                   help="conditioned generation: --num-samples samples per prompt of a JSONL file (BOS + prompt "
                   "fixed) or of the run's conditioned validation rows (valid)")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts only")
    p.add_argument("--prompt-key", default="prompt", help="prompt field of the --prompts records")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before --prefix / the prompts")
    p.add_argument("--judge", default=None, help="local HF causal-LM folder or ARM run dir for generative PPL")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="live (non-EMA) weights")
    p.add_argument("--no-hash", action="store_true", help="skip the checkpoint sha256")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. parallel.tp=2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.apps.sample import main as sample_main  # the work: megatron_lomdm/apps/sample.py

    return sample_main(args)


if __name__ == "__main__":
    sys.exit(main())
