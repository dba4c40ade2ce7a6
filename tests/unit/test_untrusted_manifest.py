"""A manifest is data: shard names that would run shell code in a `pipe:` command are refused."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data.shards import read_manifest
from megatron_lomdm.data.cache import ShardStore
from megatron_lomdm.data.sources import SourceOptions, open_source, parse_spec


def _hostile_copy(shards: Path, folder: Path, name: str) -> Path:
    """A copy of the shard folder whose manifest renames the first train shard to `name`."""
    shutil.copytree(shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_pipe_manifest_with_shell_in_a_shard_name_is_refused(tiny_shards: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the payload's relative `touch pwned` would land
    marker = tmp_path / "pwned"
    name = "train-000000$(touch pwned).tar"
    folder = _hostile_copy(tiny_shards, tmp_path / "data", name)
    options = SourceOptions(cache_dir=tmp_path / "cache", retries=0, retry_wait_s=0.01, prefetch_shards=0)
    try:
        with pytest.raises(ValueError, match=r"manifest\.json: shard name .*\$\(touch pwned\).* is not one this "):
            source = open_source(f"pipe:cat {folder}/manifest.json", "train", options)
            ShardStore(source, options).open(0, dtype=np.dtype(np.uint16), seq_length=32)
    finally:
        assert not marker.exists(), "the manifest's shard name ran as shell code"


@pytest.mark.parametrize("name", ["../../etc/passwd.tar", "valid-000000.tar", "train-1.tar", "train-000000.tar\n"])
def test_local_manifest_names_follow_the_writer(name: str, tiny_shards: Path, tmp_path: Path) -> None:
    """Outside its folder, of another split, or not SPLIT-NNNNNN.tar: refused for local folders too."""
    folder = _hostile_copy(tiny_shards, tmp_path / "data", name)
    expected = f"{folder / 'manifest.json'}: shard name {name!r} of split 'train'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_manifest(folder)


def test_pipe_substitutions_are_shell_quoted(tmp_path: Path) -> None:
    """The user's command keeps its shell syntax; the substituted shard name is one quoted word."""
    spec = parse_spec(f"pipe:cat {tmp_path}/manifest.json | head -c 100000000")
    hostile = f"x$(touch {tmp_path}/pwned) y.tar"
    assert spec.location(hostile) == f"pipe:cat {tmp_path}/{shlex.quote(hostile)} | head -c 100000000"
    assert spec.location("train-000001.tar") == f"pipe:cat {tmp_path}/train-000001.tar | head -c 100000000"
