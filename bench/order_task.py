#!/usr/bin/env python
"""Order-learning benchmark (`make bench-order`, not in CI): does the learned order learn the easy order?

On a synthetic task where generating one part of the row first makes the other a look-up
(megatron_lomdm/data/synthetic.py; default `pairs`), the easy order is MEASURED, not assumed: the
same backbone is trained with the two fixed two-block orders (BD3LM with one block per part, on
the row layouts `ab` and `ba`, which hold the same distribution with the parts swapped). Then MDLM,
poly (c2 = 0, K = 1), LoMDM's K-corruption step with c2 = 0 (`poly_k2`, the control that separates
the learned order from K corruptions per sequence), LoMDM and the context-free `multivariate`
family (when the tree has it) train with the same steps and unique batch, >= 3 seeds, all through
the CLI (`python -m megatron_lomdm.train`, `tools/evaluate.py`).

Per run it reports: the validation NELBO (full valid split, EMA weights, velocity term included)
against the task's exact entropy; the forward exponent gap between the parts (mean exponent of
part A minus part B on validation rows: > 0 means A is generated first); the reverse exponent gap
seen while sampling; and the share of ancestral-sampler orders that follow the better fixed order
(`order_agreement` > 1/2) with the mean pairwise agreement. The summary checks issue 16's goal.

Outputs under --out-dir (default bench/_work/order_task): order_task.md, order_task.json; one JSON
line per variant in bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORK, environment, record  # noqa: E402
from learning import run_all  # noqa: E402

C = ["diffusion.c1=0.7"]
VARIANTS = {  # name -> (row layout, overrides)
    "ref_a_first": ("ab", ["diffusion.name=bd3lm"]),  # block size = half the row, set below
    "ref_b_first": ("ba", ["diffusion.name=bd3lm"]),
    "mdlm": ("ab", ["diffusion.name=mdlm"]),
    "poly": ("ab", ["diffusion.name=poly", *C, "diffusion.c2=0.0"]),
    "poly_k2": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.0"]),
    "lomdm": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.65"]),
    # the same objective, heads (and the family's order logits) at 10x the backbone lr: a schedule
    # of the heads' training, not of the objective (issue 16 §2)
    "lomdm_hlr": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.65", "optim.head_lr=1e-2"]),
    "multivariate_hlr": ("ab", ["diffusion.name=multivariate", *C, "diffusion.c2=0.65", "optim.head_lr=1e-2"]),
    # the two variance reductions of issue 16 §2, end to end: K = 4 corruptions (per-step order-gradient
    # SNR 0.020 vs 0.005 at K = 2, bench/order_signal.py) and P-POTS importance-sampled t
    "lomdm_k4": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.65", "diffusion.num_corruptions=4"]),
    "poly_k4": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.0", "diffusion.num_corruptions=4"]),  # its control
    "lomdm_ppots": ("ab", ["diffusion.name=lomdm", *C, "diffusion.c2=0.65", "diffusion.time_sampler=ppots"]),
}
CONTROL = {"lomdm_k4": "poly_k4"}
# What `make bench-order` runs (<= 15 min on 2 cores): the two fixed orders that settle the reference,
# the control and LoMDM. The other variants are one `--variants` away (RESULTS.md has their figures).
DEFAULT_VARIANTS = ["ref_a_first", "ref_b_first", "poly_k2", "lomdm"]
LEARNED = ("lomdm", "lomdm_hlr", "multivariate_hlr", "poly_k2", "lomdm_k4", "poly_k4", "lomdm_ppots")


def make_data(task: str, rows: int, out: Path) -> dict[str, dict]:
    """Shards of both layouts (same rows), through tools/make_synthetic.py and tools/preprocess_data.py."""
    info = {}
    for layout in ("ab", "ba"):
        d = out / f"{task}_{layout}"
        if not (d / "shards" / "manifest.json").exists():
            subprocess.run([sys.executable, "tools/make_synthetic.py", "--task", task, "--rows", str(rows),
                            "--layout", layout, "--out", str(d)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            meta = json.loads((d / "task.json").read_text())
            subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(d / "rows.jsonl"), "--tokenizer",
                            str(d / "tokenizer"), "--seq-length", str(meta["seq_length"]), "--layout", "padded",
                            "--valid-fraction", "0.04", "--workers", "0", "--no-progress", "--overwrite",
                            "--output-dir", str(d / "shards")], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        info[layout] = json.loads((d / "task.json").read_text()) | {"shards": str(d / "shards")}
    return info


def train_command(name: str, seed: int, args: argparse.Namespace, data: dict, run_dir: Path) -> list[str]:
    layout, overrides = VARIANTS[name]
    meta = data[layout]
    extra = [f"diffusion.block_size={meta['seq_length'] // 2}"] if "bd3lm" in overrides[0] else []
    if name in LEARNED and args.num_corruptions != 2 and "num_corruptions" not in str(overrides):
        extra.append(f"diffusion.num_corruptions={args.num_corruptions}")
    return [sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/tiny_cpu.yaml",
            *overrides, *extra, *args.extra, f"data.train={meta['shards']}", f"run.dir={run_dir}",
            f"train.seed={seed}", f"train.steps={args.steps}", f"train.micro_batch_size={args.batch}",
            f"train.global_batch_size={args.batch}", f"train.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}",
            "model.seq_length=0", "train.deterministic=false", f"train.log_interval={args.log_interval}",
            "train.eval_interval=0", f"optim.ema_decay={args.ema}", "checkpoint.interval=0",
            "tracking.enabled=false"]


def post_command(run_dir: Path, meta: dict, args: argparse.Namespace) -> list[list[str]]:
    """Evaluation of the whole valid split and the order probe, both on the final checkpoint."""
    return [[sys.executable, "tools/evaluate.py", "--run-dir", str(run_dir), "--t-draws", str(args.t_draws),
             "--no-hash", "--out", str(run_dir / "eval.json")],
            [sys.executable, "bench/order_task.py", "--probe", str(run_dir), "--probe-a", json.dumps(meta["positions_a"]),
             "--probe-b", json.dumps(meta["positions_b"]), "--probe-samples", str(args.samples)]]


def probe(run_dir: str, pos_a: list[int], pos_b: list[int], num_samples: int) -> None:
    """Forward exponent gap on validation rows and ancestral orders; writes RUN/order_probe.json."""
    import torch

    from megatron_lomdm.apps.evaluate import read_eval_sequences
    from megatron_lomdm.apps.generate import generate
    from megatron_lomdm.apps.run import close_run, open_run, weights
    from megatron_lomdm.sampling import build_sampler, sampler_options
    from megatron_lomdm.sampling.metrics import order_agreement

    run = open_run(run_dir)
    model, family, L = run.model, run.model.family, run.cfg.model.seq_length
    rows = [r for r in read_eval_sequences(run, split="valid", max_sequences=512) if len(r) == L]
    x_BL = torch.tensor(rows, device=run.device)
    valid_BL = torch.ones_like(x_BL, dtype=torch.bool)
    out: dict = {"family": run.cfg.diffusion.name}
    with torch.no_grad(), weights(run, use_ema=run.ema.decay > 0):
        logits = model.fwd_head(model.clean_features(x_BL, valid_BL), valid_BL) if family.needs_clean_features else None
        t_B = torch.full((x_BL.shape[0],), 0.5, device=run.device)
        sched = family.forward_schedule(x_BL=x_BL, t_B=t_B, fwd_logits_BL=logits, valid_BL=valid_BL)
        e_BL = (sched.velocity_BL * t_B[:, None]).double()  # the exponent for power schedules
    if run.cfg.diffusion.name != "bd3lm":
        e_a, e_b = e_BL[:, pos_a].mean(1), e_BL[:, pos_b].mean(1)
        out |= {"fwd_gap": float((e_a - e_b).mean()), "fwd_gap_row_std": float((e_a - e_b).std()),
                "fwd_exponent_std": float(e_BL.std())}
    sampler = build_sampler("ancestral", **sampler_options("ancestral", mask_id=run.cfg.model.mask_id, family=family,
                                                           steps=4 * L))
    gen = generate(run, sampler, num_samples=num_samples, batch_size=min(num_samples, 128), seed=0)
    agree_N = order_agreement(gen.unmask_step, pos_a, pos_b)
    out |= {"a_first_pair_agreement": float(agree_N.mean()), "a_first_share": float((agree_N > 0.5).double().mean()),
            "samples": num_samples}
    if gen.exp_count_L.sum() > 0:
        rev_L = gen.exp_sum_L / gen.exp_count_L.clamp_min(1)
        out["rev_gap"] = float(rev_L[pos_a].mean() - rev_L[pos_b].mean())
    (Path(run_dir) / "order_probe.json").write_text(json.dumps(out, indent=1) + "\n")
    close_run()


def train_stats(run_dir: Path) -> dict:
    """Median unique tokens/s and the mean forward-head gradient SNR over the second half of training."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind", "train") == "train"]
    late = rows[len(rows) // 2:]
    snr = [r["order_grad_snr"] for r in late if "order_grad_snr" in r]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
            "grad_snr": statistics.mean(snr) if snr else None}


