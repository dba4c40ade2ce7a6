#!/usr/bin/env python
r"""Raw text (JSONL, text, Parquet, Arrow, HF hub) -> tokenized WebDataset shards + manifest.

Thin CLI over ``megatron_lomdm.data.preprocess`` (``write_shards``, the options in
``cli_parser``); the format and layouts: ``data/format.py``. A rerun into an interrupted output
starts over; a complete output is only replaced with --overwrite. Recipes for OpenWebText and
LM1B: docs/recipes.md.

Examples:
    python tools/preprocess_data.py --input data/owt/*.jsonl --output-dir shards/owt \
        --tokenizer gpt2 --seq-length 1024 --layout packed --workers 16 --valid-fraction 0.01
    python tools/preprocess_data.py --input raw/owt --output-dir data/owt --tokenizer gpt2 \
        --seq-length 1024 --layout packed --frame-chunks --valid-last-docs 100000 --workers 32
    python tools/preprocess_data.py --hf-dataset Skylion007/openwebtext --split train \
        --output-dir data/owt --tokenizer gpt2 --seq-length 1024 --layout packed --workers 32
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Rows of Parquet/Arrow/hub inputs are streamed by HF datasets, which imports torch when it can
# (seconds, for nothing here): not in this process.
os.environ.setdefault("USE_TORCH", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lomdm.data import preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing; returns the exit status."""
    return preprocess.main(argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
