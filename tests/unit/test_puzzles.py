"""Logic puzzles (issue 19 §2): generators give unique puzzles by an independent verifier, the
verifier rejects bad ones, the sequence format round-trips with a cond mask on exactly the givens,
splits are disjoint by solution, the metrics' formulas, determinism, and the tool end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lomdm.data.tokenize import load_tokenizer, save_word_tokenizer
from megatron_lomdm.puzzles.dataset import (
    SudokuSpec,
    ZebraSpec,
    generate_splits,
    parse_givens,
    puzzle_from_record,
    read_split,
    to_record,
    write_dataset,
)
from megatron_lomdm.puzzles.format import BLANK, NUM_SPECIAL_TOKENS, SUDOKU, ZebraFormat, decode, encode, format_for
from megatron_lomdm.puzzles.metrics import PuzzleScore, score, summarize, table_rows
from megatron_lomdm.puzzles.sudoku import SudokuGrade, SudokuPuzzle, count_solutions, make_sudoku
from megatron_lomdm.puzzles.verify import (
    count_sudoku_solutions_exact_cover,
    count_zebra_solutions_enumeration,
    sudoku_problems,
    zebra_problems,
)
from megatron_lomdm.puzzles.zebra import Clue, ZebraGrade, ZebraPuzzle, make_zebra, solve_zebra

ROOT = Path(__file__).resolve().parents[2]


def _sudokus(n: int, lo: int = 30, hi: int = 40, seed: int = 0) -> list[SudokuPuzzle]:
    rng = random.Random(seed)
    return [make_sudoku(rng, lo, hi) for _ in range(n)]


def _zebras(n: int, houses: int, attributes: int, seed: int = 0) -> list[ZebraPuzzle]:
    rng = random.Random(seed)
    return [make_zebra(rng, houses, attributes) for _ in range(n)]


def _relabel(grid, mapping: dict[int, int]) -> tuple[int, ...]:
    return tuple(mapping.get(d, d) for d in grid)


# ---- generators, checked by the independent verifiers ---------------------------------------------

def test_sudoku_generator_is_unique_by_the_verifier_and_graded():
    for p in _sudokus(6) + _sudokus(2, 24, 27, seed=1):
        assert sudoku_problems(p) == []
        assert p.grade.givens == p.givens and p.grade.technique in ("naked_single", "hidden_single", "search")
    assert all(30 <= p.givens <= 40 for p in _sudokus(6))


def test_zebra_generator_is_unique_by_the_verifier_and_has_no_redundant_clue():
    for houses, attributes in ((3, 3), (4, 4), (5, 5)):
        for p in _zebras(2, houses, attributes, seed=houses):
            assert zebra_problems(p) == []
            for k in range(len(p.clues)):  # every clue is needed
                fewer = ZebraPuzzle(p.houses, p.attributes, p.clues[:k] + p.clues[k + 1:], p.solution,
                                    ZebraGrade(len(p.clues) - 1, p.grade.technique))
                assert count_zebra_solutions_enumeration(fewer) == 2


def test_generators_are_deterministic_by_seed():
    assert _sudokus(3, seed=5) == _sudokus(3, seed=5) != _sudokus(3, seed=6)
    assert _zebras(3, 4, 4, seed=5) == _zebras(3, 4, 4, seed=5) != _zebras(3, 4, 4, seed=6)


# ---- the verifiers reject what they must ------------------------------------------------------------

def test_sudoku_verifier_rejects_a_corrupted_solution():
    p = _sudokus(1)[0]
    swapped = list(p.solution)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # breaks two columns and keeps rows
    bad = SudokuPuzzle(p.puzzle, tuple(swapped), p.grade)
    assert any("not a permutation" in s for s in sudoku_problems(bad))
    # a valid full grid that contradicts the givens (digits 1 and 2 exchanged)
    other = SudokuPuzzle(p.puzzle, _relabel(p.solution, {1: 2, 2: 1}), p.grade)
    assert any("disagrees with the givens" in s for s in sudoku_problems(other))


def test_sudoku_verifier_rejects_a_non_unique_puzzle():
    p = _sudokus(1)[0]
    kept = [i for i, d in enumerate(p.puzzle) if d][:16]  # fewer than 17 givens: never unique
    sparse = tuple(d if i in kept else 0 for i, d in enumerate(p.puzzle))
    bad = SudokuPuzzle(sparse, p.solution, SudokuGrade(16, "search"))
    assert sudoku_problems(bad) == ["puzzle has more than one solution"]
    assert count_sudoku_solutions_exact_cover([1, 1] + [0] * 79) == 0  # clashing givens: no solution


def test_sudoku_counters_agree_exact_cover_vs_search():
    rng = random.Random(3)
    for p in _sudokus(6, seed=3):
        blanked = [d if rng.random() < 0.7 else 0 for d in p.puzzle]  # often several solutions
        assert count_sudoku_solutions_exact_cover(blanked, 2) == count_solutions(blanked, 2)
    assert count_sudoku_solutions_exact_cover([0] * 81, 3) == 3


def test_zebra_counters_agree_enumeration_vs_propagation():
    rng = random.Random(4)
    for p in _zebras(4, 4, 4, seed=4):
        subset = tuple(c for c in p.clues if rng.random() < 0.7)
        partial = ZebraPuzzle(p.houses, p.attributes, subset, p.solution, ZebraGrade(len(subset), "x"))
        for limit in (1, 2, 5):
            assert count_zebra_solutions_enumeration(partial, limit) == solve_zebra(4, 4, subset, limit)[0]


def test_zebra_verifier_rejects_two_solutions_and_a_corrupted_solution():
    # 2 houses, 2 attributes, one clue "red is in house 1": the nationalities can go either way
    loose = ZebraPuzzle(2, 2, (Clue("at", (0, 0), house=0),), ((0, 0), (1, 1)), ZebraGrade(1, "propagation"))
    assert zebra_problems(loose) == ["clues have more than one solution"]
    tight = ZebraPuzzle(2, 2, loose.clues + (Clue("same", (0, 0), (1, 0)),), loose.solution, ZebraGrade(2, "x"))
    assert zebra_problems(tight) == []
    p = _zebras(1, 4, 4)[0]
    rows = [list(r) for r in p.solution]
    rows[0][0], rows[1][0] = rows[1][0], rows[0][0]  # swap attribute 0 between houses 1 and 2
    bad = ZebraPuzzle(p.houses, p.attributes, p.clues, tuple(tuple(r) for r in rows), p.grade)
    assert any("false of the solution" in s for s in zebra_problems(bad))


# ---- sequence format -----------------------------------------------------------------------------------

def test_sudoku_encode_decode_round_trip_and_cond_marks_exactly_the_givens():
    for p in _sudokus(3):
        ids, cond = encode(p)
        assert len(ids) == len(cond) == 81
        assert decode(ids) == list(p.solution)
        assert cond == [d != 0 for d in p.puzzle] and sum(cond) == p.givens
        assert all(i == NUM_SPECIAL_TOKENS + d for i, d in zip(ids, p.solution))
        prompt, response = SUDOKU.texts(p)
        assert [s != BLANK for s in prompt.split()] == cond
        assert [s for s, c in zip(prompt.split(), cond) if c] == [s for s, c in zip(response.split(), cond) if c]
    assert decode([0, 3, 4] + [13] * 78)[:4] == [0, 0, 0, 9]  # specials and the blank are not digits


def test_zebra_encode_decode_round_trip_and_cond_marks_exactly_the_clues():
    for p in _zebras(3, 4, 3):
        fmt = format_for(p)
        assert isinstance(fmt, ZebraFormat) and fmt.max_clues == 12
        ids, cond = encode(p, fmt)
        assert len(ids) == len(cond) == fmt.seq_length == 3 * 12 + 12
        assert cond == [True] * 36 + [False] * 12
        assert decode(ids, fmt) == [list(r) for r in p.solution]
        assert fmt.decode_clues(ids) == list(p.clues)
        prompt, _ = fmt.texts(p)
        assert [s != BLANK for s in prompt.split()] == cond
    with pytest.raises(ValueError, match="clues"):
        ZebraFormat(4, 3, 2).encode(p)


def test_word_tokenizer_encodes_the_response_to_the_record_tokens(tmp_path):
    for spec in (SudokuSpec(30, 40), ZebraSpec(3, 3)):
        p = spec.make(random.Random(0))
        record = to_record(spec, p, "x")
        tok, _ = load_tokenizer(save_word_tokenizer(spec.fmt.symbols, tmp_path / spec.kind))
        assert tok.encode(record["response"], add_special_tokens=False).ids == record["tokens"]
        prompt_ids = tok.encode(record["prompt"], add_special_tokens=False).ids
        assert [i != NUM_SPECIAL_TOKENS for i in prompt_ids] == [bool(c) for c in record["cond"]]  # "_" is id 4
        assert puzzle_from_record(json.loads(json.dumps(record))) == p


# ---- splits ------------------------------------------------------------------------------------------------

def test_splits_are_disjoint_by_solution_and_held_out_splits_ignore_train_count():
    spec = ZebraSpec(3, 3)  # only 216 solutions: collisions are certain, so the dedupe is exercised
    splits, dropped = generate_splits(spec, {"train": 120, "valid": 15, "test": 15}, seed=1)
    sol = {s: {spec.solution_key(p) for p in splits[s]} for s in splits}
    assert not sol["train"] & sol["valid"] and not sol["train"] & sol["test"] and not sol["valid"] & sol["test"]
    assert dropped > 0 and [len(splits[s]) for s in ("train", "valid", "test")] == [120, 15, 15]
    again, _ = generate_splits(spec, {"train": 3, "valid": 15, "test": 15}, seed=1)
    assert again["test"] == splits["test"] and again["valid"] == splits["valid"]
    other, _ = generate_splits(spec, {"train": 3, "valid": 15, "test": 15}, seed=2)
    assert other["test"] != splits["test"]


def test_bad_arguments_raise_clear_errors(tmp_path):
    assert parse_givens("30:40") == (30, 40) and parse_givens("35") == (35, 35)
    for text in ("40:30", "10", "30:x", "1:2:3", "81"):
        with pytest.raises(ValueError):
            parse_givens(text)
    with pytest.raises(ValueError, match="houses"):
        ZebraSpec(9, 3)
    with pytest.raises(ValueError, match="distinct"):
        generate_splits(ZebraSpec(2, 2), {"train": 1, "valid": 2, "test": 2}, seed=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        write_dataset(SudokuSpec(30, 40), tmp_path / "full", {"train": 1, "valid": 0, "test": 0}, 0)


def test_write_dataset_is_atomic(tmp_path):
    def broken_tokenizer(symbols, path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(SudokuSpec(35, 40), tmp_path / "out", {"train": 2, "valid": 1, "test": 1}, 0,
                      save_tokenizer=broken_tokenizer)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


# ---- metrics ----------------------------------------------------------------------------------------------

def test_sudoku_metrics_on_hand_made_predictions():
    p = _sudokus(1, 35, 35)[0]
    truth, _ = encode(p)
    assert score(truth, p) == PuzzleScore(True, True, 46, 46)
    blanks = [i for i, d in enumerate(p.puzzle) if not d]
    row_blanks = next(b for r in range(9) if len(b := [i for i in blanks if i // 9 == r]) >= 2)
    swapped = list(truth)
    swapped[row_blanks[0]], swapped[row_blanks[1]] = swapped[row_blanks[1]], swapped[row_blanks[0]]
    assert score(swapped, p) == PuzzleScore(False, False, 44, 46)
    # a valid grid that changes givens is not valid; cell accuracy counts only the 46 blanks
    relabeled = [NUM_SPECIAL_TOKENS + d for d in _relabel(p.solution, {1: 2, 2: 1})]
    s = score(relabeled, p)
    assert not s.exact and not s.valid and s.cells_right == sum(p.solution[i] not in (1, 2) for i in blanks)
    # a puzzle with one given has many solutions: another valid completion is valid but not exact
    first = next(i for i, d in enumerate(p.solution) if d == 9)
    loose = SudokuPuzzle(tuple(9 if i == first else 0 for i in range(81)), p.solution, SudokuGrade(1, "search"))
    assert score(relabeled, loose) == PuzzleScore(False, True, 80 - 2 * 9, 80)


def test_zebra_metrics_on_hand_made_predictions():
    p = _zebras(1, 4, 4, seed=2)[0]
    fmt = format_for(p)
    truth, _ = encode(p, fmt)
    assert score(truth, p) == PuzzleScore(True, True, 16, 16)
    swapped = list(truth)
    t = fmt.table_start
    swapped[t], swapped[t + 4] = swapped[t + 4], swapped[t]  # attribute 0 of houses 1 and 2
    assert score(swapped, p) == PuzzleScore(False, False, 14, 16)  # unique puzzle: no other valid table
    masked = list(truth)
    masked[t + 5] = 3  # [MASK] left in the table
    assert score(masked, p) == PuzzleScore(False, False, 15, 16)


def test_summarize_and_table_rows_formulas():
    a, b, c = PuzzleScore(True, True, 10, 10), PuzzleScore(False, True, 5, 30), PuzzleScore(False, False, 0, 20)
    got = summarize([a, b])
    assert got == {"puzzles": 2, "exact": 0.5, "valid": 1.0, "cell": 15 / 40}  # micro average, not (1 + 1/6) / 2
    rows = table_rows([("vanilla", 8, c), ("top_margin", 81, a), ("top_margin", 8, b), ("top_margin", 8, a)])
    assert [(r["sampler"], r["steps"], r["puzzles"]) for r in rows] == [("top_margin", 8, 2), ("top_margin", 81, 1),
                                                                        ("vanilla", 8, 1)]
    assert rows[0]["exact"] == 0.5 and rows[0]["cell"] == 15 / 40 and rows[2]["cell"] == 0.0


# ---- the tool ----------------------------------------------------------------------------------------------

def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_puzzles.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_make_puzzles_tool_end_to_end(tmp_path):
    out = tmp_path / "sudoku"
    r = _tool("sudoku", "--out", str(out), "--train", "12", "--valid", "4", "--test", "4", "--givens", "32:38",
              "--seed", "3")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "valid": 4, "test": 4} and manifest["seed"] == 3
    assert sum(manifest["grade_histogram"]["train"]["technique"].values()) == 12
    splits = {s: read_split(out / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert all(sudoku_problems(p) == [] and 32 <= p.givens <= 38 for ps in splits.values() for p in ps)
    train = {p.solution for p in splits["train"]}
    assert not train & {p.solution for p in splits["test"] + splits["valid"]}
    tok, _ = load_tokenizer(out / "tokenizer")
    record = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    assert tok.encode(record["response"], add_special_tokens=False).ids == record["tokens"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sudoku"]  # no temporary folder left

    r = _tool("zebra", "--out", str(tmp_path / "zebra"), "--houses", "3", "--attributes", "4", "--train", "8",
              "--valid", "2", "--test", "2")
    assert r.returncode == 0, r.stderr
    assert all(zebra_problems(p) == [] for p in read_split(tmp_path / "zebra" / "train.jsonl"))
    r = _tool("zebra", "--out", str(tmp_path / "zebra"), "--houses", "3", "--attributes", "4")
    assert r.returncode == 2 and "not empty" in r.stderr
    r = _tool("sudoku", "--out", str(tmp_path / "x"), "--givens", "90")
    assert r.returncode == 2 and "givens" in r.stderr and not (tmp_path / "x").exists()
