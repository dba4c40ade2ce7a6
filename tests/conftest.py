"""Shared fixtures: a tiny tokenizer and tiny shard folders built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LONGEST_FIRST = ("test_readme_commands.py", "test_slurm.py", "test_parity_megatron.py", "test_hf_export.py",
                 "test_parity_deepspeed.py", "test_loop_robustness.py", "test_eval_sample.py", "test_train_cli.py",
                 "test_mlflow_dashboard.py", "test_mlflow_server.py", "test_run_dir_faults.py", "test_zygote.py")
"""The suite's longest files, by worker-seconds in a fresh-clone run (README, Development)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first. Under `make test` (pytest-xdist, --dist loadfile) each worker takes whole
    files in collection order, so a long file collected late would run alone at the end while the
    other workers idle. The order inside each file, and of all other files, is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture(scope="session")
def tiny_cond_shards(tiny_corpus: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conditioned padded length-32 shards (prompt/response records cut from the tiny corpus's
    lines: the first words are the prompt), a valid split, small shards so there are several."""
    import json

    from megatron_lomdm.data.shards import write_shards
    from megatron_lomdm.data.tokenize import iter_texts

    root = tmp_path_factory.mktemp("cond_data")
    records = []
    for doc in iter_texts([tiny_corpus]):
        for line in doc.splitlines():
            words = line.split()
            if len(words) >= 4:
                cut = min(len(words) // 3 + 1, 6)
                records.append({"prompt": " ".join(words[:cut]), "response": " " + " ".join(words[cut:])})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "shards"
    write_shards([root / "pairs.jsonl"], out, tokenizer=tiny_tokenizer, seq_length=32, layout="padded", workers=0,
                 valid_fraction=0.05, shard_size_mb=0.05, progress=False, prompt_key="prompt", skip_bad=True)
    return out
