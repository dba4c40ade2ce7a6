"""Weighted blends: realised shares, layout independence, exact resume, one tokenizer.

Ranks are simulated in one process (explicit dp_rank / dp_size), as in test_loader_sharding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lomdm.data.blend import (
    BlendLoader,
    blend_manifest,
    build_train_loader,
    valid_source,
)
from megatron_lomdm.data.demo_corpus import write_demo_corpus
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import read_manifest, write_shards
from megatron_lomdm.data.sources import SourceOptions
from megatron_lomdm.data.tokenize import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
G, SEED, L = 16, 2024, 16
WEIGHTS = {"docs": 0.5, "topics": 0.3, "tail": 0.2}
#: |realised share - weight| after STEPS global batches (sequences exact to ~1 row; tokens: packed
#: rows are full except each source's last row).
SAMPLE_TOL, TOKEN_TOL, STEPS = 1e-3, 1e-2, 300


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three packed sources of different sizes with one tokenizer, one with another tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    write_demo_corpus(root / "text", max_bytes=60_000)
    train_bpe_tokenizer([root / "text"], root / "tok", vocab_size=400)
    texts = []
    for file in sorted((root / "text").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in file.read_text().splitlines()]
    parts = {
        "docs": texts[: len(texts) // 2],
        "topics": texts[len(texts) // 2 : -20],
        "tail": texts[-20:],
    }
    out = {}
    for name, part in parts.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        write_shards(
            [root / f"{name}.jsonl"],
            root / name,
            tokenizer=root / "tok",
            seq_length=L,
            layout="packed",
            shard_size_mb=0.01,
            valid_fraction=0.1 if name == "docs" else 0.0,
            workers=0,
            progress=False,
        )
        out[name] = root / name
    train_bpe_tokenizer([root / "text"], root / "tok2", vocab_size=300)
    write_shards(
        [root / "tail.jsonl"],
        root / "other_tok",
        tokenizer=root / "tok2",
        seq_length=L,
        layout="packed",
        workers=0,
        progress=False,
    )
    out["other_tok"] = root / "other_tok"
    out["root"] = root
    return out


def _entries(sources: dict[str, Path]) -> list[dict]:
    return [{"source": str(sources[n]), "weight": w, "name": n} for n, w in WEIGHTS.items()]


def _blend(sources: dict[str, Path], *, mbs: int, dp_rank: int = 0, dp: int = 1) -> BlendLoader:
    return BlendLoader(
        _entries(sources),
        micro_batch_size=mbs,
        global_batch_size=G,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=SEED,
        source_options=SourceOptions(cache_dir=sources["root"] / "cache"),
    )


def _step(loader: BlendLoader) -> dict[str, torch.Tensor]:
    micro = loader.next_global_batch()
    return {
        k: torch.cat([m[k] for m in micro]) for k in ("tokens", "valid", "source", "sample_index")
    }


def test_blend_weights(sources: dict[str, Path]) -> None:
    """Realised sequence and token shares match the weights within SAMPLE_TOL / TOKEN_TOL; every
    batch is near-proportional; each source's rows follow its own seeded epoch order."""
    loader = _blend(sources, mbs=G)
    sizes = [s.num_samples for s in loader.sources]
    assert sizes[2] < G * STEPS * WEIGHTS["tail"]  # the small source runs through several epochs
    counts = np.zeros(3)
    tokens = np.zeros(3)
    streams: list[list[np.ndarray]] = [[], [], []]
    for _ in range(STEPS):
        src, pos = loader.global_batch_plan()
        batch = _step(loader)
        per_batch = np.bincount(batch["source"].numpy(), minlength=3)
        assert np.abs(per_batch - G * np.array(list(WEIGHTS.values()))).max() <= 1.5
        counts += per_batch
        for k in range(3):
            sel = batch["source"] == k
            tokens[k] += batch["valid"][sel].sum().item()
            streams[k].append(batch["tokens"][sel])
            assert (pos[src == k] == np.arange(counts[k] - per_batch[k], counts[k])).all()
    shares = counts / counts.sum()
    token_shares = tokens / tokens.sum()
    for k, w in enumerate(WEIGHTS.values()):
        assert abs(shares[k] - w) <= SAMPLE_TOL, (shares, WEIGHTS)
        assert abs(token_shares[k] - w) <= TOKEN_TOL, (token_shares, WEIGHTS)
    stats = loader.stats()
    for k, name in enumerate(WEIGHTS):
        assert stats[f"data/sample_share/{name}"] == pytest.approx(shares[k])
        assert stats[f"data/token_share/{name}"] == pytest.approx(token_shares[k])
    # the rows of each source are that source's own stream: epoch after epoch of its seeded order
    for k in range(3):
        single = loader.sources[k]
        got = torch.cat(streams[k])
        n = single.num_samples
        epochs = [single.epoch_order(e) for e in range(len(got) // n + 1)]
        want_idx = np.concatenate(epochs)[: len(got)]
        want, _ = single.read_samples(want_idx)
        assert torch.equal(got, torch.from_numpy(want))


def test_blend_dp_split_and_resume(sources: dict[str, Path]) -> None:
    """DP=2 slices concatenate to the DP=1 batch; a resume (mid-step, or at a step boundary under
    another DP size) continues the blend exactly."""
    reference = _blend(sources, mbs=8)
    ranks = [_blend(sources, mbs=2, dp_rank=r, dp=2) for r in range(2)]
    for _ in range(25):
        want = _step(reference)
        got = [_step(r) for r in ranks]
        for key in ("tokens", "valid", "source"):
            assert torch.equal(torch.cat([g[key] for g in got]), want[key])
        assert torch.equal(torch.cat([g["sample_index"] for g in got]), torch.arange(G))

    a = ranks[1]
    next(a)  # mid-step: micro-batch 1 of 4
    state = a.state_dict()
    assert state["kind"] == "blend" and sum(state["consumed"]) == 25 * G
    b = _blend(sources, mbs=2, dp_rank=1, dp=2)
    b.load_state_dict(json.loads(json.dumps(state)))  # plain values survive a checkpoint
    for _ in range(4 * 6 - 1):
        x, y = next(a), next(b)
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["source"], y["source"])
    assert a.consumed_global_batches == 31

    boundary = a.state_dict()
    c = _blend(sources, mbs=16)  # another DP size / micro-batch size at a step boundary
    c.load_state_dict(boundary)
    for _ in range(31 - 25):
        _step(reference)
    for _ in range(5):
        assert torch.equal(_step(c)["tokens"], _step(reference)["tokens"])

    with pytest.raises(ValueError, match="micro_batch_size=2, dp_size=2"):
        _blend(sources, mbs=16).load_state_dict(state)
    changed = BlendLoader(
        [{**e, "weight": 0.25} if e["name"] == "tail" else e for e in _entries(sources)],
        micro_batch_size=8,
        global_batch_size=G,
        dp_rank=0,
        dp_size=1,
        seed=SEED,
    )
    with pytest.raises(ValueError, match="the blend .* changed"):
        changed.load_state_dict(boundary)
    single = ShardLoader(
        sources["docs"], micro_batch_size=8, global_batch_size=G, dp_rank=0, dp_size=1, seed=SEED
    )
    with pytest.raises(ValueError, match="data.train was a blend"):
        single.load_state_dict(boundary)
    with pytest.raises(ValueError, match="single-source loader"):
        c.load_state_dict(single.state_dict())


def test_blend_checks_and_config(sources: dict[str, Path], tmp_path: Path) -> None:
    """One tokenizer across sources (the error names both); config lists build a BlendLoader."""
    from megatron_lomdm.config import load_config

    entries = [*_entries(sources)[:2], {"source": str(sources["other_tok"]), "weight": 1.0}]
    with pytest.raises(ValueError, match=r"share one tokenizer.*'docs'.*'other_tok'"):
        blend_manifest(entries)
    with pytest.raises(ValueError, match=r"share one tokenizer"):
        BlendLoader(
            entries, micro_batch_size=8, global_batch_size=G, dp_rank=0, dp_size=1, seed=SEED
        )
    assert (
        read_manifest(_entries(sources)).data == read_manifest(sources["docs"]).data
    )  # the first one
    with pytest.raises(ValueError, match=r"data\.train\[1\]\.weight: expected a number > 0"):
        load_config(
            None,
            [f"data.train=[{{source: {sources['docs']}, weight: 1}}, {{source: x, weight: -1}}]"],
        )
    with pytest.raises(ValueError, match=r"unknown key"):
        load_config(None, ["data.train=[{source: x, weight: 1, wieght: 2}]"])
    blend = ", ".join(
        f"{{source: {sources[n]}, weight: {w}, name: {n}}}" for n, w in WEIGHTS.items()
    )
    cfg = load_config(ROOT / "configs/experiments/tiny_cpu.yaml", [f"data.train=[{blend}]"])
    loader = build_train_loader(
        cfg.data,
        micro_batch_size=4,
        global_batch_size=G,
        dp_rank=0,
        dp_size=2,
        seed=SEED,
        run_dir=tmp_path,
    )
    assert isinstance(loader, BlendLoader) and loader.num_micro_batches == 2
    assert valid_source(cfg.data, tmp_path) == (sources["docs"], "valid")  # the first source's
    single = build_train_loader(
        load_config(
            ROOT / "configs/experiments/tiny_cpu.yaml", [f"data.train={sources['topics']}"]
        ).data,
        micro_batch_size=4,
        global_batch_size=G,
        dp_rank=0,
        dp_size=1,
        seed=SEED,
    )
    assert isinstance(single, ShardLoader)


def _stats_worker(rank: int, sources: dict[str, Path], init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loader = _blend(sources, mbs=4, dp_rank=rank, dp=2)
        for _ in range(12):
            loader.next_global_batch()
        stats = loader.stats(group=dist.group.WORLD, device="cpu")
        Path(f"{out}.{rank}").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_blend_stats_summed_over_dp_group(sources: dict[str, Path], tmp_path: Path) -> None:
    """stats(group=DP group) under a real 2-process gloo group equals the DP=1 loader's shares."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "stats")
    mp.spawn(_stats_worker, args=(sources, str(tmp_path / "init"), out), nprocs=2, join=True)
    reference = _blend(sources, mbs=G)
    for _ in range(12):
        reference.next_global_batch()
    want = reference.stats()
    for rank in range(2):
        got = json.loads(Path(f"{out}.{rank}").read_text())
        assert got == pytest.approx(want), rank
