"""torchrun'd worker (2 processes, gloo, CPU): what a rank holds while `training.build.build_model`
builds a model under DeepSpeed ZeRO-3, and the weights it builds.

Run by ``test_zero3_build.py``; each rank writes a JSON report to ``<argv[1]>.<rank>``. Per
family (LoMDM with its scheduler heads, MDLM without) and precision (fp32, bf16): the allocator peak of a plain build (ZeRO-2: every rank builds the whole
model) and of a ZeRO-3 build, the largest module's parameter bytes, the full model's bytes, this
rank's partition bytes, whether every parameter is partitioned right after the build, and whether
the gathered ZeRO-3 weights equal the plain build's bit for bit.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

from megatron_lomdm.config.schema import (
    Config,
    DiffusionConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_lomdm.distributed.init import destroy_distributed, init_distributed, parallel_info
from megatron_lomdm.training.build import build_model
from tests.helpers.cpu_megatron import install_cpu_shims
from tests.unit.test_plan import _allocator_peak

# 8 layers and a small vocabulary, so the largest module is a small share of the model
MODEL = dict(num_layers=8, hidden_size=64, num_heads=4, seq_length=16, vocab_size=64, mask_id=63, pad_id=62)


def config(family: str, zero: int, precision: str) -> Config:
    return Config(model=ModelConfig(**MODEL), diffusion=DiffusionConfig(name=family),
                  optim=OptimConfig(warmup_steps=0, ema_decay=0.0),
                  train=TrainConfig(precision=precision, micro_batch_size=1, global_batch_size=2),
                  parallel=ParallelConfig(backend="deepspeed", zero=zero, overlap_grad_reduce=False))


def build(cfg: Config, rng: torch.Tensor) -> tuple[torch.nn.Module, int]:
    """The model `build_model` makes from the default-RNG state `rng`, and the allocator peak meanwhile."""
    torch.random.set_rng_state(rng)
    gc.collect()  # the previous case's models go now, not as negative allocations inside this peak
    out: list[torch.nn.Module] = []
    peak = _allocator_peak(lambda: out.append(build_model(cfg, parallel_info())))
    return out[0], peak


class ParamBytes:
    """The most parameter bytes (whole tensors and partitions) alive at the end of any module's
    `__init__` under `zero.Init`, just before DeepSpeed partitions that module's parameters."""

    def __init__(self) -> None:
        import deepspeed

        self.seen: list[torch.nn.Parameter] = []
        self.peak = 0
        self.whole_peak = 0  # of those, whole (not yet partitioned) parameters
        self._orig = deepspeed.zero.Init._post_init_method

        def post_init(init: Any, module: torch.nn.Module) -> None:
            self.seen += list(module.parameters(recurse=False))
            whole = sum(p.data.numel() * p.data.element_size() for p in self.seen)
            parts = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.seen
                        if getattr(p, "ds_tensor", None) is not None)
            self.peak, self.whole_peak = max(self.peak, whole + parts), max(self.whole_peak, whole)
            self._orig(init, module)

        deepspeed.zero.Init._post_init_method = post_init

    def close(self) -> None:
        import deepspeed

        deepspeed.zero.Init._post_init_method = self._orig


def case(family: str, precision: str, rng: torch.Tensor) -> dict[str, Any]:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    plain, plain_peak = build(config(family, 2, precision), rng)
    full = {n: p.detach().clone() for n, p in plain.named_parameters()}
    biggest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in plain.backbone.modules())
    del plain
    held = ParamBytes()
    try:
        model, peak = build(config(family, 3, precision), rng)
    finally:
        held.close()
    params = dict(model.named_parameters())
    backbone = {n: p for n, p in params.items() if n.startswith("backbone.")}
    # the backbone partitioned (its own slice only, DeepSpeed's padding aside), the heads whole
    partitioned = all(is_zero_param(p) and p.data.numel() == 0 and p.ds_tensor.numel() <= -(-p.ds_numel // 2)
                      for p in backbone.values())
    heads_whole = not any(is_zero_param(p) for n, p in params.items() if n not in backbone)
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in backbone.values() if is_zero_param(p))
    same, dtypes = True, set()
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            same &= p.dtype == full[name].dtype and torch.equal(p.data, full[name])
            dtypes.add(str(p.dtype))
    return {"plain_peak": plain_peak, "zero3_peak": peak, "param_peak": held.peak, "whole_peak": held.whole_peak, "largest_module_numel": biggest, "partition": local,
            "model": sum(t.numel() * t.element_size() for t in full.values()),
            "backbone": sum(full[n].numel() * full[n].element_size() for n in backbone),
            "heads_numel": sum(t.numel() for n, t in full.items() if n not in backbone),
            "partitioned": partitioned, "heads_whole": heads_whole,
            "same_weights": bool(same), "dtypes": sorted(dtypes), "names": sorted(full) == sorted(params)}


def main(path: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    init_distributed(tp=1, pp=1, seed=0, backend="gloo", before_rng_seed=install_cpu_shims)
    rng = torch.random.get_rng_state()
    report = {f"{family} {precision}": case(family, precision, rng)
              for family in ("lomdm", "mdlm") for precision in ("fp32", "bf16")}
    with open(f"{path}.{dist.get_rank()}", "w") as f:
        json.dump(report, f)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