def se(vals: list[float]) -> float:
    return statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")


def summarize(results: dict, entropy: float, args: argparse.Namespace) -> tuple[str, dict]:
    def col(name: str, key: str) -> list[float]:
        return [r[key] for r in results.get(name, []) if r.get(key) is not None]

    ref_a, ref_b = col("ref_a_first", "nelbo"), col("ref_b_first", "nelbo")
    a_first = statistics.mean(ref_a) < statistics.mean(ref_b)
    sign = 1.0 if a_first else -1.0
    lines = [f"Task {args.task}: exact entropy {entropy:.4f} nats/token; {args.steps} steps, batch {args.batch}, "
             f"{args.layers}L d{args.hidden}, lr {args.lr}, {len(ref_a)} seeds. Reference (better fixed order): "
             f"**{'A' if a_first else 'B'} first** ({statistics.mean(ref_a):.3f} vs {statistics.mean(ref_b):.3f}).", "",
             "| variant | valid NELBO mean ± se | per seed | fwd gap (ref sign) | rev gap | orders following ref "
             "| pair agreement | grad SNR (2nd half) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {"reference": "a_first" if a_first else "b_first", "entropy": entropy, "variants": {}}
    for name in results:
        nel = col(name, "nelbo")
        gaps = [sign * g for g in col(name, "fwd_gap")]
        rev = [sign * g for g in col(name, "rev_gap")]
        share = [s if a_first else 1 - s for s in col(name, "a_first_share")]
        pair = [p if a_first else 1 - p for p in col(name, "a_first_pair_agreement")]
        fmt = (lambda v, f="{:+.3f}": ", ".join(f.format(x) for x in v) if v else "—")
        lines.append(f"| {name} | {statistics.mean(nel):.4f} ± {se(nel):.4f} | {fmt(nel, '{:.3f}')} | {fmt(gaps)} | "
                     f"{fmt(rev)} | {fmt(share, '{:.2f}')} | {fmt(pair, '{:.2f}')} | {fmt(col(name, 'grad_snr'), '{:.3g}')} "
                     f"| {statistics.median(col(name, 'tokens_per_s')):.0f} |")
        summary["variants"][name] = {"nelbo": nel, "fwd_gap": gaps, "rev_gap": rev, "share": share, "pair": pair}
    ref_best = ref_a if a_first else ref_b
    best = statistics.mean(ref_best)
    summary["goal"] = {}
    for name in ("lomdm", "lomdm_hlr", "multivariate_hlr", "lomdm_k4", "lomdm_ppots"):
        control = CONTROL.get(name, "poly_k2")  # the same step with c2 = 0 (same K)
        lo, ctl = col(name, "nelbo"), col(control, "nelbo")
        if not (lo and ctl):
            continue
        diff = [c - x for x, c in zip(lo, ctl)]  # paired by seed
        v = summary["variants"][name]
        goal = {"gap_right_sign_every_seed": bool(v["fwd_gap"]) and all(g > 0 for g in v["fwd_gap"]),
                "orders_follow_ref_ge_90pct": bool(v["share"]) and min(v["share"]) >= 0.9,
                "below_control_by_3se": statistics.mean(diff) > 3 * se(diff),
                "within_noise_of_best_fixed": statistics.mean(lo) - best <= 2 * (se(lo) + se(ref_best))}
        summary["goal"][name] = goal | {"control": control, "control_minus_variant": diff}
        lines.append(f"\nGoal (issue 16 §1), {name}: {json.dumps(goal)}; {control} − {name} per seed "
                     f"{[round(d, 4) for d in diff]}; {name} − best fixed {statistics.mean(lo) - best:+.4f}.")
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pairs")
    p.add_argument("--rows", type=int, default=40000)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-corruptions", type=int, default=2)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--t-draws", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out-dir", default=str(WORK / "order_task"))
    p.add_argument("--reuse", action="store_true", help="keep finished runs (eval.json and order_probe.json present)")
    p.add_argument("--extra", nargs="*", default=[], help="dotted overrides for every run")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-a", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--probe-b", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--probe-samples", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe(args.probe, json.loads(args.probe_a), json.loads(args.probe_b), args.probe_samples)
        return 0
    from megatron_lomdm.config.families import FAMILY_SPECS

    runnable = [v for v in VARIANTS if VARIANTS[v][1][0].split("=")[1] in FAMILY_SPECS]
    variants = [v for v in args.variants if v in runnable]
    out = Path(args.out_dir)
    t0 = time.time()
    data = make_data(args.task, args.rows, out / "data")
    jobs = []
    for name in variants:
        for seed in range(1, args.seeds + 1):
            run_dir = out / "runs" / f"{name}_s{seed}"
            if args.reuse and (run_dir / "eval.json").exists() and (run_dir / "order_probe.json").exists():
                continue
            if run_dir.exists():
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            cmd = train_command(name, seed, args, data, run_dir)
            post = post_command(run_dir, data[VARIANTS[name][0]], args)
            chained = " && ".join(" ".join(f"'{c}'" for c in c_) for c_ in [cmd, *post])
            jobs.append((name, seed, ["bash", "-c", chained], run_dir))
    run_all(jobs, args.parallel)
    results: dict[str, list[dict]] = {}

    def finished(name: str) -> bool:
        return all((out / "runs" / f"{name}_s{k}" / "order_probe.json").exists() for k in range(1, args.seeds + 1))

    # with --reuse the table also shows the other variants' finished runs (a subset run keeps its references)
    for name in [v for v in VARIANTS if v in variants or (args.reuse and v in runnable and finished(v))]:
        for seed in range(1, args.seeds + 1):
            run_dir = out / "runs" / f"{name}_s{seed}"
            ev = json.loads((run_dir / "eval.json").read_text())
            pr = json.loads((run_dir / "order_probe.json").read_text())
            results.setdefault(name, []).append({"seed": seed, "nelbo": ev["nelbo"], **pr, **train_stats(run_dir)})
    entropy = data["ab"]["entropy_per_token_nats"]
    table, summary = summarize(results, entropy, args)
    elapsed = time.time() - t0
    cmdline = "bench/order_task.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"# Order-learning benchmark\n\n`{cmdline}` — {elapsed / 60:.1f} min\n\n{table}"
    (out / "order_task.md").write_text(text)
    (out / "order_task.json").write_text(json.dumps({"results": results, "summary": summary,
                                                     "args": vars(args), "env": environment()}, indent=1) + "\n")
    for name, rows in results.items():
        record(f"order_task/{args.task}/{name}", {"nelbo": [r["nelbo"] for r in rows], "runs": rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
