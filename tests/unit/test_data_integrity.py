"""Local shards are checked against their manifest (size, sha256, row lengths, token ids,
padding); bad shards fail fast naming the shard; skipping every shard stops the loader (CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data.demo_corpus import write_demo_corpus
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import ShardDataError, ShardFile, read_manifest, write_shards
from megatron_lomdm.data.sources import NoDataError, SourceOptions
from megatron_lomdm.data.tokenize import train_bpe_tokenizer

L = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packed length-16 shards over a 400-token vocabulary, a few small shards."""
    root = tmp_path_factory.mktemp("integrity")
    write_demo_corpus(root / "text", max_bytes=30_000)
    train_bpe_tokenizer([root / "text"], root / "tok", vocab_size=400)
    write_shards(
        [root / "text"],
        root / "shards",
        tokenizer=root / "tok",
        seq_length=L,
        layout="packed",
        shard_size_mb=0.01,
        workers=0,
        progress=False,
    )
    return root / "shards"


def _copy(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def _loader(folder: Path, *, skip: bool = False, retries: int = 3, **kw: object) -> ShardLoader:
    options = SourceOptions(retries=retries, retry_wait_s=1.0, skip_bad_shards=skip)
    return ShardLoader(
        folder,
        micro_batch_size=4,
        global_batch_size=8,
        dp_rank=0,
        dp_size=1,
        seed=3,
        source_options=options,
        **kw,  # type: ignore[arg-type]
    )


def _epoch(loader: ShardLoader) -> int:
    """Read one epoch; the real tokens seen."""
    batches = (loader.next_global_batch() for _ in range(loader.batches_per_epoch))
    return sum(int(m["valid"].sum()) for micro in batches for m in micro)


def _edit(folder: Path, shard: int, edit: object, *, fix_manifest: bool) -> Path:
    """Apply ``edit(raw bytearray, ShardFile)`` to a shard; optionally make the manifest agree
    (sha256 and size) so that only the row checks can notice."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][shard]
    path = folder / entry["name"]
    reader = ShardFile(path, dtype=np.dtype(manifest["dtype"]), seq_length=L)
    raw = bytearray(path.read_bytes())
    edit(raw, reader)  # type: ignore[operator]
    reader.close()
    path.write_bytes(bytes(raw))
    if fix_manifest:
        entry["sha256"], entry["bytes"] = hashlib.sha256(raw).hexdigest(), len(raw)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return path


def _set_length(row: int, value: int):  # noqa: ANN202
    def edit(raw: bytearray, reader: ShardFile) -> None:
        offset = int(reader.lengths_offset[0]) + 4 * row  # rows of block 0
        raw[offset : offset + 4] = np.int32(value).tobytes()

    return edit


def _set_token(row: int, position: int, value: int):  # noqa: ANN202
    def edit(raw: bytearray, reader: ShardFile) -> None:
        offset = int(reader.tokens_offset[0]) + 2 * (row * L + position)  # uint16
        raw[offset : offset + 2] = np.uint16(value).tobytes()

    return edit


def test_flipped_byte_fails_on_digest(shards: Path, tmp_path: Path) -> None:
    """A flipped byte in a length (any byte) is caught by the sha256 at the first open."""
    folder = _copy(shards, tmp_path)
    path = _edit(folder, 0, _set_length(1, L - 3), fix_manifest=False)
    entry = read_manifest(folder).split("train")["shards"][0]
    with pytest.raises(ShardDataError, match=rf"{path}: sha256 [0-9a-f]+ but the manifest") as info:
        _epoch(_loader(folder))
    assert entry["sha256"] in str(info.value) and str(entry["bytes"]) in str(info.value)


def test_truncated_local_shard_fails_fast(shards: Path, tmp_path: Path) -> None:
    """No network-style retries for a local file: one attempt, an error with the expected size."""
    folder = _copy(shards, tmp_path)
    entry = read_manifest(folder).split("train")["shards"][1]
    path = folder / entry["name"]
    path.write_bytes(path.read_bytes()[:1000])
    start = time.perf_counter()
    with pytest.raises(ShardDataError) as info:
        _epoch(_loader(folder, retries=3))  # retry_wait_s=1: a retry would take >= 1 s
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert f"{path}: 1000 bytes but the manifest" in message
    assert f"says {entry['bytes']} bytes, sha256 {entry['sha256']}" in message
    path.unlink()
    with pytest.raises(ShardDataError, match=rf"shard {path}: cannot be read"):
        _epoch(_loader(folder))


def test_row_checks_name_shard_row_and_value(shards: Path, tmp_path: Path) -> None:
    """With a manifest that agrees with the bytes, the row checks still catch bad content."""
    folder = _copy(shards, tmp_path)
    path = _edit(folder, 0, _set_token(2, 5, 999), fix_manifest=True)
    with pytest.raises(
        ShardDataError,
        match=rf"{path}: row 2 \(sample 0000000000, row 2 of its block\) holds token id 999 at "
        r"position 5, outside the manifest's vocab_size=400",
    ):
        _epoch(_loader(folder, shuffle=False))

    folder = _copy(shards, tmp_path / "b")
    path = _edit(folder, 0, _set_length(3, 1000), fix_manifest=True)
    with pytest.raises(ShardDataError, match=rf"{path}: row 3 .* has length 1000, outside"):
        _epoch(_loader(folder))

    folder = _copy(shards, tmp_path / "c")
    path = _edit(folder, 0, _set_length(1, L - 3), fix_manifest=True)
    with pytest.raises(ShardDataError, match=rf"{path}: its row lengths sum to .* manifest says"):
        _epoch(_loader(folder))


def test_length_inconsistent_with_tokens(shards: Path, tmp_path: Path) -> None:
    """A shorter length whose dropped positions hold real tokens (not padding) is refused."""
    folder = _copy(shards, tmp_path)
    pad_id = read_manifest(folder).tokenizer["pad_id"]
    path = _edit(folder, 0, _set_length(0, L - 4), fix_manifest=True)
    reader = ShardFile(path, dtype=np.dtype(np.uint16), seq_length=L, pad_id=pad_id)
    with pytest.raises(ShardDataError, match=r"row 0 .* length 12 but token \d+ .* position 12"):
        reader.read([0])
    assert reader.read([1])[1].tolist() == [L]  # other rows of the block stay readable
    reader.close()


def test_skip_bad_shards_skips_then_stops_when_all_bad(shards: Path, tmp_path: Path) -> None:
    folder = _copy(shards, tmp_path)
    names = [s["name"] for s in read_manifest(folder).split("train")["shards"]]
    assert len(names) >= 3
    good = _epoch(_loader(folder))
    _edit(folder, 0, _set_token(0, 0, 999), fix_manifest=True)  # a bad row: caught on read
    (folder / names[1]).write_bytes(b"")  # truncated: caught on open
    loader = _loader(folder, skip=True)
    partial = _epoch(loader)
    assert 0 < partial < good
    assert sorted(loader.skipped_shards) == names[:2]
    assert loader.stats()["data/skipped_shards"] == 2

    for name in names[2:]:
        path = folder / name
        path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(NoDataError, match=rf"all {len(names)} shard\(s\) were skipped"):
        _epoch(_loader(folder, skip=True))
    (folder / names[0]).write_bytes(b"")
    with pytest.raises(NoDataError, match=rf"all {len(names)} shard\(s\) were skipped"):
        _loader(folder, skip=True)  # sizes are checked up front: before the first batch


def test_all_shards_corrupt_stops_at_the_first_batch(shards: Path, tmp_path: Path) -> None:
    """Same sizes, wrong bytes: the first bad shard makes the loader verify the others until one
    is good; none is, so it stops at once instead of training a whole epoch on empty rows."""
    folder = _copy(shards, tmp_path)
    names = [s["name"] for s in read_manifest(folder).split("train")["shards"]]
    for name in names:
        raw = bytearray((folder / name).read_bytes())
        raw[600] ^= 1
        (folder / name).write_bytes(bytes(raw))
    loader = _loader(folder, skip=True)
    with pytest.raises(NoDataError, match=rf"all {len(names)} shard\(s\) were skipped.*sha256"):
        loader.next_global_batch()
    assert loader.consumed_global_batches == 0


def test_epoch_without_tokens_stops(shards: Path, tmp_path: Path) -> None:
    """An epoch that gave this rank no token raises at the start of the next one."""
    folder = _copy(shards, tmp_path)
    entries = read_manifest(folder).split("train")["shards"]
    for entry in entries[:-1]:
        (folder / entry["name"]).write_bytes(b"")
    loader = _loader(folder, skip=True, shuffle=False)
    # the last (good) shard holds the last rows; an epoch limited to the first batches sees none
    first_rows = sum(e["num_samples"] for e in entries[:-1])
    assert first_rows >= 8
    loader.batches_per_epoch = first_rows // 8
    with pytest.raises(NoDataError, match="epoch 0 gave data-parallel rank 0 no token"):
        for _ in range(loader.batches_per_epoch + 1):
            loader.next_global_batch()


def test_filler_only_rank_is_not_an_empty_epoch(shards: Path) -> None:
    """drop_last=False (evaluation): a rank whose share of an epoch is only filler rows is fine."""
    n = read_manifest(shards).split("train")["num_samples"]
    loader = ShardLoader(
        shards, micro_batch_size=n + 1, global_batch_size=2 * (n + 1), dp_rank=1, dp_size=2,
        seed=0, drop_last=False, num_epochs=2,
    )  # fmt: skip
    batches = list(loader)
    assert len(batches) == 2 and not any(b["valid"].any() for b in batches)
