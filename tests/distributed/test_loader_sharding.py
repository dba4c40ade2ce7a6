"""ShardLoader: layout-independent global batches, DP slicing, epochs and exact resume.

Ranks are simulated in one process by constructing loaders with explicit dp_rank/dp_size, as the
trainer does with the DP rank from megatron parallel_state.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lomdm.data.demo_corpus import write_demo_corpus
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import read_split, write_shards
from megatron_lomdm.data.tokenize import train_bpe_tokenizer

G, SEED = 16, 1234


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Packed (many small shards) and padded shard folders from a slice of the demo corpus."""
    root = tmp_path_factory.mktemp("loader")
    write_demo_corpus(root / "text", max_bytes=60_000)
    train_bpe_tokenizer([root / "text"], root / "tok", vocab_size=400)
    common = {"tokenizer": root / "tok", "workers": 0, "progress": False, "valid_fraction": 0.1}
    write_shards(
        [root / "text"],
        root / "packed",
        seq_length=16,
        layout="packed",
        shard_size_mb=0.01,
        **common,
    )
    write_shards(
        [root / "text"],
        root / "padded",
        seq_length=24,
        layout="padded",
        shard_size_mb=0.005,
        **common,
    )
    return {"packed": root / "packed", "padded": root / "padded", "root": root}


def _loader(
    path: Path, *, mbs: int, dp_rank: int = 0, dp: int = 1, seed: int = SEED, **kw: object
) -> ShardLoader:
    return ShardLoader(
        path,
        micro_batch_size=mbs,
        global_batch_size=G,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=seed,
        **kw,
    )


def _step(loader: ShardLoader) -> list[dict]:
    """One optimizer step's micro-batches of one rank."""
    return loader.next_global_batch()


def _cat(micro: list[dict], key: str) -> torch.Tensor:
    return torch.cat([m[key] for m in micro])


