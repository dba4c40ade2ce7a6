"""NVMe offload (`parallel.nvme_offload_dir`, DeepSpeed ZeRO-3 / ZeRO-Infinity): the config rules,
the engine's start-up checks and the DeepSpeed config dict it produces (issue 21 §1).

The engine itself (swapping, the NVMe checkpoint and resume) runs in `bench/scale_1b.py --small`
and at full size in `make bench-scale`; building a DeepSpeed engine needs a process group and the
JIT-built async_io op, which the unit tests avoid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lomdm.config import load_config
from megatron_lomdm.distributed import deepspeed_engine
from megatron_lomdm.distributed.deepspeed_engine import (
    NVME_BUCKET_NUMEL,
    NVME_SUB_GROUP_NUMEL,
    check_nvme_offload,
    deepspeed_config,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "tiny_cpu.yaml"
ZERO3 = ["parallel.backend=deepspeed", "parallel.zero=3", "optim.ema_decay=0"]


def test_nvme_offload_config(tmp_path: Path) -> None:
    cfg = load_config(TINY, [*ZERO3, f"parallel.nvme_offload_dir={tmp_path}", "train.precision=bf16"])
    assert cfg.parallel.nvme_offload_dir == str(tmp_path)
    assert load_config(TINY).parallel.nvme_offload_dir == ""  # off by default


@pytest.mark.parametrize("overrides, message", [
    (["parallel.backend=megatron", "parallel.zero=1"], "needs parallel.backend=deepspeed and parallel.zero=3"),
    (["parallel.backend=deepspeed", "parallel.zero=2"], "needs parallel.backend=deepspeed and parallel.zero=3"),
    ([*ZERO3, "parallel.cpu_offload=true"], "not both: set parallel.cpu_offload=false"),
])
def test_nvme_offload_rejections_name_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="parallel.nvme_offload_dir") as err:
        load_config(TINY, [*overrides, f"parallel.nvme_offload_dir={tmp_path}"])
    assert message in str(err.value)


def test_deepspeed_config_for_nvme(tmp_path: Path) -> None:
    cfg = load_config(TINY, [*ZERO3, f"parallel.nvme_offload_dir={tmp_path}", "train.precision=bf16"])
    ds = deepspeed_config(cfg, dp=2, num_microbatches=1, bucket_numel=NVME_BUCKET_NUMEL, engine_clips=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": str(tmp_path), "pin_memory": False,
                                         "buffer_count": 4}
    assert zero["sub_group_size"] == NVME_SUB_GROUP_NUMEL
    assert zero["reduce_bucket_size"] == NVME_BUCKET_NUMEL == zero["stage3_prefetch_bucket_size"]
    assert "offload_param" not in zero  # the bf16 parameters stay in memory
    assert ds["aio"]["block_size"] == 1 << 20
    assert ds["bf16"]["enabled"]
    # DeepSpeed accepts it as it is
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.offload_optimizer.device == "nvme" and parsed.sub_group_size == NVME_SUB_GROUP_NUMEL


def test_deepspeed_config_without_offload_is_unchanged() -> None:
    cfg = load_config(TINY, ZERO3)
    ds = deepspeed_config(cfg, dp=2, num_microbatches=1, bucket_numel=1000, engine_clips=False)
    assert "offload_optimizer" not in ds["zero_optimization"] and "aio" not in ds
    cpu = load_config(TINY, [*ZERO3, "parallel.cpu_offload=true"])
    ds = deepspeed_config(cpu, dp=2, num_microbatches=1, bucket_numel=1000, engine_clips=False)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_check_nvme_offload_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"parallel.nvme_offload_dir: .*missing is not a directory"):
        check_nvme_offload(str(tmp_path / "missing"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_bytes(b"")  # root ignores permissions: nothing to check then
            probe.unlink()
        except OSError:
            with pytest.raises(ValueError, match="is not writable"):
                check_nvme_offload(str(locked))
    finally:
        locked.chmod(0o700)


def test_check_nvme_offload_names_libaio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Builder:
        def is_compatible(self, verbose: bool = False) -> bool:
            return False

    class Accelerator:
        def create_op_builder(self, name: str) -> Builder:
            assert name == "AsyncIOBuilder"
            return Builder()

    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    with pytest.raises(ValueError, match="apt-get install -y libaio-dev"):
        check_nvme_offload(str(tmp_path))


def test_check_nvme_offload_accepts_a_writable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Builder:
        def is_compatible(self, verbose: bool = False) -> bool:
            return True

    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator",
                        lambda: type("A", (), {"create_op_builder": lambda self, name: Builder()})())
    assert check_nvme_offload(str(tmp_path)) == tmp_path.resolve()
    assert not list(tmp_path.iterdir())  # the write probe is gone
    assert deepspeed_engine.NVME_STATE_DIR == "nvme_state"
