"""Zebra (Einstein) puzzles: N houses in a row, M attributes, one value of each attribute per house.

The hidden solution is a table ``solution[house][attribute] -> value`` whose every column is a
permutation of ``0..N-1``. An *item* is ``(attribute, value)``; its house is where the solution puts
it. Clue kinds (``Clue``), with x, y items and houses numbered from the left:

* ``same``      x and y are in the same house (different attributes);
* ``not_same``  x and y are in different houses (different attributes);
* ``left_of``   x is somewhere left of y;
* ``imm_left``  x is immediately left of y;
* ``next_to``   x and y are neighbours;
* ``at``        x is in house k.

Generation (``make_zebra``): a random solution; random clues that are true of it are added until a
constraint solver finds exactly one solution; then every clue whose removal keeps the solution
unique is removed (in a random order), so the final set has no redundant clue. The solver is
domain propagation (each item's possible houses as a bitmask; clue revision, all-different,
hidden singles) plus branching on the smallest domain; the grade records the clue count and
whether propagation alone solves the puzzle (``propagation``) or branching is needed (``search``).

Everything draws from the ``random.Random`` passed in: the same seed gives the same puzzles.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

#: (attribute name, noun-phrase template, values). Value names are distinct across attributes:
#: each is one symbol of the sequence format.
ATTRIBUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("color", "the person in the {} house", ("red", "green", "blue", "yellow", "white", "black")),
    ("nationality", "the {}", ("Brit", "Swede", "Dane", "Norwegian", "German", "Spaniard")),
    ("drink", "the person who drinks {}", ("tea", "coffee", "milk", "beer", "water", "juice")),
    ("pet", "the person who keeps the {}", ("dog", "bird", "cat", "horse", "fish", "rabbit")),
    ("hobby", "the person who plays {}", ("chess", "golf", "tennis", "cards", "darts", "piano")),
    ("job", "the {}", ("teacher", "doctor", "pilot", "baker", "nurse", "painter")),
)
MIN_HOUSES, MAX_HOUSES = 2, len(ATTRIBUTES[0][2])
MIN_ATTRIBUTES, MAX_ATTRIBUTES = 2, len(ATTRIBUTES)
CLUE_KINDS = ("same", "not_same", "left_of", "imm_left", "next_to", "at")
#: Relative frequency of each kind among the random candidate clues.
_KIND_WEIGHTS = (3, 1, 1, 1, 2, 1)
_TEMPLATES = {
    "same": "{x} lives in the same house as {y}.",
    "not_same": "{x} does not live in the same house as {y}.",
    "left_of": "{x} lives somewhere to the left of {y}.",
    "imm_left": "{x} lives directly to the left of {y}.",
    "next_to": "{x} lives next to {y}.",
    "at": "{x} lives in house {k}.",
}

Item = tuple[int, int]  # (attribute, value)


@dataclass(frozen=True)
class Clue:
    """One clue: ``kind`` over item ``x`` and either item ``y`` or house ``house`` (kind ``at``)."""

    kind: str
    x: Item
    y: Item | None = None
    house: int | None = None

    def holds(self, house_of: Sequence[Sequence[int]]) -> bool:
        """Whether the clue is true when item ``(a, v)`` sits in house ``house_of[a][v]``."""
        hx = house_of[self.x[0]][self.x[1]]
        if self.kind == "at":
            return hx == self.house
        assert self.y is not None
        hy = house_of[self.y[0]][self.y[1]]
        return _RELATIONS[self.kind](hx, hy)

    def text(self) -> str:
        """The clue as an English sentence (houses numbered from 1)."""
        y = item_phrase(self.y) if self.y is not None else ""
        k = self.house + 1 if self.house is not None else 0
        sentence = _TEMPLATES[self.kind].format(x=item_phrase(self.x), y=y, k=k)
        return sentence[0].upper() + sentence[1:]

    def to_dict(self) -> dict:
        """The structured form: ``{"kind", "x": [a, v], "y": [a, v] | None, "house": k | None}``."""
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y) if self.y else None, "house": self.house}

    @classmethod
    def from_dict(cls, d: dict) -> Clue:
        """Inverse of ``to_dict``."""
        y = tuple(d["y"]) if d.get("y") is not None else None
        return cls(d["kind"], (int(d["x"][0]), int(d["x"][1])), y, d.get("house"))  # type: ignore[arg-type]


_RELATIONS = {
    "same": lambda hx, hy: hx == hy,
    "not_same": lambda hx, hy: hx != hy,
    "left_of": lambda hx, hy: hx < hy,
    "imm_left": lambda hx, hy: hx + 1 == hy,
    "next_to": lambda hx, hy: abs(hx - hy) == 1,
}


@dataclass(frozen=True)
class ZebraGrade:
    """How hard a puzzle is: its clue count and whether propagation alone solves it."""

    clues: int
    technique: str  # "propagation" or "search"


@dataclass(frozen=True)
class ZebraPuzzle:
    """A puzzle with its (unique) solution.

    Attributes:
        houses: N, the number of houses (and of values per attribute).
        attributes: M, the number of attributes (the first M of ``ATTRIBUTES``).
        clues: The clue set (no clue redundant).
        solution: ``solution[house][attribute]`` is the value index there.
        grade: Clue count and technique.
    """

    houses: int
    attributes: int
    clues: tuple[Clue, ...]
    solution: tuple[tuple[int, ...], ...]
    grade: ZebraGrade

    def text(self) -> str:
        """The clues as numbered English sentences, one per line."""
        return "\n".join(f"{i + 1}. {c.text()}" for i, c in enumerate(self.clues))


def item_phrase(item: Item) -> str:
    """``(0, 2)`` -> ``"the person in the blue house"``."""
    _, template, values = ATTRIBUTES[item[0]]
    return template.format(values[item[1]])


def houses_of(solution: Sequence[Sequence[int]], attributes: int) -> list[list[int]]:
    """``house_of[a][v]``: the house holding value ``v`` of attribute ``a`` (the inverse table)."""
    house_of = [[0] * len(solution) for _ in range(attributes)]
    for h, row in enumerate(solution):
        for a in range(attributes):
            house_of[a][row[a]] = h
    return house_of


def check_size(houses: int, attributes: int) -> None:
    """Raise ``ValueError`` for a size outside the supported range."""
    if not (MIN_HOUSES <= houses <= MAX_HOUSES and MIN_ATTRIBUTES <= attributes <= MAX_ATTRIBUTES):
        raise ValueError(f"zebra needs {MIN_HOUSES}..{MAX_HOUSES} houses and {MIN_ATTRIBUTES}..{MAX_ATTRIBUTES} "
                         f"attributes; got {houses} houses, {attributes} attributes")


# ---- the generator's solver: domain propagation + branching ------------------------------------

def _revise(clue: Clue, dx: int, dy: int, full: int) -> tuple[int, int]:
    """Shrink the house masks of the clue's two items to the supports the clue leaves them."""
    kind = clue.kind
    if kind == "same":
        both = dx & dy
        return both, both
    if kind == "not_same":
        if dx & (dx - 1) == 0:
            dy &= ~dx
        if dy & (dy - 1) == 0:
            dx &= ~dy
        return dx, dy
    if kind == "left_of":  # hx < hy: x below y's highest house, y above x's lowest
        if not dx or not dy:
            return 0, 0
        dx &= (1 << (dy.bit_length() - 1)) - 1
        lowest_x_plus_1 = (dx & -dx).bit_length()  # 0 when dx is empty
        return dx, (dy & ~((1 << lowest_x_plus_1) - 1)) if dx else 0
    if kind == "imm_left":
        dx &= dy >> 1
        return dx, dy & (dx << 1)
    # next_to
    dx &= ((dy << 1) | (dy >> 1)) & full
    return dx, dy & ((dx << 1) | (dx >> 1))


