"""Puzzle datasets on disk: train/valid/test JSONL, a word tokenizer and a manifest (``tools/make_puzzles.py``).

Splits are generated held-out first (test, then valid, then train), each from its own seeded
stream, so a test set depends only on the seed and its own count, never on ``--train``. A puzzle
whose solution already appears in a held-out split is dropped (valid never shares a solution with
test; train never with either): the splits are disjoint *by solution*, not just by puzzle. Exact
duplicate puzzles within a split are dropped too. Every kept puzzle passes the independent verifier
(``verify.py``) before it is written; a failure is a generator bug and stops the run.

Files (``write_dataset``), written into a temporary sibling folder and renamed into place at the end,
so an interrupted run never leaves a complete-looking output:

* ``{train,valid,test}.jsonl``: one record per puzzle (``to_record``);
* ``tokenizer/``: the word tokenizer of the format's symbols (when a ``save_tokenizer`` is given);
* ``manifest.json`` (last): counts, seed, parameters, format, grade histograms, generator version.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from megatron_lomdm.puzzles.format import (
    NUM_SPECIAL_TOKENS,
    SUDOKU,
    Puzzle,
    PuzzleFormat,
    ZebraFormat,
    default_max_clues,
)
from megatron_lomdm.puzzles.sudoku import SudokuGrade, SudokuPuzzle, check_givens_range, make_sudoku
from megatron_lomdm.puzzles.verify import sudoku_problems, zebra_problems
from megatron_lomdm.puzzles.zebra import ATTRIBUTES, Clue, ZebraGrade, ZebraPuzzle, check_size, make_zebra
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

GENERATOR_VERSION = "megatron_lomdm.puzzles/1"
SPLITS = ("train", "valid", "test")
GENERATION_ORDER = ("test", "valid", "train")
PROGRESS_EVERY_S = 10.0


class VerificationError(RuntimeError):
    """A generated puzzle failed the independent verifier (a generator bug)."""


class PuzzleSpec(Protocol):
    """What ``generate_splits`` and ``write_dataset`` need to know about one kind of puzzle."""

    kind: str

    @property
    def fmt(self) -> PuzzleFormat: ...
    def make(self, rng: random.Random) -> Puzzle: ...
    def problems(self, puzzle: Puzzle) -> list[str]: ...
    def solution_key(self, puzzle: Puzzle) -> str: ...
    def puzzle_key(self, puzzle: Puzzle) -> str: ...
    def fields(self, puzzle: Puzzle) -> dict[str, Any]: ...
    def params(self) -> dict[str, Any]: ...
    def distinct_solutions(self) -> int: ...


def _digits(grid: Sequence[int]) -> str:
    return "".join(str(d) for d in grid)


@dataclass(frozen=True)
class SudokuSpec:
    """9×9 Sudoku with a givens count in ``[min_givens, max_givens]``."""

    min_givens: int
    max_givens: int
    kind = "sudoku"

    def __post_init__(self) -> None:
        check_givens_range(self.min_givens, self.max_givens)

    @property
    def fmt(self) -> PuzzleFormat:
        return SUDOKU

    def make(self, rng: random.Random) -> SudokuPuzzle:
        return make_sudoku(rng, self.min_givens, self.max_givens)

    def problems(self, puzzle: SudokuPuzzle) -> list[str]:  # type: ignore[override]
        return sudoku_problems(puzzle)

    def solution_key(self, puzzle: SudokuPuzzle) -> str:  # type: ignore[override]
        return _digits(puzzle.solution)

    def puzzle_key(self, puzzle: SudokuPuzzle) -> str:  # type: ignore[override]
        return _digits(puzzle.puzzle)

    def fields(self, puzzle: SudokuPuzzle) -> dict[str, Any]:  # type: ignore[override]
        """``puzzle`` / ``solution`` as 81-digit strings (0 = blank), ``givens`` count, ``grade``."""
        return {"puzzle": _digits(puzzle.puzzle), "solution": _digits(puzzle.solution),
                "givens": puzzle.grade.givens,
                "grade": {"givens": puzzle.grade.givens, "technique": puzzle.grade.technique}}

    def params(self) -> dict[str, Any]:
        return {"min_givens": self.min_givens, "max_givens": self.max_givens}

    def distinct_solutions(self) -> int:
        return 6_670_903_752_021_072_936_960  # full 9×9 grids (Felgenhauer and Jarvis, 2005)


@dataclass(frozen=True)
class ZebraSpec:
    """Zebra puzzles of ``houses`` x ``attributes``, at most ``max_clues`` clues (default N*M)."""

    houses: int
    attributes: int
    max_clues: int | None = None
    kind = "zebra"
    max_tries: int = 100

    def __post_init__(self) -> None:
        check_size(self.houses, self.attributes)
        if self.max_clues is not None and self.max_clues < 1:
            raise ValueError(f"max_clues must be >= 1; got {self.max_clues}")

    @property
    def slots(self) -> int:
        return self.max_clues if self.max_clues is not None else default_max_clues(self.houses, self.attributes)

    @property
    def fmt(self) -> PuzzleFormat:
        return ZebraFormat(self.houses, self.attributes, self.slots)

    def make(self, rng: random.Random) -> ZebraPuzzle:
        """A puzzle that fits the clue slots (longer ones are redrawn).

        Raises:
            ValueError: When ``max_tries`` puzzles in a row need more than ``max_clues`` clues.
        """
        for _ in range(self.max_tries):
            puzzle = make_zebra(rng, self.houses, self.attributes)
            if len(puzzle.clues) <= self.slots:
                return puzzle
        raise ValueError(f"{self.max_tries} puzzles in a row needed more than {self.slots} clues: raise --max-clues")

    def problems(self, puzzle: ZebraPuzzle) -> list[str]:  # type: ignore[override]
        return zebra_problems(puzzle)

    def solution_key(self, puzzle: ZebraPuzzle) -> str:  # type: ignore[override]
        return json.dumps(puzzle.solution)

    def puzzle_key(self, puzzle: ZebraPuzzle) -> str:  # type: ignore[override]
        return json.dumps(sorted(json.dumps(c.to_dict()) for c in puzzle.clues))

    def fields(self, puzzle: ZebraPuzzle) -> dict[str, Any]:  # type: ignore[override]
        """Size, structured ``clues``, their English ``text``, ``solution[house][attribute]``, ``givens``
        (the clue count) and ``grade``."""
        return {"houses": puzzle.houses, "attributes": puzzle.attributes,
                "clues": [c.to_dict() for c in puzzle.clues], "text": puzzle.text(),
                "solution": [list(row) for row in puzzle.solution], "givens": len(puzzle.clues),
                "grade": {"clues": puzzle.grade.clues, "technique": puzzle.grade.technique}}

    def params(self) -> dict[str, Any]:
        attrs = [{"name": name, "values": list(values[:self.houses])}
                 for name, _, values in ATTRIBUTES[:self.attributes]]
        return {"houses": self.houses, "attributes": self.attributes, "max_clues": self.slots,
                "attribute_values": attrs}

    def distinct_solutions(self) -> int:
        return math.factorial(self.houses) ** self.attributes


def parse_givens(text: str) -> tuple[int, int]:
    """``"30"`` -> ``(30, 30)``; ``"30:40"`` -> ``(30, 40)``.

    Raises:
        ValueError: On anything else.
    """
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"givens must be MIN or MIN:MAX (integers); got {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    check_givens_range(lo, hi)
    return lo, hi


def check_counts(counts: dict[str, int], spec: PuzzleSpec) -> None:
    """Raise ``ValueError`` for negative counts, no puzzles at all, or held-out splits that would
    take too large a share of the distinct solutions for train to find new ones."""
    if set(counts) != set(SPLITS) or any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise ValueError(f"counts must give train/valid/test >= 0, not all 0; got {counts}")
    held_out = counts["valid"] + counts["test"]
    if held_out and 2 * held_out > spec.distinct_solutions():
        raise ValueError(f"valid + test = {held_out} puzzles, but only {spec.distinct_solutions()} distinct "
                         "solutions exist: use a larger puzzle or fewer held-out puzzles")


def _generate_split(spec: PuzzleSpec, split: str, count: int, seed: int,
                    held_out: set[str]) -> tuple[list[Puzzle], int]:
    """``count`` verified puzzles whose solutions avoid ``held_out``; also the number dropped."""
    rng = random.Random(f"puzzles:{spec.kind}:{seed}:{split}")
    puzzles: list[Puzzle] = []
    seen: set[str] = set()
    dropped = 0
    start = last_log = time.monotonic()
    while len(puzzles) < count:
        puzzle = spec.make(rng)
        key = spec.puzzle_key(puzzle)
        if spec.solution_key(puzzle) in held_out or key in seen:
            dropped += 1
            if dropped > 10 * count + 1000:
                raise ValueError(f"{split}: dropped {dropped} duplicate puzzles after {len(puzzles)} kept; "
                                 "too few distinct puzzles of this size for the counts asked")
            continue
        problems = spec.problems(puzzle)
        if problems:
            raise VerificationError(f"{split} puzzle {len(puzzles)} failed verification: {problems}")
        puzzles.append(puzzle)
        seen.add(key)
        if time.monotonic() - last_log > PROGRESS_EVERY_S:
            last_log = time.monotonic()
            logger.info("%s %s: %d/%d puzzles (%.1f/s)", spec.kind, split, len(puzzles), count,
                        len(puzzles) / (last_log - start))
    logger.info("%s %s: %d puzzles in %.1f s (%d duplicates dropped)", spec.kind, split, count,
                time.monotonic() - start, dropped)
    return puzzles, dropped


def generate_splits(spec: PuzzleSpec, counts: dict[str, int], seed: int) -> tuple[dict[str, list[Puzzle]], int]:
    """Verified puzzles per split, disjoint by solution across splits; also the number dropped."""
    check_counts(counts, spec)
    held_out: set[str] = set()
    out: dict[str, list[Puzzle]] = {}
    dropped = 0
    for split in GENERATION_ORDER:
        out[split], n = _generate_split(spec, split, counts[split], seed, held_out)
        dropped += n
        if split != "train":
            held_out |= {spec.solution_key(p) for p in out[split]}
    return out, dropped


def to_record(spec: PuzzleSpec, puzzle: Puzzle, puzzle_id: str) -> dict[str, Any]:
    """One JSONL record: ``id``, ``kind``, ``prompt``, ``response``, ``tokens``, ``cond`` (0/1), then
    the kind's fields (``solution``, ``givens``, ``grade``, ...)."""
    tokens, cond = spec.fmt.encode(puzzle)  # type: ignore[arg-type]
    prompt, response = spec.fmt.texts(puzzle)  # type: ignore[arg-type]
    return {"id": puzzle_id, "kind": spec.kind, "prompt": prompt, "response": response, "tokens": tokens,
            "cond": [int(c) for c in cond], **spec.fields(puzzle)}


