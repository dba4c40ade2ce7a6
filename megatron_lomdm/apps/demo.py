"""`make demo`'s stages (tools/demo.py): the data, the training command, and what it prints at the end.

`data_stages` and `train_command` are also what `tests/integration/test_readme_commands.py` runs to
stand in for `make demo`, so the README's commands are tested against the demo's real data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
DASHBOARD_PORT = 5000


def run_stage(cmd: list[str], root: Path) -> None:
    """Run one stage's command in `root`, echoed with its duration (the demo's progress)."""
    log.info("+ %s", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, cwd=root, check=True)
    log.info("  (%.1f s)", time.time() - t0)


def data_stages(py: str, data: Path) -> list[tuple[Path, list[str]]]:
    """(output that marks the stage done, command) for the corpus, the tokenizer and the shards."""
    corpus, tok, shards = data / "corpus", data / "tokenizer", data / "shards"
    return [
        (corpus / "stdlib_docstrings.jsonl", [py, "-m", "megatron_lomdm.data.demo_corpus", str(corpus)]),
        (tok / "tokenizer.json",
         [py, "tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "2048", "--output", str(tok)]),
        (shards / "manifest.json",
         [py, "tools/preprocess_data.py", "--input", str(corpus), "--output-dir", str(shards), "--tokenizer",
          str(tok), "--seq-length", "64", "--layout", "packed", "--workers", "2", "--valid-fraction", "0.05"]),
    ]


def train_command(py: str, config: str, shards: Path, overrides: list[str]) -> list[str]:
    """The demo's training command (`overrides` are dotted.key=value)."""
    return [py, "-m", "megatron_lomdm.train", "--config", config, f"data.train={shards}", *overrides]


def tracking_uri(run_dir: Path) -> str | None:
    """The MLflow tracking URI a finished run logged to (from its config.yaml); None when tracking was off."""
    from megatron_lomdm.config import load_config
    from megatron_lomdm.tracking.mlflow_tracker import default_uri

    cfg = load_config(run_dir / "config.yaml")
    if not cfg.tracking.enabled:
        return None
    return cfg.tracking.uri or default_uri(run_dir)


def dashboard_command(uri: str, root: Path) -> str:
    """The one command that opens the dashboard of a run tracked at `uri`, bound to 127.0.0.1."""
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri} in a browser (the run's tracking server)"
    mlflow = Path(sys.executable).with_name("mlflow")
    shown = os.path.relpath(mlflow, root) if mlflow.is_relative_to(root) else str(mlflow)
    return f"{shown} ui --backend-store-uri {uri} --host 127.0.0.1 --port {DASHBOARD_PORT} --workers 1"


def run_page(uri: str, run_dir: Path) -> str:
    """The address of the run's page on that dashboard (the dashboard's front page if the run is unknown)."""
    base = uri if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{DASHBOARD_PORT}"
    id_file = run_dir / "mlflow_run_id"
    if not id_file.is_file():
        return base
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = id_file.read_text().strip()
    try:
        experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except MlflowException:
        return base
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def summary(root: Path, shards: Path, run_dir: Path, nelbo: Path, samples: Path, hf: Path) -> list[str]:
    """What the demo made, ending with the command that opens its dashboard (lines to print)."""
    result = json.loads(nelbo.read_text())
    lines = ["", "Demo finished.",
             f"  test NELBO {result['nelbo']:.4f} nats/token, PPL {result['ppl']:.2f} "
             f"({result['num_tokens']} tokens, EMA weights, velocity term included)",
             "  learned-order samples (ancestral, T=64):"]
    lines += [f"    {json.loads(line)['text'][:160]!r}" for line in samples.read_text().splitlines()[:3]]
    lines += [f"  shards + manifest:   {shards}",
              f"  run directory:       {run_dir} (config.yaml, metrics.jsonl, checkpoints/, artifacts/, eval/, samples/)",
              f"  Hugging Face export: {hf} (AutoModel.from_pretrained(..., trust_remote_code=True))"]
    uri = tracking_uri(run_dir)
    if uri is None:
        return [*lines, "  MLflow: tracking was off for this run (tracking.enabled=false)"]
    return [*lines, "", "Open the MLflow dashboard (Ctrl-C stops it):", f"  {dashboard_command(uri, root)}",
            f"then browse {run_page(uri, run_dir)}"]


# Reload the export in a fresh interpreter through transformers only, and generate with the learned order.
HF_RELOAD = r"""
import sys
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
ids = model.generate(num_samples=2, steps=64, seed=0)
for row in ids:
    sys.stdout.write(f"  HF sample: {tok.decode(row.tolist())[:160]!r}\n")
"""
