"""Conditioned shards (issue 19 §1): prompt/response JSONL -> padded rows with a conditioning
mask; the loader's ``cond`` member; old shards read as unconditioned; bad prompt records."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data.format import COND_MEMBER, pack_cond, unpack_cond
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import write_shards
from megatron_lomdm.data.tokenize import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
FAST = {"workers": 0, "progress": False}
L = 32

PAIRS = [
    {"question": "What is 2 + 2?", "answer": "Four."},
    {"question": "", "answer": "An unconditioned record."},
    {"question": "Name a colour.", "answer": "Blue, or perhaps a very long answer " * 4},
    {"question": "Say hi.", "answer": "hi"},
]


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _write(src: Path, out: Path, tok: Path, **kw: object):
    return write_shards([src], out, tokenizer=tok, seq_length=L, layout="padded", prompt_key="question",
                        response_key="answer", **FAST, **kw)


def test_pack_cond_roundtrip() -> None:
    cond = np.random.default_rng(0).random((5, 13)) < 0.5
    assert pack_cond(cond).shape == (5, 2)
    assert np.array_equal(unpack_cond(pack_cond(cond), 13), cond)


def test_prompt_response_rows_and_loader(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    manifest = _write(src, tmp_path / "out", tiny_tokenizer)
    assert manifest.conditioned and manifest["format_version"] == 2
    assert COND_MEMBER in manifest["sample_format"]["members"]
    tok, info = load_tokenizer(tiny_tokenizer)
    loader = ShardLoader(tmp_path / "out", micro_batch_size=4, global_batch_size=4, dp_rank=0, dp_size=1,
                         seed=0, shuffle=False)
    batch = next(iter(loader))
    tokens, valid, cond = batch["tokens"].numpy(), batch["valid"].numpy(), batch["cond"].numpy()
    assert not (cond & ~valid).any()
    for row, rec in enumerate(PAIRS):
        prompt = tok.encode(rec["question"], add_special_tokens=False).ids
        response = tok.encode(rec["answer"], add_special_tokens=False).ids
        n_cond = 1 + len(prompt)  # [BOS] + prompt
        assert cond[row].tolist() == [True] * n_cond + [False] * (L - n_cond)
        assert tokens[row, 0] == info.bos_id and tokens[row, 1:n_cond].tolist() == prompt
        n = int(valid[row].sum())
        assert tokens[row, n - 1] == info.eos_id
        assert tokens[row, n_cond:n - 1].tolist() == response[: n - 1 - n_cond]  # truncated, EOS kept
    assert manifest.split("train")["num_truncated_documents"] == 1
    assert manifest.split("train")["num_cond_tokens"] == int(cond.sum())


def test_old_shards_read_unconditioned(tiny_shards: Path) -> None:
    loader = ShardLoader(tiny_shards, micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    batch = next(iter(loader))
    assert batch["cond"].shape == batch["tokens"].shape and not batch["cond"].any()


def test_packed_layout_refused(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ValueError, match="need --layout padded"):
        write_shards([src], tmp_path / "out", tokenizer=tiny_tokenizer, seq_length=L, layout="packed",
                     prompt_key="question", response_key="answer", **FAST)


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"answer": "no prompt"}, "no field 'question'"),
        ({"question": "q"}, "no field 'answer'"),
        ({"question": "q", "answer": "  "}, "field 'answer' is empty"),
        ({"question": "long prompt " * 40, "answer": "a"}, r"the prompt has \d+ tokens; a row leaves room for 29"),
    ],
)
def test_bad_prompt_records_name_file_and_line(tiny_tokenizer: Path, tmp_path: Path, record: dict,
                                              reason: str) -> None:
    src = _jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], record, PAIRS[3]])
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: {reason}.*--skip-bad"):
        _write(src, tmp_path / "out", tiny_tokenizer)
    assert not (tmp_path / "out").exists()


def test_bad_prompt_records_skipped_and_counted(tiny_tokenizer: Path, tmp_path: Path) -> None:
    bad = [{"answer": "x"}, {"question": "q", "answer": ""}, {"question": "long prompt " * 40, "answer": "a"}]
    src = _jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], *bad, PAIRS[3]])
    manifest = _write(src, tmp_path / "out", tiny_tokenizer, skip_bad=True)
    assert manifest["stats"]["rejected"] == {"empty_response": 1, "missing_field": 1, "prompt_too_long": 1}
    assert manifest.split("train")["num_samples"] == 2


def test_cli_prompt_key_and_non_jsonl_refused(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    base = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--tokenizer", str(tiny_tokenizer),
            "--seq-length", str(L), "--layout", "padded", "--workers", "0", "--no-progress",
            "--prompt-key", "question", "--response-key", "answer"]
    ok = subprocess.run([*base, "--input", str(src), "--output-dir", str(tmp_path / "out")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["conditioned"] is True
    txt = tmp_path / "plain.txt"
    txt.write_text("not records\n")
    bad = subprocess.run([*base, "--input", str(txt), "--output-dir", str(tmp_path / "out2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a JSONL file" in bad.stderr and "Traceback" not in bad.stderr


def test_worker_processes_and_valid_last_docs_keep_the_masks(tiny_tokenizer: Path, tmp_path: Path) -> None:
    """The encoder in a worker process and the held-back valid split carry the prompt lengths."""
    src = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    one = _write(src, tmp_path / "inproc", tiny_tokenizer, valid_last_documents=1)
    two = write_shards([src], tmp_path / "pool", tokenizer=tiny_tokenizer, seq_length=L, layout="padded",
                       prompt_key="question", response_key="answer", workers=1, progress=False,
                       valid_last_documents=1)
    for split in ("train", "valid"):
        assert one.split(split)["shards"][0]["sha256"] == two.split(split)["shards"][0]["sha256"]
    loader = ShardLoader(tmp_path / "pool", split="valid", micro_batch_size=1, global_batch_size=1, dp_rank=0,
                         dp_size=1, seed=0, shuffle=False)
    cond = next(iter(loader))["cond"][0]
    tok, _ = load_tokenizer(tiny_tokenizer)
    assert int(cond.sum()) == 1 + len(tok.encode(PAIRS[-1]["question"], add_special_tokens=False).ids)