def puzzle_from_record(record: dict[str, Any]) -> Puzzle:
    """Rebuild the puzzle of a record written by ``to_record``."""
    grade = record["grade"]
    if record["kind"] == "sudoku":
        return SudokuPuzzle(tuple(int(c) for c in record["puzzle"]), tuple(int(c) for c in record["solution"]),
                            SudokuGrade(grade["givens"], grade["technique"]))
    clues = tuple(Clue.from_dict(c) for c in record["clues"])
    return ZebraPuzzle(record["houses"], record["attributes"], clues, tuple(tuple(r) for r in record["solution"]),
                       ZebraGrade(grade["clues"], grade["technique"]))


def read_split(path: str | Path) -> list[Puzzle]:
    """The puzzles of one ``{split}.jsonl``."""
    with Path(path).open(encoding="utf-8") as f:
        return [puzzle_from_record(json.loads(line)) for line in f if line.strip()]


def _grade_histogram(spec: PuzzleSpec, puzzles: list[Puzzle]) -> dict[str, dict[str, int]]:
    """``{grade field: {value: puzzles}}``, e.g. ``{"givens": {"30": 12, ...}, "technique": {...}}``."""
    counters: dict[str, Counter] = {}
    for puzzle in puzzles:
        for key, value in spec.fields(puzzle)["grade"].items():
            counters.setdefault(key, Counter())[str(value)] += 1
    return {key: dict(sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0]))) for key, c in counters.items()}


