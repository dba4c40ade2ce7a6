"""The pieces of bench/puzzles.py that run without a trained model: every decoder it names is a
registered sampler, the candidate counts of its order picture, the FLOP ratio of its equal-compute
run, the table and plot it writes, and the per-stage timing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from megatron_lomdm.puzzles.sudoku import make_sudoku
from megatron_lomdm.sampling import SAMPLERS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_puzzles", ROOT / "bench" / "puzzles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decoders_are_registered_samplers(bench: ModuleType) -> None:
    for model, decoders in bench.DECODERS.items():
        assert model in bench.VARIANTS
        for _, name, _ in decoders:
            assert name in SAMPLERS


def test_candidates_count_the_digits_the_givens_leave(bench: ModuleType) -> None:
    puzzle = make_sudoku(random.Random(0), 45, 45)
    cand = bench._candidates(puzzle)
    for i in range(81):
        if puzzle.puzzle[i]:
            assert cand[i] == 0
            continue
        r, c = divmod(i, 9)
        seen = {puzzle.puzzle[j] for j in range(81) if puzzle.puzzle[j] and j != i and (
            j // 9 == r or j % 9 == c or (j // 27 == i // 27 and (j % 9) // 3 == c // 3))}
        assert cand[i] == 9 - len(seen) >= 1  # the solution's digit is always possible


def test_flop_ratio_and_table(bench: ModuleType, tmp_path: Path) -> None:
    args = argparse.Namespace(layers=3, hidden=96, batch=32)
    assert 2.0 < bench.flop_ratio(args) < 3.5  # K = 2 corruptions + a clean pass + two heads
    rows = [{"model": "mdlm", "decoder": "vanilla", "T": 4, "exact": 0.25, "cell": 0.5},
            {"model": "mdlm", "decoder": "vanilla", "T": 81, "exact": 0.5, "cell": 0.75},
            {"model": "lomdm", "decoder": "lomdm_top_margin", "T": 81, "exact": 1.0, "cell": 1.0}]
    text = bench.table(rows, [4, 81])
    assert "| mdlm | vanilla | 25.0 / 50.0 | 50.0 / 75.0 |" in text
    assert "| lomdm | lomdm_top_margin | — | 100.0 / 100.0 |" in text
    assert "top_prob" not in text  # decoders without rows are left out
    bench.plot(rows, [tmp_path / "a.png"], "title")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_timed_stage_writes_wall_and_cpu_and_the_stage_table(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "time_train.json"
    assert bench.main(["--timed", str(path), "--", sys.executable, "-c", "sum(range(10**6))"]) == 0
    cost = json.loads(path.read_text())
    assert set(cost) == {"wall_s", "cpu_s"} and cost["wall_s"] >= 0 and cost["cpu_s"] >= 0
    text = bench.stage_table({"generate": {"wall_s": 12.4, "cpu_s": 10.0}, "mdlm train": cost})
    assert text.splitlines()[:3] == ["| stage | wall (s) | CPU (s) |", "|---|---|---|", "| generate | 12 | 10 |"]
    with pytest.raises(subprocess.CalledProcessError):  # a failing stage fails the chain
        bench.timed([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.json")
