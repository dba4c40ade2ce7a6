"""A checkpoint that would run code when loaded is refused by every load path, and the code never runs.

Each case poisons one pickle-bearing file of a real one-step checkpoint with an object whose
unpickling runs `touch <marker>` (`os.system` via `__reduce__`), then resumes (megatron and DeepSpeed
backends) or exports it. Without `checkpoint/safe_load.py` every case creates the marker: torch DCP
unpickles `.metadata` and its byte items freely, DeepSpeed loads its files with
`weights_only=False`, and megatron's `common.pt` is unpickled freely once the environment turns
torch's `weights_only` default off (`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, set for that case).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from tests.helpers import zygote
from tests.helpers.runs import ROOT, clean_env, train, train_cmd

pytestmark = pytest.mark.slow
STEP = "step_0000001"
REFUSAL = "posix.system, which a checkpoint never needs"


class Touch:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def poison_metadata(step_dir: Path, marker: Path) -> Path:
    path = step_dir / "dist" / ".metadata"
    path.write_bytes(pickle.dumps(Touch(marker)))
    return path


def poison_torch_file(relative: str) -> Callable[[Path, Path], Path]:
    def poison(step_dir: Path, marker: Path) -> Path:
        path = step_dir / relative
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own trusted file
        state["payload"] = Touch(marker)
        torch.save(state, path)
        return path

    return poison


def poison_distcp_item(step_dir: Path, marker: Path) -> Path:
    """Point a byte item of `.metadata` (e.g. an `_extra_state`) at a payload appended to its file."""
    meta_path = step_dir / "dist" / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())  # our own trusted file
    keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn in keys)
    payload = step_dir / "payload.tmp"
    torch.save(Touch(marker), payload)
    distcp = step_dir / "dist" / info.relative_path
    offset = distcp.stat().st_size
    with distcp.open("ab") as f:
        f.write(payload.read_bytes())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=payload.stat().st_size)
    meta_path.write_bytes(pickle.dumps(metadata))
    payload.unlink()
    return distcp


BACKENDS = {"megatron": ("parallel.backend=megatron",),
            "deepspeed": ("parallel.backend=deepspeed", "parallel.zero=1")}
CASES = {  # name: (backend, poison, extra environment)
    "dcp_metadata": ("megatron", poison_metadata, {}),
    "dcp_byte_item": ("megatron", poison_distcp_item, {}),
    "megatron_common_pt": ("megatron", poison_torch_file("dist/common.pt"),
                           {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    "deepspeed_model_states": ("deepspeed", poison_torch_file("deepspeed/ds/mp_rank_00_model_states.pt"), {}),
    "deepspeed_optim_states": ("deepspeed", poison_torch_file("deepspeed/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                               {}),
}


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step runs with a checkpoint (Adam state included), one per backend, made on first use."""
    root = tmp_path_factory.mktemp("untrusted")
    runs: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            out = train(root / backend, tiny_shards, "train.steps=1", "checkpoint.interval=1", *BACKENDS[backend])
            assert out.returncode == 0, out.stderr[-3000:]
            runs[backend] = root / backend
        return runs[backend]

    return get  # type: ignore[return-value]


def _poisoned_copy(trained, backend: str, poison: Callable[[Path, Path], Path],
                   tmp_path: Path) -> tuple[Path, Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(trained(backend), run_dir)
    marker = tmp_path / "pwned"
    step_dir = run_dir / "checkpoints" / STEP
    poisoned = poison(step_dir, marker)
    _reseal(step_dir)
    return run_dir, marker, poisoned


def _reseal(step_dir: Path) -> None:
    """Rewrite the file sizes `meta.pt` records, as whoever crafts a checkpoint can."""
    meta = torch.load(step_dir / "meta.pt", weights_only=True)
    if "files" in meta:
        meta["files"] = {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*"))
                         if p.is_file() and p.name != "meta.pt"}
        torch.save(meta, step_dir / "meta.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_refuses_code_in_checkpoint(case: str, trained, tiny_shards: Path, tmp_path: Path) -> None:
    backend, poison, env = CASES[case]
    run_dir, marker, poisoned = _poisoned_copy(trained, backend, poison, tmp_path)
    out = zygote.run(train_cmd(run_dir, tiny_shards, "train.steps=2", "checkpoint.interval=1", *BACKENDS[backend]),
                     env=clean_env(**env), cwd=ROOT, timeout=300)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"refusing to load {poisoned}" in out.stderr and REFUSAL in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_resume_of_an_honest_checkpoint_passes(backend: str, trained, tiny_shards: Path, tmp_path: Path) -> None:
    """Everything a real checkpoint of each backend holds is on the allowlist."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained(backend), run_dir)
    out = zygote.run(train_cmd(run_dir, tiny_shards, "train.steps=2", "checkpoint.interval=1", *BACKENDS[backend]),
                     env=clean_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_export_refuses_code_in_dist_metadata(trained, tmp_path: Path) -> None:
    """`tools/convert_to_hf.py --no-ema` reads the live weights from `dist/` (megatron DCP)."""
    run_dir, marker, poisoned = _poisoned_copy(trained, "megatron", poison_metadata, tmp_path)
    out = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--run-dir", str(run_dir), "--output",
                          str(tmp_path / "hf"), "--no-ema"], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"refusing to load {poisoned}: it references {REFUSAL}" in out.stderr
    assert not (tmp_path / "hf").exists()
