#!/usr/bin/env python
"""`make bench`: every CPU benchmark under bench/ (<= 20 min on 2 cores), JSON lines + a short table.

Each benchmark runs in its own subprocess (`build_run` installs process-global CPU shims), all
appending to bench/results.jsonl (git sha, config hash, versions, machine, threads, median and
min-max over >= 7 interleaved pairs, the ratio and its predicted band):

1. bench/cpu_ratios.py: LoMDM/MDLM step (+ phases) vs the FLOP prediction, our FLOP counter /
   FlopCounterMode (MDLM, LoMDM), megatron-core backbone / plain PyTorch, MDLM/ARM step;
2. bench/zero_memory.py: bytes per parameter at DP=2 (megatron ZeRO-0/1, DeepSpeed ZeRO-1/2/3);
3. bench/bench_data.py: preprocessing docs/s, MB/s, tokens/s (1 vs 2 workers) and loader tokens/s,
   then loader tokens/s / training consumption tokens/s (the MDLM and LoMDM steps of 1.); with
   MEGATRON_LM_DIR set (a Megatron-LM core_v0.16.1 checkout), also our preprocessing throughput /
   Megatron-LM's on the same input and tokenizer, and whether the token streams are identical;
4. bench/samplers.py: tokens/s and executed backbone calls vs T (L = 128, cache on/off) for
   ancestral, mdlm_cache and entropy_bound, calls against T (1 - e^{-L/T}), work outside the backbone;
5. bench/gpu.py when CUDA is present (otherwise its `--dry-run` is left to ``python bench/gpu.py --dry-run``).

Not here (separate targets): bench/learning.py (`make bench-learning`, ~60 min).
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

from common import RESULTS, ROOT, environment, record  # noqa: E402


def run(cmd: list[str], timeout: int) -> tuple[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=9, help="interleaved pairs per ratio (>= 7)")
    p.add_argument("--data-mb", type=float, default=10.0)
    p.add_argument("--skip", nargs="*", default=[], help="cpu_ratios zero_memory data samplers gpu")
    args = p.parse_args(argv)
    if args.pairs < 7:
        p.error("--pairs must be >= 7 (performance.md §B1)")
    start_line = len(RESULTS.read_text().splitlines()) if RESULTS.exists() else 0
    py = sys.executable
    status = {}
    t_all = time.time()
    if "cpu_ratios" not in args.skip:
        status["cpu_ratios"] = run([py, "bench/cpu_ratios.py", "--pairs", str(args.pairs)], 900)
    if "zero_memory" not in args.skip:
        status["zero_memory"] = run([py, "bench/zero_memory.py"], 600)
    if "data" not in args.skip:
        status["data"] = run([py, "bench/bench_data.py", "--mb", str(args.data_mb), "--seq-length", "128",
                              "--out", str(RESULTS)], 600)
    if "samplers" not in args.skip:
        status["samplers"] = run([py, "bench/samplers.py"], 900)
    import torch

    if "gpu" not in args.skip and torch.cuda.is_available():
        status["gpu"] = run([py, "bench/gpu.py"], 3600)

    lines = [json.loads(x) for x in RESULTS.read_text().splitlines()[start_line:]] if RESULTS.exists() else []
    steps = {x["bench"]: x for x in lines if x["bench"] == "lomdm_step/mdlm_step"}
    data = [x for x in lines if x["bench"] == "data"]
    if steps and data:  # loader tokens/s / training consumption tokens/s (performance.md §B2.6, aim >= 10x)
        loader = data[-1]["loader"]["tokens_per_s"]
        consumption = steps["lomdm_step/mdlm_step"]["unique_tokens_per_s"]
        res = {"loader_tokens_per_s": loader, **{f"train_{k}_tokens_per_s": v for k, v in consumption.items()},
               "ratio": loader / consumption["mdlm"], "ratio_lomdm": loader / consumption["lomdm"]}
        lines.append(record("loader/train_consumption", res, predicted=10.0, band=(10.0, float("inf"))))

    print(f"\n=== bench summary ({time.time() - t_all:.0f} s, {environment()['git_sha']}; full records in "
          f"{RESULTS.relative_to(ROOT)})")
    print(f"{'benchmark':<44} {'value':>9} {'min':>8} {'max':>8}  {'predicted [band]':<24} ok")
    for x in lines:
        if x["bench"] == "data":
            pre = x["preprocess"]
            for w, r in pre.items():
                print(f"{'data/preprocess_' + w:<44} {r['tokens_per_s']:>9.0f} tok/s  {r['mb_per_s']:.2f} MB/s  "
                      f"{r['docs_per_s']:.0f} docs/s  ({r['tokens_per_cpu_s_per_worker']:.0f} tok per CPU-s per worker)")
            print(f"{'data/loader':<44} {x['loader']['tokens_per_s']:>9.0f} tok/s")
            for w, r in x.get("megatron_lm", {}).get("by_workers", {}).items():
                print(f"{'data/ours_over_megatron_lm_' + w:<44} {r['throughput_ours_over_theirs']:>9.2f}x  token streams "
                      f"{'identical' if r['streams_identical_over_ours'] else 'DIFFER'}")
            continue
        if x["bench"].startswith("sampler/"):
            expected = f"E {x['expected_calls']:.1f}" if x.get("expected_calls") is not None else ""
            ok = "-" if x.get("in_band") is None else ("yes" if x["in_band"] else "NO")
            print(f"{x['bench']:<44} {x['calls_mean']:>9.1f} calls {expected:<9} {x['tokens_per_s']:>8.1f} tok/s  "
                  f"outside backbone {x['outside_backbone_s_per_step'] * 1e3:.2f} ms/step  {ok}")
            continue
        value = x.get("ratio_median", x.get("ratio"))
        if value is None:
            print(f"{x['bench']:<44} {x.get('status', '')[:70]}")
            continue
        band = x.get("band")
        pred = x.get("predicted")
        pb = (f"{pred:.3f}" if pred is not None else "") + (f" [{band[0]:.2f}, {band[1]:.2f}]" if band else "")
        ok = "-" if band is None else ("yes" if x.get("in_band") else "NO")
        print(f"{x['bench']:<44} {value:>9.3f} {x.get('ratio_min', value):>8.3f} {x.get('ratio_max', value):>8.3f}  "
              f"{pb:<24} {ok}")
    for name, (rc, secs) in status.items():
        print(f"  {name}: rc {rc}, {secs:.0f} s")
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
