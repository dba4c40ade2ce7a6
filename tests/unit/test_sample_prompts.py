"""Bad prompt records for ``tools/sample.py --prompts FILE.jsonl`` (issue 19 §1): a ``file:line``
error for malformed JSON, a missing (or non-string) field and a prompt that leaves nothing to
generate, before any sampling. (The CLI's exit code 2 on such a file is checked end to end by
tests/integration/test_eval_sample.py::test_sample_cli_prompts.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lomdm.apps.judges import RunTokenizer
from megatron_lomdm.apps.sample import file_prompt_ids, read_prompts
from megatron_lomdm.data.tokenize import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer: Path) -> RunTokenizer:
    tokenizer, info = load_tokenizer(tiny_tokenizer)
    return RunTokenizer(tokenizer, info.to_dict())


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_good_prompts_are_bos_plus_their_ids(tok: RunTokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.jsonl", [json.dumps({"q": "The module"}), "", json.dumps({"q": "A"})])
    texts, ids = file_prompt_ids(path, "q", tok, seq_length=32)
    bos = tok.info["bos_id"]
    assert texts == ["The module", "A"]
    assert ids == [[bos, *tok.encode("The module")], [bos, *tok.encode("A")]]
    assert file_prompt_ids(path, "q", tok, seq_length=32, max_prompts=1)[0] == ["The module"]


@pytest.mark.parametrize(("line", "message"), [
    ('{"q": "fine"', "malformed JSON"),
    ('{"other": "x"}', "no string field 'q' (--prompt-key)"),
    ('{"q": 7}', "no string field 'q' (--prompt-key)"),
    ('["q"]', "no string field 'q' (--prompt-key)"),
])
def test_bad_record_is_a_file_line_error(line: str, message: str, tok: RunTokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"q": "ok"}), line])
    with pytest.raises(ValueError) as err:
        file_prompt_ids(path, "q", tok, seq_length=32)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), err.value
    with pytest.raises(ValueError, match=f"^{path}:2: "):
        read_prompts(path, "q")


def test_prompt_longer_than_the_row_is_a_file_line_error(tok: RunTokenizer, tmp_path: Path) -> None:
    long_text = " ".join(["module"] * 40)
    assert len(tok.encode(long_text)) + 1 >= 32
    path = _write(tmp_path / "long.jsonl", [json.dumps({"q": "ok"}), "", json.dumps({"q": long_text})])
    with pytest.raises(ValueError) as err:
        file_prompt_ids(path, "q", tok, seq_length=32)
    assert str(err.value).startswith(f"{path}:3: the prompt has ") and "nothing left to generate" in str(err.value)
    # exactly one position left is fine; none is not
    fits = " ".join(["module"] * 3)
    n = len(tok.encode(fits)) + 1
    path = _write(tmp_path / "edge.jsonl", [json.dumps({"q": fits})])
    assert file_prompt_ids(path, "q", tok, seq_length=n + 1)[1][0][-1] == tok.encode(fits)[-1]
    with pytest.raises(ValueError, match=f"^{path}:1: the prompt has {n} tokens"):
        file_prompt_ids(path, "q", tok, seq_length=n)


def test_file_without_prompts(tok: RunTokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no prompt"):
        file_prompt_ids(path, "q", tok, seq_length=32)