def test_loader_dp_split(data: dict[str, Path]) -> None:
    """DP2 x TP2 (4 ranks), DP4 and DP1 see the same global batches, sliced by DP rank."""
    path = data["packed"]
    reference = _loader(path, mbs=4)  # DP=1: 4 micro-batches of 4
    tp, dp = 2, 2
    ranks = [_loader(path, mbs=2, dp_rank=r // tp, dp=dp) for r in range(tp * dp)]  # TP inner
    dp4 = [_loader(path, mbs=4, dp_rank=r, dp=4) for r in range(4)]  # 1 micro-batch each
    assert (
        reference.num_micro_batches == 4
        and ranks[0].num_micro_batches == 4
        and dp4[0].num_micro_batches == 1
    )
    steps = reference.batches_per_epoch + 3  # crosses an epoch boundary
    for g in range(steps):
        ref = _step(reference)
        assert [m["global_batch"] for m in ref] == [g] * 4
        want_idx = reference.global_batch_indices(g)
        got = [_step(r) for r in ranks]
        for r in range(0, tp * dp, tp):  # TP peers identical
            for a, b in zip(got[r], got[r + 1], strict=True):
                assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(
                    a["sample_index"], b["sample_index"]
                )
        dp_slices = [got[r] for r in range(0, tp * dp, tp)]
        idx = [set(_cat(s, "sample_index").tolist()) for s in dp_slices]
        assert idx[0].isdisjoint(idx[1]) and idx[0] | idx[1] == set(range(G))
        for d, s in enumerate(dp_slices):  # contiguous slice [d G/dp, (d+1) G/dp)
            assert _cat(s, "sample_index").tolist() == list(range(d * G // dp, (d + 1) * G // dp))
        assert torch.equal(torch.cat([_cat(s, "tokens") for s in dp_slices]), _cat(ref, "tokens"))
        assert torch.equal(torch.cat([_cat(s, "valid") for s in dp_slices]), _cat(ref, "valid"))
        assert torch.equal(torch.cat([_cat(_step(x), "tokens") for x in dp4]), _cat(ref, "tokens"))
        rows, _ = reference.read_samples(want_idx)
        assert torch.equal(_cat(ref, "tokens"), torch.from_numpy(rows))
    m = ref[0]
    assert (
        m["tokens"].dtype == torch.int64
        and m["valid"].dtype == torch.bool
        and m["sample_index"].dtype == torch.int64
    )
    assert m["tokens"].shape == (4, 16) and m["epoch"] == 1


def test_loader_epochs_and_order(data: dict[str, Path]) -> None:
    path = data["packed"]
    loader = _loader(path, mbs=8)
    n, per_epoch = loader.num_samples, loader.batches_per_epoch
    assert per_epoch == n // G and len(loader.manifest.split("train")["shards"]) >= 8
    for epoch in (0, 1):
        seen = np.concatenate(
            [loader.global_batch_indices(epoch * per_epoch + b) for b in range(per_epoch)]
        )
        assert (
            len(set(seen.tolist())) == len(seen) == per_epoch * G
        )  # no repeats; the remainder is dropped
        assert np.array_equal(np.sort(loader.epoch_order(epoch)), np.arange(n))
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    assert np.array_equal(loader.epoch_order(1), _loader(path, mbs=4).epoch_order(1))
    assert not np.array_equal(
        loader.epoch_order(0), _loader(path, mbs=8, seed=SEED + 1).epoch_order(0)
    )
    assert np.array_equal(_loader(path, mbs=8, shuffle=False).epoch_order(3), np.arange(n))
    # window shuffle: each window of shards is a contiguous stretch of the order
    local = _loader(path, mbs=8, shuffle_window_shards=2)
    starts = local._shard_start
    shard_of = np.searchsorted(starts, local.epoch_order(0), side="right") - 1
    counts, s0 = np.diff(starts), int(shard_of[0])
    assert any(
        set(shard_of[: counts[s0] + counts[s1]].tolist()) == {s0, s1}
        for s1 in range(len(counts))
        if s1 != s0
    )
    with pytest.raises(ValueError, match="not a multiple"):
        _loader(path, mbs=3, dp=2)
    with pytest.raises(ValueError, match=r"dp_rank=2 is not in \[0, dp_size=2\)"):
        _loader(path, mbs=2, dp_rank=2, dp=2)
    with pytest.raises(ValueError, match="no split 'test'"):
        _loader(path, mbs=2, split="test")


def test_loader_resume_exact(data: dict[str, Path], tmp_path: Path) -> None:
    path = data["packed"]
    run = _loader(path, mbs=2, dp_rank=1, dp=2)
    k = run.batches_per_epoch - 2  # resume shortly before an epoch boundary
    for _ in range(k):
        _step(run)
    state = copy.deepcopy(run.state_dict())
    assert (
        state["consumed_global_batches"] == k and state["micro_batch"] == 0 and state["epoch"] == 0
    )
    torch.save(state, tmp_path / "state.pt")
    cont = [_step(run) for _ in range(5)]
    resumed = _loader(path, mbs=2, dp_rank=1, dp=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    again = [_step(resumed) for _ in range(5)]
    for a_step, b_step in zip(cont, again, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            assert a["global_batch"] == b["global_batch"]
            for key in ("tokens", "valid", "sample_index"):
                assert torch.equal(a[key], b[key])
    assert resumed.state_dict() == run.state_dict() and resumed.epoch == 1
    # the same position under another layout (DP=1, other micro-batch size): same global batches
    single = _loader(path, mbs=8)
    single.load_state_dict(state)
    dp1 = [_cat(_step(single), "tokens") for _ in range(5)]
    for g in range(5):
        assert torch.equal(dp1[g][G // 2 :], _cat(cont[g], "tokens"))
    # mid-step positions are exact too (same layout only)
    mid = _loader(path, mbs=2, dp_rank=1, dp=2)
    mid.load_state_dict(state)
    next(mid)
    mid_state = mid.state_dict()
    other = _loader(path, mbs=2, dp_rank=1, dp=2)
    other.load_state_dict(mid_state)
    assert torch.equal(next(other)["tokens"], next(mid)["tokens"])
    with pytest.raises(ValueError, match="mid-step"):
        _loader(path, mbs=4, dp_rank=1, dp=2).load_state_dict(mid_state)
    # refusals: other data, other seed, other global batch size
    with pytest.raises(ValueError, match="fingerprint .* the data changed"):
        _loader(data["padded"], mbs=2, dp_rank=1, dp=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1234 but this loader has seed=1"):
        _loader(path, mbs=2, dp_rank=1, dp=2, seed=1).load_state_dict(state)
    with pytest.raises(
        ValueError, match="global_batch_size=16 but this loader has global_batch_size=32"
    ):
        ShardLoader(
            path, micro_batch_size=2, global_batch_size=32, dp_rank=0, dp_size=2, seed=SEED
        ).load_state_dict(state)


def test_loader_padded_valid_split_single_pass(data: dict[str, Path]) -> None:
    """drop_last=False + num_epochs=1 covers every valid sample once; filler rows are invalid."""
    path = data["padded"]
    stored = list(read_split(path, "valid"))
    loaders = [
        _loader(
            path,
            mbs=4,
            dp_rank=r,
            dp=2,
            split="valid",
            shuffle=False,
            drop_last=False,
            num_epochs=1,
        )
        for r in range(2)
    ]
    assert loaders[0].batches_per_epoch == -(-len(stored) // G)
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for loader in loaders:
        for micro in loader:
            for i, pos in enumerate(micro["sample_index"].tolist()):
                rows[micro["global_batch"] * G + pos] = (micro["tokens"][i], micro["valid"][i])
    assert sorted(rows) == list(range(loaders[0].batches_per_epoch * G))
    for j, (tokens, valid) in rows.items():
        if j < len(stored):
            row, length = stored[j]
            assert valid.sum() == length and bool(valid[:length].all())
            assert tokens.tolist() == row.astype(np.int64).tolist()
        else:
            assert not valid.any()
    with pytest.raises(StopIteration):
        next(loaders[0])
