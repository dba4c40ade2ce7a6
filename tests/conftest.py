"""Shared fixtures: a tiny tokenizer and tiny shard folders built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic ~200 KB prefix of the demo corpus (Python's bundled documentation)."""
    from megatron_lomdm.data.demo_corpus import write_demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(out, max_bytes=100_000)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token byte-level BPE trained on the tiny corpus (bos/eos/pad/mask specials)."""
    from megatron_lomdm.data.tokenize import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([tiny_corpus], out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_corpus: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packed length-32 shards with a valid split, small shards so there are several."""
    from megatron_lomdm.data.shards import write_shards

    out = tmp_path_factory.mktemp("data") / "shards"
    write_shards([tiny_corpus], out, tokenizer=tiny_tokenizer, seq_length=32, layout="packed", workers=0,
                 valid_fraction=0.05, shard_size_mb=0.05, progress=False)
    return out
