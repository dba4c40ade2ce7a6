"""Independent verifiers: every generated puzzle passes one of these before it is written.

They share nothing with the generators but the data layout, so a bug in a generator's solver does
not hide itself:

* Sudoku: the solution is checked unit by unit (every row, column and box holds 1..9 once) and
  against the givens; uniqueness is counted by exact cover (Knuth's Algorithm X over the 324
  constraints "cell filled", "digit once per row / column / box"), not by the generator's
  candidate-mask search.
* Zebra: the clue semantics are written again here; uniqueness is counted by enumerating whole
  permutations attribute by attribute (``itertools.permutations``), a clue tested as soon as all
  its attributes are placed, not by the generator's domain propagation.

Each ``*_problems`` function returns a list of what is wrong (empty when the puzzle is good).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from megatron_lomdm.puzzles.sudoku import SudokuPuzzle
from megatron_lomdm.puzzles.zebra import ZebraPuzzle

# ---- Sudoku ------------------------------------------------------------------------------------


def _sudoku_units() -> list[list[int]]:
    rows = [[r * 9 + c for c in range(9)] for r in range(9)]
    cols = [[r * 9 + c for r in range(9)] for c in range(9)]
    boxes = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)]
             for br in range(3) for bc in range(3)]
    return rows + cols + boxes


def sudoku_solution_problems(puzzle: Sequence[int], solution: Sequence[int]) -> list[str]:
    """Shape, digits, every unit a permutation of 1..9, and every given kept."""
    if len(puzzle) != 81 or len(solution) != 81:
        return [f"grids must have 81 cells; got {len(puzzle)} and {len(solution)}"]
    out = []
    if any(d not in range(10) for d in puzzle):
        out.append("puzzle cells must be 0..9")
    if any(d not in range(1, 10) for d in solution):
        out.append("solution cells must be 1..9")
    for k, unit in enumerate(_sudoku_units()):
        if sorted(solution[i] for i in unit) != list(range(1, 10)):
            out.append(f"unit {k} ({('row', 'column', 'box')[k // 9]} {k % 9}) is not a permutation of 1..9")
    changed = [i for i in range(81) if puzzle[i] and puzzle[i] != solution[i]]
    if changed:
        out.append(f"solution disagrees with the givens at cells {changed[:5]}")
    return out


def _exact_cover_columns(option: int) -> tuple[int, int, int, int]:
    """The four constraint columns that option ``cell*9 + (digit-1)`` covers."""
    cell, d = divmod(option, 9)
    r, c = divmod(cell, 9)
    b = (r // 3) * 3 + c // 3
    return cell, 81 + r * 9 + d, 162 + c * 9 + d, 243 + b * 9 + d


def count_sudoku_solutions_exact_cover(puzzle: Sequence[int], limit: int = 2) -> int:
    """Solutions of ``puzzle`` (0 = blank) counted up to ``limit`` by Algorithm X."""
    columns: dict[int, set[int]] = {k: set() for k in range(324)}
    for option in range(729):
        for k in _exact_cover_columns(option):
            columns[k].add(option)

    def select(option: int) -> list[tuple[int, set[int]]]:
        """Cover the option's columns and every option that clashes with it; return what to restore."""
        removed = []
        for k in _exact_cover_columns(option):
            for other in columns[k]:
                for k2 in _exact_cover_columns(other):
                    if k2 != k and k2 in columns:
                        columns[k2].discard(other)
            removed.append((k, columns.pop(k)))
        return removed

    def restore(removed: list[tuple[int, set[int]]]) -> None:
        for k, options in reversed(removed):
            columns[k] = options
            for other in options:
                for k2 in _exact_cover_columns(other):
                    if k2 != k and k2 in columns:
                        columns[k2].add(other)

    for cell, d in enumerate(puzzle):
        if d:
            option = cell * 9 + d - 1
            if any(k not in columns or option not in columns[k] for k in _exact_cover_columns(option)):
                return 0  # two givens clash
            select(option)

    def count(need: int) -> int:
        """Solutions below the current selection, up to ``need``."""
        if not columns:
            return 1
        k = min(columns, key=lambda c: len(columns[c]))
        found = 0
        for option in list(columns[k]):
            removed = select(option)
            found += count(need - found)
            restore(removed)
            if found >= need:
                break
        return found

    return count(limit)


def sudoku_problems(puzzle: SudokuPuzzle) -> list[str]:
    """Everything wrong with a generated Sudoku (empty list: valid, agrees with givens, unique)."""
    out = sudoku_solution_problems(puzzle.puzzle, puzzle.solution)
    if not out:
        n = count_sudoku_solutions_exact_cover(puzzle.puzzle, limit=2)
        if n != 1:
            out.append(f"puzzle has {'no' if n == 0 else 'more than one'} solution")
    if puzzle.grade.givens != sum(1 for d in puzzle.puzzle if d):
        out.append("grade.givens does not match the puzzle")
    return out


