"""`make demo`: the whole pipeline on the bundled demo corpus, on CPU, through the user-facing CLIs.

corpus (Python's own documentation) -> BPE tokenizer -> WebDataset shards -> LoMDM training with
MLflow tracking -> test NELBO/PPL -> learned-order samples -> Hugging Face export, reloaded in a
fresh process and sampled. Each stage is skipped when its output is already complete, so a second
`make demo` resumes where the first stopped (training itself resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"  ({time.time() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="demo_data")
    parser.add_argument("--config", default="configs/experiments/demo_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for training")
    args = parser.parse_args(argv)
    py = sys.executable
    data = ROOT / args.data_dir
    corpus, tok, shards = data / "corpus", data / "tokenizer", data / "shards"

    if not any(corpus.glob("*.jsonl")):
        _run([py, "-m", "megatron_lomdm.data.demo_corpus", str(corpus)])
    if not (tok / "tokenizer.json").exists():
        _run([py, "tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "2048", "--output", str(tok)])
    if not (shards / "manifest.json").exists():
        _run([py, "tools/preprocess_data.py", "--input", str(corpus), "--output-dir", str(shards), "--tokenizer",
              str(tok), "--seq-length", "64", "--layout", "packed", "--workers", "2", "--valid-fraction", "0.05"])
    _run([py, "-m", "megatron_lomdm.train", "--config", args.config, f"data.train={shards}", *args.overrides])

    run_dir = ROOT / "runs" / "demo_cpu"
    nelbo, samples, hf = run_dir / "eval" / "nelbo.json", run_dir / "samples" / "ancestral_T64.jsonl", run_dir / "hf"
    _run([py, "tools/evaluate.py", "--run-dir", str(run_dir), "--t-draws", "2", "--out", str(nelbo)])
    _run([py, "tools/sample.py", "--run-dir", str(run_dir), "--sampler", "ancestral", "--steps", "64",
          "--num-samples", "8", "--out", str(samples)])
    _run([py, "tools/convert_to_hf.py", "--run-dir", str(run_dir), "--output", str(hf), "--verify", "--overwrite"])
    _run([py, "-c", HF_RELOAD, str(hf)])

    result = json.loads(nelbo.read_text())
    print("\nDemo finished.")
    print(f"  test NELBO {result['nelbo']:.4f} nats/token, PPL {result['ppl']:.2f} "
          f"({result['num_tokens']} tokens, EMA weights, velocity term included)")
    print("  learned-order samples (ancestral, T=64):")
    for line in samples.read_text().splitlines()[:3]:
        print("   ", repr(json.loads(line)["text"][:160]))
    print(f"  shards + manifest:   {shards}")
    print(f"  run directory:       {run_dir} (config.yaml, metrics.jsonl, checkpoints/, eval/, samples/)")
    print(f"  Hugging Face export: {hf} (AutoModel.from_pretrained(..., trust_remote_code=True))")
    print(f"  MLflow dashboard:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'} "
          "--host 127.0.0.1 --port 5000")
    return 0


# Reload the export in a fresh interpreter through transformers only, and generate with the learned order.
HF_RELOAD = """
import sys
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
ids = model.generate(num_samples=2, steps=64, seed=0)
for row in ids:
    print("  HF sample:", repr(tok.decode(row.tolist())[:160]))
"""


if __name__ == "__main__":
    sys.exit(main())
