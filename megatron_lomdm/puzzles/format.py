"""Puzzles as fixed-length token sequences with a conditioning mask (what the backbone sees).

Every puzzle of a dataset has the same length and layout. ``cond[i]`` is True at a *conditioned*
position (a given: never masked, the prompt) and False at a position to generate. Token ids are
those of the dataset's word-level tokenizer (``symbols`` after the project's four specials
``[PAD] [BOS] [EOS] [MASK]``, ids 0..3, see ``data/tokenize.py::save_word_tokenizer``); the
sequences here carry no BOS/EOS (preprocessing adds them as for any row).

Sudoku (``SudokuFormat``, 81 tokens): the cells in row-major order, one digit token ``1``..``9``
each (id = 4 + digit). ``cond`` marks exactly the givens.

Zebra (``ZebraFormat(houses N, attributes M, max_clues C)``, ``3C + NM`` tokens):

* ``C`` clue slots of three tokens ``kind x y``: ``kind`` one of ``same not_same left_of imm_left
  next_to at``, ``x`` an item symbol (the value's name, e.g. ``red``, ``Brit``, ``tea``: value names
  are distinct across attributes), ``y`` an item symbol, or a house ``h1``..``hN`` for ``at``;
  unused slots are ``nil nil nil``. All clue tokens are conditioned.
* the solution table, house by house (house 1's M attribute values in attribute order, then house
  2's, ...), each an item symbol. None conditioned.

Text form (JSONL ``prompt``/``response``, whitespace-separated symbols): ``response`` is the full
sequence (givens and solution), ``prompt`` the same positions with the blank symbol ``_`` where a
token is to be generated. The two are aligned position by position, so ``cond[i] == (prompt
symbol i != "_")`` and ``tokens == tokenizer(response)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from megatron_lomdm.puzzles.sudoku import NUM_CELLS, SudokuPuzzle
from megatron_lomdm.puzzles.zebra import ATTRIBUTES, CLUE_KINDS, Clue, ZebraPuzzle

#: ``[PAD] [BOS] [EOS] [MASK]`` take ids 0..3 in every word tokenizer of this project.
NUM_SPECIAL_TOKENS = 4
#: A position to generate, in prompt text.
BLANK = "_"
#: An unused clue slot (conditioned).
FILLER = "nil"
SLOT_TOKENS = 3


@dataclass(frozen=True)
class SudokuFormat:
    """81 cell tokens, digits 1..9; the givens are conditioned."""

    kind = "sudoku"

    @property
    def symbols(self) -> list[str]:
        """Symbols after the specials: the blank, then the digits (so digit d has id 4 + d)."""
        return [BLANK] + [str(d) for d in range(1, 10)]

    @property
    def seq_length(self) -> int:
        return NUM_CELLS

    def encode(self, puzzle: SudokuPuzzle) -> tuple[list[int], list[bool]]:
        """``(ids, cond)``, both of length 81: the solution's digits and where the givens are."""
        return [NUM_SPECIAL_TOKENS + d for d in puzzle.solution], [d != 0 for d in puzzle.puzzle]

    def decode(self, ids: Sequence[int]) -> list[int]:
        """81 ids -> a row-major grid; 0 where the id is not a digit (a special, the blank)."""
        assert len(ids) == NUM_CELLS, f"a Sudoku sequence has 81 tokens, got {len(ids)}"
        return [i - NUM_SPECIAL_TOKENS if 1 <= i - NUM_SPECIAL_TOKENS <= 9 else 0 for i in ids]

    def texts(self, puzzle: SudokuPuzzle) -> tuple[str, str]:
        """``(prompt, response)`` as whitespace-separated symbols."""
        prompt = [str(d) if d else BLANK for d in puzzle.puzzle]
        return " ".join(prompt), " ".join(str(d) for d in puzzle.solution)