def _propagate(dom: list[int], clues: Sequence[Clue], n: int, m: int) -> bool:
    """Prune ``dom`` (item ``a*n+v`` -> house mask) in place to a fixpoint; False on a contradiction."""
    full = (1 << n) - 1
    for c in clues:
        if c.kind == "at":
            dom[c.x[0] * n + c.x[1]] &= 1 << c.house  # type: ignore[operator]
    pairs = [(c, c.x[0] * n + c.x[1], c.y[0] * n + c.y[1]) for c in clues if c.y is not None]
    changed = True
    while changed:
        changed = False
        for c, i, j in pairs:
            new_i, new_j = _revise(c, dom[i], dom[j], full)
            if new_i != dom[i] or new_j != dom[j]:
                dom[i], dom[j] = new_i, new_j
                changed = True
        for a in range(m):
            column = range(a * n, a * n + n)
            for i in column:  # a placed value takes its house from the others
                if dom[i] and dom[i] & (dom[i] - 1) == 0:
                    for j in column:
                        if j != i and dom[j] & dom[i]:
                            dom[j] &= ~dom[i]
                            changed = True
            for h in range(n):  # a house only one value can take
                holders = [i for i in column if dom[i] >> h & 1]
                if not holders:
                    return False
                if len(holders) == 1 and dom[holders[0]] != 1 << h:
                    dom[holders[0]] = 1 << h
                    changed = True
        if not all(dom):
            return False
    return True


