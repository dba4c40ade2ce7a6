#!/usr/bin/env python
"""GPU benchmark (performance.md §B4): ceilings, tokens/s, TFLOP/s, MFU, peak memory, LoMDM/MDLM.

Runs only where CUDA is present (`--dry-run` runs the same path end to end on the CPU with a tiny
shape, to keep the script working on machines without a GPU):

1. ceilings: bf16 GEMM 8192^3 (TFLOP/s) and a device-to-device copy (TB/s, read + write);
2. `owt_small` (12L d768 T1024, vocab 50258 = GPT-2 + [MASK]) MDLM and LoMDM, and the 1B config
   (24L d2048 16 heads) on one GPU with selective recompute (TP=1, no distributed optimizer): a
   micro-batch sweep, each point in its own subprocess (an OOM is a recorded result, not a crash):
   unique tokens/s, model TFLOP/s from our analytic counter (`Run.flops_per_step`), MFU against
   989.4 TFLOP/s nominal and against the measured GEMM ceiling, peak memory;
3. LoMDM step / MDLM step at each micro-batch, next to the CPU ratio of bench/cpu_ratios.py.

Data: the bench shards (demo corpus, local BPE) at T=1024 with `model.vocab_size=50258` forced, so
the shapes (and FLOPs) are GPT-2's; tokens are real text. Targets (§B4): 124M-class MDLM >= 350k
tok/s (MFU 35-40%), 1B >= 35% MFU. Appends JSON lines to bench/results.jsonl, prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, WORK, Progress, config_hash, ensure_shards, environment, record  # noqa: E402

NOMINAL = 989.4e12
CASES = {  # name -> (config, overrides, micro-batch sweep)
    "owt_small_mdlm": ("configs/experiments/owt_small.yaml", ["diffusion.name=mdlm", "model.dropout=0.0"], [8, 16, 32, 64]),
    "owt_small_lomdm": ("configs/experiments/owt_small.yaml", ["model.dropout=0.0"], [8, 16, 32]),
    "1b_mdlm": ("configs/experiments/owt_1b.yaml", ["diffusion.name=mdlm", "parallel.tp=1", "parallel.zero=0",
                                                     "model.recompute=selective"], [4, 8, 16]),
    "1b_lomdm": ("configs/experiments/owt_1b.yaml", ["parallel.tp=1", "parallel.zero=0", "model.recompute=selective"],
                 [2, 4, 8]),
}
DRY = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_heads": 4, "train.precision": "fp32"}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ceilings(dry: bool) -> dict[str, float]:
    import torch

    dev = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    n = 256 if dry else 8192
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 3 if dry else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    gemm = 2 * n**3 * reps / (time.perf_counter() - t0)
    numel = (1 << 22) if dry else (1 << 30)  # 2 GiB of bf16 on the GPU
    x = torch.empty(numel, device=dev, dtype=dtype)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    copy = 2 * x.numel() * x.element_size() * reps / (time.perf_counter() - t0)
    return {"gemm_n": n, "gemm_tflops": gemm / 1e12, "copy_tb_per_s": copy / 1e12, "dtype": str(dtype)}


def worker(args: argparse.Namespace) -> None:
    """One (case, micro-batch) point: build, warm up, time `--steps` steps."""
    import torch

    from megatron_lomdm.config import load_config
    from megatron_lomdm.training.build import build_run
    from megatron_lomdm.training.loop import train_step

    config, overrides, _ = CASES[args.case]
    overrides = [*overrides, f"data.train={args.shards}", f"train.micro_batch_size={args.mb}",
                 f"train.global_batch_size={args.mb}", "tracking.enabled=false", "optim.ema_decay=0",
                 "checkpoint.interval=0", "train.eval_interval=0", f"run.dir={WORK / 'runs' / ('gpu_' + args.case)}",
                 "train.log_interval=1000000"]
    if args.dry_run:
        overrides += [f"{k}={v}" for k, v in DRY.items()] + ["model.seq_length=0", "model.recompute=none"]
    else:
        overrides += ["model.vocab_size=50258", "train.precision=bf16"]
    cfg = load_config(ROOT / config, overrides)
    try:
        run = build_run(cfg)
        for _ in range(args.warmup):
            train_step(run)
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(run)
        sync()
        dt = (time.perf_counter() - t0) / args.steps
    except torch.cuda.OutOfMemoryError as err:  # pragma: no cover - GPU only
        print("RESULT " + json.dumps({"case": args.case, "mb": args.mb, "status": f"OOM: {str(err)[:200]}"}))
        return
    tokens = cfg.train.global_batch_size * run.cfg.model.seq_length
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    fam = run.model.family
    out = {"case": args.case, "mb": args.mb, "status": "measured", "step_s": dt, "unique_tokens_per_s": tokens / dt,
           "mdlm_equivalent_tokens_per_s": tokens * fam.num_corruptions / dt, "flops_per_step": run.flops_per_step,
           "tflops": run.flops_per_step / dt / 1e12, "peak_memory_gib": peak, "config_hash": config_hash(run.cfg),
           "params": sum(p.numel() for p in run.model.parameters()), "seq_length": run.cfg.model.seq_length,
           "vocab_size": run.cfg.model.vocab_size, "recompute": run.cfg.model.recompute}
    run.close()
    print("RESULT " + json.dumps(out), flush=True)


def launch(case: str, mb: int, args: argparse.Namespace, shards: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--mb", str(mb), "--shards", str(shards),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--dry-run"] if args.dry_run else [])
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True,
                          text=True, timeout=args.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"case": case, "mb": mb, "status": f"failed (rc {proc.returncode}): {proc.stderr[-800:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def cpu_ratio() -> float | None:
    """The latest CPU LoMDM/MDLM step ratio recorded by bench/cpu_ratios.py, if any."""
    if not RESULTS.exists():
        return None
    vals = [json.loads(x) for x in RESULTS.read_text().splitlines() if '"lomdm_step/mdlm_step"' in x]
    return vals[-1]["ratio_median"] if vals else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU (no GPU needed)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case", default="owt_small_mdlm")
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--shards", default="")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/gpu.py needs CUDA (use --dry-run to exercise it on the CPU)")
        return []
    if args.dry_run:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    shards = ensure_shards(128, 8192) if args.dry_run else ensure_shards(1024, 8192)
    env = environment()
    out = Path(args.out) if args.out and not args.dry_run else None
    ceil = ceilings(args.dry_run)
    record("gpu/ceilings", ceil, out=out, env=env)
    ceiling_flops = ceil["gemm_tflops"] * 1e12
    rows = []
    sweeps = {case: CASES[case][2][:2] if args.dry_run else CASES[case][2] for case in args.cases}
    progress = Progress("gpu", sum(len(s) for s in sweeps.values()))
    for case, sweep in sweeps.items():
        for mb in sweep:
            progress.step(f"{case}, micro-batch {mb}")
            r = launch(case, mb, args, shards)
            if r["status"] == "measured":
                r["mfu_nominal"] = r["tflops"] * 1e12 / NOMINAL
                r["mfu_of_measured_gemm"] = r["tflops"] * 1e12 / ceiling_flops
            rows.append(r)
            record(f"gpu/{case}", r, out=out, env=env)
    by = {(r["case"], r["mb"]): r for r in rows if r["status"] == "measured"}
    ratios = []
    for size in ("owt_small", "1b"):
        for (case, mb), r in by.items():
            if case == f"{size}_lomdm" and (f"{size}_mdlm", mb) in by:
                ratio = r["step_s"] / by[(f"{size}_mdlm", mb)]["step_s"]
                ratios.append({"size": size, "mb": mb, "ratio": ratio, "cpu_ratio": cpu_ratio()})
                record(f"gpu/lomdm_step/mdlm_step/{size}", {"ratio": ratio, "mb": mb, "cpu_ratio": cpu_ratio()},
                       out=out, env=env)
    print(f"device: {env['device']}  GEMM {ceil['gemm_tflops']:.1f} TFLOP/s ({ceil['dtype']}, n={ceil['gemm_n']}), "
          f"copy {ceil['copy_tb_per_s']:.3f} TB/s" + ("  [DRY RUN: tiny shape on CPU]" if args.dry_run else ""))
    print(f"{'case':<18} {'mb':>4} {'tok/s':>10} {'TFLOP/s':>8} {'MFU989':>7} {'MFUgemm':>7} {'peak GiB':>8}")
    for r in rows:
        if r["status"] != "measured":
            print(f"{r['case']:<18} {r['mb']:>4} {r['status'][:80]}")
            continue
        print(f"{r['case']:<18} {r['mb']:>4} {r['unique_tokens_per_s']:>10.0f} {r['tflops']:>8.2f} "
              f"{r['mfu_nominal']:>7.1%} {r['mfu_of_measured_gemm']:>7.1%} {r['peak_memory_gib']:>8.2f}")
    for x in ratios:
        print(f"LoMDM/MDLM step {x['size']} mb {x['mb']}: {x['ratio']:.3f} (CPU: {x['cpu_ratio']})")
    return rows


if __name__ == "__main__":
    main()
