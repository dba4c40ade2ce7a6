#!/usr/bin/env python
"""Learning benchmark (`make bench-learning`, not in CI): MDLM vs polynomial vs LoMDM at small scale.

method.md §4.3's central claim (LoMDM reaches MDLM's quality in fewer steps), on the bundled demo
corpus with a tiny model: MDLM (`lomdm` with c1=1, c2=0 is MDLM's linear schedule; here the
`mdlm` family), poly (c1=0.7, c2=0) and LoMDM (c1=0.7, c2=0.65), the same steps and the same unique
batch, `--seeds` seeds each, trained with the CLI (`python -m megatron_lomdm.train`) and evaluated
every `--eval-interval` steps (validation NELBO with EMA weights, `metrics.jsonl` `kind: valid`).

Outputs (under `--out-dir`, default bench/_work/learning): `learning.png` (validation NELBO vs
step, mean and per-seed), `learning.md` (tables), `learning.json`; one JSON line per family
appended to bench/results.jsonl. Reports, for each family, final NELBO (mean ± std over seeds),
the step at which its mean curve first reaches MDLM's final mean NELBO, and the velocity-confidence
correlation over training (train records, `velocity_confidence_corr`).

Default (the full benchmark, ~50 min on 2 cores): 4 layers, d 128, T 64, V 2048, batch 32,
1000 steps (eval every 100 on 8 validation batches, the same evaluation noise for every family),
3 seeds, two runs at a time with one thread each, the slow LoMDM runs first. Fewer steps say
nothing: every family sits on the unigram plateau (validation NELBO = the unigram cross-entropy,
reported as the baseline) for the first ~400 steps at this size; a 1000-step MDLM run leaves it
at ~500 steps and reaches 5.86. Step time on one thread: MDLM ~0.37 s, LoMDM ~0.8 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, WORK, environment, ensure_shards, record  # noqa: E402

FAMILIES = {  # name -> overrides
    "mdlm": ["diffusion.name=mdlm"],
    "poly": ["diffusion.name=poly", "diffusion.c1=0.7", "diffusion.c2=0.0"],
    "lomdm": ["diffusion.name=lomdm", "diffusion.c1=0.7", "diffusion.c2=0.65"],
}


def command(family: str, seed: int, args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/tiny_cpu.yaml",
            *FAMILIES[family], f"data.train={shards}", f"run.dir={run_dir}", f"train.seed={seed}",
            f"train.steps={args.steps}", f"train.eval_interval={args.eval_interval}",
            f"train.eval_batches={args.eval_batches}", f"train.micro_batch_size={args.batch}",
            f"train.global_batch_size={args.batch}", f"train.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}",
            "model.seq_length=0", "train.deterministic=false", f"train.log_interval={args.log_interval}",
            f"optim.ema_decay={args.ema}", "checkpoint.interval=0", "tracking.enabled=false"]


def read(run_dir: Path) -> dict[str, list]:
    valid, corr = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "valid":
            valid.append((r["step"], r["nelbo"]))
        elif r.get("kind", "train") == "train" and "velocity_confidence_corr" in r:
            corr.append((r["step"], r["velocity_confidence_corr"]))
    return {"valid": sorted(valid), "corr": sorted(corr)}


def run_all(jobs: list[tuple[str, int, list[str], Path]], parallel: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            fam, seed, cmd, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "w")
            print(f"[learning] start {fam} seed {seed}", flush=True)
            running.append((fam, seed, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            run_dir, time.time()))
        time.sleep(2)
        for job in list(running):
            fam, seed, proc, run_dir, t0 = job
            if proc.poll() is not None:
                running.remove(job)
                print(f"[learning] done {fam} seed {seed}: rc {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode:
                    raise SystemExit(f"{fam} seed {seed} failed, see {run_dir / 'train.log'}")


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    out = []
    for s in steps:
        vals = [dict(c)[s] for c in curves]
        out.append((s, statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
    return out


def unigram_cross_entropy(shards: Path) -> float:
    """Nats/token of the valid split under the train split's unigram (add-one smoothed): the NELBO of
    a model that ignores context, i.e. the plateau every family starts on."""
    import numpy as np

    from megatron_lomdm.data.shards import read_manifest, read_split

    manifest = read_manifest(shards)
    counts = np.ones(manifest.tokenizer["vocab_size"], dtype=np.float64)
    for row, length in read_split(manifest, "train"):
        np.add.at(counts, row[:length].astype(np.int64), 1)
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for row, length in read_split(manifest, "valid"):
        total -= float(logp[row[:length].astype(np.int64)].sum())
        n += length
    return total / n


def first_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    return next((s for s, m, _ in curve if m <= target), None)


def plot(results: dict, path: Path, unigram: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"mdlm": "tab:blue", "poly": "tab:orange", "lomdm": "tab:green"}
    for fam, r in results.items():
        for c in r["valid_per_seed"]:
            ax1.plot([s for s, _ in c], [v for _, v in c], color=colors[fam], alpha=0.25, lw=0.8)
        m = r["valid_mean"]
        ax1.plot([s for s, *_ in m], [v for _, v, _ in m], color=colors[fam], lw=2, label=fam)
        if r["corr_mean"]:
            ax2.plot([s for s, *_ in r["corr_mean"]], [v for _, v, _ in r["corr_mean"]], color=colors[fam], label=fam)
    if unigram is not None:
        ax1.axhline(unigram, color="gray", ls="--", lw=1, label="unigram baseline")
    ax1.set_xlabel("step")
    ax1.set_ylabel("validation NELBO (nats/token)")
    ax1.legend()
    ax1.set_title("validation NELBO vs step")
    ax2.set_xlabel("step")
    ax2.set_ylabel("corr(velocity, confidence)")
    ax2.set_title("velocity-confidence correlation (train)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights (0 = raw weights)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--out-dir", default=str(WORK / "learning"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--reuse", action="store_true", help="only read existing runs under --out-dir")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    shards = ensure_shards(args.seq_length, args.vocab_size)
    jobs = []
    slow_first = sorted(args.families, key=lambda f: f != "lomdm")  # longest jobs first: less idle tail
    for seed in range(1, args.seeds + 1):
        for fam in slow_first:
            run_dir = out_dir / f"{fam}_s{seed}"
            if not args.reuse:
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                jobs.append((fam, seed, command(fam, seed, args, shards, run_dir), run_dir))
    t0 = time.time()
    run_all(jobs, args.parallel)
    wall = time.time() - t0
    results = {}
    for fam in args.families:
        per_seed = [read(out_dir / f"{fam}_s{seed}") for seed in range(1, args.seeds + 1)]
        valid = [r["valid"] for r in per_seed]
        corr = [r["corr"] for r in per_seed if r["corr"]]
        results[fam] = {"valid_per_seed": valid, "valid_mean": mean_curve(valid),
                        "corr_mean": mean_curve(corr) if corr else [],
                        "final_per_seed": [c[-1][1] for c in valid]}
    target = results["mdlm"]["valid_mean"][-1][1] if "mdlm" in results else None
    unigram = unigram_cross_entropy(shards)
    lines = [f"Validation NELBO (nats/token, mean ± std over {args.seeds} seed(s)); {args.steps} steps, batch "
             f"{args.batch} x T {args.seq_length}, {args.layers}L d{args.hidden}, V {args.vocab_size}; wall {wall:.0f} s",
             f"Unigram baseline (cross-entropy of the valid split under the train split's unigram, add-one "
             f"smoothed): {unigram:.3f}", "", "| step | " + " | ".join(args.families) + " |", "|---|" + "---|" * len(args.families)]
    steps = [s for s, *_ in results[args.families[0]]["valid_mean"]]
    for i, s in enumerate(steps):
        cells = []
        for fam in args.families:
            m = results[fam]["valid_mean"]
            cells.append(f"{m[i][1]:.3f} ± {m[i][2]:.3f}" if i < len(m) else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| family | final NELBO | steps to MDLM's final NELBO | corr(velocity, confidence) first → last |",
              "|---|---|---|---|"]
    env = environment()
    for fam in args.families:
        r = results[fam]
        fin = r["valid_mean"][-1]
        reach = first_reach(r["valid_mean"], target) if target is not None else None
        cm = r["corr_mean"]
        corr_txt = f"{cm[0][1]:+.3f} → {cm[-1][1]:+.3f}" if cm else "n/a"
        r.update(final_mean=fin[1], final_std=fin[2], steps_to_mdlm_final=reach)
        lines.append(f"| {fam} | {fin[1]:.3f} ± {fin[2]:.3f} | {reach if reach is not None else 'not reached'} | {corr_txt} |")
        if args.results:
            record(f"learning/{fam}", {"final_nelbo_mean": fin[1], "final_nelbo_std": fin[2],
                                       "final_per_seed": r["final_per_seed"], "steps_to_mdlm_final": reach,
                                       "mdlm_final": target, "unigram_baseline": unigram, "steps": args.steps, "seeds": args.seeds,
                                       "valid_mean": r["valid_mean"], "corr_mean": cm[:: max(len(cm) // 20, 1)],
                                       "wall_s": wall}, out=Path(args.results), env=env)
    table = "\n".join(lines)
    (out_dir / "learning.md").write_text(table + "\n")
    (out_dir / "learning.json").write_text(json.dumps({"args": vars(args), "unigram_baseline": unigram,
                                                       "results": results}, default=float))
    plot(results, out_dir / "learning.png", unigram)
    print(table)
    print(f"plot: {out_dir / 'learning.png'}")
    return results


if __name__ == "__main__":
    main()
