"""Scheduler head g(f): zero-initialised output, gradient flow, pad exclusion (no shims)."""

from __future__ import annotations

import copy

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


def test_scheduler_head_math_is_fp32_under_bf16() -> None:
    """A bf16 head (bf16 runs cast the whole model) computes in fp32, under autocast too: logits
    1 + O(1e-3), whose differences are below bf16's resolution at 1 (2^-7), survive, equal to the
    fp32 head with the same bf16-valued weights; gradients reach the bf16 parameters."""
    torch.manual_seed(0)
    head = SchedulerHead(D, H)
    with torch.no_grad():
        head.out[-1].weight.normal_(std=3e-4)
        head.out[-1].bias.fill_(1.0)
    head = head.to(torch.bfloat16)
    reference = copy.deepcopy(head).float()
    f = features().bfloat16()
    want = reference(f.float())
    spread = float(want.max() - want.min())
    assert 5e-4 < spread < 2**-7, spread  # the early, sub-bf16 differences between positions
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = head(f)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (got * torch.randn(B, L)).sum().backward()
    assert head.out[-1].weight.grad.dtype == torch.bfloat16 and head.out[-1].weight.grad.abs().sum() > 0


def test_uncentred_normsig_has_a_flat_absorbing_state_that_centring_removes():
    """Issue 16: with head_lr 1e-2 on the pairs task the forward head drove every logit to about -23
    (order still in the logits: std 4 over positions) and the exponent spread stayed ~1e-8 for 500
    steps. NormSig(v) = sigmoid(v) - mean sigmoid(v) is not shift-invariant: a common shift saturates
    every sigmoid, the spread and its gradient vanish. Centring the logits makes the shift a null
    direction: the same head output keeps its order and its gradient."""
    from megatron_lomdm.diffusion.lomdm import normsig
    from megatron_lomdm.models.scheduler_head import center_logits

    order_BL = torch.tensor([[4.0, 3.0, -3.0, -4.0, 0.5, -0.5]])
    for center in (False, True):
        v_BL = (order_BL - 23.0).requires_grad_(True)
        logits_BL = center_logits(v_BL) if center else v_BL
        e_BL = 0.7 + 0.65 * normsig(logits_BL)
        (e_BL[:, :2].sum() - e_BL[:, 2:4].sum()).backward()  # any objective that prefers an order
        spread, grad = e_BL.std().item(), v_BL.grad.abs().max().item()
        if center:
            assert spread > 0.2 and grad > 1e-2
        else:
            assert spread < 1e-6 and grad < 1e-6  # the trap: flat, and no gradient to leave it
    # centring changes nothing at initialisation (zero logits) and ignores any common shift
    assert torch.equal(center_logits(torch.zeros(2, 5)), torch.zeros(2, 5))
    valid_BL = torch.tensor([[True, True, True, False]])
    v_BL = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert torch.allclose(center_logits(v_BL + 7.0, valid_BL), center_logits(v_BL, valid_BL))
    assert center_logits(v_BL, valid_BL)[0, :3].tolist() == [-1.0, 0.0, 1.0]


def test_head_centres_its_logits_over_valid_positions():
    torch.manual_seed(0)
    head = SchedulerHead(16, 4)
    torch.nn.init.normal_(head.out[-1].weight)
    torch.nn.init.constant_(head.out[-1].bias, 5.0)
    feats, valid = torch.randn(3, 7, 16), torch.ones(3, 7, dtype=torch.bool)
    valid[1, 5:] = False
    out = head(feats, valid)
    assert out[0].mean().abs() < 1e-5 and out[1, :5].mean().abs() < 1e-5
    plain = SchedulerHead(16, 4, center=False)
    plain.load_state_dict(head.state_dict())
    raw = plain(feats, valid)
    assert raw[0].mean() > 1.0 and torch.allclose(raw[0] - raw[0].mean(), out[0], atol=1e-5)
