"""SUBS: chunked log-prob of the true token and the GenMD4 expected rate."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.subs import expected_token_rate, subs_logp_true

N, V, MASK = 37, 11, 10


def _inputs(dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype).requires_grad_(True)
    x = torch.randint(0, V - 1, (N,), generator=g)
    masked = torch.rand(N, generator=g) < 0.6
    z = torch.where(masked, torch.full_like(x, MASK), x)
    return logits, z, x, masked


def _reference(logits: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    subs = logits.double().clone()
    subs[:, MASK] = float("-inf")
    logp = torch.log_softmax(subs, -1).gather(1, x[:, None]).squeeze(1)
    return torch.where(z == MASK, logp, torch.zeros_like(logp))


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 1000])
def test_subs_chunked_equals_reference(chunk_size: int) -> None:
    logits, z, x, _ = _inputs()
    out = subs_logp_true(logits, z, x, MASK, chunk_size=chunk_size)
    torch.testing.assert_close(out, _reference(logits, z, x), rtol=1e-12, atol=1e-12)


def test_subs_carry_over_is_exactly_zero() -> None:
    logits, z, x, masked = _inputs()
    out = subs_logp_true(logits, z, x, MASK, chunk_size=5)
    assert torch.all(out[~masked] == 0.0)
    assert torch.all(out[masked] < 0.0)


def test_subs_mask_logit_ignored() -> None:
    logits, z, x, _ = _inputs()
    bumped = logits.detach().clone()
    bumped[:, MASK] += 100.0
    torch.testing.assert_close(
        subs_logp_true(bumped, z, x, MASK), subs_logp_true(logits.detach(), z, x, MASK)
    )


def test_subs_gradients_match_reference() -> None:
    logits, z, x, _ = _inputs()
    weights = torch.randn(N, dtype=torch.float64)
    (subs_logp_true(logits, z, x, MASK, chunk_size=3) * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    (_reference(logits, z, x) * weights).sum().backward()
    torch.testing.assert_close(grad, logits.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[:, MASK] == 0.0)
    assert torch.autograd.gradcheck(
        lambda lg: subs_logp_true(lg, z, x, MASK, chunk_size=7), (logits.detach().requires_grad_(),)
    )


def test_subs_bf16_upcast_per_chunk() -> None:
    logits, z, x, _ = _inputs(torch.bfloat16)
    out = subs_logp_true(logits, z, x, MASK, chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(logits.detach(), z, x), rtol=0, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_subs_argument_errors() -> None:
    logits, z, x, _ = _inputs()
    with pytest.raises(ValueError):
        subs_logp_true(logits, z[:-1], x, MASK)
    with pytest.raises(ValueError):
        subs_logp_true(logits, z, x, V)
    with pytest.raises(ValueError):
        subs_logp_true(logits, z, x, MASK, chunk_size=0)


def test_expected_token_rate_matches_reference_and_gradients() -> None:
    logits, _, _, _ = _inputs()
    w = (torch.rand(V, dtype=torch.float64) + 0.1).requires_grad_(True)
    out = expected_token_rate(logits, w, MASK, chunk_size=6)
    subs = logits.clone()
    subs[:, MASK] = float("-inf")
    reference = (torch.softmax(subs, -1) * w).sum(-1)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda lg, ww: expected_token_rate(lg, ww, MASK, chunk_size=4),
        (logits.detach().requires_grad_(), w.detach().requires_grad_()),
    )
    # The [MASK] exponent never matters (zero masking probability).
    w2 = w.detach().clone()
    w2[MASK] = 1e6
    torch.testing.assert_close(expected_token_rate(logits.detach(), w2, MASK), reference.detach())
