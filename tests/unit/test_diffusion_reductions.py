"""Known models as OeMDM instances (method.md §2, §3.8 test 1): exact reductions."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.diffusion.subs import expected_token_rate, subs_logp_true
from megatron_lomdm.losses.objective import LossTerms, compute_loss_terms

V, MASK = 9, 8
F64 = torch.float64


def _build(name: str, L: int, **kw: float) -> DiffusionFamily:
    args = dict(c1=0.7, c2=0.65, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
    args.update(kw)
    return build_family(name, **args)


def _run(
    family: DiffusionFamily,
    *,
    x_BL: torch.Tensor,
    t_B: torch.Tensor,
    mask_KBL: torch.Tensor,
    logits_KBLV: torch.Tensor,
    fwd_logits_BL: torch.Tensor | None = None,
    rev_logits_KBL: torch.Tensor | None = None,
    valid_BL: torch.Tensor | None = None,
) -> LossTerms:
    """What the training step does for one micro-batch, given masks and backbone logits."""
    K, B, L, _ = logits_KBLV.shape
    valid_BL = torch.ones(B, L, dtype=torch.bool) if valid_BL is None else valid_BL
    sched = family.forward_schedule(
        x_BL=x_BL, t_B=t_B, fwd_logits_BL=fwd_logits_BL, valid_BL=valid_BL
    )
    z_KBL = torch.where(mask_KBL, MASK, x_BL.expand(K, B, L))
    logp_KBL = subs_logp_true(
        logits_KBLV.reshape(-1, V), z_KBL.reshape(-1), x_BL.expand(K, B, L).reshape(-1), MASK, 5
    ).view(K, B, L)
    rate_KBL = None
    if family.needs_expected_rate:
        rate_KBL = expected_token_rate(
            logits_KBLV.reshape(-1, V), family.token_exponents(), MASK, 7
        )
        rate_KBL = rate_KBL.view(K, B, L)
    velocity_hat_KBL = family.reverse_velocity(
        t_KB=t_B.expand(K, B),
        rev_logits_KBL=rev_logits_KBL,
        expected_rate_KBL=rate_KBL,
        valid_BL=valid_BL,
    )
    return compute_loss_terms(
        family,
        sched=sched,
        mask_KBL=mask_KBL,
        logp_true_KBL=logp_KBL,
        velocity_hat_KBL=velocity_hat_KBL,
        log_q_KB=family.log_q(sched, mask_KBL, valid_BL),
        valid_BL=valid_BL,
    )


def _random_batch(K: int, B: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_BL = torch.randint(0, V - 1, (B, L), generator=g)
    t_B = torch.rand(B, generator=g, dtype=F64) * 0.98 + 0.01
    logits_KBLV = (2 * torch.randn(K, B, L, V, generator=g, dtype=F64)).requires_grad_(True)
    fwd_BL = torch.randn(B, L, generator=g, dtype=F64).requires_grad_(True)
    rev_KBL = torch.randn(K, B, L, generator=g, dtype=F64).requires_grad_(True)
    uniform_KBL = torch.rand(K, B, L, generator=g, dtype=F64)
    return x_BL, t_B, logits_KBLV, fwd_BL, rev_KBL, uniform_KBL


def _reduction_check(c1: float, reference_name: str) -> None:
    """LoMDM with c2 = 0 equals the fixed power schedule: loss, zero velocity, zero RLOO grad."""
    K, B, L = 2, 5, 6
    x_BL, t_B, logits_KBLV, fwd_BL, rev_KBL, u_KBL = _random_batch(K, B, L)
    lomdm = _build("lomdm", L, c1=c1, c2=0.0)
    sched = lomdm.forward_schedule(x_BL=x_BL, t_B=t_B, fwd_logits_BL=fwd_BL)
    torch.testing.assert_close(sched.velocity_BL, (c1 / t_B)[:, None].expand(B, L))
    torch.testing.assert_close(sched.log_mask_prob_BL, (c1 * torch.log(t_B))[:, None].expand(B, L))
    mask_KBL = lomdm.sample_masks(sched, u_KBL)
    assert mask_KBL.any() and (~mask_KBL).any()
    terms = _run(
        lomdm,
        x_BL=x_BL,
        t_B=t_B,
        mask_KBL=mask_KBL,
        logits_KBLV=logits_KBLV,
        fwd_logits_BL=fwd_BL,
        rev_logits_KBL=rev_KBL,
    )

    # Main term: -(c1/t) log p on masked positions, summed over sequences, mean over K.
    logp_KBLV = logits_KBLV.detach().clone()
    logp_KBLV[..., MASK] = float("-inf")
    logp_KBL = torch.log_softmax(logp_KBLV, -1).gather(-1, x_BL.expand(K, B, L)[..., None])[..., 0]
    expected = (torch.where(mask_KBL, -(c1 / t_B)[None, :, None] * logp_KBL, 0.0)).sum() / K
    torch.testing.assert_close(terms.main, expected)
    assert terms.velocity == 0.0
    torch.testing.assert_close(terms.nelbo, terms.main)

    # The scheduler logits get exactly zero gradient: no pathwise, no RLOO, no psi.
    g_fwd, g_rev, g_theta = torch.autograd.grad(terms.surrogate, (fwd_BL, rev_KBL, logits_KBLV))
    assert torch.all(g_fwd == 0) and torch.all(g_rev == 0)

    # The fixed-schedule family gives the same NELBO and the same backbone gradient.
    reference = _build(reference_name, L, c1=c1)
    ref_sched = reference.forward_schedule(x_BL=x_BL, t_B=t_B)
    torch.testing.assert_close(ref_sched.log_mask_prob_BL, sched.log_mask_prob_BL.detach())
    torch.testing.assert_close(ref_sched.log_keep_prob_BL, sched.log_keep_prob_BL.detach())
    ref_terms = _run(reference, x_BL=x_BL, t_B=t_B, mask_KBL=mask_KBL, logits_KBLV=logits_KBLV)
    torch.testing.assert_close(ref_terms.nelbo, terms.nelbo)
    assert ref_terms.velocity == 0.0 and ref_terms.rloo == 0.0
    (g_theta_ref,) = torch.autograd.grad(ref_terms.surrogate, logits_KBLV)
    torch.testing.assert_close(g_theta_ref, g_theta)

    # c2 > 0 with position-constant logits: NormSig = 0, so again the fixed schedule.
    spread = _build("lomdm", L, c1=c1, c2=0.6 * c1)
    const_terms = _run(
        spread,
        x_BL=x_BL,
        t_B=t_B,
        mask_KBL=mask_KBL,
        logits_KBLV=logits_KBLV,
        fwd_logits_BL=torch.full((B, L), 0.3, dtype=F64),
        rev_logits_KBL=torch.full((K, B, L), -1.2, dtype=F64),
    )
    torch.testing.assert_close(const_terms.nelbo, terms.nelbo)


def test_mdlm_reduction() -> None:
    _reduction_check(1.0, "mdlm")
    # MDLM's own code weight dsigma / expm1(sigma) with alpha = 1 - (1 - eps) t is 1/t = A.
    eps = 1e-3
    t = torch.linspace(0.001, 0.999, 50, dtype=F64)
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    A = (
        _build("mdlm", 1)
        .forward_schedule(x_BL=torch.zeros(50, 1, dtype=torch.long), t_B=t)
        .velocity_BL[:, 0]
    )
    torch.testing.assert_close(A, dsigma / torch.expm1(sigma))


def test_poly_reduction() -> None:
    _reduction_check(0.7, "poly")
    _reduction_check(1.3, "poly")


def _gl(a: float, b: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((a + b) / 2 + (b - a) / 2 * x), torch.from_numpy((b - a) / 2 * w)


def _all_masks(L: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([False, True], repeat=L)))


def _quadrature_nelbo(
    family: DiffusionFamily, x_L: torch.Tensor, predictor, nodes: int = 3
) -> torch.Tensor:
    """int_0^1 E_z[NELBO integrand] dt: exact expectation over all 2^L masks, GL per slot."""
    L = x_L.shape[0]
    num_slots = L // getattr(family, "block_size", L)
    total = torch.zeros((), dtype=F64)
    for k in range(num_slots):
        t_T, w_T = _gl(k / num_slots, (k + 1) / num_slots, nodes)
        for t, w in zip(t_T, w_T, strict=True):
            t_B = t.reshape(1)
            sched = family.forward_schedule(x_BL=x_L[None], t_B=t_B)
            for mask_L in _all_masks(L):
                mask_KBL = mask_L[None, None]
                q = torch.exp(family.log_q(sched, mask_KBL))[0, 0]
                if q == 0:
                    continue
                z_L = torch.where(mask_L, MASK, x_L)
                terms = _run(
                    family,
                    x_BL=x_L[None],
                    t_B=t_B,
                    mask_KBL=mask_KBL,
                    logits_KBLV=predictor(z_L)[None, None],
                )
                total = total + w * q * terms.nelbo
    return total


def _table_predictor(L: int, causal: bool, seed: int):
    """logits_i(z) = b_i + sum_j E[i, j, z_j] over j < i (causal) or j != i (full context)."""
    g = torch.Generator().manual_seed(seed)
    bias_LV = torch.randn(L, V, generator=g, dtype=F64)
    table_LLVV = torch.randn(L, L, V, V, generator=g, dtype=F64)
    allowed_LL = torch.ones(L, L).tril(-1) if causal else 1 - torch.eye(L)

    def predictor(z_L: torch.Tensor) -> torch.Tensor:
        contrib_LLV = table_LLVV[:, torch.arange(L), z_L]  # [i, j] -> E[i, j, z_j]
        return bias_LV + (allowed_LL[..., None].to(F64) * contrib_LLV).sum(1)

    return predictor


def _logp(logits_LV: torch.Tensor, x_L: torch.Tensor) -> torch.Tensor:
    logits_LV = logits_LV.clone()
    logits_LV[:, MASK] = float("-inf")
    return torch.log_softmax(logits_LV, -1).gather(1, x_L[:, None])[:, 0]


def test_arm_exact_nll() -> None:
    """ARM slots + a clean-prefix predictor: NELBO = sum_i -log p(x_i | x_<i) (method.md §2)."""
    L = 5
    x_L = torch.tensor([3, 0, 7, 7, 2])
    predictor = _table_predictor(L, causal=True, seed=4)
    exact_nll = -_logp(predictor(x_L), x_L).sum()
    nelbo = _quadrature_nelbo(_build("arm", L), x_L, predictor)
    torch.testing.assert_close(nelbo, exact_nll, rtol=0, atol=1e-6)
    # MDLM on the same predictor is a different (looser here) bound: the test has power.
    assert abs(_quadrature_nelbo(_build("mdlm", L), x_L, predictor, nodes=12) - exact_nll) > 1e-3


def test_bd3lm_reduction() -> None:
    """Block NELBO = sum_b MDLM NELBO of block b given clean x^{<b}; L'=1 ARM, L'=L MDLM."""
    L = 4
    x_L = torch.tensor([1, 5, 0, 6])
    t_B = torch.tensor([0.02, 0.13, 0.3, 0.49, 0.51, 0.77, 0.999], dtype=F64)
    x_BL = x_L.expand(7, L)
    for block_size, other in ((1, "arm"), (L, "mdlm")):
        ours = _build("bd3lm", L, block_size=block_size).forward_schedule(x_BL=x_BL, t_B=t_B)
        theirs = _build(other, L).forward_schedule(x_BL=x_BL, t_B=t_B)
        for field in ("log_mask_prob_BL", "log_keep_prob_BL", "velocity_BL"):
            torch.testing.assert_close(
                getattr(ours, field), getattr(theirs, field), rtol=1e-12, atol=0
            )

    block = 2
    predictor = _table_predictor(L, causal=False, seed=5)
    # Reference, written out by hand: per block, MDLM's linear schedule in local time tau,
    # earlier blocks clean, later blocks masked, NELBO = int_0^1 E[sum_masked -(1/tau) log p].
    tau_T, w_T = _gl(0.0, 1.0, 4)
    reference = torch.zeros((), dtype=F64)
    for b in range(L // block):
        inside = torch.arange(b * block, (b + 1) * block)
        for sub in _all_masks(block):
            mask_L = torch.arange(L) >= (b + 1) * block
            mask_L[inside] = sub
            z_L = torch.where(mask_L, MASK, x_L)
            ce = -_logp(predictor(z_L), x_L)[inside][sub].sum()
            m = int(sub.sum())
            prob_T = tau_T**m * (1 - tau_T) ** (block - m)
            reference = reference + (w_T * prob_T / tau_T).sum() * ce
    nelbo = _quadrature_nelbo(_build("bd3lm", L, block_size=block), x_L, predictor, nodes=4)
    torch.testing.assert_close(nelbo, reference, rtol=0, atol=1e-10)


def test_genmd4_equivalence() -> None:
    """OeMDM form = GenMD4's integrand -(w_x/t) log mu_x - w_x/t + sum_v (w_v/t) mu_v."""
    K, B, L = 1, 3, 5
    x_BL, t_B, logits_KBLV, _, _, u_KBL = _random_batch(K, B, L, seed=6)
    family = _build("genmd4", L)
    with torch.no_grad():
        family.raw_exponent_V.copy_(torch.linspace(-1.5, 2.0, V))
    family.double()
    sched = family.forward_schedule(x_BL=x_BL, t_B=t_B)
    mask_KBL = family.sample_masks(sched, u_KBL * 0.8)
    assert mask_KBL.any() and (~mask_KBL).any()
    terms = _run(family, x_BL=x_BL, t_B=t_B, mask_KBL=mask_KBL, logits_KBLV=logits_KBLV)
    g_theta, g_w = torch.autograd.grad(terms.surrogate, (logits_KBLV, family.raw_exponent_V))

    # GenMD4's code form: sum_v dgamma_times_alpha_v ((log mu_x + 1) 1[v = x] - mu_v).
    w_V = torch.nn.functional.softplus(family.raw_exponent_V)
    subs_KBLV = logits_KBLV.clone()
    subs_KBLV[..., MASK] = float("-inf")
    log_mu_KBLV = torch.log_softmax(subs_KBLV, -1)
    onehot_KBLV = torch.nn.functional.one_hot(x_BL, V).to(F64).expand(K, B, L, V)
    log_mu_x_KBL1 = log_mu_KBLV.gather(-1, x_BL.expand(K, B, L)[..., None])
    dgamma_times_alpha_BLV = -w_V / t_B[:, None, None]
    integrand_KBL = (
        dgamma_times_alpha_BLV * ((log_mu_x_KBL1 + 1) * onehot_KBLV - log_mu_KBLV.exp())
    ).sum(-1)
    reference = torch.where(mask_KBL, integrand_KBL, 0.0).sum()
    torch.testing.assert_close(terms.nelbo, reference, rtol=1e-12, atol=1e-12)
    r_theta, r_w = torch.autograd.grad(reference, (logits_KBLV, family.raw_exponent_V))
    torch.testing.assert_close(g_theta, r_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, r_w, rtol=1e-10, atol=1e-12)
