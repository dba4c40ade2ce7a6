#!/usr/bin/env python
r"""Train a byte-level BPE tokenizer (HF ``tokenizers``) with [PAD] [BOS] [EOS] [MASK] specials.

Thin CLI over ``megatron_lomdm.data.tokenize.train_bpe_tokenizer``. The output folder loads with
``transformers.PreTrainedTokenizerFast.from_pretrained(DIR)`` and with
``tools/preprocess_data.py --tokenizer DIR``.

Example:
    python tools/train_tokenizer.py --input demo_data/corpus --vocab-size 8192 \
        --output demo_data/tokenizer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lomdm.data.tokenize import TEXT_MODES, train_bpe_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, folders or globs (as for preprocess_data.py)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="vocabulary size, specials and 256 bytes included",
    )
    p.add_argument("--output", required=True, help="folder to write the tokenizer into")
    p.add_argument("--json-key", default="text", help="text field of JSONL records")
    p.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="plain text: one document per file or per line",
    )
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and save; returns the exit status."""
    args = parse_args(argv)
    try:
        train_bpe_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            json_key=args.json_key,
            text_mode=args.text_mode,
            min_frequency=args.min_frequency,
            skip_bad=args.skip_bad,
        )
    except ValueError as err:
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
