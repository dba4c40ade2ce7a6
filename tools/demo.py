"""`make demo`: the whole pipeline on the bundled demo corpus, on CPU, through the user-facing CLIs.

corpus (Python's own documentation) -> BPE tokenizer -> WebDataset shards -> LoMDM training with
MLflow tracking -> test NELBO/PPL -> learned-order samples -> Hugging Face export, reloaded in a
fresh process and sampled. Each stage is skipped when its output is already complete, so a second
`make demo` resumes where the first stopped (training itself resumes from its checkpoint). The last
lines name what was made and the one command that opens the run's MLflow dashboard. The stages
live in `megatron_lomdm/apps/demo.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lomdm.apps.demo import (  # noqa: E402
    HF_RELOAD,
    dashboard_command,
    data_stages,
    run_page,
    run_stage,
    summary,
    tracking_uri,
    train_command,
)

__all__ = ["dashboard_command", "data_stages", "main", "run_page", "tracking_uri", "train_command"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="demo_data")
    parser.add_argument("--config", default="configs/experiments/demo_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for training")
    args = parser.parse_args(argv)
    from megatron_lomdm.config import load_config

    py = sys.executable
    shards = ROOT / args.data_dir / "shards"
    for done, cmd in data_stages(py, ROOT / args.data_dir):
        if not done.exists():
            run_stage(cmd, ROOT)
    run_stage(train_command(py, args.config, shards, args.overrides), ROOT)

    run_dir = ROOT / load_config(ROOT / args.config, args.overrides).run.dir
    nelbo, samples, hf = run_dir / "eval" / "nelbo.json", run_dir / "samples" / "ancestral_T64.jsonl", run_dir / "hf"
    run_stage([py, "tools/evaluate.py", "--run-dir", str(run_dir), "--t-draws", "2", "--out", str(nelbo)], ROOT)
    run_stage([py, "tools/sample.py", "--run-dir", str(run_dir), "--sampler", "ancestral", "--steps", "64",
               "--num-samples", "8", "--out", str(samples)], ROOT)
    run_stage([py, "tools/convert_to_hf.py", "--run-dir", str(run_dir), "--output", str(hf), "--verify",
               "--overwrite"], ROOT)
    run_stage([py, "-c", HF_RELOAD, str(hf)], ROOT)
    sys.stdout.write("\n".join(summary(ROOT, shards, run_dir, nelbo, samples, hf)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