def _manifest(spec: PuzzleSpec, splits: dict[str, list[Puzzle]], seed: int, dropped: int, seconds: float) -> dict:
    fmt = spec.fmt
    return {
        "generator_version": GENERATOR_VERSION, "kind": spec.kind, "seed": seed, "params": spec.params(),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "format": {"seq_length": fmt.seq_length, "num_special_tokens": NUM_SPECIAL_TOKENS, "symbols": fmt.symbols},
        "grade_histogram": {s: _grade_histogram(spec, splits[s]) for s in SPLITS},
        "duplicates_dropped": dropped, "verified": True, "disjoint_by_solution": True,
        "seconds": round(seconds, 2),
    }


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"output folder {out} is not empty: choose another or pass --force to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing a previous output."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_dataset(spec: PuzzleSpec, out_dir: str | Path, counts: dict[str, int], seed: int, *,
                  save_tokenizer: Callable[[Sequence[str], Path], object] | None = None,
                  force: bool = False) -> dict:
    """Generate, verify and write a puzzle dataset (see the module docstring).

    Args:
        spec: ``SudokuSpec`` or ``ZebraSpec``.
        out_dir: Output folder; must be absent or empty unless ``force``.
        counts: Puzzles per split (``train``, ``valid``, ``test``).
        seed: Seed of every split's stream.
        save_tokenizer: Writes a word tokenizer of the symbols to a folder
            (``data.tokenize.save_word_tokenizer``); ``None`` writes none.
        force: Replace a non-empty ``out_dir``.

    Returns:
        The manifest.
    """
    out = Path(out_dir)
    _check_output(out, force)
    start = time.monotonic()
    splits, dropped = generate_splits(spec, counts, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()  # a hidden sibling: renamed to ``out`` only once complete
    try:
        for split in SPLITS:
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for k, puzzle in enumerate(splits[split]):
                    f.write(json.dumps(to_record(spec, puzzle, f"{spec.kind}-{split}-{k:06d}")) + "\n")
        if save_tokenizer is not None:
            save_tokenizer(spec.fmt.symbols, tmp / "tokenizer")
        manifest = _manifest(spec, splits, seed, dropped, time.monotonic() - start)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", out, manifest["counts"])
    return manifest
