"""Counter-based diffusion noise: layout independence and uniformity."""

from __future__ import annotations

import math

import torch

from megatron_lomdm.diffusion.noise import mask_uniforms, time_uniforms


def test_noise_independent_of_batch_slicing() -> None:
    idx = torch.arange(16)
    full = mask_uniforms(seed=3, step=5, index_B=idx, num_corruptions=2, seq_length=32)
    # a data-parallel rank that holds samples 8..11 sees exactly those rows
    part = mask_uniforms(seed=3, step=5, index_B=idx[8:12], num_corruptions=2, seq_length=32)
    assert torch.equal(full[:, 8:12], part)
    assert torch.equal(time_uniforms(seed=3, step=5, index_B=idx)[8:12], time_uniforms(seed=3, step=5, index_B=idx[8:12]))


def test_noise_changes_with_every_counter() -> None:
    idx = torch.arange(8)
    a = mask_uniforms(seed=1, step=0, index_B=idx, num_corruptions=2, seq_length=16)
    assert not torch.equal(a, mask_uniforms(seed=2, step=0, index_B=idx, num_corruptions=2, seq_length=16))
    assert not torch.equal(a, mask_uniforms(seed=1, step=1, index_B=idx, num_corruptions=2, seq_length=16))
    assert not torch.equal(a[0], a[1])  # the two corruptions differ
    assert not torch.equal(time_uniforms(seed=1, step=0, index_B=idx), time_uniforms(seed=1, step=1, index_B=idx))


def test_noise_is_uniform_and_uncorrelated() -> None:
    u = mask_uniforms(seed=0, step=0, index_B=torch.arange(256), num_corruptions=2, seq_length=256).double()
    n = u.numel()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    # histogram against uniform (chi-square with 63 dof: mean 63, sd ~11)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    # neighbouring positions and the two corruptions are uncorrelated
    x, y = u[:, :, :-1].flatten(), u[:, :, 1:].flatten()
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[0].flatten(), u[1].flatten()]))[0, 1].item()) < 0.01


def test_corruptions_are_independent_not_antithetic() -> None:
    """RLOO's leave-one-out baseline is unbiased only if the K corruptions of a sequence are drawn
    independently (method.md §5.8): complementary / antithetic masks (u_2 = 1 - u_1) would correlate
    each sample's advantage with its own score. Pin independence of the K mask uniforms."""
    u_KBL = mask_uniforms(seed=11, step=2, index_B=torch.arange(256), num_corruptions=4, seq_length=64).double()
    n = u_KBL[0].numel()
    for j in range(1, 4):
        corr = torch.corrcoef(torch.stack([u_KBL[0].flatten(), u_KBL[j].flatten()]))[0, 1]
        assert abs(float(corr)) < 4 / math.sqrt(n)  # antithetic pairs would give -1
        for a in (0.2, 0.5, 0.8):  # joint law of two corruptions' mask events at rate a: a^2
            both = float(((u_KBL[0] < a) & (u_KBL[j] < a)).double().mean())
            assert abs(both - a * a) < 4 * math.sqrt(a * a * (1 - a * a) / n)
