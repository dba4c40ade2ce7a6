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
    # control, not in the default set: LoMDM's step (K = 2 corruptions per sequence, clean pass, heads)
    # with c2 = 0, i.e. the polynomial schedule without a learned order; separates the effect of
    # the learned order from that of two corruptions per sequence.
    "poly_k2": ["diffusion.name=lomdm", "diffusion.c1=0.7", "diffusion.c2=0.0"],
}
DEFAULT_FAMILIES = ["mdlm", "poly", "lomdm"]


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


def step_flops_of(family: str, args: argparse.Namespace, shards: Path) -> float:
    """FLOPs of one training step of `family` at the benchmark's shape (our analytic counter)."""
    from megatron_lomdm.config import load_config
    from megatron_lomdm.data.shards import read_manifest
    from megatron_lomdm.training.build import family_from_config, resolve_data_fields
    from megatron_lomdm.utils.flops import Shape, step_flops

    overrides = command(family, 1, args, shards, WORK / "unused")[5:]
    cfg = resolve_data_fields(load_config(ROOT / "configs/experiments/tiny_cpu.yaml", overrides), read_manifest(shards))
    m = cfg.model
    fam = family_from_config(cfg)
    return step_flops(Shape(m.num_layers, m.hidden_size, m.ffn_size, m.vocab_size, m.seq_length),
                      unique_sequences=args.batch, num_corruptions=fam.num_corruptions,
                      clean_pass=fam.needs_clean_features, heads=fam.needs_clean_features)


def value_at(curve: list[tuple[int, float, float]], step: float) -> float | None:
    """The mean curve linearly interpolated at `step` (None outside the evaluated range)."""
    for (s0, v0, _), (s1, v1, _) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return curve[-1][1] if curve and step == curve[-1][0] else None


def finished(run_dir: Path, steps: int) -> bool:
    try:
        return any(step == steps for step, _ in read(run_dir)["valid"])
    except (OSError, ValueError, KeyError):
        return False


def first_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    return next((s for s, m, _ in curve if m <= target), None)


def plot(results: dict, path: Path, unigram: float | None = None) -> None:
    """NELBO vs step, NELBO vs compute (MDLM-step equivalents), and the learned order's correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    colors = {"mdlm": "tab:blue", "poly": "tab:orange", "lomdm": "tab:green", "poly_k2": "tab:purple"}
    for fam, r in results.items():
        for c in r["valid_per_seed"]:
            ax1.plot([s for s, _ in c], [v for _, v in c], color=colors[fam], alpha=0.25, lw=0.8)
        m = r["valid_mean"]
        ax1.plot([s for s, *_ in m], [v for _, v, _ in m], color=colors[fam], lw=2, label=fam)
        ax3.plot([s * r["flops_over_mdlm"] for s, *_ in m], [v for _, v, _ in m], color=colors[fam], lw=2, label=fam)
        if any(abs(v) > 0 for _, v, _ in r["corr_mean"]):  # only learned orders have one
            ax2.plot([s for s, *_ in r["corr_mean"]], [v for _, v, _ in r["corr_mean"]], color=colors[fam], label=fam)
    for ax in (ax1, ax3):
        if unigram is not None:
            ax.axhline(unigram, color="gray", ls="--", lw=1, label="unigram baseline")
        ax.set_ylabel("validation NELBO (nats/token)")
        ax.legend()
    ax1.set_xlabel("step")
    ax1.set_title("validation NELBO vs step")
    ax3.set_xlabel("training compute (MDLM steps of equal FLOPs)")
    ax3.set_title("validation NELBO vs compute")
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
    p.add_argument("--families", nargs="*", default=DEFAULT_FAMILIES, choices=list(FAMILIES),
                   help="poly_k2 is a control: LoMDM's step with c2 = 0 (no learned order)")
    p.add_argument("--out-dir", default=str(WORK / "learning"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs under --out-dir (same settings) and run only the missing ones")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    shards = ensure_shards(args.seq_length, args.vocab_size)
    jobs = []
    slow_first = sorted(args.families, key=lambda f: f != "lomdm")  # longest jobs first: less idle tail
    for seed in range(1, args.seeds + 1):
        for fam in slow_first:
            run_dir = out_dir / f"{fam}_s{seed}"
            if args.reuse and finished(run_dir, args.steps):
                continue
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
                        "final_per_seed": [c[-1][1] for c in valid], "flops_per_step": step_flops_of(fam, args, shards)}
    mdlm_flops = results["mdlm"]["flops_per_step"] if "mdlm" in results else None
    for r in results.values():
        r["flops_over_mdlm"] = r["flops_per_step"] / mdlm_flops if mdlm_flops else 1.0
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
    lines += ["", "Compute: FLOPs per step from our analytic counter; 'MDLM-equivalent steps' = steps x (FLOPs per "
              "step / MDLM's). 'NELBO at MDLM's compute' = the mean curve at the step whose compute equals MDLM's "
              f"{args.steps} steps.", "",
              "| family | final NELBO | FLOPs/step ÷ MDLM | steps to MDLM's final NELBO (MDLM-equivalent) | "
              "NELBO at MDLM's compute | corr(velocity, confidence) first → last |",
              "|---|---|---|---|---|---|"]
    env = environment()
    for fam in args.families:
        r = results[fam]
        fin = r["valid_mean"][-1]
        reach = first_reach(r["valid_mean"], target) if target is not None else None
        cm = r["corr_mean"]
        corr_txt = f"{cm[0][1]:+.3f} → {cm[-1][1]:+.3f}" if any(abs(v) > 0 for _, v, _ in cm) else "n/a"
        ratio = r["flops_over_mdlm"]
        at_mdlm_compute = value_at(r["valid_mean"], args.steps / ratio)
        r.update(final_mean=fin[1], final_std=fin[2], steps_to_mdlm_final=reach, nelbo_at_mdlm_compute=at_mdlm_compute)
        reach_txt = f"{reach} ({reach * ratio:.0f})" if reach is not None else "not reached"
        at_txt = f"{at_mdlm_compute:.3f}" if at_mdlm_compute is not None else "n/a (before the first evaluation)"
        lines.append(f"| {fam} | {fin[1]:.3f} ± {fin[2]:.3f} | {ratio:.2f} | {reach_txt} | {at_txt} | {corr_txt} |")
        if args.results:
            record(f"learning/{fam}", {"final_nelbo_mean": fin[1], "final_nelbo_std": fin[2],
                                       "final_per_seed": r["final_per_seed"], "steps_to_mdlm_final": reach,
                                       "mdlm_final": target, "unigram_baseline": unigram,
                                       "flops_per_step": r["flops_per_step"], "flops_over_mdlm": ratio,
                                       "nelbo_at_mdlm_compute": at_mdlm_compute, "steps": args.steps, "seeds": args.seeds,
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
