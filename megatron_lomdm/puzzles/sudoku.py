"""9×9 Sudoku: a seeded generator of unique-solution puzzles and a small logic grader.

A grid is a flat sequence of 81 ints in row-major order (cell ``i`` is row ``i // 9``, column
``i % 9``); 0 is a blank. Candidate sets are 9-bit masks: bit ``d - 1`` set means digit ``d`` may go
there.

Generation (``make_sudoku``):

1. a random full grid by randomized depth-first search (fewest-candidates cell first, digits in a
   random order);
2. cells visited in a random order and blanked while the solution stays unique, until the target
   number of givens is reached. Blanking cell ``i`` (digit ``d``) of a unique puzzle keeps it unique
   iff no solution has a digit other than ``d`` at ``i``, so each step is one search for such a
   solution, stopping at the first (the "solution counter stopping at 2", made cheaper);
3. a grade: the givens count and the hardest technique a small logic solver needs
   (``naked_single`` < ``hidden_single`` < ``search``).

Random removal rarely reaches fewer than about 22 givens (its minimal puzzles keep 22–27), so a
range whose top is below that fails after a few grids with a clear error.

Everything draws from the ``random.Random`` passed in: the same seed gives the same puzzles.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

NUM_CELLS = 81
ALL_DIGITS = 0x1FF
#: No 9×9 Sudoku with fewer givens has a unique solution (McGuire, Tugemann and Civario, 2012).
MIN_GIVENS = 17
MAX_GIVENS = 80
#: Logic techniques, easiest first; ``search`` means singles alone get stuck.
TECHNIQUES = ("naked_single", "hidden_single", "search")

ROW_OF = tuple(i // 9 for i in range(NUM_CELLS))
COL_OF = tuple(i % 9 for i in range(NUM_CELLS))
BOX_OF = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(NUM_CELLS))
#: The 27 units (9 rows, 9 columns, 9 boxes), each the 9 cell indices it covers.
UNITS = tuple(
    tuple(i for i in range(NUM_CELLS) if key[i] == k) for key in (ROW_OF, COL_OF, BOX_OF) for k in range(9)
)
PEERS = tuple(
    tuple(j for j in range(NUM_CELLS) if j != i and (ROW_OF[j] == ROW_OF[i] or COL_OF[j] == COL_OF[i]
                                                      or BOX_OF[j] == BOX_OF[i]))
    for i in range(NUM_CELLS)
)
_POPCOUNT = tuple(bin(m).count("1") for m in range(ALL_DIGITS + 1))


@dataclass(frozen=True)
class SudokuGrade:
    """How hard a puzzle is: its givens and the hardest technique the logic grader needed."""

    givens: int
    technique: str


@dataclass(frozen=True)
class SudokuPuzzle:
    """A puzzle with its (unique) solution.

    Attributes:
        puzzle: 81 cells, row-major, 0 for a blank.
        solution: 81 digits 1..9, row-major.
        grade: Givens count and hardest technique.
    """

    puzzle: tuple[int, ...]
    solution: tuple[int, ...]
    grade: SudokuGrade

    @property
    def givens(self) -> int:
        """Number of filled cells in the puzzle."""
        return sum(1 for d in self.puzzle if d)


def _digits(mask: int) -> list[int]:
    return [d for d in range(1, 10) if mask >> (d - 1) & 1]


def _unit_masks(grid: Sequence[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Used-digit masks per row, column and box; ``None`` when a digit repeats in a unit."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(grid):
        if d:
            bit = 1 << (d - 1)
            r, c, b = ROW_OF[i], COL_OF[i], BOX_OF[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def search_solutions(grid: Sequence[int], limit: int, *, rng: random.Random | None = None,
                     banned: tuple[int, int] = (-1, 0)) -> tuple[int, list[int] | None]:
    """Depth-first search over the blanks, fewest candidates first, stopping after ``limit`` solutions.

    Args:
        grid: 81 cells, 0 for a blank.
        limit: Stop once this many solutions are found (2 answers "is it unique?").
        rng: Shuffle the digit order at each cell (random full grids); ``None`` for ascending.
        banned: ``(cell, digit)`` that may not be placed (an alternative-solution search).

    Returns:
        ``(number of solutions found, up to limit; the first solution or None)``.
    """
    masks = _unit_masks(grid)
    if masks is None:
        return 0, None
    rows, cols, boxes = masks
    cells = list(grid)
    ban_cell, ban_bit = banned[0], (1 << (banned[1] - 1)) if banned[1] else 0
    found: list[list[int]] = []
    count = 0

    def recurse(blanks: list[int]) -> None:
        nonlocal count
        if not blanks:
            count += 1
            if not found:
                found.append(list(cells))
            return
        best_pos, best_mask, best_n = -1, 0, 10
        for pos, i in enumerate(blanks):
            mask = ALL_DIGITS & ~(rows[ROW_OF[i]] | cols[COL_OF[i]] | boxes[BOX_OF[i]])
            if i == ban_cell:
                mask &= ~ban_bit
            n = _POPCOUNT[mask]
            if n < best_n:
                best_pos, best_mask, best_n = pos, mask, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        i = blanks[best_pos]
        rest = blanks[:best_pos] + blanks[best_pos + 1:]
        r, c, b = ROW_OF[i], COL_OF[i], BOX_OF[i]
        digits = _digits(best_mask)
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << (d - 1)
            cells[i] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            recurse(rest)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            cells[i] = 0
            if count >= limit:
                return

    recurse([i for i in range(NUM_CELLS) if not grid[i]])
    return count, (found[0] if found else None)


def count_solutions(grid: Sequence[int], limit: int = 2) -> int:
    """Solutions of ``grid``, counted up to ``limit``."""
    return search_solutions(grid, limit)[0]


def random_full_grid(rng: random.Random) -> list[int]:
    """A random valid full grid (randomized backtracking from the empty grid)."""
    count, grid = search_solutions([0] * NUM_CELLS, 1, rng=rng)
    assert count == 1 and grid is not None
    return grid


def remove_givens(solution: Sequence[int], target: int, rng: random.Random) -> list[int]:
    """Blank cells of ``solution`` in a random order while the puzzle stays unique, down to ``target`` givens.

    Returns the puzzle; it has more than ``target`` givens when no further cell can go (it is minimal).
    """
    grid = list(solution)
    givens = NUM_CELLS
    order = list(range(NUM_CELLS))
    rng.shuffle(order)
    for i in order:
        if givens <= target:
            break
        digit = grid[i]
        grid[i] = 0
        if search_solutions(grid, 1, banned=(i, digit))[0]:
            grid[i] = digit  # another solution puts a different digit here: keep the given
        else:
            givens -= 1
    return grid


def _solved_by_singles(puzzle: Sequence[int], hidden: bool) -> bool:
    """Whether naked singles (and, with ``hidden``, hidden singles) alone fill every blank."""
    grid = list(puzzle)
    cands = [0 if d else ALL_DIGITS for d in grid]
    for i, d in enumerate(grid):
        if d:
            for p in PEERS[i]:
                cands[p] &= ~(1 << (d - 1))

    def place(i: int, d: int) -> None:
        grid[i], cands[i] = d, 0
        for p in PEERS[i]:
            cands[p] &= ~(1 << (d - 1))

    progress = True
    while progress:
        progress = False
        for i in range(NUM_CELLS):
            if not grid[i] and _POPCOUNT[cands[i]] == 1:
                place(i, cands[i].bit_length())
                progress = True
        if hidden and not progress:
            for unit in UNITS:
                for d in range(1, 10):
                    spots = [i for i in unit if cands[i] >> (d - 1) & 1]
                    if len(spots) == 1:
                        place(spots[0], d)
                        progress = True
    return all(grid)


def grade_sudoku(puzzle: Sequence[int]) -> SudokuGrade:
    """Givens count and the hardest technique needed: naked singles, hidden singles, or search."""
    if _solved_by_singles(puzzle, hidden=False):
        technique = "naked_single"
    elif _solved_by_singles(puzzle, hidden=True):
        technique = "hidden_single"
    else:
        technique = "search"
    return SudokuGrade(givens=sum(1 for d in puzzle if d), technique=technique)


def check_givens_range(min_givens: int, max_givens: int) -> None:
    """Raise ``ValueError`` unless ``MIN_GIVENS <= min_givens <= max_givens <= MAX_GIVENS``."""
    if not MIN_GIVENS <= min_givens <= max_givens <= MAX_GIVENS:
        raise ValueError(f"givens must satisfy {MIN_GIVENS} <= MIN <= MAX <= {MAX_GIVENS}; "
                         f"got {min_givens}:{max_givens}")


def make_sudoku(rng: random.Random, min_givens: int, max_givens: int, *, max_grids: int = 50) -> SudokuPuzzle:
    """One unique-solution puzzle whose givens count lies in ``[min_givens, max_givens]``.

    The target count is drawn uniformly from the range; when random removal stops above the
    range (the puzzle is minimal but has too many givens) a fresh grid is tried.

    Raises:
        ValueError: For a bad range, or when ``max_grids`` grids all stop above ``max_givens``.
    """
    check_givens_range(min_givens, max_givens)
    target = rng.randint(min_givens, max_givens)
    for _ in range(max_grids):
        solution = random_full_grid(rng)
        puzzle = remove_givens(solution, target, rng)
        givens = sum(1 for d in puzzle if d)
        if givens <= max_givens:
            return SudokuPuzzle(tuple(puzzle), tuple(solution), grade_sudoku(puzzle))
    raise ValueError(f"{max_grids} random grids all kept more than {max_givens} givens after removal; "
                     "random removal rarely goes below about 22 givens: raise the range's maximum")
