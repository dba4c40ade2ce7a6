"""The slot families' finite-variance NELBO estimator (ARM, BD3LM; issue #16 §4).

``SlotFamily.estimator_schedule`` integrates the block-local time tau out given the number k of
masked valid positions of the active block: k ~ U{1..n}, a uniform k-subset is masked, weight
A = nb n / k. Checked here against independent references: the exact AR NLL, the old law's
(independent Bernoulli(tau) masks, A = nb / tau) NELBO by quadrature, with and without pads;
bounded per-draw values and finite moments, against the old law's diverging second moment;
the mask law itself (exact k, block structure, uniform subsets, nesting, log q).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_lomdm.diffusion.arm import ARMFamily
from megatron_lomdm.diffusion.bd3lm import BD3LMFamily, SlotEstimatorSchedule, SlotFamily
from megatron_lomdm.diffusion.mdlm import MDLMFamily
from megatron_lomdm.diffusion.noise import mask_uniforms, time_uniforms
from megatron_lomdm.diffusion.subs import subs_logp_true
from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t
from megatron_lomdm.losses.objective import compute_loss_terms

V, MASK = 9, 8
F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Toy predictor and the two estimators, through the family code path
# ----------------------------------------------------------------------------------------------


def _table_predictor(L: int, causal: bool, seed: int):
    """logits_i(z) = b_i + sum_j E[i, j, z_j] over j < i (causal) or j != i (full context)."""
    g = torch.Generator().manual_seed(seed)
    bias_LV = torch.randn(L, V, generator=g, dtype=F64)
    table_LLVV = torch.randn(L, L, V, V, generator=g, dtype=F64)
    allowed_LL = torch.ones(L, L, dtype=F64).tril(-1) if causal else 1 - torch.eye(L, dtype=F64)

    def predictor(z_NL: torch.Tensor) -> torch.Tensor:
        onehot_NLV = torch.nn.functional.one_hot(z_NL, V).to(F64)
        return bias_LV + torch.einsum("njv,ijvw,ij->niw", onehot_NLV, table_LLVV, allowed_LL)

    return predictor


def _logp_true(predictor, z_NL: torch.Tensor, x_NL: torch.Tensor) -> torch.Tensor:
    """SUBS log p of the true token, (N, L) (0 at unmasked positions)."""
    logits_NLV = predictor(z_NL)
    return subs_logp_true(logits_NLV.reshape(-1, V), z_NL.reshape(-1), x_NL.reshape(-1), MASK).view(
        z_NL.shape
    )


def _clean_prefix_ce(predictor, x_L: torch.Tensor) -> torch.Tensor:
    """-log p(x_i | x) under SUBS for every i, (L,): with a causal predictor, -log p(x_i | x_<i)."""
    logits_LV = predictor(x_L[None])[0].clone()
    logits_LV[:, MASK] = -math.inf
    return -torch.log_softmax(logits_LV, -1).gather(1, x_L[:, None])[:, 0]


def _draws(
    family: SlotFamily,
    x_L: torch.Tensor,
    valid_L: torch.Tensor,
    t_N: torch.Tensor,
    u_NL: torch.Tensor,
    predictor,
    *,
    old: bool = False,
) -> torch.Tensor:
    """One-sample NELBO estimates (N,) as the training step computes them (K = 1).

    ``old``: the previous estimator, forward_schedule's independent Bernoulli(tau) masks with
    A = nb / tau (and A_hat from reverse_velocity); else estimator_schedule's k-subset law.
    """
    N, L = u_NL.shape
    x_NL, valid_NL = x_L.expand(N, L), valid_L.expand(N, L)
    t_1N = t_N.unsqueeze(0)
    if old:
        sched = family.forward_schedule(x_BL=x_NL, t_B=t_N, valid_BL=valid_NL)
        velocity_hat_1NL = family.reverse_velocity(t_KB=t_1N, valid_BL=valid_NL)
    else:
        sched = family.estimator_schedule(x_BL=x_NL, t_B=t_N, valid_BL=valid_NL)
        velocity_hat_1NL = family.estimator_reverse_velocity(sched=sched, t_KB=t_1N, valid_BL=valid_NL)
    mask_1NL = family.sample_masks(sched, u_NL.unsqueeze(0)) & valid_NL
    z_NL = torch.where(mask_1NL[0], MASK, x_NL)
    logp_1NL = _logp_true(predictor, z_NL, x_NL).unsqueeze(0)
    terms = compute_loss_terms(
        family, sched=sched, mask_KBL=mask_1NL, logp_true_KBL=logp_1NL,
        velocity_hat_KBL=velocity_hat_1NL, log_q_KB=None, valid_BL=valid_NL,
    )
    value_N = torch.where(mask_1NL[0], -sched.velocity_BL * logp_1NL[0], 0.0).sum(-1)
    torch.testing.assert_close(terms.nelbo, value_N.sum(), rtol=1e-12, atol=1e-9)
    assert terms.velocity == 0.0
    return value_N


def _exact_moments(
    family: SlotFamily, x_L: torch.Tensor, valid_L: torch.Tensor, predictor
) -> tuple[float, float, float]:
    """E, E[X^2], E[X^4] of the new estimator by enumeration of (slot, k, k-subset).

    The estimate is constant on the cells {slot s, k} of t (probability 1 / (nb n) each), so the
    cell midpoint stands for the cell; the subsets are enumerated here, not by sample_masks.
    """
    L, nb, W = x_L.shape[0], family.num_blocks, family.block_size
    moments = [0.0, 0.0, 0.0]
    for s in range(1, nb + 1):
        b = nb - s
        active = [i for i in range(b * W, (b + 1) * W) if valid_L[i]]
        n = len(active)
        for k in range(1, n + 1):  # n = 0: only pads, the estimate is 0
            t_1 = torch.tensor([(s - 1 + (k - 0.5) / n) / nb], dtype=F64)
            sched = family.estimator_schedule(x_BL=x_L[None], t_B=t_1, valid_BL=valid_L[None])
            assert int(sched.num_masked_B) == k
            subsets = list(itertools.combinations(active, k))
            mask_ML = torch.zeros(len(subsets), L, dtype=torch.bool)
            mask_ML[:, (b + 1) * W:] = True
            for m, subset in enumerate(subsets):
                mask_ML[m, list(subset)] = True
            mask_ML &= valid_L
            x_ML = x_L.expand_as(mask_ML)
            logp_ML = _logp_true(predictor, torch.where(mask_ML, MASK, x_ML), x_ML)
            value_M = torch.where(mask_ML, -sched.velocity_BL * logp_ML, 0.0).sum(-1)
            p = 1.0 / (nb * n * len(subsets))
            for j in range(3):
                moments[j] += p * float((value_M ** (2**j)).sum())
    return moments[0], moments[1], moments[2]


def _gauss_legendre(a: float, b: float, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy((a + b) / 2 + (b - a) / 2 * x), torch.from_numpy((b - a) / 2 * w)


def _old_law_nelbo(
    family: SlotFamily, x_L: torch.Tensor, valid_L: torch.Tensor, predictor, nodes: int = 8
) -> float:
    """The NELBO under forward_schedule's law (the target of the old estimator), pads excluded.

    int_0^1 E_z[sum_i M_i A_i (-log p_i)] dt with the exact expectation over every mask of the
    valid positions, weighted by the product law exp(log q); Gauss-Legendre per slot is exact
    (the integrand is a polynomial of degree < block_size in tau).
    """
    L, nb = x_L.shape[0], family.num_blocks
    masks_ML = torch.tensor(list(itertools.product([False, True], repeat=L)))
    masks_ML = masks_ML[~(masks_ML & ~valid_L).any(-1)]
    x_ML = x_L.expand_as(masks_ML)
    logp_ML = _logp_true(predictor, torch.where(masks_ML, MASK, x_ML), x_ML)
    total = 0.0
    for s in range(nb):
        t_T, w_T = _gauss_legendre(s / nb, (s + 1) / nb, nodes)
        T = t_T.shape[0]
        sched = family.forward_schedule(x_BL=x_L.expand(T, L), t_B=t_T, valid_BL=valid_L.expand(T, L))
        mask_MTL = masks_ML[:, None, :].expand(-1, T, L)
        q_MT = torch.exp(family.log_q(sched, mask_MTL, valid_L.expand(T, L)))
        value_MT = torch.where(mask_MTL, -sched.velocity_BL * logp_ML[:, None, :], 0.0).sum(-1)
        total += float((w_T * (q_MT * value_MT).sum(0)).sum())
    return total


CASES = [  # (name, family, causal predictor, valid mask)
    ("arm", ARMFamily(seq_length=5, mask_id=MASK), True, [1, 1, 1, 1, 1]),
    ("arm_pads", ARMFamily(seq_length=5, mask_id=MASK), True, [1, 1, 1, 0, 0]),
    ("bd3lm2", BD3LMFamily(block_size=2, seq_length=6, mask_id=MASK), False, [1, 1, 1, 1, 1, 1]),
    ("bd3lm3_pads", BD3LMFamily(block_size=3, seq_length=6, mask_id=MASK), False, [1, 1, 1, 1, 0, 0]),
    ("bd3lm2_pad_block", BD3LMFamily(block_size=2, seq_length=6, mask_id=MASK), False, [1, 1, 1, 0, 0, 0]),
    ("mdlm_like", BD3LMFamily(block_size=4, seq_length=4, mask_id=MASK), False, [1, 1, 1, 1]),
]


def _case(case):
    name, family, causal, valid = case
    L = family.seq_length
    x_L = torch.tensor([3, 0, 7, 7, 2, 5][:L])
    return family, x_L, torch.tensor(valid, dtype=torch.bool), _table_predictor(L, causal, seed=len(name))


# ----------------------------------------------------------------------------------------------
# (1) The mean: exact AR NLL / exact block NELBO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_estimator_mean_is_exact_nelbo(case) -> None:
    """E[new estimate] (enumerated) = the old law's NELBO (quadrature); ARM: the exact AR NLL."""
    family, x_L, valid_L, predictor = _case(case)
    mean, _, _ = _exact_moments(family, x_L, valid_L, predictor)
    reference = _old_law_nelbo(family, x_L, valid_L, predictor)
    assert mean == pytest.approx(reference, rel=1e-10, abs=1e-10)
    if isinstance(family, ARMFamily):
        # causal predictor: p(x_i | z) = p(x_i | x_<i); pads contribute nothing
        exact_ar_nll = float((_clean_prefix_ce(predictor, x_L) * valid_L).sum())
        assert mean == pytest.approx(exact_ar_nll, rel=1e-10)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
