"""A checkpoint resumes on another TP x PP x DP layout (format 2: the EMA reshards with the weights).

A run trains on one layout and checkpoints; the same run directory is opened on another layout,
and every tensor each rank then holds (model parameters and EMA shadows) is compared bit for bit
with the checkpoint's own tensors, assembled from the shards the first layout wrote (megatron's
`load_plain_tensors`, no model involved). Training then continues on the new layout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import zygote
from tests.helpers.runs import ROOT, clean_env, losses, train

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("_resume_worker.py")
STEPS = ("train.steps=4", "checkpoint.interval=4", "optim.ema_decay=0.9")


def _open_at(run_dir: Path, out: Path, nproc: int, *overrides: str) -> list[dict]:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(run_dir), str(out), *overrides]
    done = zygote.run(cmd, env=clean_env(), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank_{r}.pt", weights_only=True) for r in range(nproc)]


def _full_tensors(dist_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist/ folder whole, assembled by torch from the shards (no process group)."""
    dcp_to_torch_save(str(dist_dir), str(tmp / "full.pt"))
    return {k: v for k, v in torch.load(tmp / "full.pt", weights_only=False).items() if isinstance(v, torch.Tensor)}


def _assert_matches_checkpoint(ranks: list[dict], saved: dict[str, torch.Tensor]) -> None:
    compared = 0
    for held in ranks:
        assert held["step"] == 4
        for kind in ("model", "ema"):
            assert held[kind], f"rank holds no {kind} tensors"
            for key, offset, local in held[kind]:
                prepended = len(offset) - local.dim()  # e.g. the layer axis of the stacked layers
                index = (*offset[:prepended],
                         *(slice(o, o + n) for o, n in zip(offset[prepended:], local.shape, strict=True)))
                want = saved[key][index]
                assert want.dtype == local.dtype and torch.equal(want, local), (kind, key, offset)
                compared += 1
    assert compared > 0


@pytest.mark.parametrize("written, opened", [
    (("parallel.tp=2",), ("parallel.tp=1",)),  # TP2 -> TP1
    (("parallel.pp=2",), ("parallel.pp=1",)),  # PP2 -> PP1 x DP2
], ids=["tp2_to_tp1", "pp2_to_pp1_dp2"])
def test_resume_on_another_layout(written: tuple[str, ...], opened: tuple[str, ...], tiny_shards: Path,
                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = train(run_dir, tiny_shards, *STEPS, "diffusion.name=lomdm", *written, nproc=2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    nproc = 1 if "parallel.tp=1" in opened else 2
    ranks = _open_at(run_dir, tmp_path / "held", nproc, *opened)
    _assert_matches_checkpoint(ranks, _full_tensors(run_dir / "checkpoints" / "step_0000004" / "dist", tmp_path))
    more = train(run_dir, tiny_shards, "train.steps=6", "checkpoint.interval=4", "optim.ema_decay=0.9",
                 "diffusion.name=lomdm", *opened, nproc=nproc, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "RNG streams restart from train.seed" in more.stderr
    assert len(losses(run_dir)) == 6


def _as_format_1(step_dir: Path, shadow_value: float) -> None:
    """Rewrite a checkpoint as format 1 wrote it: the EMA (every shadow `shadow_value`) in the rank file."""
    rank_file = step_dir / "rank_000_000.pt"
    state = torch.load(rank_file, weights_only=True)
    names = torch.load(step_dir.parent.parent / "names.pt", weights_only=True)
    state["ema"] = {"decay": 0.9, "shadow": {n: torch.full(shape, shadow_value) for n, shape in names.items()}}
    torch.save(state, rank_file)
    meta = torch.load(step_dir / "meta.pt", weights_only=True)
    meta["format"] = 1
    meta["files"]["rank_000_000.pt"] = rank_file.stat().st_size
    torch.save(meta, step_dir / "meta.pt")


def test_format_1_checkpoint_loads_on_its_layout_and_is_refused_elsewhere(tiny_shards: Path, tmp_path: Path) -> None:
    """Checkpoints written before the EMA moved into dist/ resume on their own layout (EMA from the rank
    file); another layout is refused with a message that says how to convert them."""
    run_dir = tmp_path / "run"
    done = train(run_dir, tiny_shards, *STEPS, "diffusion.name=lomdm")
    assert done.returncode == 0, done.stderr[-3000:]
    # the rank file's EMA is keyed by parameter name: take the names from a one-process model
    script = ("import sys, torch; from megatron_lomdm.apps.run import open_run, close_run; "
              "run = open_run(sys.argv[1]); torch.save({n: p.shape for n, p in run.model.named_parameters()}, "
              "sys.argv[2]); close_run()")
    got = subprocess.run([sys.executable, "-c", script, str(run_dir), str(run_dir / "names.pt")], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    _as_format_1(run_dir / "checkpoints" / "step_0000004", 0.5)
    held = _open_at(run_dir, tmp_path / "held", 1)[0]
    assert held["ema"] and all(bool((t == 0.5).all()) for _, _, t in held["ema"])
    refused = train(run_dir, tiny_shards, "train.steps=6", "diffusion.name=lomdm", "parallel.tp=2", nproc=2)
    assert refused.returncode != 0
    assert "checkpoint format 1" in refused.stderr and "Resume it once with its own layout" in refused.stderr
    assert "Connection closed" not in refused.stderr  # every rank refuses; none is left in a collective
