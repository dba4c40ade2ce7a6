"""Write train/valid/test logic-puzzle JSONL (Sudoku or Zebra), a word tokenizer and a manifest.

    python tools/make_puzzles.py sudoku --out data/sudoku --train 20000 --valid 500 --test 1000 \
        --givens 30:40 --seed 0
    python tools/make_puzzles.py zebra --out data/zebra --houses 4 --attributes 4 \
        --train 20000 --valid 500 --test 1000 --seed 0

Every puzzle has a unique solution checked by an independent verifier; valid and test never share a
solution with train. Record fields, the sequence format and the tokenizer: docs/puzzles.md
(library: megatron_lomdm/puzzles/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lomdm.data.tokenize import save_word_tokenizer  # noqa: E402
from megatron_lomdm.puzzles.dataset import SudokuSpec, ZebraSpec, parse_givens, write_dataset  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (train/valid/test.jsonl, tokenizer/, manifest.json)")
    for split, default in (("train", 1000), ("valid", 100), ("test", 100)):
        p.add_argument(f"--{split}", type=int, default=default, help=f"{split} puzzles (default {default})")
    p.add_argument("--seed", type=int, default=0, help="seed of the puzzle streams")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    sudoku = sub.add_parser("sudoku", help="9x9 Sudoku with a unique solution")
    sudoku.add_argument("--givens", default="30:40", help="givens per puzzle, MIN or MIN:MAX (17..80)")
    _common(sudoku)
    zebra = sub.add_parser("zebra", help="Zebra (Einstein) puzzles with a unique solution")
    zebra.add_argument("--houses", type=int, default=4, help="houses N (2..6)")
    zebra.add_argument("--attributes", type=int, default=4, help="attributes M (2..6)")
    zebra.add_argument("--max-clues", type=int, default=None, help="clue slots of the sequence (default N*M)")
    _common(zebra)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.kind == "sudoku":
            spec = SudokuSpec(*parse_givens(args.givens))
        else:
            spec = ZebraSpec(args.houses, args.attributes, args.max_clues)
        counts = {"train": args.train, "valid": args.valid, "test": args.test}
        manifest = write_dataset(spec, args.out, counts, args.seed, save_tokenizer=save_word_tokenizer,
                                 force=args.force)
    except ValueError as err:
        p.error(str(err))
    sys.stdout.write(json.dumps({k: manifest[k] for k in ("kind", "counts", "seed", "grade_histogram")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
