"""torchrun'd worker (2 processes, gloo, CPU): what one rank holds under TP=2 and under PP=2.

Run by ``test_plan.py::test_tp2_and_pp2_ranks``; rank 0 writes a JSON report to ``argv[1]``. With
TP=2: this rank's parameters and the bytes autograd saves for backward in a backbone pass over K·b
corruptions and in a whole phase two (megatron local attention). With PP=2: each stage's
parameters.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist

from megatron_lomdm.distributed.init import destroy_distributed, init_distributed
from tests.helpers.cpu_megatron import install_cpu_shims
from tests.unit.test_plan import _diffusion_lm, _saved_bytes, tiny_plan

SHAPE = dict(layers=2, d=64, heads=4, T=32, V=200, b=2)


def tp2(report: dict) -> None:
    init_distributed(tp=2, pp=1, seed=0, backend="gloo", before_rng_seed=install_cpu_shims)
    m = tiny_plan(**SHAPE)
    torch.manual_seed(0)
    model = _diffusion_lm(m).train()
    params = list(model.parameters())
    b, T, V = m.micro_batch_size, m.seq_length, m.vocab_size
    tokens = torch.randint(0, V - 2, (b, T), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(b, T, dtype=torch.bool)
    with torch.no_grad():
        hidden = model.clean_features(tokens, valid)
    fwd_logits = model.forward_head_logits(hidden, valid)
    z = torch.full((2 * b, T), V - 1)
    backbone, _ = _saved_bytes(lambda: model.backbone(z, valid.repeat(2, 1)), params)
    phase_two, _ = _saved_bytes(lambda: model(tokens, valid, torch.arange(b), 0, fwd_logits_BL=fwd_logits), params)
    report["tp2"] = {"params": sum(p.numel() for p in params), "backbone": backbone, "phase_two": phase_two}


def pp2(report: dict) -> None:
    init_distributed(tp=1, pp=2, seed=0, backend="gloo", before_rng_seed=install_cpu_shims)
    m = tiny_plan(**SHAPE)
    model = _diffusion_lm(m)
    counts = [None, None]
    dist.all_gather_object(counts, sum(p.numel() for p in model.parameters()))
    report["pp2"] = {"params": counts}


def main(path: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    report: dict = {}
    tp2(report)
    pp2(report)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f)
    destroy_distributed()


if __name__ == "__main__":
    from megatron_lomdm.utils.proc import quick_exit_gc

    quick_exit_gc()  # as the commands do: no shutdown collections
    main(sys.argv[1])
