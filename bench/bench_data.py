#!/usr/bin/env python
"""Data throughput: preprocessing (docs/s, MB/s, tokens/s; 1 vs 2 workers) and loader tokens/s.

Input: the bundled demo corpus (``megatron_lomdm.data.demo_corpus``) repeated to ``--mb``
megabytes; tokenizer: a byte-level BPE (``--vocab-size``) trained on it locally. Everything is
written under ``--work`` (default ``bench/_work/data``; put it on tmpfs for I/O-free numbers).
Prints one JSON line (and appends it to ``--out`` when given).

With ``--megatron-lm DIR`` (default: the ``MEGATRON_LM_DIR`` environment variable), a checkout of
Megatron-LM ``core_v0.16.1`` (never vendored or committed), its ``tools/preprocess_data.py`` runs on
the same input with the same tokenizer folder (``HuggingFaceTokenizer``, ``--append-eod``) next to
our ``tools/preprocess_data.py`` (packed, no valid split). Both commands are run alternately
(``--pairs`` pairs per worker count) and timed whole, start-up included; each tool's own steady-state
rate is reported as well (ours from the manifest, theirs from its last progress line). The token
streams are compared: ours with [BOS] removed (rows ``[BOS] ids [EOS]``) must equal theirs
(documents ``ids <eod>``) over the whole packed length. ``MEGATRON_LM_PYTHONPATH`` adds entries to
its ``PYTHONPATH`` (``megatron.training`` imports ``triton``, which our CPU stack does not install:
``pip install --target DIR triton`` and point it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from megatron_lomdm.data.demo_corpus import write_demo_corpus  # noqa: E402
from megatron_lomdm.data.loader import ShardLoader  # noqa: E402
from megatron_lomdm.data.shards import read_manifest, read_split, write_shards  # noqa: E402
from megatron_lomdm.data.tokenize import train_bpe_tokenizer  # noqa: E402

from common import Progress  # noqa: E402


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


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as stream:
        proc = subprocess.run(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed (rc {proc.returncode}); see {log}")
    return time.perf_counter() - start


def our_stream(shards: Path) -> np.ndarray:
    """Our packed train split as one token stream with [BOS] removed: ``ids [EOS] ids [EOS] ...``."""
    manifest = read_manifest(shards)
    rows = [row[:length] for row, length in read_split(manifest, "train")]
    stream = np.concatenate(rows).astype(np.int64)
    bos = manifest.tokenizer.get("bos_id")
    return stream if bos is None else stream[stream != bos]


def their_stream(prefix: Path) -> np.ndarray:
    """Megatron-LM's indexed dataset as one token stream (documents ``ids <eod>``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def compare_megatron_lm(mlm: Path, inp: Path, tok: Path, work: Path, workers: list[int], seq_length: int,
                        pairs: int, progress: Progress) -> dict:
    """Our preprocess CLI vs Megatron-LM's on the same input and tokenizer, alternating, timed whole."""
    root = Path(__file__).resolve().parents[1]
    script = mlm / "tools" / "preprocess_data.py"
    if not script.exists():
        raise SystemExit(f"--megatron-lm {mlm}: no tools/preprocess_data.py there (want a core_v0.16.1 checkout)")
    base = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    theirs_env = {**base, "PYTHONPATH": os.pathsep.join(
        x for x in (str(mlm), os.environ.get("MEGATRON_LM_PYTHONPATH", "")) if x)}
    size = inp.stat().st_size
    out: dict = {"megatron_lm_dir": str(mlm), "input_bytes": size, "by_workers": {}}
    for w in workers:
        progress.step(f"ours vs Megatron-LM's preprocessing, {w} worker(s), {pairs} pair(s)")
        ours_dir, theirs_prefix = work / f"cmp_ours_w{w}", work / f"cmp_theirs_w{w}" / "data"
        theirs_prefix.parent.mkdir(parents=True, exist_ok=True)
        ours_cmd = [sys.executable, str(root / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-dir",
                    str(ours_dir), "--tokenizer", str(tok), "--seq-length", str(seq_length), "--layout", "packed",
                    "--workers", str(w), "--valid-fraction", "0", "--overwrite", "--no-progress"]
        theirs_cmd = [sys.executable, str(script), "--input", str(inp), "--output-prefix", str(theirs_prefix),
                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--workers", str(w),
                      "--append-eod", "--log-interval", "1000"]
        t_ours, t_theirs = [], []
        for i in range(pairs):
            order = ((ours_cmd, t_ours, base, "ours"), (theirs_cmd, t_theirs, theirs_env, "theirs"))
            for cmd, store, env, name in order if i % 2 == 0 else order[::-1]:
                store.append(_timed(cmd, env, work / f"cmp_{name}_w{w}.log"))
        log = (work / f"cmp_theirs_w{w}.log").read_text(encoding="utf-8", errors="replace")
        last = re.findall(r"Processed (\d+) documents \(([\d.]+) docs/s, ([\d.]+) MB/s\)", log)
        stats = read_manifest(ours_dir)["stats"]
        ours_s, theirs_s = our_stream(ours_dir), their_stream(theirs_prefix.parent / "data_text_document")
        n = len(ours_s)
        out["by_workers"][f"workers_{w}"] = {
            "pairs": pairs, "ours_wall_s": t_ours, "theirs_wall_s": t_theirs,
            "ours_wall_s_median": statistics.median(t_ours), "theirs_wall_s_median": statistics.median(t_theirs),
            "throughput_ours_over_theirs": statistics.median(t_theirs) / statistics.median(t_ours),
            "ours_mb_per_s_whole": size / 1e6 / statistics.median(t_ours),
            "theirs_mb_per_s_whole": size / 1e6 / statistics.median(t_theirs),
            "ours_mb_per_s_steady": stats["mb_per_s"], "ours_docs_per_s_steady": stats["docs_per_s"],
            "theirs_mb_per_s_steady_last_log": float(last[-1][2]) if last else None,
            "theirs_docs_per_s_steady_last_log": float(last[-1][1]) if last else None,
            "ours_stream_tokens": n, "theirs_stream_tokens": len(theirs_s),
            "streams_identical_over_ours": bool(n <= len(theirs_s) and np.array_equal(ours_s, theirs_s[:n])),
            "tokens_not_in_ours": len(theirs_s) - n,
        }
    return out


def main() -> None:
    """Run the benchmark and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / "_work" / "data"))
    p.add_argument("--mb", type=float, default=20.0, help="input size in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"),
                   help="Megatron-LM core_v0.16.1 checkout to compare preprocessing against")
    p.add_argument("--pairs", type=int, default=2, help="alternating runs per tool in the comparison")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    progress = Progress("data", 2 + len(args.workers) + (len(args.workers) if args.megatron_lm else 0))
    progress.step(f"input ({args.mb:g} MB) and a {args.vocab_size}-token BPE")
    inp = build_input(work, args.mb)
    tok = train_bpe_tokenizer([work / "demo"], work / "tokenizer", vocab_size=args.vocab_size)
    runs = {}
    for w in args.workers:
        progress.step(f"preprocessing with {w} worker(s)")
        runs[f"workers_{w}"] = bench_preprocess(inp, tok, work, w, args.seq_length)
    shas = {r["sha256_first_shard"] for r in runs.values()}
    progress.step("loader tokens/s")
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
    if args.megatron_lm:
        result["megatron_lm"] = compare_megatron_lm(Path(args.megatron_lm), inp, tok, work, args.workers,
                                                    args.seq_length, args.pairs, progress)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")


if __name__ == "__main__":
    main()
