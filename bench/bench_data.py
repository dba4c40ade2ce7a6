#!/usr/bin/env python
"""Data throughput: preprocessing (docs/s, MB/s, tokens/s; 1 vs 2 workers) and loader tokens/s.

Input: the bundled demo corpus (``megatron_lomdm.data.demo_corpus``) repeated to ``--mb``
megabytes; tokenizer: a byte-level BPE (``--vocab-size``) trained on it locally. Everything is
written under ``--work`` (default ``bench/_work/data``; put it on tmpfs for I/O-free numbers).
Prints one JSON line (and appends it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lomdm.data.demo_corpus import write_demo_corpus  # noqa: E402
from megatron_lomdm.data.loader import ShardLoader  # noqa: E402
from megatron_lomdm.data.shards import write_shards  # noqa: E402
from megatron_lomdm.data.tokenize import train_bpe_tokenizer  # noqa: E402


def build_input(work: Path, megabytes: float) -> Path:
    """The demo corpus, repeated (with a copy number prepended to each text) up to ``megabytes``."""
    base = write_demo_corpus(work / "demo")
    lines = [line for path in base for line in path.read_text(encoding="utf-8").splitlines()]
    out = work / "input" / "corpus.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    size, copy = 0, 0
    with open(out, "w", encoding="utf-8") as stream:
        while size < megabytes * 1e6:
            for line in lines:
                doc = json.loads(line)
                text = json.dumps({"text": f"[{copy}] " + doc["text"]}) + "\n"
                stream.write(text)
                size += len(text.encode("utf-8"))
            copy += 1
    return out


def bench_preprocess(
    inp: Path, tok: Path, work: Path, workers: int, seq_length: int
) -> dict[str, float]:
    """One preprocessing run: the manifest's wall-clock rates (worker start-up included) and, robust
    to a shared machine, tokens per CPU-second of the tokenizing processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    manifest = write_shards(
        [inp],
        work / f"shards_w{workers}",
        tokenizer=tok,
        seq_length=seq_length,
        layout="packed",
        workers=workers,
        valid_fraction=0.01,
        overwrite=True,
        progress=False,
    )
    stats = manifest["stats"]
    keys = (
        "seconds",
        "docs_per_s",
        "mb_per_s",
        "tokens_per_s",
        "num_documents",
        "num_raw_tokens",
        "input_bytes",
    )
    result = {k: stats[k] for k in keys}
    result["tokens_per_s_per_worker"] = stats["tokens_per_s"] / max(workers, 1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    cpu = [
        a.ru_utime + a.ru_stime - (b.ru_utime + b.ru_stime)
        for a, b in zip(after, before, strict=True)
    ]
    result["cpu_s_workers"], result["cpu_s_main"] = cpu
    tokenizing_cpu = cpu[0] if workers else cpu[1]
    result["tokens_per_cpu_s_per_worker"] = stats["num_raw_tokens"] / max(tokenizing_cpu, 1e-9)
    result["sha256_first_shard"] = manifest.split("train")["shards"][0]["sha256"]
    return result


def bench_loader(
    shards: Path, micro_batch_size: int, global_batch_size: int, steps: int
) -> dict[str, float]:
    """Tokens/s of one DP rank iterating micro-batches (random access into the shards)."""
    loader = ShardLoader(
        shards,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=0,
    )
    next(loader)  # open shards, build the epoch order
    start, tokens = time.perf_counter(), 0
    for _ in range(steps * loader.num_micro_batches):
        tokens += next(loader)["tokens"].numel()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": tokens / seconds,
        "micro_batches_per_s": steps * loader.num_micro_batches / seconds,
        "mb_per_s_uint16": 2 * tokens / seconds / 1e6,
    }


def main() -> None:
    """Run the benchmark and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / "_work" / "data"))
    p.add_argument("--mb", type=float, default=20.0, help="input size in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    inp = build_input(work, args.mb)
    tok = train_bpe_tokenizer([work / "demo"], work / "tokenizer", vocab_size=args.vocab_size)
    runs = {
        f"workers_{w}": bench_preprocess(inp, tok, work, w, args.seq_length) for w in args.workers
    }
    shas = {r["sha256_first_shard"] for r in runs.values()}
    loader = bench_loader(
        work / f"shards_w{args.workers[0]}", micro_batch_size=8, global_batch_size=64, steps=50
    )
    result = {
        "bench": "data",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "input_mb": round(inp.stat().st_size / 1e6, 2),
        "vocab_size": args.vocab_size,
        "seq_length": args.seq_length,
        "preprocess": runs,
        "identical_output_across_workers": len(shas) == 1,
        "loader": loader,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")


if __name__ == "__main__":
    main()
