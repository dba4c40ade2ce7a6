"""Every megatron-backend layout gives the one-process losses (interface.md: layout-independent).

Launched through the CLI with torchrun (gloo, fp32, tiny model). A shared 4-step reference per
family; each layout must write the same per-step losses to metrics.jsonl (relative 1e-5; what we
observe is ~1e-6: reduction order differs across layouts). Identical losses at steps 2-4 also
prove that gradients, the optimizer update and (for LoMDM) the masks drawn from e_F agree, since
every later loss depends on them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import losses, train

STEPS = ("train.steps=4", "checkpoint.interval=0")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    out = {}
    for family in ("mdlm", "lomdm"):
        run_dir = tmp_path_factory.mktemp(f"ref_{family}")
        done = train(run_dir, tiny_shards, *STEPS, f"diffusion.name={family}")
        assert done.returncode == 0, done.stderr[-3000:]
        out[family] = losses(run_dir)
    return out


LAYOUTS_2 = {
    "pp2": ("parallel.pp=2",),
    "dp2": (),
    "dp2_distopt": ("parallel.zero=1",),
}
LAYOUTS_4 = {
    "tp2_pp2": ("parallel.tp=2", "parallel.pp=2"),
    "tp2_dp2": ("parallel.tp=2",),
    "pp2_dp2": ("parallel.pp=2", "parallel.zero=1"),
}


def _check(family: str, overrides: tuple[str, ...], nproc: int, shards: Path, tmp: Path, ref: list[float]) -> None:
    done = train(tmp / "run", shards, *STEPS, f"diffusion.name={family}", *overrides, nproc=nproc, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = losses(tmp / "run")
    assert len(got) == len(ref) == 4
    assert got == pytest.approx(ref, rel=1e-5), (family, overrides, ref, got)


@pytest.mark.parametrize("family", ["mdlm", "lomdm"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS_2))
def test_parity_two_processes(layout: str, family: str, tiny_shards: Path, tmp_path: Path, reference) -> None:
    _check(family, LAYOUTS_2[layout], 2, tiny_shards, tmp_path, reference[family])


@pytest.mark.parametrize("layout", sorted(LAYOUTS_4))
def test_parity_four_processes_lomdm(layout: str, tiny_shards: Path, tmp_path: Path, reference) -> None:
    _check("lomdm", LAYOUTS_4[layout], 4, tiny_shards, tmp_path, reference["lomdm"])


@pytest.mark.parametrize("family", ["mdlm", "lomdm"])
def test_parity_recompute(family: str, tiny_shards: Path, tmp_path: Path, reference) -> None:
    _check(family, ("model.recompute=full",), 1, tiny_shards, tmp_path, reference[family])


def test_parity_pp2_resume(tiny_shards: Path, tmp_path: Path, reference) -> None:
    """A PP=2 run checkpointed at step 2 and resumed gives the uninterrupted losses."""
    run_dir = tmp_path / "run"
    first = train(run_dir, tiny_shards, "train.steps=2", "checkpoint.interval=2", "parallel.pp=2", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(run_dir, tiny_shards, *STEPS, "parallel.pp=2", nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(run_dir) == pytest.approx(reference["lomdm"], rel=1e-5)
