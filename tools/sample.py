"""Unconditional or prefix-conditioned samples from a trained run, fully fingerprinted.

    python tools/sample.py --run-dir DIR --sampler NAME --steps T --num-samples N [--out FILE]
                           [--prefix TEXT] [--judge DIR] [--batch-size B] [--seed S]
                           [--temperature X] [--top-p P] [--grid uniform|beta ...] [--gamma G]
                           [--checkpoint STEP] [--no-ema] [dotted.key=value ...]
    torchrun --nproc_per_node=N tools/sample.py ...   (TP/PP as in the run's config; DP splits batches)

NAME: ancestral (reverse-scheduler order), exact (one token at a time, Plackett-Luce),
mdlm_cache, top_prob, top_margin, entropy_bound.

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
import json
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
SAMPLER_NAMES = ("ancestral", "exact", "mdlm_cache", "top_prob", "top_margin", "entropy_bound")


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
    p.add_argument("--no-cache", action="store_true", help="never reuse a backbone call")
    p.add_argument("--prefix", default=None, help="prefix text: generation continues it (BOS + text fixed)")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before --prefix")
    p.add_argument("--judge", default=None, help="local HF causal-LM folder or ARM run dir for generative PPL")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="live (non-EMA) weights")
    p.add_argument("--no-hash", action="store_true", help="skip the checkpoint sha256")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. parallel.tp=2)")
    return p.parse_args(argv)


def _grid_spec(args: argparse.Namespace, default_t_min: float | None):
    from megatron_lomdm.sampling.grids import GridSpec

    if args.grid is None and args.grid_t_min is None:
        return None
    t_min = args.grid_t_min if args.grid_t_min is not None else (default_t_min or 0.0)
    return GridSpec(kind=args.grid or "uniform", t_min=t_min, a=args.grid_a, b=args.grid_b, sin2=not args.no_sin2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.training.evaluate import RunNotReady, close_run, is_rank0, open_run

    try:
        if args.num_samples < 1 or args.steps < 1:
            raise ValueError("--num-samples and --steps must be >= 1")
        if args.judge is not None and not Path(args.judge).is_dir():
            raise ValueError(f"--judge {args.judge}: no such folder")
        run = open_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        judge = None
        if args.judge is not None and is_rank0():  # the judge scores on rank 0 only
            from megatron_lomdm.sampling.generate import make_judge

            judge = make_judge(args.judge)
        code = _sample(args, run, judge)
    except (RunNotReady, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"sample.py: {err}\n")
        return EXIT_BAD_INPUT
    close_run()
    return code


def _sample(args: argparse.Namespace, run, judge) -> int:
    from megatron_lomdm.sampling import SAMPLERS, build_sampler
    from megatron_lomdm.sampling.generate import (
        generate,
        judge_gen_ppl,
        load_run_tokenizer,
        order_report,
        prefix_token_ids,
        sample_entropies,
        sampler_options,
        sampler_record,
    )
    from megatron_lomdm.training.evaluate import broadcast_object, is_rank0, run_fingerprint

    cfg = run.cfg
    seed = cfg.train.seed if args.seed is None else args.seed
    batch_size = args.batch_size or min(args.num_samples, 16)
    tok = load_run_tokenizer(cfg)
    prefix_ids = prefix_token_ids(tok, args.prefix, add_bos=not args.no_bos) if args.prefix is not None else None
    grid = _grid_spec(args, getattr(SAMPLERS[args.sampler], "default_t_min", None))
    opts = sampler_options(args.sampler, mask_id=cfg.model.mask_id, family=run.model.family, steps=args.steps,
                           grid=grid, temperature=args.temperature, top_p=args.top_p, use_cache=not args.no_cache,
                           gamma=args.gamma)
    sampler = build_sampler(args.sampler, **opts)
    gen = generate(run, sampler, num_samples=args.num_samples, batch_size=batch_size, seed=seed,
                   prefix_ids=prefix_ids, use_ema=args.ema)

    fingerprint = run_fingerprint(run, use_ema=args.ema, hash_checkpoint=not args.no_hash)
    fingerprint["sampler"] = sampler_record(args.sampler, sampler, steps=args.steps, grid=grid, gamma=args.gamma)
    fingerprint["generation"] = {"seed": seed, "batch_size": batch_size, "num_samples": args.num_samples,
                                 "seq_length": cfg.model.seq_length, "prefix": args.prefix, "prefix_ids": prefix_ids,
                                 "seed_rule": "batch b: sha256(f'{seed}:{b}')[:8]"}
    fingerprint["tokenizer"] = {"name_or_path": tok.info.get("name_or_path"), "sha256": tok.sha256,
                                "decoded": tok.tokenizer is not None}
    fingerprint = broadcast_object(fingerprint)
    if not is_rank0():
        return 0

    step = run.state.step
    out = Path(args.out) if args.out else (Path(cfg.run.dir) / "samples" /
                                           f"{args.sampler}_T{args.steps}_seed{seed}_step{step}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    heat = out.with_suffix(".order.png")
    title = f"{args.sampler}, T={args.steps}, ckpt {step} (x: progress bins)"
    order = order_report(gen, heatmap_path=heat, title=title)
    entropies = sample_entropies(gen.tokens)
    records = []
    for i in range(gen.tokens.shape[0]):
        ids = [int(x) for x in gen.tokens[i].tolist()]
        b = gen.batch_of[i]
        records.append({"index": i, "text": tok.decode(ids), "token_ids": ids, "batch": b,
                        "num_calls": gen.num_calls[b], "num_steps": gen.num_steps[b],
                        "kendall_tau": order["kendall_tau"][i], "unigram_entropy": entropies[i],
                        "tokenizer_sha256": tok.sha256, "fingerprint": fingerprint})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)

    summary = {
        "out": str(out), "num_samples": len(records), "sampler": args.sampler, "steps": args.steps,
        "num_calls": gen.total_calls, "num_calls_per_batch": gen.num_calls, "num_steps_per_batch": gen.num_steps,
        "seconds": gen.seconds, "kendall_tau_mean": order["kendall_tau_mean"], "heatmap": order["heatmap"],
        "per_position_mean_exponent": order["per_position_mean_exponent"],
        "velocity_confidence_corr": order["velocity_confidence_corr"],
        "unigram_entropy_mean": sum(entropies) / len(entropies),
    }
    if judge is not None:
        t0 = time.time()
        summary.update(judge_gen_ppl(judge, records))
        summary["judge_seconds"] = time.time() - t0
    summary["fingerprint"] = fingerprint
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