def test_estimator_mean_monte_carlo(case) -> None:
    """The training step's own noise (counter-based uniforms, antithetic t with eps = 0):
    the sample mean is within 4 standard errors of the exact NELBO."""
    family, x_L, valid_L, predictor = _case(case)
    N, L = 4096, family.seq_length
    index_N = torch.arange(N)
    t_N = low_discrepancy_t(time_uniforms(seed=7, step=3, index_B=index_N), index_N, N, eps=0.0)
    u_NL = mask_uniforms(seed=7, step=3, index_B=index_N, num_corruptions=1, seq_length=L)[0]
    value_N = _draws(family, x_L, valid_L, t_N.double(), u_NL.double(), predictor)
    mean, m2, _ = _exact_moments(family, x_L, valid_L, predictor)
    se = math.sqrt((m2 - mean**2) / N)  # iid bound; the antithetic t only lowers it
    assert abs(float(value_N.mean()) - mean) <= 4 * se


# ----------------------------------------------------------------------------------------------
# (2) Finite, bounded variance; the old law's second moment diverges
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_estimator_variance_is_finite(case) -> None:
    family, x_L, valid_L, predictor = _case(case)
    L, nb = family.seq_length, family.num_blocks
    mean, m2, m4 = _exact_moments(family, x_L, valid_L, predictor)
    g = torch.Generator().manual_seed(11)
    N = 2**14
    t_N = torch.rand(N, generator=g, dtype=F64)
    u_NL = torch.rand(N, L, generator=g, dtype=F64)
    new_N = _draws(family, x_L, valid_L, t_N, u_NL, predictor)
    old_N = _draws(family, x_L, valid_L, t_N, u_NL, predictor, old=True)

    # Every draw is bounded: nb * n * max(-log p) over the conditionals it can use (ARM: L * max).
    masks_ML = torch.tensor(list(itertools.product([False, True], repeat=L))) & valid_L
    x_ML = x_L.expand_as(masks_ML)
    max_ce = float(-_logp_true(predictor, torch.where(masks_ML, MASK, x_ML), x_ML).min())
    bound = nb * family.block_size * max_ce
    assert float(new_N.max()) <= bound
    assert float(old_N.max()) > 10 * bound  # the old estimator is unbounded (A = nb / tau)

    # The sample second moment is stable over 2^k growing sample sizes: within 6 standard errors
    # of the exact (finite) E[X^2], the standard error of X^2 from the exact E[X^4].
    for n in (2**8, 2**10, 2**12, 2**14):
        m2_hat = float(new_N[:n].square().mean())
        assert abs(m2_hat - m2) <= 6 * math.sqrt((m4 - m2**2) / n), (n, m2_hat, m2)
    assert abs(float(new_N.mean()) - mean) <= 5 * math.sqrt((m2 - mean**2) / N)
    # The old estimator on the same draws (same mean): a sample second moment far above the new
    # one's exact value, driven by rare huge draws (test_old_second_moment_diverges says why).
    assert float(old_N.square().mean()) > 2 * m2


