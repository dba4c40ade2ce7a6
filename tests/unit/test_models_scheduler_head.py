"""Scheduler head g(f): zero-initialised output, gradient flow, pad exclusion (no shims)."""

from __future__ import annotations

import torch

from megatron_lomdm.models.param_count import scheduler_head_param_count
from megatron_lomdm.models.scheduler_head import SchedulerHead

B, L, D, H = 3, 10, 32, 4


def features(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


def test_scheduler_head_zero_init() -> None:
    torch.manual_seed(0)
    head = SchedulerHead(D, H, dropout=0.1)
    logits = head(features())
    assert logits.shape == (B, L) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.zeros(B, L))  # exactly 0: the polynomial schedule
    (logits * torch.randn(B, L)).sum().backward()
    last = head.out[-1]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    # with the last layer at zero, nothing upstream gets a gradient yet
    assert head.attn.qkv.weight.grad.abs().sum() == 0

    # after one step the logits move away from 0
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    head.eval()
    assert head(features()).abs().max() > 0


def test_scheduler_head_excludes_pads() -> None:
    torch.manual_seed(0)
    head = SchedulerHead(D, H).eval()
    torch.nn.init.normal_(head.out[-1].weight)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, -3:] = False
    f = features()
    f_changed = f.clone()
    f_changed[:, -3:] = torch.randn(B, 3, D)
    with torch.no_grad():
        a, b = head(f, valid), head(f_changed, valid)
        short = head(f[:, :-3])
        unmasked = head(f)
    assert (a[:, :-3] - b[:, :-3]).abs().max() <= 1e-6
    assert (a[:, :-3] - short).abs().max() <= 1e-5
    assert (a[:, :-3] - unmasked[:, :-3]).abs().max() > 1e-4
    all_pad = torch.zeros(B, L, dtype=torch.bool)
    assert torch.isfinite(head(f, all_pad)).all()  # no empty softmax rows


def test_scheduler_head_bf16_features_and_size() -> None:
    head = SchedulerHead(D, H)
    assert head(features().bfloat16()).dtype == torch.float32
    assert sum(p.numel() for p in head.parameters()) == scheduler_head_param_count(D)
    assert abs(scheduler_head_param_count(768) - 7.7e6) / 7.7e6 < 0.01  # method.md: ~7.7M