def solve_zebra(houses: int, attributes: int, clues: Sequence[Clue], limit: int = 2) -> tuple[int, bool]:
    """Count the solutions of a clue set, up to ``limit``.

    Returns:
        ``(number of solutions found, whether any branching was needed)``.
    """
    n, m = houses, attributes
    branched = False

    def count(dom: list[int], need: int) -> int:
        nonlocal branched
        if not _propagate(dom, clues, n, m):
            return 0
        open_items = [i for i in range(n * m) if dom[i] & (dom[i] - 1)]
        if not open_items:
            house_of = [[dom[a * n + v].bit_length() - 1 for v in range(n)] for a in range(m)]
            return int(all(c.holds(house_of) for c in clues))
        branched = True
        i = min(open_items, key=lambda k: bin(dom[k]).count("1"))
        found = 0
        for h in range(n):
            if dom[i] >> h & 1:
                trial = list(dom)
                trial[i] = 1 << h
                found += count(trial, need - found)
                if found >= need:
                    break
        return found

    return count([(1 << n) - 1] * (n * m), limit), branched


# ---- generation --------------------------------------------------------------------------------

def random_solution(rng: random.Random, houses: int, attributes: int) -> tuple[tuple[int, ...], ...]:
    """A random table ``[house][attribute] -> value``: every column a random permutation."""
    columns = []
    for _ in range(attributes):
        perm = list(range(houses))
        rng.shuffle(perm)
        columns.append(perm)
    return tuple(tuple(columns[a][h] for a in range(attributes)) for h in range(houses))


def _random_item(rng: random.Random, houses: int, attributes: int) -> Item:
    return rng.randrange(attributes), rng.randrange(houses)


def random_true_clue(rng: random.Random, house_of: list[list[int]], houses: int, attributes: int) -> Clue:
    """A random clue that the solution (given as ``house_of``) satisfies."""
    kind = rng.choices(CLUE_KINDS, weights=_KIND_WEIGHTS)[0]
    if kind == "at":
        x = _random_item(rng, houses, attributes)
        return Clue("at", x, house=house_of[x[0]][x[1]])
    while True:  # redraw both items: some x have no partner (nothing is left of house 1)
        x, y = _random_item(rng, houses, attributes), _random_item(rng, houses, attributes)
        if kind in ("same", "not_same") and y[0] == x[0]:
            continue
        clue = Clue(kind, x, y)
        if y != x and clue.holds(house_of):
            return clue


def _drop_redundant(clues: list[Clue], rng: random.Random, houses: int, attributes: int) -> list[Clue]:
    """Remove, in a random order, every clue whose removal keeps the solution unique."""
    order = list(range(len(clues)))
    rng.shuffle(order)
    keep = [True] * len(clues)
    for k in order:
        keep[k] = False
        if solve_zebra(houses, attributes, [c for c, on in zip(clues, keep) if on])[0] != 1:
            keep[k] = True
    return [c for c, on in zip(clues, keep) if on]


def make_zebra(rng: random.Random, houses: int, attributes: int) -> ZebraPuzzle:
    """One puzzle with a unique solution and no redundant clue.

    Raises:
        ValueError: For a size outside ``check_size``'s range.
    """
    check_size(houses, attributes)
    solution = random_solution(rng, houses, attributes)
    house_of = houses_of(solution, attributes)
    clues: list[Clue] = []
    while solve_zebra(houses, attributes, clues)[0] != 1:
        clue = random_true_clue(rng, house_of, houses, attributes)
        if clue not in clues:
            clues.append(clue)
    clues = _drop_redundant(clues, rng, houses, attributes)
    rng.shuffle(clues)
    _, branched = solve_zebra(houses, attributes, clues)
    grade = ZebraGrade(clues=len(clues), technique="search" if branched else "propagation")
    return ZebraPuzzle(houses, attributes, tuple(clues), solution, grade)
