"""Shared benchmark helpers: tiny shards, configs, interleaved A/B timing and JSON-lines records.

performance.md §B1: A and B run in one process, interleaved (2 warm-ups each, then >= 7 pairs),
and the figure is median(B_i / A_i) with its min-max; §B5: every record carries git sha, config
hash, versions, machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
RESULTS = ROOT / "bench" / "results.jsonl"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The benchmark shape of performance.md §B1 (one unit 50-500 ms on CPU): 4 layers, d 256, 4 heads,
# T 128, V ~ 8k, B 8.
BENCH_SHAPE = {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "seq_length": 128, "vocab_size": 8192,
               "batch": 8}


class Progress:
    """A line per run of a benchmark loop, on stderr as the run starts: `[zero_memory 2/5, 41 s] deepspeed ZeRO-1`.

    Benchmarks print their figures at the end; this says meanwhile what is running, how far the loop is
    and how long it has taken so far.
    """

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.count, self.t0 = name, total, 0, time.time()

    def step(self, what: str) -> None:
        """Announce the next run (`what`)."""
        self.count += 1
        print(f"[{self.name} {self.count}/{self.total}, {time.time() - self.t0:.0f} s] {what}", file=sys.stderr,
              flush=True)


def ensure_shards(seq_length: int = 128, vocab_size: int = 8192, max_bytes: int | None = 2_000_000) -> Path:
    """Packed shards of the demo corpus (as tests/conftest.py builds them), cached under bench/_work."""
    from megatron_lomdm.data.demo_corpus import write_demo_corpus
    from megatron_lomdm.data.shards import write_shards
    from megatron_lomdm.data.tokenize import train_bpe_tokenizer

    base = WORK / f"corpus_{max_bytes}"
    out = WORK / f"shards_T{seq_length}_V{vocab_size}_{max_bytes}"
    if (out / "manifest.json").exists():
        return out
    if not base.exists() or not any(base.iterdir()):
        write_demo_corpus(base, max_bytes=max_bytes)
    tok = WORK / f"tokenizer_V{vocab_size}_{max_bytes}"
    if not (tok / "tokenizer.json").exists():
        train_bpe_tokenizer([base], tok, vocab_size=vocab_size)
    write_shards([base], out, tokenizer=tok, seq_length=seq_length, layout="packed", workers=0,
                 valid_fraction=0.05, shard_size_mb=1.0, progress=False, overwrite=True)
    return out


def make_config(family: str, shards: Path, *, c1: float | None = None, c2: float | None = None,
                num_layers: int = BENCH_SHAPE["num_layers"], hidden_size: int = BENCH_SHAPE["hidden_size"],
                num_heads: int = BENCH_SHAPE["num_heads"], batch: int = BENCH_SHAPE["batch"],
                run_dir: Path | None = None, extra: list[str] | None = None):
    """A `Config` from configs/experiments/tiny_cpu.yaml, resized to the benchmark shape."""
    from megatron_lomdm.config import load_config

    overrides = [
        f"diffusion.name={family}", f"data.train={shards}", f"model.num_layers={num_layers}",
        f"model.hidden_size={hidden_size}", f"model.num_heads={num_heads}", "model.seq_length=0",
        f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", "train.deterministic=false",
        "optim.ema_decay=0", "tracking.enabled=false", "checkpoint.interval=0", "train.steps=1000000",
        f"run.dir={run_dir or WORK / 'runs' / family}",
    ]
    if family == "arm":
        overrides.append("diffusion.block_size=1")
    if c1 is not None:
        overrides.append(f"diffusion.c1={c1}")
    if c2 is not None:
        overrides.append(f"diffusion.c2={c2}")
    return load_config(ROOT / "configs" / "experiments" / "tiny_cpu.yaml", overrides + list(extra or []))


def config_hash(cfg: Any) -> str:
    from megatron_lomdm.config.load import config_to_dict

    d = config_to_dict(cfg)
    d.get("run", {}).pop("dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def environment() -> dict[str, Any]:
    """git sha, versions, machine and threads (performance.md §B5)."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    return {"git_sha": git_sha(), "torch": torch.__version__, "megatron_core": _version("megatron-core"),
            "deepspeed": _version("deepspeed"), "python": platform.python_version(), "machine": platform.node(),
            "device": device, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def interleaved_ratio(a: Callable[[], Any], b: Callable[[], Any], *, pairs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """Time a and b alternately (warm-ups first, then `pairs` pairs; the order flips every pair so
    neither side always runs second); returns per-side medians and median / min / max of b_i / a_i."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(pairs):
        for fn, store in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            store.append(time.perf_counter() - t0)
    ratios = [y / x for x, y in zip(ta, tb)]
    return {"n": pairs, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_s_median": statistics.median(ta), "b_s_median": statistics.median(tb),
            "a_s_min": min(ta), "b_s_min": min(tb), "ratio_of_mins": min(tb) / min(ta)}


def record(name: str, result: dict[str, Any], *, band: tuple[float, float] | None = None,
           predicted: float | None = None, cfg_hash: str | None = None, out: Path | None = RESULTS,
           env: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JSON line: the benchmark, its figures, the predicted band and the environment."""
    line = {"bench": name, **(env or environment()), "config_hash": cfg_hash, "predicted": predicted,
            "band": list(band) if band else None, **result}
    ratio = result.get("ratio_median", result.get("ratio"))
    if band is not None and ratio is not None:
        line["in_band"] = bool(band[0] <= ratio <= band[1])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(line, default=float) + "\n")
    return line
