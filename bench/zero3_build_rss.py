"""Per-rank RSS of a DeepSpeed ZeRO-3 + NVMe build, with and without the partitioned build.

    python bench/zero3_build_rss.py [--layers 8 --hidden 1024]

Runs one torchrun launch (2 gloo ranks, bf16, owt_1b's vocabulary) per mode: `partitioned` (this
code: `deepspeed_engine.partitioned_build`) and `plain` (the build replaced by a null context, as
before). Each rank prints the build's and the engine's seconds and its VmHWM / VmRSS before the build, after `build_model` (and after a
`malloc_trim`, with the parameter bytes it holds), and after the engine is built.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def memory() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS")}


def worker(mode: str, layers: int, hidden: int, nvme: str) -> None:
    import torch

    from megatron_lomdm.config.schema import (Config, DiffusionConfig, ModelConfig, OptimConfig, ParallelConfig,
                                              TrainConfig)
    from megatron_lomdm.distributed.cpu_compat import install_cpu_shims
    from megatron_lomdm.distributed.init import init_distributed, parallel_info
    from megatron_lomdm.training import build
    from megatron_lomdm.training.step import MicroBatchStep

    torch.set_num_threads(1)
    if mode == "plain":
        build.partitioned_build = lambda cfg: contextlib.nullcontext()
    info = init_distributed(tp=1, pp=1, seed=0, backend="gloo", before_rng_seed=install_cpu_shims)
    v = 50258
    cfg = Config(model=ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=16, seq_length=128, vocab_size=v,
                                   mask_id=v - 1, pad_id=v - 2, init_device="cpu"),
                 diffusion=DiffusionConfig(name="lomdm"), optim=OptimConfig(warmup_steps=0, ema_decay=0.0),
                 train=TrainConfig(precision="bf16", micro_batch_size=1, global_batch_size=2),
                 parallel=ParallelConfig(backend="deepspeed", zero=3, nvme_offload_dir=nvme))
    out: dict = {"mode": mode, "rank": info.rank, "before": memory()}
    t0 = time.perf_counter()
    model = build.build_model(cfg, parallel_info())
    out["build_s"] = time.perf_counter() - t0
    out["after_build"] = memory()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["after_build_trimmed"] = memory()
    out["param_bytes"] = sum(t.numel() * t.element_size() for p in model.parameters()
                             for t in (p.data, getattr(p, "ds_tensor", None)) if t is not None)
    t0 = time.perf_counter()
    build.build_engine(MicroBatchStep(model), cfg)
    out["engine_s"] = time.perf_counter() - t0
    out["after_engine"] = memory()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--worker", choices=["plain", "partitioned"], help=argparse.SUPPRESS)
    ap.add_argument("--nvme", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.layers, args.hidden, args.nvme)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    for mode in ("plain", "partitioned"):
        with tempfile.TemporaryDirectory() as nvme:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   __file__, "--worker", mode, "--nvme", nvme, "--layers", str(args.layers),
                                   "--hidden", str(args.hidden)], cwd=ROOT, env=env, capture_output=True, text=True)
        rows = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
        if proc.returncode or len(rows) != 2:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        for r in sorted(rows, key=lambda r: r["rank"]):
            gib = {k: round(r[k]["VmHWM"] / 2**30, 2) for k in ("after_build", "after_engine")}
            print(f"{mode:<12} rank {r['rank']}: build {r['build_s']:.1f} s, engine {r['engine_s']:.1f} s; params held {r['param_bytes'] / 2**30:.2f} GiB, VmHWM after build "
                  f"{gib['after_build']}, after engine {gib['after_engine']} GiB; VmRSS after build (trimmed) "
                  f"{r['after_build_trimmed']['VmRSS'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