def test_old_second_moment_diverges() -> None:
    """Why: under the old law E[X^2; tau > delta] = L sum_i c_i^2 log(1/delta) -> infinity for
    ARM (masked w.p. tau, weight L / tau), against the new E[X^2] = L sum_i c_i^2."""
    family, x_L, valid_L, predictor = _case(CASES[0])
    L = family.seq_length
    c_L = _clean_prefix_ce(predictor, x_L)
    _, m2_new, _ = _exact_moments(family, x_L, valid_L, predictor)
    assert m2_new == pytest.approx(L * float(c_L.square().sum()), rel=1e-10)

    def old_truncated_m2(delta: float) -> float:
        # tau = exp(-y), y in [0, log 1/delta]; each slot has probability 1/L, dt = dtau / L.
        y_T, w_T = _gauss_legendre(0.0, math.log(1 / delta), 64)
        tau_T, w_T = torch.exp(-y_T), w_T * torch.exp(-y_T)
        total = 0.0
        for s in range(L):
            t_T = (s + tau_T) / L
            T = t_T.shape[0]
            sched = family.forward_schedule(x_BL=x_L.expand(T, L), t_B=t_T)
            i = L - 1 - s  # the active position
            p_mask_T = torch.exp(sched.log_mask_prob_BL[:, i])
            total += float((w_T / L * p_mask_T * (sched.velocity_BL[:, i] * c_L[i]) ** 2).sum())
        return total

    for delta in (1e-2, 1e-4, 1e-8):
        assert old_truncated_m2(delta) == pytest.approx(m2_new * math.log(1 / delta), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# (3) The mask law
# ----------------------------------------------------------------------------------------------


def test_masks_block_structure() -> None:
    """Exactly k = ceil(tau n) active positions masked, later blocks masked, earlier clean,
    pads of the active block never masked; the schedule's marginals and weights match."""
    family = BD3LMFamily(block_size=4, seq_length=12, mask_id=MASK)
    nb, W, L = 3, 4, 12
    g = torch.Generator().manual_seed(5)
    N = 3000
    t_N = torch.rand(N, generator=g)
    lengths_N = torch.randint(1, L + 1, (N,), generator=g)
    valid_NL = torch.arange(L) < lengths_N[:, None]
    valid_NL[:7] = True
    valid_NL[7, 5] = False  # a pad inside a block
    sched = family.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N, valid_BL=valid_NL)
    assert isinstance(sched, SlotEstimatorSchedule)
    mask_KNL = family.sample_masks(sched, torch.rand(3, N, L, generator=g))
    assert mask_KNL.dtype == torch.bool and not mask_KNL.requires_grad
    t64_N = t_N.double()
    slot_N = torch.ceil(nb * t64_N).clamp(1, nb)
    block_N = (nb - slot_N).long()
    tau_N = nb * t64_N - (slot_N - 1)
    block_L = torch.arange(L) // W
    active_NL = (block_L == block_N[:, None]) & valid_NL
    n_N = active_NL.sum(-1)
    k_N = torch.minimum(torch.ceil(tau_N * n_N).clamp(min=1), n_N.double()).long()
    assert torch.equal(sched.active_BL, active_NL) and torch.equal(sched.num_masked_B, k_N)
    assert torch.equal((mask_KNL & active_NL).sum(-1), k_N.expand(3, N))
    assert torch.all(mask_KNL[:, block_L[None, :].expand(N, L) > block_N[:, None]])
    assert not torch.any(mask_KNL & (block_L <= block_N[:, None]) & ~active_NL)
    # marginals and weights
    p_NL = torch.exp(sched.log_mask_prob_BL)
    torch.testing.assert_close(p_NL[active_NL], (k_N / n_N.clamp(min=1))[:, None].expand(N, L)[active_NL])
    torch.testing.assert_close(torch.exp(sched.log_keep_prob_BL), 1 - p_NL)
    expected_A = (nb * n_N / k_N.clamp(min=1)).float()[:, None].expand(N, L)
    torch.testing.assert_close(sched.velocity_BL, torch.where(active_NL, expected_A, 0.0))
    assert torch.all(torch.isfinite(sched.velocity_BL))
    torch.testing.assert_close(
        family.estimator_reverse_velocity(sched=sched, t_KB=t_N.expand(2, N)), sched.velocity_BL.expand(2, N, L)
    )
    # ARM: one position, weight L
    arm = ARMFamily(seq_length=L, mask_id=MASK)
    arm_sched = arm.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N)
    assert torch.equal(arm_sched.num_masked_B, torch.ones(N, dtype=torch.long))
    assert torch.equal(arm_sched.velocity_BL, torch.where(arm_sched.active_BL, float(L), 0.0))


