"""Solver accuracy of generated puzzle sequences: whole-puzzle and cell accuracy, per sampler and T.

Per puzzle (``score``):

* ``exact``: every generated cell equals the stored solution;
* ``valid``: the decoded answer satisfies every constraint by itself — Sudoku: every row, column
  and box holds 1..9 once and every given is kept; Zebra: every attribute is a permutation over
  the houses and every clue holds. For a unique puzzle ``valid`` implies ``exact``; both are
  computed independently, so a disagreement exposes a non-unique puzzle or a scoring bug;
* ``cells_right`` / ``cells_total``: generated (non-conditioned) cells that equal the solution.

``summarize`` averages whole-puzzle rates over puzzles and cell accuracy over all generated cells
(micro average); ``table_rows`` groups ``(sampler, steps, score)`` into one row per sampler and T.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megatron_lomdm.puzzles.format import SUDOKU, Puzzle, PuzzleFormat, format_for
from megatron_lomdm.puzzles.sudoku import UNITS, SudokuPuzzle
from megatron_lomdm.puzzles.zebra import ZebraPuzzle


@dataclass(frozen=True)
class PuzzleScore:
    """The score of one predicted sequence against its puzzle."""

    exact: bool
    valid: bool
    cells_right: int
    cells_total: int


def sudoku_grid_valid(grid: Sequence[int], puzzle: SudokuPuzzle) -> bool:
    """Every unit holds 1..9 once and every given of ``puzzle`` is kept."""
    if any(given and given != d for given, d in zip(puzzle.puzzle, grid)):
        return False
    return all(sorted(grid[i] for i in unit) == list(range(1, 10)) for unit in UNITS)


def zebra_table_valid(table: Sequence[Sequence[int]], puzzle: ZebraPuzzle) -> bool:
    """Every attribute a permutation over the houses and every clue true of ``table``."""
    n, m = puzzle.houses, puzzle.attributes
    if any(sorted(row[a] for row in table) != list(range(n)) for a in range(m)):
        return False
    house_of = [[0] * n for _ in range(m)]
    for h, row in enumerate(table):
        for a, v in enumerate(row):
            house_of[a][v] = h
    return all(c.holds(house_of) for c in puzzle.clues)


def score(pred_ids: Sequence[int], puzzle: Puzzle, fmt: PuzzleFormat | None = None) -> PuzzleScore:
    """Score one predicted token sequence (the whole ``fmt.seq_length`` layout) against ``puzzle``."""
    fmt = fmt or format_for(puzzle)
    if len(pred_ids) != fmt.seq_length:
        raise ValueError(f"prediction has {len(pred_ids)} tokens; the format has {fmt.seq_length}")
    if isinstance(puzzle, SudokuPuzzle):
        grid = SUDOKU.decode(pred_ids)
        blanks = [i for i, d in enumerate(puzzle.puzzle) if not d]
        right = sum(1 for i in blanks if grid[i] == puzzle.solution[i])
        exact = grid == list(puzzle.solution)
        return PuzzleScore(exact, sudoku_grid_valid(grid, puzzle), right, len(blanks))
    table = fmt.decode(pred_ids)
    truth = [list(row) for row in puzzle.solution]
    right = sum(1 for row, true_row in zip(table, truth) for v, t in zip(row, true_row) if v == t)
    total = puzzle.houses * puzzle.attributes
    return PuzzleScore(table == truth, zebra_table_valid(table, puzzle), right, total)  # type: ignore[arg-type]


def summarize(scores: Iterable[PuzzleScore]) -> dict[str, float | int]:
    """``{"puzzles", "exact", "valid", "cell"}``: rates over puzzles, cell accuracy over generated cells."""
    scores = list(scores)
    if not scores:
        return {"puzzles": 0, "exact": float("nan"), "valid": float("nan"), "cell": float("nan")}
    cells = sum(s.cells_total for s in scores)
    return {
        "puzzles": len(scores),
        "exact": sum(s.exact for s in scores) / len(scores),
        "valid": sum(s.valid for s in scores) / len(scores),
        "cell": sum(s.cells_right for s in scores) / cells if cells else float("nan"),
    }


def evaluate(preds: Sequence[Sequence[int]], puzzles: Sequence[Puzzle],
             fmt: PuzzleFormat | None = None) -> dict[str, float | int]:
    """``summarize`` over paired predictions and puzzles."""
    if len(preds) != len(puzzles):
        raise ValueError(f"{len(preds)} predictions for {len(puzzles)} puzzles")
    return summarize(score(p, z, fmt) for p, z in zip(preds, puzzles))


def table_rows(results: Iterable[tuple[str, int, PuzzleScore]]) -> list[dict[str, float | int | str]]:
    """One row per ``(sampler, steps T)``: ``{"sampler", "steps", "puzzles", "exact", "valid", "cell"}``,
    sorted by sampler, then T."""
    groups: dict[tuple[str, int], list[PuzzleScore]] = {}
    for sampler, steps, s in results:
        groups.setdefault((sampler, steps), []).append(s)
    return [{"sampler": sampler, "steps": steps, **summarize(group)}
            for (sampler, steps), group in sorted(groups.items())]
