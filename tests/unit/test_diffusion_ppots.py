"""P-POTS time sampling math (method.md §5.8): inverse-CDF draws, weights, unbiasedness, variance.

The toy loss mimics MDLM's per-token NELBO at time t: l(t) = c * (#masked of L) / (L t) with
each position masked with probability t, so E[l | t] = c for every t while Var[l | t] =
c^2 (1 - t) / (L t) grows like 1/t, the shape P-POTS is designed for.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.diffusion.subs import subs_logp_true
from megatron_lomdm.diffusion.time_sampling import (
    bin_loss_sums,
    loss_scale_mass,
    low_discrepancy_t,
    proposal_t,
    proposal_weight,
    time_bin,
)
from megatron_lomdm.losses.objective import compute_loss_terms

EPS = 1e-3
F64 = torch.float64


def _skewed_mass(num_bins: int) -> torch.Tensor:
    """A strongly non-uniform proposal: mass ~ 1/sqrt(bin centre), mixed with 10% uniform."""
    centre_N = EPS + (1 - EPS) * (torch.arange(num_bins, dtype=F64) + 0.5) / num_bins
    w_N = centre_N.rsqrt()
    return 0.9 * w_N / w_N.sum() + 0.1 / num_bins


def _piecewise_cdf(t: torch.Tensor, mass_N: torch.Tensor) -> torch.Tensor:
    """The proposal's CDF at t, written independently of the sampler (linear inside each bin)."""
    n = mass_N.numel()
    pos = ((t - EPS) / (1 - EPS) * n).clamp(0, n)
    full = torch.floor(pos).clamp(max=n - 1).long()
    below = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(mass_N, 0)])[full]
    return below + (pos - full) * mass_N[full]


def _toy_loss(t_RB: torch.Tensor, L: int, g: torch.Generator, c: float = 2.0) -> torch.Tensor:
    masked_RB = (torch.rand(*t_RB.shape, L, generator=g, dtype=F64) < t_RB[..., None]).sum(-1)
    return c * masked_RB / (L * t_RB)


def test_time_bin_edges() -> None:
    t = torch.tensor([EPS, EPS + (1 - EPS) * 0.2499, EPS + (1 - EPS) * 0.2501, 0.999, 1.0], dtype=F64)
    assert time_bin(t, 4, EPS).tolist() == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError, match="num_bins"):
        time_bin(t, 0)


def test_inverse_cdf_stratified_counts_and_cdf() -> None:
    """(1) Stratified strata through the inverse CDF: bin n holds mass_n * n_draws draws (+-1,
    the stratification makes it exact), and the empirical CDF is the piecewise-linear one."""
    g = torch.Generator().manual_seed(0)
    n, mass_N = 4096, _skewed_mass(16)
    t = proposal_t(torch.rand(n, generator=g, dtype=F64), torch.arange(n), n, mass_N, eps=EPS)
    assert t.dtype == F64 and t.min() >= EPS and t.max() <= 1.0
    counts_N = torch.bincount(time_bin(t, 16, EPS), minlength=16).double()
    assert (counts_N - mass_N * n).abs().max() <= 1.0 + 1e-9
    t_sorted = torch.sort(t).values
    ecdf = (torch.arange(n, dtype=F64) + 0.5) / n
    assert (_piecewise_cdf(t_sorted, mass_N) - ecdf).abs().max() <= 1.0 / n + 1e-9


def test_inverse_cdf_iid_density() -> None:
    """(1) Plain iid uniforms (one stratum) give draws with density p: Kolmogorov-Smirnov."""
    g = torch.Generator().manual_seed(1)
    n, mass_N = 20000, _skewed_mass(8)
    t = proposal_t(torch.rand(n, generator=g, dtype=F64), torch.zeros(n, dtype=torch.long), 1, mass_N, eps=EPS)
    t_sorted = torch.sort(t).values
    cdf = _piecewise_cdf(t_sorted, mass_N)
    ks = torch.maximum((torch.arange(1, n + 1) / n - cdf).abs(), (torch.arange(n) / n - cdf).abs()).max()
    assert ks < 1.63 / n**0.5  # the 1% critical value


def test_proposal_t_uniform_mass_is_low_discrepancy() -> None:
    g = torch.Generator().manual_seed(2)
    n = 256
    u = torch.rand(n, generator=g)
    ours = proposal_t(u, torch.arange(n), n, torch.full((7,), 1 / 7, dtype=F64), eps=EPS)
    ref = low_discrepancy_t(u, torch.arange(n), n, eps=EPS)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-7, atol=0)  # same map up to rounding


