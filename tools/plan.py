"""Which parallel layout a config needs on a cluster: bytes per GPU, step time, tokens/day.

    python tools/plan.py --config configs/experiments/owt_1b.yaml [--gpus-per-node 8 --nodes 4]
        [--gpu h100-80gb] [--mfu 0.35] [--tokens 3e11] [--headroom 0.1] [--top 20] [--all]
        [--micro-batches 1 2 4 8 | --keep-micro-batch] [--recompute none selective full] [key=value ...]

Prints one row per candidate layout (TP[+sp] PP[xV] DP backend+ZeRO, micro-batch, recompute):
model state (params, grads, optim, ema) and activations (clean pass, forward-head graphs held
across phases, K corruptions, reverse head, logits + SUBS backward, backward working set, peak)
in GiB, whether it fits, the pipeline bubble, communication GB per step per GPU, step time,
unique tokens/s, billions of tokens/day, days to --tokens and the resulting MFU. Fitting layouts
this code runs come first, by tokens/s; then the shipped layout. Model in
megatron_lomdm/apps/plan.py; validation in docs/scaling.md.

Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_lomdm.apps.plan import GPUS

    p = argparse.ArgumentParser(prog="plan.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--mfu", type=float, default=0.35, help="fraction of peak the math sustains")
    p.add_argument("--tokens", type=float, default=3e11, help="token budget (unique tokens) for the days column")
    p.add_argument("--headroom", type=float, default=0.10, help="share of GPU memory kept free")
    p.add_argument("--micro-batches", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="micro-batch sizes tried")
    p.add_argument("--keep-micro-batch", action="store_true", help="only the config's train.micro_batch_size")
    p.add_argument("--recompute", nargs="*", default=None, help="recompute policies tried (default: the config's)")
    p.add_argument("--top", type=int, default=20, help="rows printed")
    p.add_argument("--all", action="store_true", help="print every candidate")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lomdm.apps.plan import GPUS, Cluster, format_table, model_plan, plan, plan_layout, shipped_layout
    from megatron_lomdm.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"plan.py: {err}", file=sys.stderr)
        return 2
    cluster = Cluster(GPUS[args.gpu], args.gpus_per_node, args.nodes, mfu=args.mfu, headroom=args.headroom)
    m = model_plan(cfg)
    batches = [cfg.train.micro_batch_size] if args.keep_micro_batch else args.micro_batches
    plans = plan(m, cluster, micro_batches=batches, recomputes=args.recompute or [m.recompute])
    ok = [p for p in plans if p.fits and not p.supported]
    print(f"{args.config}: {m.num_layers}L d{m.hidden_size} T{m.seq_length} V{m.vocab_size} K{m.num_corruptions} "
          f"global batch {m.global_batch_size}, {'bf16' if m.bf16 else 'fp32'}, EMA {'on' if m.ema else 'off'}; "
          f"{cluster.world} x {args.gpu} ({cluster.usable_bytes / 2**30:.1f} GiB usable after "
          f"{args.headroom:.0%} + 2 GiB headroom), MFU {args.mfu:.0%}, budget {args.tokens:.3g} tokens")
    print(f"{len(plans)} layouts, {sum(p.fits for p in plans)} fit, {len(ok)} fit and run today\n")
    print(format_table(plans if args.all else plans[: args.top], cluster, args.tokens))
    shipped = shipped_layout(cfg, cluster)
    if cluster.world % (shipped.tp * shipped.pp) or m.global_batch_size % (shipped.micro_batch_size * shipped.dp):
        print(f"\nthe config's own layout (tp={shipped.tp}, pp={shipped.pp}, micro-batch {shipped.micro_batch_size}) "
              f"does not divide {cluster.world} GPUs and global batch {m.global_batch_size}")
        return 0
    print(f"\nshipped layout ({args.config}):")
    print(format_table([plan_layout(m, shipped, cluster)], cluster, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
