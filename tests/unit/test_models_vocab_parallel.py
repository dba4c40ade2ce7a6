"""Vocab-parallel SUBS functions at TP=1 (no process group) against plain torch.

The TP=2 case is in tests/distributed/test_backbone_parity.py. No shims needed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lomdm.models.vocab_parallel import (
    expected_token_rate_vocab_parallel,
    subs_logp_true_vocab_parallel,
)

B, L, V_TRUE, V_PAD = 3, 7, 13, 16
MASK_ID = V_TRUE - 1


def inputs(dtype=torch.float64, seed=0):  # noqa: ANN001, ANN201
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V_PAD, generator=g)).to(dtype).requires_grad_(True)
    x = torch.randint(0, V_TRUE - 1, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.6
    z = torch.where(masked, torch.full_like(x, MASK_ID), x)
    w = (torch.rand(V_TRUE, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    return logits, z, x, w


def subs_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    lg = logits.double().clone()
    lg[..., MASK_ID] = float("-inf")
    lg[..., V_TRUE:] = float("-inf")
    return torch.log_softmax(lg, dim=-1)


def ref_logp(logits, z, x):  # noqa: ANN001, ANN201
    logp = subs_log_softmax(logits).gather(-1, x[..., None]).squeeze(-1)
    return torch.where(z == MASK_ID, logp, torch.zeros_like(logp))


def ref_rate(logits, w):  # noqa: ANN001, ANN201
    return (subs_log_softmax(logits).exp()[..., :V_TRUE] * w.double()).sum(-1)


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_subs_logp_matches_reference(chunk) -> None:  # noqa: ANN001
    logits, z, x, _ = inputs()
    got = subs_logp_true_vocab_parallel(
        logits, z, x, MASK_ID, vocab_size=V_TRUE, chunk_tokens=chunk
    )
    want = ref_logp(logits, z, x)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.equal(got[z != MASK_ID], torch.zeros_like(got[z != MASK_ID]))  # carry-over
    g = torch.randn(B, L, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * g).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * g).sum(), logits)
    assert torch.allclose(grad, want_grad, atol=1e-12)
    assert torch.equal(grad[z != MASK_ID], torch.zeros_like(grad[z != MASK_ID]))


def test_subs_logp_gradcheck_and_layouts() -> None:
    logits, z, x, _ = inputs()
    small = logits.detach()[:2, :3].clone().requires_grad_(True)
    fn = lambda lg: subs_logp_true_vocab_parallel(lg, z[:2, :3], x[:2, :3], MASK_ID,  # noqa: E731
                                                  vocab_size=V_TRUE, chunk_tokens=4)
    assert torch.autograd.gradcheck(fn, (small,), fast_mode=True)
    # megatron's sequence-first logits viewed batch-first (no copy) give the same numbers
    seq_first = logits.detach().transpose(0, 1).contiguous().requires_grad_(True)
    got = subs_logp_true_vocab_parallel(seq_first.transpose(0, 1), z, x, MASK_ID, vocab_size=V_TRUE)
    assert torch.allclose(got, ref_logp(logits, z, x), atol=1e-12)


def test_subs_logp_bf16_and_fp32() -> None:
    logits, z, x, _ = inputs(torch.float32)
    got32 = subs_logp_true_vocab_parallel(logits, z, x, MASK_ID, vocab_size=V_TRUE)
    assert got32.dtype == torch.float32
    assert (got32.double() - ref_logp(logits, z, x)).abs().max() <= 1e-5
    lb = logits.detach().bfloat16().requires_grad_(True)
    got16 = subs_logp_true_vocab_parallel(lb, z, x, MASK_ID, vocab_size=V_TRUE, chunk_tokens=2)
    assert got16.dtype == torch.float32  # fp32 math on bf16 logits
    assert (got16.double() - ref_logp(lb.float(), z, x)).abs().max() <= 1e-5
    got16.sum().backward()
    assert lb.grad.dtype == torch.bfloat16


def test_subs_logp_without_vocab_size_keeps_padding_ids() -> None:
    logits, z, x, _ = inputs()
    got = subs_logp_true_vocab_parallel(logits, z, x, MASK_ID)
    lg = logits.detach().clone()
    lg[..., MASK_ID] = float("-inf")
    want = torch.log_softmax(lg, -1).gather(-1, x[..., None]).squeeze(-1)
    assert torch.allclose(got, torch.where(z == MASK_ID, want, torch.zeros_like(want)), atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
def test_expected_rate_matches_reference(chunk) -> None:  # noqa: ANN001
    logits, _, _, w = inputs()
    got = expected_token_rate_vocab_parallel(logits, w, MASK_ID, chunk_tokens=chunk)
    want = ref_rate(logits, w)
    assert torch.allclose(got, want, atol=1e-12)
    g = torch.randn(B, L, dtype=torch.float64)
    grads = torch.autograd.grad((got * g).sum(), (logits, w))
    want_grads = torch.autograd.grad((want * g).sum(), (logits, w))
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_expected_rate_gradcheck_and_checks() -> None:
    logits, _, _, w = inputs()
    small = logits.detach()[:2, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lg, ww: expected_token_rate_vocab_parallel(
            lg, F.softplus(ww), MASK_ID, chunk_tokens=4
        ),
        (small, w), fast_mode=True,
    )
    with pytest.raises(ValueError, match="more than the vocabulary"):
        expected_token_rate_vocab_parallel(logits, torch.ones(V_PAD + 1), MASK_ID)
