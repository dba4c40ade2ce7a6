"""Pre-tokenized records (``--ids-key``/``--cond-key``): in-place puzzle rows with their givens
conditioned, straight from tools/make_puzzles.py's JSONL; bad records name file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import write_shards
from megatron_lomdm.data.tokenize import load_tokenizer, save_word_tokenizer
from megatron_lomdm.puzzles.dataset import SudokuSpec, read_split, write_dataset
from megatron_lomdm.puzzles.format import encode

REPO = Path(__file__).resolve().parents[2]
FAST = {"workers": 0, "progress": False}


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pz") / "sudoku"
    write_dataset(SudokuSpec(40, 45), out, {"train": 12, "valid": 4, "test": 4}, 0,
                  save_tokenizer=save_word_tokenizer)
    return out


def _write(inputs: list[Path], out: Path, tok: Path, **kw: object):
    return write_shards(inputs, out, tokenizer=tok, seq_length=83, layout="padded", ids_key="tokens",
                        cond_key="cond", **FAST, **kw)


def test_puzzle_rows_in_place(sudoku: Path, tmp_path: Path) -> None:
    manifest = _write([sudoku / "train.jsonl", sudoku / "valid.jsonl"], tmp_path / "out", sudoku / "tokenizer",
                      valid_last_documents=4)
    assert manifest.conditioned and manifest["pretokenized"] == {"ids_key": "tokens", "cond_key": "cond"}
    _, info = load_tokenizer(sudoku / "tokenizer")
    for split, name in (("train", "train.jsonl"), ("valid", "valid.jsonl")):
        loader = ShardLoader(tmp_path / "out", split=split, micro_batch_size=4, global_batch_size=4, dp_rank=0,
                             dp_size=1, seed=0, shuffle=False, num_epochs=1)
        tokens, lengths, cond = loader.read_rows(np.arange(loader.num_samples, dtype=np.int64))
        loader.close()
        puzzles = read_split(sudoku / name)
        assert len(puzzles) == len(tokens)
        for row, given, puzzle in zip(tokens, cond, puzzles):
            ids, c = encode(puzzle)
            assert row[0] == info.bos_id and row[82] == info.eos_id and row[1:82].tolist() == ids
            assert given[0] and not given[82]  # [BOS] given, [EOS] generated (as for prompt records)
            assert given[1:82].tolist() == c and int(given[1:82].sum()) == puzzle.givens
        assert (lengths == 83).all()


@pytest.mark.parametrize("record, reason", [
    ({"tokens": [5, 6]}, "missing_field"),
    ({"tokens": [5, "x"], "cond": [1, 0]}, "bad_ids"),
    ({"tokens": [5, 999], "cond": [1, 0]}, "bad_ids"),
    ({"tokens": [5, 6], "cond": [1]}, "bad_cond"),
    ({"tokens": [5, 6], "cond": [1, 2]}, "bad_cond"),
    ({"tokens": [5] * 82, "cond": [0] * 82}, "record_too_long"),
    ({"tokens": [5, 6], "cond": [1, 1]}, "nothing_to_generate"),
])
def test_bad_records_name_file_and_line(sudoku: Path, tmp_path: Path, record: dict, reason: str) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"tokens": [5, 6, 7], "cond": [1, 0, 0]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*\[{reason}\]"):
        _write([src], tmp_path / "out", sudoku / "tokenizer")
    manifest = _write([src], tmp_path / "skip", sudoku / "tokenizer", skip_bad=True)
    assert manifest["stats"]["rejected"] == {reason: 1} and manifest["splits"]["train"]["num_samples"] == 1


def test_cli_pretokenized_and_refusals(sudoku: Path, tmp_path: Path) -> None:
    base = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(sudoku / "train.jsonl"),
            "--tokenizer", str(sudoku / "tokenizer"), "--seq-length", "83", "--workers", "0", "--no-progress"]
    ok = subprocess.run([*base, "--layout", "padded", "--ids-key", "tokens", "--output-dir", str(tmp_path / "a")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]["train"]["num_cond_tokens"] > 12
    packed = subprocess.run([*base, "--layout", "packed", "--ids-key", "tokens", "--output-dir", str(tmp_path / "b")],
                            capture_output=True, text=True)
    assert packed.returncode == 2 and "--layout padded" in packed.stderr
    both = subprocess.run([*base, "--layout", "padded", "--ids-key", "tokens", "--prompt-key", "prompt",
                           "--output-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert both.returncode == 2 and "not both" in both.stderr
