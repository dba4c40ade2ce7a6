#!/usr/bin/env python
r"""Megatron checkpoint (any TP x PP) <-> HF folder loadable with ``trust_remote_code=True``.

Thin CLI over ``megatron_lomdm.apps.hf_export`` (``export_run`` / ``import_hf``).

Export (EMA weights unless --no-ema; --verify reloads the export in a fresh process and compares
its fp32 logits with the native model before the folder is published):
    python tools/convert_to_hf.py --run-dir runs/owt --output hf/owt [--checkpoint STEP] --verify

Import (a run directory with a step-0 checkpoint that ``python -m megatron_lomdm.train --config
DIR/config.yaml`` fine-tunes; trailing dotted.key=value overrides, e.g. the data to train on;
under torchrun with parallel.tp=N / parallel.pp=M for another layout):
    python tools/convert_to_hf.py --from-hf hf/owt --to-run-dir runs/owt_ft data.train=shards/x

Exit codes: 0 done, 1 verification failed (nothing published), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="run directory to export (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", type=int, default=None, help="step to export (default: latest)")
    p.add_argument("--output", help="export folder to create")
    p.add_argument("--verify", action="store_true",
                   help="reload in a fresh process and compare fp32 logits with the native model")
    p.add_argument("--no-ema", action="store_true", help="export the live weights, not the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--rtol", type=float, default=None, help="--verify rtol (with --atol)")
    p.add_argument("--atol", type=float, default=None, help="--verify atol (with --rtol)")
    p.add_argument("--max-shard-size", default=None,
                   help="safetensors shards of at most this size, e.g. 1GB (default: one file up to 50GB)")
    p.add_argument("--from-hf", help="HF folder to import")
    p.add_argument("--to-run-dir", help="run directory to create from --from-hf")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (import)")
    args = p.parse_args(argv)
    exporting = args.run_dir is not None or args.output is not None
    importing = args.from_hf is not None or args.to_run_dir is not None
    if exporting == importing:
        p.error("give either --run-dir and --output, or --from-hf and --to-run-dir")
    if exporting and not (args.run_dir and args.output):
        p.error("export needs both --run-dir and --output")
    if importing and not (args.from_hf and args.to_run_dir):
        p.error("import needs both --from-hf and --to-run-dir")
    if exporting and args.overrides:
        p.error("config overrides apply to --from-hf only")
    if (args.rtol is None) != (args.atol is None):
        p.error("give both --rtol and --atol, or neither")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the export or the import; prints one JSON line describing the result."""
    args = parse_args(argv)
    from megatron_lomdm.utils.proc import quick_exit_gc

    quick_exit_gc()
    from megatron_lomdm.apps.hf_export import ExportVerificationError, export_run, import_hf

    try:
        if args.from_hf:
            folder = import_hf(args.from_hf, args.to_run_dir, args.overrides)
            if int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun too
                print(json.dumps({"run_dir": args.to_run_dir, "checkpoint": str(folder)}))
            return 0
        result = export_run(args.run_dir, args.output, step=args.checkpoint, ema=not args.no_ema,
                            verify=args.verify, overwrite=args.overwrite, rtol=args.rtol,
                            atol=args.atol, max_shard_size=args.max_shard_size)
    except ExportVerificationError as err:
        sys.stderr.write(f"convert_to_hf: verification failed, nothing written: {err}\n")
        return EXIT_VERIFY_FAILED
    except ValueError as err:
        sys.stderr.write(f"convert_to_hf: {err}\n")
        return EXIT_BAD_INPUT
    print(json.dumps({"output": str(result.output), "step": result.step, "ema": result.ema,
                      "source_tp_pp": list(result.source_layout),
                      "tokenizer_files": result.tokenizer_files,
                      "max_abs_diff": result.max_abs_diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