@dataclass(frozen=True)
class ZebraFormat:
    """``max_clues`` clue slots (conditioned), then the ``houses x attributes`` table (generated)."""

    houses: int
    attributes: int
    max_clues: int
    kind = "zebra"

    @cached_property
    def symbols(self) -> list[str]:
        """Blank, filler, clue kinds, houses ``h1``.., then every attribute's value names."""
        values = [v for _, _, names in ATTRIBUTES[:self.attributes] for v in names[:self.houses]]
        return [BLANK, FILLER, *CLUE_KINDS, *(f"h{k + 1}" for k in range(self.houses)), *values]

    @cached_property
    def _id(self) -> dict[str, int]:
        return {s: NUM_SPECIAL_TOKENS + k for k, s in enumerate(self.symbols)}

    @property
    def seq_length(self) -> int:
        return SLOT_TOKENS * self.max_clues + self.houses * self.attributes

    @property
    def table_start(self) -> int:
        """Position of the first solution-table token."""
        return SLOT_TOKENS * self.max_clues

    def _clue_symbols(self, puzzle: ZebraPuzzle) -> list[str]:
        if len(puzzle.clues) > self.max_clues:
            raise ValueError(f"puzzle has {len(puzzle.clues)} clues; the format holds {self.max_clues}")
        out = []
        for c in puzzle.clues:
            last = f"h{c.house + 1}" if c.kind == "at" else _value_name(c.y)  # type: ignore[operator,arg-type]
            out += [c.kind, _value_name(c.x), last]
        return out + [FILLER] * (SLOT_TOKENS * (self.max_clues - len(puzzle.clues)))

    def _table_symbols(self, puzzle: ZebraPuzzle) -> list[str]:
        return [_value_name((a, row[a])) for row in puzzle.solution for a in range(self.attributes)]

    def _check(self, puzzle: ZebraPuzzle) -> None:
        if (puzzle.houses, puzzle.attributes) != (self.houses, self.attributes):
            raise ValueError(f"puzzle is {puzzle.houses}x{puzzle.attributes}; "
                             f"format is {self.houses}x{self.attributes}")

    def encode(self, puzzle: ZebraPuzzle) -> tuple[list[int], list[bool]]:
        """``(ids, cond)`` of length ``seq_length``: clue slots conditioned, table not."""
        self._check(puzzle)
        clue_part, table = self._clue_symbols(puzzle), self._table_symbols(puzzle)
        return [self._id[s] for s in clue_part + table], [True] * len(clue_part) + [False] * len(table)

    def decode(self, ids: Sequence[int]) -> list[list[int]]:
        """ids -> table ``[house][attribute]`` of value indices; -1 where the token is not a value of
        that attribute."""
        assert len(ids) == self.seq_length, f"a {self.houses}x{self.attributes} sequence has {self.seq_length} tokens"
        table_ids = ids[self.table_start:]
        names = {a: {self._id[v]: k for k, v in enumerate(ATTRIBUTES[a][2][:self.houses])}
                 for a in range(self.attributes)}
        return [[names[a].get(table_ids[h * self.attributes + a], -1) for a in range(self.attributes)]
                for h in range(self.houses)]

    def decode_clues(self, ids: Sequence[int]) -> list[Clue]:
        """The clue slots back to clues (fillers skipped); raises ``KeyError`` on a malformed slot."""
        by_id = {i: s for s, i in self._id.items()}
        item = {v: (a, k) for a, (_, _, names) in enumerate(ATTRIBUTES[:self.attributes])
                for k, v in enumerate(names[:self.houses])}
        out = []
        for s in range(self.max_clues):
            kind, x, y = (by_id[i] for i in ids[SLOT_TOKENS * s:SLOT_TOKENS * (s + 1)])
            if kind == FILLER:
                continue
            if kind == "at":
                out.append(Clue("at", item[x], house=int(y[1:]) - 1))
            else:
                out.append(Clue(kind, item[x], item[y]))
        return out

    def texts(self, puzzle: ZebraPuzzle) -> tuple[str, str]:
        """``(prompt, response)`` as whitespace-separated symbols."""
        clue_part, table = self._clue_symbols(puzzle), self._table_symbols(puzzle)
        return " ".join(clue_part + [BLANK] * len(table)), " ".join(clue_part + table)


PuzzleFormat = SudokuFormat | ZebraFormat
Puzzle = SudokuPuzzle | ZebraPuzzle
SUDOKU = SudokuFormat()


def _value_name(item: tuple[int, int]) -> str:
    return ATTRIBUTES[item[0]][2][item[1]]


def default_max_clues(houses: int, attributes: int) -> int:
    """Clue slots of the default Zebra layout: N*M (generated puzzles use about 0.5–0.8 N*M)."""
    return houses * attributes


def format_for(puzzle: Puzzle, max_clues: int | None = None) -> PuzzleFormat:
    """The format of a puzzle (Zebra: ``max_clues`` slots, default ``default_max_clues``)."""
    if isinstance(puzzle, SudokuPuzzle):
        return SUDOKU
    slots = max_clues if max_clues is not None else default_max_clues(puzzle.houses, puzzle.attributes)
    return ZebraFormat(puzzle.houses, puzzle.attributes, slots)


def encode(puzzle: Puzzle, fmt: PuzzleFormat | None = None) -> tuple[list[int], list[bool]]:
    """``(token ids, cond mask)`` of a puzzle in ``fmt`` (default ``format_for(puzzle)``)."""
    return (fmt or format_for(puzzle)).encode(puzzle)  # type: ignore[arg-type]


def decode(ids: Sequence[int], fmt: PuzzleFormat = SUDOKU) -> list[int] | list[list[int]]:
    """Token ids -> a Sudoku grid (81 ints, 0 = not a digit) or a Zebra table (-1 = not a value)."""
    return fmt.decode(ids)