def test_proposal_t_layout_independent() -> None:
    """The t of a sequence depends only on its uniform, its global index and the proposal."""
    g = torch.Generator().manual_seed(3)
    n, mass_N = 24, _skewed_mass(5)
    u = torch.rand(n, generator=g)
    reference = proposal_t(u, torch.arange(n), n, mass_N)
    pieces = torch.zeros(n)
    for rank in range(4):
        for micro in torch.arange(rank, n, 4).split(2):
            pieces[micro] = proposal_t(u[micro], micro, n, mass_N)
    assert torch.equal(pieces, reference)


def test_proposal_weight_and_mixture_bound() -> None:
    mass_N = _skewed_mass(10)
    t = EPS + (1 - EPS) * (torch.arange(10, dtype=F64) + 0.5) / 10
    torch.testing.assert_close(proposal_weight(t, mass_N, EPS), 1 / (10 * mass_N))
    # the weights integrate the proposal density back to the uniform one: sum_n mass_n w_n = 1
    torch.testing.assert_close((mass_N * proposal_weight(t, mass_N, EPS)).sum(), torch.tensor(1.0, dtype=F64))
    assert proposal_weight(t, mass_N, EPS).max() <= 1 / 0.1 + 1e-9


def test_loss_scale_mass() -> None:
    sums = torch.tensor([[4.0, 0.0, 1.0, 2.0], [4.0, 0.0, 3.0, 2.0], [16.0, 0.0, 9.0, 2.0]], dtype=F64)
    # rms per bin: 2, (pooled: sqrt(27/7)), 3, 1
    mass = loss_scale_mass(sums, uniform_mix=0.2)
    scale = torch.tensor([2.0, (27 / 7) ** 0.5, 3.0, 1.0], dtype=F64)
    torch.testing.assert_close(mass, 0.8 * scale / scale.sum() + 0.05)
    assert abs(float(mass.sum()) - 1.0) < 1e-12 and float(mass.min()) >= 0.05
    torch.testing.assert_close(loss_scale_mass(torch.zeros(3, 4, dtype=F64), 0.1), torch.full((4,), 0.25, dtype=F64))
    torch.testing.assert_close(loss_scale_mass(sums, 1.0), torch.full((4,), 0.25, dtype=F64))
    with pytest.raises(ValueError, match="uniform_mix"):
        loss_scale_mass(sums, 0.0)
    with pytest.raises(ValueError, match="sums_3N"):
        loss_scale_mass(sums[:2], 0.1)


def test_bin_loss_sums() -> None:
    t = torch.tensor([0.1, 0.2, 0.9, 0.95])
    loss = torch.tensor([1.0, 3.0, 2.0, 5.0])
    sums = bin_loss_sums(t, loss, 2, eps=0.0, keep_B=torch.tensor([True, True, True, False]))
    expected = torch.tensor([[2.0, 1.0], [4.0, 2.0], [10.0, 4.0]], dtype=F64)
    assert torch.equal(sums, expected)


def _estimates(mass_N: torch.Tensor | None, R: int, B: int, L: int, seed: int) -> torch.Tensor:
    """R per-batch estimates (mean over B stratified sequences of weight x toy loss)."""
    g = torch.Generator().manual_seed(seed)
    u_RB = torch.rand(R, B, generator=g, dtype=F64)
    idx = torch.arange(B)
    if mass_N is None:
        t_RB = torch.stack([low_discrepancy_t(u, idx, B, eps=EPS) for u in u_RB])
        w_RB = torch.ones_like(t_RB)
    else:
        t_RB = torch.stack([proposal_t(u, idx, B, mass_N, eps=EPS) for u in u_RB])
        w_RB = proposal_weight(t_RB.reshape(-1), mass_N, EPS).view(R, B)
    return (w_RB * _toy_loss(t_RB, L, g)).mean(-1)


def test_weighted_estimator_unbiased() -> None:
    """(2) With p ~ a non-uniform w the weighted estimate has the uniform-t expectation."""
    R, B, L = 4000, 16, 32
    uniform = _estimates(None, R, B, L, seed=10)
    skewed = _estimates(_skewed_mass(20), R, B, L, seed=11)
    se = (uniform.var() / R + skewed.var() / R).sqrt()
    assert (uniform.mean() - skewed.mean()).abs() < 4 * se
    assert (skewed.mean() - 2.0).abs() < 4 * (skewed.var() / R).sqrt()  # E[l | t] = c = 2 exactly


