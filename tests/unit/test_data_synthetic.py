"""Synthetic order tasks: the rows follow the task's law, both layouts hold the same rows, the word
tokenizer maps one symbol to one token, and the generator's files are what preprocessing needs."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_lomdm.data.synthetic import iter_rows, make_task, write_task
from megatron_lomdm.data.tokenize import load_tokenizer, save_word_tokenizer
from megatron_lomdm.sampling.metrics import order_agreement

ROOT = Path(__file__).resolve().parents[2]


def test_pairs_rows_follow_the_table_and_layouts_swap_the_parts():
    task = make_task("pairs", seed=3)
    ab = list(iter_rows(task, 50, seed=7, layout="ab"))
    ba = list(iter_rows(task, 50, seed=7, layout="ba"))
    for row_ab, row_ba in zip(ab, ba):
        words = row_ab.split()
        x = [int(w[1:]) for w in words[:12]]
        y = [int(w[1:]) for w in words[12:]]
        assert all(w.startswith("a") for w in words[:12]) and all(w.startswith("b") for w in words[12:])
        assert y == [task.table[x[i]][x[(i + 1) % 12]] for i in range(12)]
        assert row_ba.split() == words[12:] + words[:12]


def test_pairs_table_is_many_to_one_and_balanced():
    task = make_task("pairs", seed=0)
    counts = Counter(v for row in task.table for v in row)
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1
    assert task.entropy_per_row == pytest.approx(12 * math.log(8))


def test_pairs_y_has_the_lower_marginal_entropy():
    """The task is built so that confidence-first decoding would start from the derived part."""
    task = make_task("pairs", seed=0)
    rng = random.Random(0)
    xs, ys = Counter(), Counter()
    for _ in range(4000):
        a, b = task.draw(rng)
        xs.update(a)
        ys.update(b)

    def entropy(c: Counter) -> float:
        n = sum(c.values())
        return -sum(v / n * math.log(v / n) for v in c.values())

    assert entropy(ys) < entropy(xs) - 0.3


def test_codebook_row_is_a_function_of_the_key():
    task = make_task("codebook", seed=1, n=2, a_vocab=4, b_vocab=3, row_len=6)
    seen: dict[tuple, tuple] = {}
    for row in iter_rows(task, 200, seed=0, layout="ab"):
        words = row.split()
        key, rest = tuple(words[:2]), tuple(words[2:])
        assert seen.setdefault(key, rest) == rest
    assert len(seen) > 8  # many keys drawn


def test_bad_task_settings_name_the_problem():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="y_vocab"):
        make_task("pairs", n=4, a_vocab=2, b_vocab=4)
    with pytest.raises(ValueError, match="layout"):
        list(iter_rows(make_task("pairs"), 1, seed=0, layout="xy"))


def test_word_tokenizer_one_token_per_symbol(tmp_path):
    tok, info = load_tokenizer(save_word_tokenizer(["a0", "a1", "b0"], tmp_path / "tok"))
    assert (info.pad_id, info.bos_id, info.eos_id, info.mask_id) == (0, 1, 2, 3)
    assert tok.encode("a1 b0 a0", add_special_tokens=False).ids == [5, 6, 4]
    assert tok.decode([5, 6, 4]) == "a1 b0 a0"
    with pytest.raises(ValueError, match="symbols"):
        save_word_tokenizer(["a0", "a0"], tmp_path / "bad")


def test_generator_cli_writes_what_preprocessing_needs(tmp_path):
    out = tmp_path / "pairs"
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--task", "pairs", "--rows", "64", "--layout", "ba",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    info = json.loads((out / "task.json").read_text())
    assert info["seq_length"] == 26 and info["positions_b"] == list(range(1, 13))
    assert info["entropy_per_token_nats"] == pytest.approx(12 * math.log(8) / 26)
    assert len((out / "rows.jsonl").read_text().splitlines()) == 64
    info_ab = write_task(make_task("pairs"), tmp_path / "ab", num_rows=64, seed=0, layout="ab")
    assert info_ab["positions_a"] == list(range(1, 13))
    assert not list(out.glob("*.tmp"))


def test_order_agreement_counts_pairs_and_ties():
    steps_BL = torch.tensor([[0, 0, 1, 1],   # group A strictly first
                             [1, 1, 0, 0],   # B first
                             [0, 1, 0, 1]])  # ties and one of each
    agree = order_agreement(steps_BL, [0, 1], [2, 3])
    assert agree.tolist() == [1.0, 0.0, 0.5]
