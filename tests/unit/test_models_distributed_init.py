"""init_distributed: launcher environments, layout validation, single-process init. No shims."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lomdm.distributed.device import default_backend, get_device
from megatron_lomdm.distributed.init import (
    _first_slurm_host,
    assert_replicated,
    broadcast_head_params,
    destroy_distributed,
    init_distributed,
    launch_env_from,
    validate_parallel_sizes,
)


def test_launch_env_parsing() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    env = launch_env_from(torchrun)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_port) == (
        "torchrun", 3, 8, 1, 29500)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "4242"}
    env = launch_env_from(slurm)
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 16, 1)
    assert env.master_addr == "gpu003" and env.master_port == 20000 + 4242
    env = launch_env_from({**slurm, "MASTER_ADDR": "node9", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("node9", 1234)
    assert launch_env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"
    assert launch_env_from({}).world_size == 1
    assert _first_slurm_host("login1,gpu[1-2]") == "login1"


def test_layout_validation_before_any_work(monkeypatch) -> None:
    assert validate_parallel_sizes(2, 2, 8) == 2
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    was_initialized = dist.is_initialized()
    with pytest.raises(ValueError, match=r"parallel\.tp=3.*parallel\.pp=1.*world size 1"):
        init_distributed(tp=3, pp=1, seed=0)
    assert dist.is_initialized() == was_initialized  # failed before creating any process group
    with pytest.raises(ValueError, match="parallel.tp"):
        validate_parallel_sizes(0, 1, 4)


def test_single_process_init(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(tp=1, pp=1, seed=5)
    try:
        assert (info.rank, info.world_size, info.tp, info.pp, info.dp) == (0, 1, 1, 1, 1)
        assert (info.tp_rank, info.pp_rank, info.dp_rank) == (0, 0, 0)
        assert info.backend == default_backend()
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
        head = torch.nn.Linear(2, 2)
        broadcast_head_params(head)  # groups of one: no-ops
        assert_replicated(head)
    finally:
        destroy_distributed()
    assert not dist.is_initialized()
