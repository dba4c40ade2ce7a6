"""The checkpoint scanner (`checkpoint/safe_load.py`) on crafted pickles, without training.

The end-to-end refusals (resume on both backends, HF export) are in
tests/integration/test_untrusted_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_lomdm.checkpoint.safe_load import (
    UnsafeCheckpointError,
    check_checkpoint_folder,
    check_pickle,
    check_torch_file,
    load_dcp_metadata,
    load_torch_file,
)


class Touch:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scanner_refuses_code_in_every_protocol(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps({"ok": [1, 2.0, "x"], "bad": Touch(marker)}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load f\.pkl: it references posix\.system"):
        check_pickle(data, "f.pkl")
    assert not marker.exists()


def test_scanner_refuses_extension_registry_and_garbage() -> None:
    with pytest.raises(UnsafeCheckpointError, match="computed name"):
        check_pickle(b"\x80\x02\x82\x01.", "ext.pkl")  # EXT1 1: a global looked up by number
    with pytest.raises(UnsafeCheckpointError, match="not a valid pickle"):
        check_pickle(b"\x80\x02\xff\xfe", "garbage.pkl")


def test_torch_files_of_a_real_state_pass_and_load(tmp_path: Path) -> None:
    """What our rank files hold (tensors of several dtypes, RNG states, containers) is allowed."""
    state = {"w": torch.randn(3, 2), "b": torch.ones(2, dtype=torch.bfloat16), "size": torch.Size([3, 2]),
             "od": OrderedDict(a=torch.arange(3)), "rng": {"torch": torch.get_rng_state(),
                                                          "python": random.getstate()},
             "nested": [(1, 2.5, None, True, "s", b"bytes")]}
    path = tmp_path / "rank_000_000.pt"
    torch.save(state, path)
    loaded = load_torch_file(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["rng"]["python"] == state["rng"]["python"]


def test_torch_file_with_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "meta.pt"
    torch.save({"step": 1, "x": Touch(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load {path} .*posix\.system, which a checkpoint"):
        load_torch_file(path)
    with pytest.raises(UnsafeCheckpointError, match="zip format"):
        check_torch_file(Path(__file__))
    assert not marker.exists()


def _dcp_folder(folder: Path) -> None:
    """A torch distributed checkpoint with tensors and a byte item (a non-tensor value)."""
    dcp.save({"w": torch.randn(4, 3), "extra": b"te-extra-state"}, checkpoint_id=str(folder), no_dist=True)


def test_dcp_folder_passes_and_payloads_in_it_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "dist"
    _dcp_folder(folder)
    check_checkpoint_folder(folder)
    metadata = load_dcp_metadata(folder / ".metadata")
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))

    # a byte item (DCP reads it with torch.load(weights_only=False)) pointed at an appended payload
    payload = tmp_path / "payload.pt"
    torch.save(Touch(marker), payload)
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == key)
    distcp = folder / info.relative_path
    offset = distcp.stat().st_size
    with distcp.open("ab") as f:
        f.write(payload.read_bytes())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=payload.stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=rf"{distcp} \(item {key}\).*posix\.system"):
        check_checkpoint_folder(folder)

    (folder / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"dist/\.metadata: it references posix\.system"):
        check_checkpoint_folder(folder)
    assert not marker.exists()
