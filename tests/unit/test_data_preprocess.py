"""tools/preprocess_data.py, tools/train_tokenizer.py and the shard format (no network, CPU)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data import preprocess as preprocess_mod
from megatron_lomdm.data import shards as shards_mod
from megatron_lomdm.data import writer as writer_mod
from megatron_lomdm.data.demo_corpus import write_demo_corpus
from megatron_lomdm.data.shards import (
    check_tokenizer_compat,
    read_manifest,
    read_split,
    write_shards,
)
from megatron_lomdm.data.tokenize import (
    DocumentEncoder,
    iter_texts,
    load_tokenizer,
    train_bpe_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
FAST = {"workers": 0, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 300 kB slice of the demo corpus and a 512-token BPE trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(root / "text", max_bytes=150_000)
    train_bpe_tokenizer([root / "text"], root / "tok", vocab_size=512)
    return {"text": root / "text", "tok": root / "tok", "root": root}


def _expected_docs(
    corpus: dict[str, Path], valid_fraction: float, seed: int
) -> dict[str, list[tuple[list[int], str]]]:
    """Direct tokenization, split by the same seeded hash: (raw ids, text) per doc per split."""
    tok, _ = load_tokenizer(corpus["tok"])
    hasher = DocumentEncoder(
        tok.to_str(), json_key="text", valid_fraction=valid_fraction, seed=seed
    )
    out: dict[str, list[tuple[list[int], str]]] = {"train": [], "valid": []}
    for text in iter_texts([corpus["text"]]):
        ids = tok.encode(text, add_special_tokens=False).ids
        out["valid" if hasher.in_valid(text) else "train"].append((ids, text))
    return out


@pytest.mark.parametrize("layout,frame", [("packed", False), ("packed", True), ("padded", False)])
def test_preprocess_roundtrip(
    corpus: dict[str, Path], tmp_path: Path, layout: str, frame: bool
) -> None:
    L, vf, seed = 48, 0.2, 7
    manifest = write_shards(
        [corpus["text"]],
        tmp_path / "out",
        tokenizer=corpus["tok"],
        seq_length=L,
        layout=layout,
        valid_fraction=vf,
        seed=seed,
        shard_size_mb=0.05 if layout == "packed" else 0.01,
        frame_chunks=frame,
        **FAST,
    )
    tok = manifest.tokenizer
    bos, eos, pad = tok["bos_id"], tok["eos_id"], tok["pad_id"]
    assert (bos, eos, pad, tok["mask_id"], tok["vocab_size"]) == (1, 2, 0, 3, 512)
    assert manifest.dtype == np.uint16 and manifest["format_version"] == 1
    expected = _expected_docs(corpus, vf, seed)
    assert expected["valid"] and expected["train"]
    tokenizer, _ = load_tokenizer(corpus["tok"])
    for split, pairs in expected.items():
        docs = [ids for ids, _ in pairs]
        # byte-level BPE: the ids decode back to the exact text
        assert all(
            tokenizer.decode(ids, skip_special_tokens=False) == text for ids, text in pairs[:50]
        )
        info = manifest.split(split)
        rows = list(read_split(manifest, split))
        assert len(info["shards"]) > (1 if split == "train" else 0)
        assert info["num_samples"] == len(rows) == sum(s["num_samples"] for s in info["shards"])
        assert info["num_documents"] == len(docs)
        for row, length in rows:
            assert row.shape == (L,) and 1 <= length <= L and np.all(row[length:] == pad)
        if layout == "padded":
            want = [[bos, *ids[: L - 2], eos] for ids in docs]
            assert [row[:n].tolist() for row, n in rows] == want
            assert info["num_truncated_documents"] == sum(len(ids) > L - 2 for ids in docs)
        else:
            doc_form = (lambda ids: [*ids, eos]) if frame else (lambda ids: [bos, *ids, eos])
            want_stream = [t for ids in docs for t in doc_form(ids)]
            if frame:
                assert all(row[0] == bos and row[n - 1] == eos for row, n in rows)
                got_stream = [t for row, n in rows for t in row[1 : n - 1].tolist()]
                want = [
                    [bos, *want_stream[i : i + L - 2], eos]
                    for i in range(0, len(want_stream), L - 2)
                ]
            else:
                got_stream = [t for row, n in rows for t in row[:n].tolist()]
                want = [want_stream[i : i + L] for i in range(0, len(want_stream), L)]
            assert got_stream == want_stream
            assert all(n == L for _, n in rows[:-1])
        assert info["num_tokens"] == sum(len(w) for w in want) == sum(n for _, n in rows)
        assert info["num_tokens"] == sum(s["num_tokens"] for s in info["shards"])
    assert manifest["stats"]["num_raw_tokens"] == sum(
        len(ids) for pairs in expected.values() for ids, _ in pairs
    )


def test_preprocess_cli_parallel_deterministic(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The CLI with 2 worker processes and gzip input gives the same shards as in-process."""
    gz = tmp_path / "in" / "docs.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((corpus["text"] / "pydoc_topics.jsonl").read_bytes()))
    args = [
        "--tokenizer",
        str(corpus["tok"]),
        "--seq-length",
        "64",
        "--layout",
        "packed",
        "--valid-fraction",
        "0.1",
        "--shard-size-mb",
        "0.05",
    ]
    cmd = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        str(gz),
        "--output-dir",
        str(tmp_path / "cli"),
        "--workers",
        "2",
        "--no-progress",
        *args,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    cli = read_manifest(tmp_path / "cli")
    ref = write_shards(
        [corpus["text"] / "pydoc_topics.jsonl"],
        tmp_path / "ref",
        tokenizer=corpus["tok"],
        seq_length=64,
        layout="packed",
        valid_fraction=0.1,
        shard_size_mb=0.05,
        **FAST,
    )
    assert cli.fingerprint() == ref.fingerprint()
    assert [s["sha256"] for s in cli.split("train")["shards"]] == [
        s["sha256"] for s in ref.split("train")["shards"]
    ]
    assert cli["command"][-1] == "0.05" and cli["stats"]["workers"] == 2