def test_masks_uniform_subset_and_k() -> None:
    """At fixed t the masked k-subset is uniform over the C(n, k) subsets (torch uniforms and the
    counter-based training uniforms); for uniform t, k is uniform on 1..n."""
    family = BD3LMFamily(block_size=4, seq_length=8, mask_id=MASK)
    N, L = 24000, 8
    t_N = torch.full((N,), 0.4)  # slot 1 of 2 -> block 1 (positions 4..7), tau = 0.8, k = ceil(3.2)
    valid_NL = torch.ones(N, L, dtype=torch.bool)
    sched = family.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N, valid_BL=valid_NL)
    assert torch.all(sched.num_masked_B == 4)
    t_N = torch.full((N,), 0.3)  # tau = 0.6, k = ceil(2.4) = 3 of 4: 4 subsets
    sched = family.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N, valid_BL=valid_NL)
    valid_NL[:, 6] = False  # now n = 3, k = ceil(1.8) = 2: 3 subsets
    padded = family.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N, valid_BL=valid_NL)
    index_N = torch.arange(N)
    uniforms = {
        "torch": torch.rand(1, N, L, generator=torch.Generator().manual_seed(9)),
        "counter": mask_uniforms(seed=3, step=5, index_B=index_N, num_corruptions=1, seq_length=L),
    }
    for name, u_1NL in uniforms.items():
        for s, positions, k in ((sched, [4, 5, 6, 7], 3), (padded, [4, 5, 7], 2)):
            mask_NL = family.sample_masks(s, u_1NL)[0]
            assert torch.equal(mask_NL, family.sample_masks(s, u_1NL)[0])  # reproducible
            counts: dict[tuple[int, ...], int] = {}
            for row in mask_NL[:, positions].tolist():
                key = tuple(p for p, m in zip(positions, row, strict=True) if m)
                counts[key] = counts.get(key, 0) + 1
            subsets = list(itertools.combinations(positions, k))
            assert set(counts) == set(subsets), (name, counts)
            p = 1 / len(subsets)
            for subset in subsets:
                assert abs(counts[subset] / N - p) <= 5 * math.sqrt(p * (1 - p) / N), (name, subset)
    # k ~ U{1..n} and the active block ~ U{blocks} under the antithetic t of the training step
    t_N = low_discrepancy_t(time_uniforms(seed=3, step=5, index_B=index_N), index_N, N, eps=0.0)
    valid_NL[:, 6] = True
    valid_NL[:, 1] = False  # block 0 has n = 3, block 1 n = 4
    sched = family.estimator_schedule(x_BL=torch.zeros(N, L, dtype=torch.long), t_B=t_N, valid_BL=valid_NL)
    block_N = (sched.active_BL.float().argmax(-1) // 4).long()
    for b, n in ((0, 3), (1, 4)):
        k_M = sched.num_masked_B[block_N == b]
        assert abs(k_M.numel() / N - 0.5) < 1e-3  # stratified
        freq = torch.bincount(k_M, minlength=n + 1)[1:].double() / k_M.numel()
        torch.testing.assert_close(freq, torch.full((n,), 1 / n, dtype=F64), rtol=0, atol=2e-3)


def test_masks_nested_in_t_and_log_q() -> None:
    """Shared uniforms give masks nested in t; log q is the exact log-probability of the law."""
    family = BD3LMFamily(block_size=3, seq_length=6, mask_id=MASK)
    L = 6
    valid_1L = torch.tensor([[True, True, True, True, False, True]])
    x_1L = torch.zeros(1, L, dtype=torch.long)
    u_K1L = torch.rand(300, 1, L, generator=torch.Generator().manual_seed(4), dtype=F64)
    previous = torch.zeros(300, 1, L, dtype=torch.bool)
    for t in torch.linspace(0.0, 1.0, 41, dtype=F64):
        sched = family.estimator_schedule(x_BL=x_1L, t_B=t.reshape(1), valid_BL=valid_1L)
        masks = family.sample_masks(sched, u_K1L)
        assert torch.all(masks | ~previous), float(t)
        previous = masks
        # log q: normalised over all masks of the valid positions, -log C(n, k) on its draws
        all_MKL = torch.tensor(list(itertools.product([False, True], repeat=L)))[:, None, :]
        all_MKL = all_MKL[~(all_MKL & ~valid_1L).any(-1)[:, 0]]
        q_M = torch.exp(family.log_q(sched, all_MKL, valid_1L))[:, 0]
        torch.testing.assert_close(q_M.sum(), torch.ones((), dtype=F64))
        n, k = int(sched.active_BL.sum()), int(sched.num_masked_B)
        drawn = family.log_q(sched, masks & valid_1L, valid_1L)
        torch.testing.assert_close(drawn, torch.full_like(drawn, -math.log(math.comb(n, k))))


def test_constant_predictor_weight() -> None:
    """Each valid token's cross-entropy carries total expected weight 1 (pads 0):
    int_0^1 P(masked) A dt = 1, on a fine t grid."""
    family = BD3LMFamily(block_size=4, seq_length=12, mask_id=MASK)
    L, T = 12, 2**16
    t_T = (torch.arange(T, dtype=F64) + 0.5) / T
    valid_L = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    sched = family.estimator_schedule(x_BL=torch.zeros(T, L, dtype=torch.long), t_B=t_T, valid_BL=valid_L.expand(T, L))
    weight_L = (torch.exp(sched.log_mask_prob_BL) * sched.velocity_BL).mean(0)
    torch.testing.assert_close(weight_L, valid_L.to(F64), rtol=0, atol=1e-3)


def test_other_families_keep_their_estimator() -> None:
    """The default estimator is forward_schedule (MDLM); forward_schedule and schedule() of the
    slot families (the samplers' law) are unchanged; only slot families drop the t floor."""
    mdlm = MDLMFamily(seq_length=4, mask_id=MASK)
    t_B = torch.tensor([0.1, 0.6], dtype=F64)
    x_BL = torch.zeros(2, 4, dtype=torch.long)
    a, b = mdlm.estimator_schedule(x_BL=x_BL, t_B=t_B), mdlm.forward_schedule(x_BL=x_BL, t_B=t_B)
    assert type(a) is type(b)
    for field in ("log_mask_prob_BL", "log_keep_prob_BL", "velocity_BL", "t_B"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(mdlm.estimator_reverse_velocity(sched=a, t_KB=t_B[None]), mdlm.reverse_velocity(t_KB=t_B[None]))
    assert mdlm.needs_time_floor and not ARMFamily.needs_time_floor and not BD3LMFamily.needs_time_floor
    arm = ARMFamily(seq_length=4, mask_id=MASK)
    old = arm.forward_schedule(x_BL=x_BL, t_B=t_B)
    assert not isinstance(old, SlotEstimatorSchedule)
    torch.testing.assert_close(old.velocity_BL, arm.schedule(t_B).velocity_BL)
    torch.testing.assert_close(old.velocity_BL[0, 3], torch.tensor(4 / 0.4, dtype=F64))  # nb / tau
