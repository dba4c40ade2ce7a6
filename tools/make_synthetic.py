"""Write a synthetic corpus whose easy generation order is known (JSONL + word tokenizer + task.json).

    python tools/make_synthetic.py --task pairs --rows 50000 --out data/pairs_ab
    python tools/preprocess_data.py --input data/pairs_ab/rows.jsonl --tokenizer data/pairs_ab/tokenizer \
        --seq-length 26 --layout padded --valid-fraction 0.05 --output-dir data/pairs_ab/shards

Tasks (megatron_lomdm/data/synthetic.py): ``pairs`` (x uniform, y_i = h(x_i, x_{i+1})) and
``codebook`` (key tokens, then a row a fixed codebook derives from the key). ``--layout ba`` writes
the derived part first: the same distribution, so two-block models on ``ab`` and ``ba`` are the two
fixed orders. ``task.json`` gives the exact entropy, the row length for ``--seq-length`` and where
each part sits in a row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lomdm.data.synthetic import LAYOUTS, TASKS, make_task, write_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--rows", type=int, required=True, help="rows (documents) to write")
    p.add_argument("--out", required=True, help="output folder (rows.jsonl, tokenizer/, task.json)")
    p.add_argument("--layout", choices=LAYOUTS, default="ab", help="ab: x/key part first in the row; ba: the other")
    p.add_argument("--table-seed", type=int, default=0, help="seed of the task's fixed table (h or the codebook)")
    p.add_argument("--row-seed", type=int, default=0, help="seed of the rows")
    p.add_argument("--n", type=int, default=None, help="pairs: length of x; codebook: key tokens")
    p.add_argument("--a-vocab", type=int, default=None, help="letters of x / of the key")
    p.add_argument("--b-vocab", type=int, default=None, help="letters of y / of the row")
    p.add_argument("--row-len", type=int, default=24, help="codebook: row tokens")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")
    try:
        task = make_task(args.task, seed=args.table_seed, n=args.n, a_vocab=args.a_vocab, b_vocab=args.b_vocab,
                         row_len=args.row_len)
    except ValueError as err:
        p.error(str(err))
    info = write_task(task, args.out, num_rows=args.rows, seed=args.row_seed, layout=args.layout)
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