def test_shards_readable_by_webdataset_and_wids(corpus: dict[str, Path], tmp_path: Path) -> None:
    import webdataset as wds
    import wids

    manifest = write_shards(
        [corpus["text"]],
        tmp_path / "out",
        tokenizer=corpus["tok"],
        seq_length=32,
        layout="padded",
        shard_size_mb=0.05,
        **FAST,
    )
    ours = [(row[:n].tolist(), n) for row, n in read_split(manifest)]
    urls = [str(p) for p in manifest.shard_paths("train")]
    streamed = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        streamed += [
            (r[:n].tolist(), int(n))
            for r, n in zip(sample["tokens.npy"], sample["lengths.npy"], strict=True)
        ]
    assert streamed == ours
    ds = wids.ShardListDataset(
        str(manifest.root / "wids-train.json"),
        cache_dir=str(tmp_path / "wids_cache"),
        transformations=[lambda s: s],
    )
    assert len(ds) == sum(s["num_blocks"] for s in manifest.split("train")["shards"])


# ---- bad input ---------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run(
    corpus: dict[str, Path], inputs: list[Path], out: Path, **kw: object
) -> shards_mod.Manifest:
    return write_shards(
        inputs, out, tokenizer=corpus["tok"], seq_length=32, layout="packed", **FAST, **kw
    )


def _assert_nothing_complete(out: Path) -> None:
    assert not out.exists()
    assert not (out.parent / f".{out.name}.incomplete").exists()


GOOD = b'{"text": "A good document."}'


