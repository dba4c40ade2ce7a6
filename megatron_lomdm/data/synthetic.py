"""Synthetic corpora whose easy generation order is known, for proving that a learned order learns.

By the chain rule every generation order has the same ideal NLL; orders differ only in how hard
their conditionals are for a finite model. Each task here has two parts, and generating one part
first turns the other into a look-up. Which part is the easy one to start from is *measured*
(bench/order_task.py trains fixed two-block orders), not assumed; the tasks are built so that a
confidence-first heuristic would pick the other part (it has the lower marginal entropy).

* ``pairs``: x_1..x_n uniform over ``x_vocab`` letters, then y_i = h(x_i, x_{i+1 mod n}) for a
  fixed random many-to-one table h onto ``y_vocab`` letters. Row entropy n log(x_vocab).
* ``codebook``: ``key_len`` key tokens uniform over ``key_vocab`` letters, then a row of
  ``row_len`` tokens, token j = C[key, j] for a fixed random codebook C onto ``row_vocab`` letters
  (each row token alone is shared by many keys). Row entropy key_len log(key_vocab).

Every row is one document ``"<part A> <part B>"`` of whitespace-separated symbols; ``layout``
``ab`` writes the key/x part first, ``ba`` the other part first (the same joint distribution with
the parts swapped, so a two-block left-to-right model on each layout gives the two fixed orders).
Symbols are tokenised one per token by a word-level tokenizer (``save_word_tokenizer``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASKS = ("pairs", "codebook")
LAYOUTS = ("ab", "ba")


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: its parameters and the fixed random table that defines it.

    Attributes:
        name: ``pairs`` or ``codebook``.
        seed: Seed of the table (h or C); rows are drawn with separate seeds.
        n: pairs: length of x (and y); codebook: number of key tokens.
        a_vocab: Letters of part A (x or key).
        b_vocab: Letters of part B (y or row).
        row_len: codebook: row tokens (pairs: unused, equals n).
        table: The fixed table: pairs h[x_i][x_j], codebook C[key index][j].
    """

    name: str
    seed: int
    n: int
    a_vocab: int
    b_vocab: int
    row_len: int
    table: list[list[int]] = field(repr=False)

    @property
    def part_lengths(self) -> tuple[int, int]:
        """Tokens in part A and part B."""
        return self.n, (self.n if self.name == "pairs" else self.row_len)

    @property
    def entropy_per_row(self) -> float:
        """Exact entropy of one row in nats (part B is a deterministic function of part A)."""
        return self.n * math.log(self.a_vocab)

    def symbols(self) -> tuple[list[str], list[str]]:
        """The word symbols of part A and part B (disjoint, so a model can tell the parts apart)."""
        return [f"a{i}" for i in range(self.a_vocab)], [f"b{i}" for i in range(self.b_vocab)]

    def draw(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One row: part A uniform, part B derived from it through the table."""
        a = [rng.randrange(self.a_vocab) for _ in range(self.n)]
        if self.name == "pairs":
            b = [self.table[a[i]][a[(i + 1) % self.n]] for i in range(self.n)]
        else:
            key = 0
            for s in a:
                key = key * self.a_vocab + s
            b = list(self.table[key])
        return a, b


def make_task(name: str, *, seed: int = 0, n: int | None = None, a_vocab: int | None = None,
              b_vocab: int | None = None, row_len: int = 24) -> SyntheticTask:
    """Build a task with its fixed random table (defaults: pairs n 12, 8 -> 5; codebook 2 keys of 8, 24 of 4).

    Raises:
        ValueError: For an unknown task or sizes that make part B not many-to-one.
    """
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"table:{name}:{seed}")
    if name == "pairs":
        n, a_vocab, b_vocab = n or 12, a_vocab or 8, b_vocab or 5
        if not (n >= 2 and a_vocab >= 2 and 2 <= b_vocab < a_vocab * a_vocab):
            raise ValueError(f"pairs needs n >= 2, x_vocab >= 2 and 2 <= y_vocab < x_vocab^2; got {n}, {a_vocab}, {b_vocab}")
        # balanced many-to-one table: every y letter has (almost) the same number of preimages
        cells = [i % b_vocab for i in range(a_vocab * a_vocab)]
        rng.shuffle(cells)
        table = [cells[i * a_vocab:(i + 1) * a_vocab] for i in range(a_vocab)]
        return SyntheticTask(name, seed, n, a_vocab, b_vocab, n, table)
    n, a_vocab, b_vocab = n or 2, a_vocab or 8, b_vocab or 4
    keys = a_vocab ** n
    if not (n >= 1 and a_vocab >= 2 and 2 <= b_vocab < keys and row_len >= 1) or keys > 1 << 16:
        raise ValueError(f"codebook needs 2 <= row_vocab < key_vocab^key_len <= 65536; got {n}, {a_vocab}, {b_vocab}")
    table = [[rng.randrange(b_vocab) for _ in range(row_len)] for _ in range(keys)]
    return SyntheticTask(name, seed, n, a_vocab, b_vocab, row_len, table)


def row_text(task: SyntheticTask, a: list[int], b: list[int], layout: str) -> str:
    """The document of one row: the two parts' symbols, in the layout's order."""
    sym_a, sym_b = task.symbols()
    part_a, part_b = [sym_a[s] for s in a], [sym_b[s] for s in b]
    return " ".join(part_a + part_b if layout == "ab" else part_b + part_a)


def iter_rows(task: SyntheticTask, num_rows: int, *, seed: int, layout: str) -> Iterator[str]:
    """``num_rows`` documents; the same ``seed`` gives the same rows in either layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose ab or ba")
    rng = random.Random(f"rows:{task.name}:{task.seed}:{seed}")
    for _ in range(num_rows):
        yield row_text(task, *task.draw(rng), layout)


def write_task(task: SyntheticTask, out_dir: str | Path, *, num_rows: int, seed: int, layout: str) -> dict:
    """Write ``rows.jsonl`` (``{"text": ...}``), ``tokenizer/`` and ``task.json`` under ``out_dir``.

    ``task.json`` records the task, its exact entropy and where each part sits in a row of the
    padded layout (``[BOS] row [EOS]``): what a benchmark needs to score orders. Files are written
    to a temporary name and renamed, so a crash never leaves a complete-looking partial output.

    Returns:
        The ``task.json`` content.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "rows.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for text in iter_rows(task, num_rows, seed=seed, layout=layout):
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(out / "rows.jsonl")
    sym_a, sym_b = task.symbols()
    from megatron_lomdm.data.tokenize import save_word_tokenizer

    save_word_tokenizer(sym_a + sym_b, out / "tokenizer")
    len_a, len_b = task.part_lengths
    first, second = (len_a, len_b) if layout == "ab" else (len_b, len_a)
    seq_length = 2 + len_a + len_b
    pos_first = list(range(1, 1 + first))
    pos_second = list(range(1 + first, 1 + first + second))
    info = {
        "task": {k: v for k, v in asdict(task).items() if k != "table"}, "layout": layout,
        "num_rows": num_rows, "row_seed": seed, "seq_length": seq_length,
        "entropy_per_row_nats": task.entropy_per_row,
        "entropy_per_token_nats": task.entropy_per_row / seq_length,  # BOS/EOS are valid, zero-entropy tokens
        "positions_a": pos_first if layout == "ab" else pos_second,
        "positions_b": pos_second if layout == "ab" else pos_first,
    }
    (out / "task.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
