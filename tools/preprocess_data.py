#!/usr/bin/env python
r"""Raw text (JSONL, text, Parquet, Arrow, HF hub) -> tokenized WebDataset shards + manifest.

Thin CLI over ``megatron_lomdm.data.shards.write_shards``; see its docstring for the format,
layouts and restart semantics (a rerun into an interrupted output starts over; a complete output
is only replaced with --overwrite). Recipes for OpenWebText and LM1B: docs/recipes.md.

Examples:
    python tools/preprocess_data.py --input data/owt/*.jsonl --output-dir shards/owt \
        --tokenizer gpt2 --seq-length 1024 --layout packed --workers 16 --valid-fraction 0.01
    python tools/preprocess_data.py --input raw/owt --output-dir data/owt --tokenizer gpt2 \
        --seq-length 1024 --layout packed --frame-chunks --valid-last-docs 100000 --workers 32
    python tools/preprocess_data.py --hf-dataset Skylion007/openwebtext --split train \
        --output-dir data/owt --tokenizer gpt2 --seq-length 1024 --layout packed --workers 32
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

# Rows of Parquet/Arrow/hub inputs are streamed by HF datasets, which imports torch when it can
# (seconds, for nothing here): not in this process.
os.environ.setdefault("USE_TORCH", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lomdm.data.shards import LAYOUTS, write_shards  # noqa: E402
from megatron_lomdm.data.tokenize import DETOKENIZERS, TEXT_MODES, HFDatasetInput  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="files, folders or globs (.jsonl/.json/.ndjson or text; .gz/.bz2/.xz/.zst; "
        ".parquet/.arrow and save_to_disk folders through HF datasets)",
    )
    hf = p.add_argument_group("HF datasets hub input (instead of --input; streamed)")
    hf.add_argument("--hf-dataset", metavar="NAME", help="hub dataset, e.g. Skylion007/openwebtext")
    hf.add_argument("--hf-config", metavar="C", help="dataset configuration")
    hf.add_argument("--split", default="train", help="dataset split (default: train)")
    hf.add_argument("--hf-revision", metavar="REV", help="hub revision, e.g. refs/convert/parquet")
    hf.add_argument("--hf-data-files", nargs="+", metavar="F", help="data files of the dataset")
    p.add_argument("--output-dir", required=True, help="folder to create")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, a tokenizer folder, or an HF hub name"
    )
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        required=True,
        help="packed (docs joined, cut) or padded (one doc per row)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (0: in the main process)"
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of documents in the valid split"
    )
    p.add_argument(
        "--valid-last-docs",
        type=int,
        default=0,
        metavar="N",
        help="the valid split is the last N documents of the input (OpenWebText: 100000)",
    )
    p.add_argument(
        "--detokenize", choices=sorted(DETOKENIZERS), help="rewrite documents first (lm1b)"
    )
    p.add_argument(
        "--json-key",
        "--text-field",
        dest="json_key",
        default="text",
        help="text field of JSONL records / text column of datasets rows",
    )
    p.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="plain text: one document per file or per line",
    )
    p.add_argument("--shard-size-mb", type=float, default=128.0, help="target shard size")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip and count bad records instead of failing"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split hash")
    p.add_argument(
        "--frame-chunks",
        action="store_true",
        help="packed rows as [BOS] + L-2 tokens + [EOS] (MDLM wrap)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing complete output folder"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing; returns the exit status."""
    args = parse_args(argv)
    if bool(args.input) == bool(args.hf_dataset):
        print(
            "preprocess_data.py: error: pass --input or --hf-dataset (one of them)", file=sys.stderr
        )
        return 2
    hf_dataset = None
    if args.hf_dataset:
        hf_dataset = HFDatasetInput(
            name=args.hf_dataset,
            config=args.hf_config,
            split=args.split,
            data_files=tuple(args.hf_data_files) if args.hf_data_files else None,
            revision=args.hf_revision,
        )
    try:
        write_shards(
            args.input,
            args.output_dir,
            tokenizer=args.tokenizer,
            seq_length=args.seq_length,
            layout=args.layout,
            workers=args.workers,
            valid_fraction=args.valid_fraction,
            json_key=args.json_key,
            text_mode=args.text_mode,
            shard_size_mb=args.shard_size_mb,
            skip_bad=args.skip_bad,
            seed=args.seed,
            frame_chunks=args.frame_chunks,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            command=[sys.executable, *sys.argv],
            hf_dataset=hf_dataset,
            valid_last_documents=args.valid_last_docs,
            detokenizer=args.detokenize,
        )
    except ValueError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        message = os_error_message(err, args.output_dir)
        print(f"preprocess_data.py: error: {message}", file=sys.stderr)
        return 2
    return 0


def os_error_message(err: OSError, output_dir: str) -> str:
    """One line naming the path of a failed read or write (the output folder when unknown)."""
    name = errno.errorcode.get(err.errno or 0, "")
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = " (the file system is full, or a quota or file-size limit was hit)"
    reason = err.strerror or str(err)
    code = f" [{name}]" if name else ""
    return f"{err.filename or output_dir}: {reason}{code}{hint}; nothing was published"


if __name__ == "__main__":
    sys.exit(main())