def test_bad_input_malformed_json(corpus: dict[str, Path], tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, b'{"text": "unterminated'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:3: malformed JSON.*--skip-bad"):
        _run(corpus, [src], tmp_path / "out")
    _assert_nothing_complete(tmp_path / "out")


def test_bad_input_missing_field(corpus: dict[str, Path], tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "in.jsonl", [GOOD, b'{"body": "wrong key"}'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: no field 'text'"):
        _run(corpus, [src], tmp_path / "out")
    _assert_nothing_complete(tmp_path / "out")
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:1: no field 'body'"):
        _run(corpus, [src], tmp_path / "out", json_key="body")


def test_bad_input_undecodable(corpus: dict[str, Path], tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "in.jsonl", [GOOD, b'{"text": "caf\xe9"}'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: invalid UTF-8 byte 0xe9"):
        _run(corpus, [src], tmp_path / "out")
    _assert_nothing_complete(tmp_path / "out")
    txt = _write_lines(
        tmp_path / "plain.txt", [b"line one", b"line two", b"line \xff three"]
    )  # one doc per file
    with pytest.raises(ValueError, match=rf"{re.escape(str(txt))}:3: invalid UTF-8"):
        _run(corpus, [txt], tmp_path / "out")
    surrogate = _write_lines(tmp_path / "sur.jsonl", [b'{"text": "bad \\ud800 escape"}'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(surrogate))}:1: .*surrogate"):
        _run(corpus, [surrogate], tmp_path / "out")


def test_bad_input_empty(corpus: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty input"):
        _run(corpus, [empty], tmp_path / "out")
    _assert_nothing_complete(tmp_path / "out")
    blank = _write_lines(tmp_path / "blank.txt", [b"", b"   "])
    with pytest.raises(ValueError, match="empty input"):
        _run(corpus, [blank], tmp_path / "out", text_mode="line")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="empty input"):
        _run(corpus, [tmp_path / "nothing"], tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        _run(corpus, [tmp_path / "missing.jsonl"], tmp_path / "out")
    with pytest.raises(ValueError, match="matches no file"):
        _run(corpus, [str(tmp_path / "*.parquet")], tmp_path / "out")
    if importlib.util.find_spec("zstandard") is None:
        zst = tmp_path / "x.jsonl.zst"
        zst.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError, match="needs the 'zstandard' module"):
            _run(corpus, [zst], tmp_path / "out")


def test_skip_bad_counts_per_reason(corpus: dict[str, Path], tmp_path: Path) -> None:
    src = _write_lines(
        tmp_path / "in.jsonl",
        [
            GOOD,
            b"{not json",
            b'{"title": "x"}',
            b'{"text": 5}',
            b'{"text": "\xff"}',
            b"",
            b'{"text": "  "}',
            GOOD,
        ],
    )
    manifest = _run(corpus, [src], tmp_path / "out", skip_bad=True)
    stats = manifest["stats"]
    assert stats["rejected"] == {
        "blank_line": 1,
        "empty_text": 1,
        "field_not_string": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "undecodable": 1,
    }
    assert stats["num_documents"] == manifest.split("train")["num_documents"] == 2
    with pytest.raises(ValueError, match="empty input"):  # nothing good left
        _run(
            corpus,
            [_write_lines(tmp_path / "bad.jsonl", [b"{", b"[1]"])],
            tmp_path / "out2",
            skip_bad=True,
        )


def test_crash_leaves_no_complete_output(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, tmp = tmp_path / "out", tmp_path / ".out.incomplete"
    calls = {"n": 0}
    real_flush = writer_mod.SplitWriter._flush_block

    def crashing_flush(self: writer_mod.SplitWriter) -> None:
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("simulated crash")
        real_flush(self)

    # a hard crash (SIGKILL): no cleanup runs, the temporary folder stays behind
    monkeypatch.setattr(writer_mod.SplitWriter, "_flush_block", crashing_flush)
    monkeypatch.setattr(preprocess_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(corpus, [corpus["text"]], out, shard_size_mb=0.02)
    assert not out.exists() and tmp.is_dir()
    assert any(p.suffix == ".tar" for p in tmp.iterdir()) and not (tmp / "manifest.json").exists()
    with pytest.raises(ValueError, match="no manifest"):
        read_manifest(tmp)
    monkeypatch.undo()
    # a rerun restarts cleanly
    (tmp / "junk").write_text("left over")
    manifest = _run(corpus, [corpus["text"]], out, shard_size_mb=0.02)
    assert not tmp.exists() and not (out / "junk").exists()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [
        s["name"] for s in manifest.split("train")["shards"]
    ]
    assert not list(out.glob("*.tmp"))
    # a complete folder is only replaced with overwrite; a foreign folder is never written into
    with pytest.raises(ValueError, match="already holds a complete shard folder.*--overwrite"):
        _run(corpus, [corpus["text"]], out)
    again = _run(corpus, [corpus["text"]], out, overwrite=True, shard_size_mb=0.02)
    assert again.fingerprint() == manifest.fingerprint()
    assert not (tmp_path / ".out.old").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a shard folder"):
        _run(corpus, [corpus["text"]], foreign)
    assert (foreign / "notes.txt").exists()


def test_tokenizer_compat_errors(corpus: dict[str, Path], tmp_path: Path) -> None:
    manifest = _run(corpus, [corpus["text"]], tmp_path / "out")
    where = str(manifest.path)
    check_tokenizer_compat(manifest, vocab_size=512, mask_id=3, pad_id=0, seq_length=32)
    check_tokenizer_compat(tmp_path / "out", vocab_size=640)  # a padded model vocabulary is fine
    for kwargs, pattern in (
        ({"mask_id": 5}, "mask_id=5 in the config but mask_id=3 in"),
        ({"pad_id": 1}, "pad_id=1 in the config but pad_id=0 in"),
        ({"seq_length": 64}, "seq_length=64 in the config but seq_length=32 in"),
        (
            {"vocab_size": 500},
            "vocab_size=500 in the config but the shards need model_vocab_size=512",
        ),
    ):
        with pytest.raises(ValueError, match=pattern) as err:
            check_tokenizer_compat(manifest, **kwargs)
        assert where in str(err.value)


def test_tokenizer_without_mask_gets_virtual_id(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["some text to learn from"] * 10, trainer)
    tok.save(str(tmp_path / "gpt2ish.json"))
    src = _write_lines(tmp_path / "in.jsonl", [GOOD] * 4)
    manifest = write_shards(
        [src],
        tmp_path / "out",
        tokenizer=tmp_path / "gpt2ish.json",
        seq_length=16,
        layout="padded",
        **FAST,
    )
    tok_info = manifest.tokenizer
    vocab = tok_info["vocab_size"]
    assert (
        tok_info["mask_is_virtual"]
        and tok_info["mask_id"] == vocab
        and tok_info["model_vocab_size"] == vocab + 1
    )
    assert tok_info["bos_id"] == tok_info["eos_id"] == tok_info["pad_id"] == 0
    rows = list(read_split(manifest))
    assert all(row.max() < vocab for row, _ in rows)
    with pytest.raises(ValueError, match=rf"vocab_size={vocab} in the config .*virtual \[MASK\]"):
        check_tokenizer_compat(manifest, vocab_size=vocab)


def test_train_tokenizer_cli(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tok"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "train_tokenizer.py"),
        "--input",
        str(corpus["text"] / "pydoc_topics.jsonl"),
        "--vocab-size",
        "400",
        "--output",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()
    }
    tok, info = load_tokenizer(out)
    assert (info.pad_id, info.bos_id, info.eos_id, info.mask_id, info.vocab_size) == (
        0,
        1,
        2,
        3,
        400,
    )
    assert not info.mask_is_virtual
    assert 3 not in tok.encode("literal [MASK] text", add_special_tokens=False).ids
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    probe = (
        "import json,sys; from transformers import PreTrainedTokenizerFast as T; "
        "t=T.from_pretrained(sys.argv[1]);"
        "print(json.dumps([t.pad_token_id,t.bos_token_id,t.eos_token_id,t.mask_token_id,len(t),"
        "t.decode(t('Hello, world!')['input_ids'])]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [0, 1, 2, 3, 400, "Hello, world!"]
    bad = _write_lines(tmp_path / "bad.jsonl", [GOOD, b"{oops"])
    res = subprocess.run(
        [*cmd[:3], str(bad), *cmd[4:]], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and f"{bad}:2" in res.stderr


def test_demo_corpus_deterministic(tmp_path: Path) -> None:
    a = write_demo_corpus(tmp_path / "a", max_bytes=100_000)
    b = write_demo_corpus(tmp_path / "b", max_bytes=100_000)
    assert [p.name for p in a] == ["pydoc_topics.jsonl", "stdlib_docstrings.jsonl"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    for path in a:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines and all(json.loads(line)["text"].strip() for line in lines)


def test_read_manifest_rejects_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not 'megatron_lomdm.shards'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "megatron_lomdm.shards", "format_version": 99})
    )
    with pytest.raises(ValueError, match="newer"):
        read_manifest(tmp_path)