def test_weighted_estimator_unbiased_deterministic_loss() -> None:
    """(2) A fixed loss f(t): the stratified weighted estimate converges to the integral of f."""
    R, B, mass_N = 2000, 64, _skewed_mass(32)
    g = torch.Generator().manual_seed(12)
    u_RB = torch.rand(R, B, generator=g, dtype=F64)
    t_RB = torch.stack([proposal_t(u, torch.arange(B), B, mass_N, eps=EPS) for u in u_RB])
    w_RB = proposal_weight(t_RB.reshape(-1), mass_N, EPS).view(R, B)
    est_R = (w_RB * (t_RB.rsqrt() + torch.sin(5 * t_RB))).mean(-1)
    cos = lambda x: torch.cos(torch.tensor(x, dtype=F64))  # noqa: E731
    exact = (2 * (1 - EPS**0.5) + (cos(5 * EPS) - cos(5.0)) / 5) / (1 - EPS)  # mean of f under U[eps, 1]
    assert (est_R.mean() - exact).abs() < 4 * (est_R.var() / R).sqrt() + 1e-12


def test_variance_lower_with_fitted_proposal() -> None:
    """(3) Fit p from loss statistics of uniform draws (the training loop's rule), then the
    weighted estimator's variance is well below the uniform sampler's."""
    R, B, L, N = 3000, 16, 32, 32
    g = torch.Generator().manual_seed(20)
    t = low_discrepancy_t(torch.rand(50_000, generator=g, dtype=F64), torch.arange(50_000), 50_000, eps=EPS)
    mass_N = loss_scale_mass(bin_loss_sums(t, _toy_loss(t, L, g), N, EPS), uniform_mix=0.1)
    assert mass_N[0] > 1.5 * mass_N[-1]  # the fitted proposal favours small t, where the loss is noisy
    uniform = _estimates(None, R, B, L, seed=21)
    fitted = _estimates(mass_N, R, B, L, seed=22)
    ratio = float(fitted.var() / uniform.var())
    print(f"variance ratio ppots/uniform: {ratio:.3f}")
    assert ratio < 0.7, ratio
    assert (uniform.mean() - fitted.mean()).abs() < 4 * (uniform.var() / R + fitted.var() / R).sqrt()


def test_objective_weight_multiplies_each_sequence() -> None:
    """The weight multiplies each sequence's whole objective (NELBO and RLOO parts), values and
    gradients; without a weight every value is bit-identical to before."""
    K, B, L, V, MASK = 2, 4, 6, 9, 8
    family = build_family("lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
    g = torch.Generator().manual_seed(30)
    x_BL = torch.randint(0, V - 1, (B, L), generator=g)
    t_B = torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05
    logits_KBLV = torch.randn(K, B, L, V, generator=g, dtype=F64).requires_grad_(True)
    fwd_BL = torch.randn(B, L, generator=g, dtype=F64).requires_grad_(True)
    u_KBL = torch.rand(K, B, L, generator=g, dtype=F64)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[1, 4:] = False
    w_B = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)

    def terms(rows: slice, weight: torch.Tensor | None = None):
        x, t, v = x_BL[rows], t_B[rows], valid_BL[rows]
        sched = family.forward_schedule(x_BL=x, t_B=t, fwd_logits_BL=fwd_BL[rows], valid_BL=v)
        mask = family.sample_masks(sched, u_KBL[:, rows]) & v
        k, b, l = mask.shape
        z = torch.where(mask, MASK, x.expand(k, b, l))
        logp = subs_logp_true(logits_KBLV[:, rows].reshape(-1, V), z.reshape(-1), x.expand(k, b, l).reshape(-1),
                              MASK).view(k, b, l)
        vel_hat = sched.velocity_BL.expand(k, b, l) * 0.8
        return compute_loss_terms(family, sched=sched, mask_KBL=mask, logp_true_KBL=logp, velocity_hat_KBL=vel_hat,
                                  log_q_KB=family.log_q(sched, mask, v), valid_BL=v, weight_B=weight)

    weighted = terms(slice(None), w_B)
    singles = [terms(slice(b, b + 1)) for b in range(B)]
    for key in ("nelbo", "main", "velocity", "rloo", "surrogate"):
        expected = sum(w * getattr(s, key) for w, s in zip(w_B, singles))
        torch.testing.assert_close(getattr(weighted, key), expected, rtol=1e-12, atol=1e-12)
    leaves = (logits_KBLV, fwd_BL)
    ref = sum(w * s.surrogate for w, s in zip(w_B, singles))
    for a, b in zip(torch.autograd.grad(weighted.surrogate, leaves), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = terms(slice(None))
    seq = torch.stack([s.seq_nelbo[0] for s in singles])
    torch.testing.assert_close(plain.seq_nelbo, seq, rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted.seq_nelbo, plain.seq_nelbo, rtol=0, atol=0)  # unweighted statistic
    ones = terms(slice(None), torch.ones(B, dtype=F64))
    torch.testing.assert_close(ones.nelbo, plain.nelbo, rtol=1e-14, atol=0)