# ---- Zebra -------------------------------------------------------------------------------------

_ZEBRA_RELATIONS = {  # (house of x, house of y or the clue's house) -> bool
    "same": lambda hx, hy: hx == hy,
    "not_same": lambda hx, hy: hx != hy,
    "left_of": lambda hx, hy: hx < hy,
    "imm_left": lambda hx, hy: hy - hx == 1,
    "next_to": lambda hx, hy: hx - hy in (1, -1),
    "at": lambda hx, k: hx == k,
}


def _clue_terms(puzzle: ZebraPuzzle) -> list[tuple[str, tuple[int, int], tuple[int, int] | int]]:
    """Each clue as ``(kind, x item, y item or house)``."""
    return [(c.kind, c.x, c.house if c.kind == "at" else c.y) for c in puzzle.clues]  # type: ignore[misc]


def _clue_true(term: tuple, house_of: dict[int, Sequence[int]]) -> bool:
    kind, x, other = term
    target = other if kind == "at" else house_of[other[0]][other[1]]
    return _ZEBRA_RELATIONS[kind](house_of[x[0]][x[1]], target)


def _zebra_shape_problems(puzzle: ZebraPuzzle) -> list[str]:
    n, m = puzzle.houses, puzzle.attributes
    if len(puzzle.solution) != n or any(len(row) != m for row in puzzle.solution):
        return [f"solution must be {n} houses x {m} attributes"]
    out = [f"attribute {a} is not a permutation of 0..{n - 1}" for a in range(m)
           if sorted(row[a] for row in puzzle.solution) != list(range(n))]
    for k, (kind, x, other) in enumerate(_clue_terms(puzzle)):
        items = [x] if kind == "at" else [x, other]
        if kind not in _ZEBRA_RELATIONS or any(not (0 <= i[0] < m and 0 <= i[1] < n) for i in items) \
                or (kind == "at" and not 0 <= other < n):
            out.append(f"clue {k} is malformed: {puzzle.clues[k]}")
    return out


def _attribute_order(terms: list[tuple], m: int) -> list[int]:
    """Attributes in an order that lets clues be tested early: most clues closed first."""
    order: list[int] = []
    while len(order) < m:
        def closed(a: int) -> int:
            placed = set(order) | {a}
            return sum(1 for t in terms if _term_attributes(t) <= placed)
        order.append(max((a for a in range(m) if a not in order), key=lambda a: (closed(a), -a)))
    return order


def _term_attributes(term: tuple) -> set[int]:
    kind, x, other = term
    return {x[0]} if kind == "at" else {x[0], other[0]}


def count_zebra_solutions_enumeration(puzzle: ZebraPuzzle, limit: int = 2) -> int:
    """Solutions of the clue set counted up to ``limit`` by enumerating permutations per attribute."""
    n, m = puzzle.houses, puzzle.attributes
    terms = _clue_terms(puzzle)
    order = _attribute_order(terms, m)
    # the clues to test once attribute order[k] is placed: those whose attributes are all placed by then
    checks = [[t for t in terms if order[k] in _term_attributes(t) and _term_attributes(t) <= set(order[:k + 1])]
              for k in range(m)]
    # clues on one attribute alone filter its permutations once, not at every node
    perms = [[p for p in itertools.permutations(range(n))
              if all(_clue_true(t, {a: p}) for t in terms if _term_attributes(t) == {a})] for a in range(m)]
    house_of: dict[int, Sequence[int]] = {}

    def count(depth: int, need: int) -> int:
        """Completions of the first ``depth`` attributes, up to ``need``."""
        if depth == m:
            return 1
        a, found = order[depth], 0
        for perm in perms[a]:  # perm[v] = house of value v
            house_of[a] = perm
            if all(_clue_true(t, house_of) for t in checks[depth]):
                found += count(depth + 1, need - found)
                if found >= need:
                    break
        del house_of[a]
        return found

    return count(0, limit)


def zebra_problems(puzzle: ZebraPuzzle) -> list[str]:
    """Everything wrong with a generated Zebra puzzle (empty list: well-formed, true, unique)."""
    out = _zebra_shape_problems(puzzle)
    if out:
        return out
    house_of = {a: [0] * puzzle.houses for a in range(puzzle.attributes)}
    for h, row in enumerate(puzzle.solution):
        for a, v in enumerate(row):
            house_of[a][v] = h
    out += [f"clue {k} is false of the solution: {puzzle.clues[k].text()}"
            for k, t in enumerate(_clue_terms(puzzle)) if not _clue_true(t, house_of)]
    if not out:
        n = count_zebra_solutions_enumeration(puzzle, limit=2)
        if n != 1:
            out.append(f"clues have {'no' if n == 0 else 'more than one'} solution")
    if puzzle.grade.clues != len(puzzle.clues):
        out.append("grade.clues does not match the clue count")
    return out
