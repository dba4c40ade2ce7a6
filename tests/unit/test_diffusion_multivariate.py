"""The multivariate family (Garg et al.; method.md §2, §5.7, §5.8): per-position learnable exponents.

Reduction to poly(c1) at constant logits, the Plackett-Luce order of its exponents, unbiasedness
of the RLOO + pathwise gradient w.r.t. the order logits (method.md §3.8 test 5), the frozen
(learn_order = false) schedule, build-time errors, and sampling its order.

Legend: K corruptions, B sequences, L positions, V vocabulary (including [MASK]).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_lomdm.diffusion.multivariate import MultivariateFamily
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.losses.objective import compute_loss_terms
from megatron_lomdm.sampling import DenoiserOutput, build_sampler, denoiser_from_backbone
from tests.unit.test_diffusion_reductions import MASK, V, _random_batch, _run
from tests.unit.test_diffusion_schedules import _masking_times
from tests.unit.test_losses_rloo import _Toy

F64 = torch.float64
C1, C2 = 0.7, 0.65


def _multivariate(L: int, **kw) -> MultivariateFamily:
    family = build_family("multivariate", c1=C1, c2=C2, block_size=1, vocab_size=V, seq_length=L,
                          mask_id=MASK, **kw)
    assert isinstance(family, MultivariateFamily)
    return family


@pytest.mark.parametrize("learn_order", [True, False])
def test_constant_logits_reduce_to_poly(learn_order: bool) -> None:
    """v = 0 is exactly poly(c1): schedule, masks and loss terms bit for bit (pads included)."""
    K, B, L = 2, 5, 6
    x_BL, t_B, logits_KBLV, _, _, u_KBL = _random_batch(K, B, L)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[1, 4:] = False
    mv = _multivariate(L, learn_order=learn_order)
    poly = build_family("poly", c1=C1, c2=0.0, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
    s_mv = mv.forward_schedule(x_BL=x_BL, t_B=t_B, valid_BL=valid_BL)
    s_poly = poly.forward_schedule(x_BL=x_BL, t_B=t_B, valid_BL=valid_BL)
    for field in ("log_mask_prob_BL", "log_keep_prob_BL", "velocity_BL"):
        assert torch.equal(getattr(s_mv, field).detach(), getattr(s_poly, field)), field
    mask_KBL = poly.sample_masks(s_poly, u_KBL) & valid_BL
    assert torch.equal(mv.sample_masks(s_mv, u_KBL) & valid_BL, mask_KBL)
    assert mask_KBL.any() and (~mask_KBL).any()

    args = dict(x_BL=x_BL, t_B=t_B, mask_KBL=mask_KBL, logits_KBLV=logits_KBLV, valid_BL=valid_BL)
    terms_mv, terms_poly = _run(mv, **args), _run(poly, **args)
    for name in ("nelbo", "main", "velocity", "num_tokens"):
        assert torch.equal(getattr(terms_mv, name), getattr(terms_poly, name)), name
    assert terms_mv.velocity == 0.0  # alpha_R = alpha_F: A_hat = A bit for bit
    # The backbone gets the poly gradient (the RLOO advantage is stop-grad).
    (g_mv,) = torch.autograd.grad(terms_mv.surrogate, logits_KBLV)
    (g_poly,) = torch.autograd.grad(terms_poly.surrogate, logits_KBLV)
    assert torch.equal(g_mv, g_poly)
    if learn_order:
        assert mv.num_corruptions == 2 and terms_mv.rloo != 0.0
        (g_v,) = torch.autograd.grad(_run(mv, **args).surrogate, mv.order_logits_L)
        assert g_v.abs().max() > 0
    else:
        assert mv.num_corruptions == 1 and terms_mv.rloo == 0.0
        assert torch.equal(terms_mv.surrogate, terms_poly.surrogate)

    # Any constant logit is poly(c1) too (NormSig(const) = 0 up to rounding of the mean).
    const = _multivariate(L, order_logits=[2.5] * L)
    torch.testing.assert_close(_run(const, **args).nelbo, terms_poly.nelbo, rtol=1e-7, atol=0)


def test_plackett_luce_order_of_learned_exponents() -> None:
    """The masking times tau_l drawn through ``sample_masks`` order as Plackett-Luce(w)."""
    family = _multivariate(4, order_logits=[-4.0, 1.5, 3.0, 0.2])
    w = family.exponents().detach().double()
    assert float(w.mean()) == pytest.approx(C1) and float(w.max() - w.min()) > 0.5
    g = torch.Generator().manual_seed(1)
    n = 20000
    tau_NL = _masking_times(family, torch.rand(n, 4, generator=g, dtype=F64))
    for i, j in itertools.combinations(range(4), 2):
        p = float(w[i] / (w[i] + w[j]))  # generation order = decreasing tau
        freq = float((tau_NL[:, i] > tau_NL[:, j]).double().mean())
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n), (i, j, freq, p)
    first = torch.bincount(tau_NL.argmax(-1), minlength=4).double() / n
    torch.testing.assert_close(first, w / w.sum(), rtol=0, atol=5 * math.sqrt(0.25 / n))
    # The masking time has CDF t^w: P(tau <= 0.5) = 0.5^w.
    torch.testing.assert_close((tau_NL <= 0.5).double().mean(0), 0.5**w, rtol=0,
                               atol=5 * math.sqrt(0.25 / n))


def _surrogate_gradients(toy: _Toy, replicates: int, per_node: int, with_score: bool,
                         seed: int = 123) -> torch.Tensor:
    """One surrogate gradient w.r.t. the order logits per replicate, (R, L), per token."""
    family, K, J = toy.family, toy.num_corruptions, toy.num_t
    B, L = J * per_node, family.seq_length
    t_B = toy.t_J.repeat_interleave(per_node)
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(replicates):
        sched = family.forward_schedule(x_BL=torch.zeros(B, L, dtype=torch.long), t_B=t_B)
        mask_KBL = family.sample_masks(sched, torch.rand(K, B, L, generator=g, dtype=F64))
        logp_KBL, velocity_hat_KBL = toy.inputs(mask_KBL, t_B)
        log_q_KB = family.log_q(sched, mask_KBL)
        terms = compute_loss_terms(
            family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=logp_KBL,
            velocity_hat_KBL=velocity_hat_KBL, log_q_KB=log_q_KB if with_score else log_q_KB.detach(),
            valid_BL=torch.ones(B, L, dtype=torch.bool),
        )
        assert terms.velocity == 0.0
        (grad_L,) = torch.autograd.grad(terms.surrogate, family.order_logits_L)
        grads.append(grad_L / (B * L))
    return torch.stack(grads)


@pytest.mark.parametrize("num_corruptions", [2, 4])
def test_rloo_gradient_unbiased(num_corruptions: int) -> None:
    """Mean surrogate gradient w.r.t. v = finite-difference gradient of E_t E_z[l] (§3.8 test 5).

    The toy of ``test_losses_rloo`` (context-dependent denoiser log-probs per mask pattern, exact
    expectation over all 2^L masks); the multivariate family reads its own order logits."""
    toy = _Toy("multivariate", num_corruptions=num_corruptions)
    family = toy.family.double()
    with torch.no_grad():
        family.order_logits_L.copy_(toy.phi_L)
    v0_L = toy.phi_L.clone()

    def objective(v_L: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            family.order_logits_L.copy_(v_L)
        return toy.exact_objective(toy.phi_L)  # phi is ignored: the schedule reads v

    (exact_grad_L,) = torch.autograd.grad(objective(v0_L), family.order_logits_L)
    h = 1e-5
    fd_grad_L = torch.stack([(objective(v0_L + h * e) - objective(v0_L - h * e)).detach() / (2 * h)
                             for e in torch.eye(4, dtype=F64)])
    torch.testing.assert_close(exact_grad_L, fd_grad_L, rtol=1e-6, atol=1e-8)
    objective(v0_L)

    grads_RL = _surrogate_gradients(toy, replicates=64, per_node=16, with_score=True)
    mean_L, se_L = grads_RL.mean(0), grads_RL.std(0) / grads_RL.shape[0] ** 0.5
    assert torch.all((mean_L - fd_grad_L).abs() <= 4.5 * se_L), (mean_L, fd_grad_L, se_L)
    assert torch.all(se_L < 0.2 * fd_grad_L.abs().max())
    # The pathwise part alone (through A in the main term) is biased: RLOO is needed.
    path_RL = _surrogate_gradients(toy, replicates=64, per_node=16, with_score=False)
    path_se_L = path_RL.std(0) / path_RL.shape[0] ** 0.5
    assert torch.any((path_RL.mean(0) - fd_grad_L).abs() > 6 * path_se_L)


def test_frozen_order_has_no_gradient_and_one_corruption() -> None:
    """learn_order = false: a fixed multivariate schedule, K = 1 (the key is ignored), no RLOO."""
    L = 6
    logits = [6.0] * (L // 2) + [-6.0] * (L // 2)
    family = _multivariate(L, learn_order=False, num_corruptions=7, order_logits=logits)
    assert family.num_corruptions == 1 and not family.order_logits_L.requires_grad
    w_L = family.exponents()
    half = C2 * (torch.sigmoid(torch.tensor(6.0)) - 0.5)  # NormSig = +-(sigmoid(6) - 1/2)
    torch.testing.assert_close(w_L, torch.tensor([C1 + half] * 3 + [C1 - half] * 3))
    K, B = 1, 4
    x_BL, t_B, logits_KBLV, _, _, u_KBL = _random_batch(K, B, L, seed=3)
    sched = family.forward_schedule(x_BL=x_BL, t_B=t_B)
    assert not sched.velocity_BL.requires_grad
    mask_KBL = family.sample_masks(sched, u_KBL)
    terms = _run(family, x_BL=x_BL, t_B=t_B, mask_KBL=mask_KBL, logits_KBLV=logits_KBLV)
    assert terms.rloo == 0.0 and terms.velocity == 0.0
    terms.surrogate.backward()
    assert family.order_logits_L.grad is None and logits_KBLV.grad is not None
    assert list(family.parameters()) == [family.order_logits_L]  # saved like any parameter


def test_build_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"diffusion\.c1 > diffusion\.c2 >= 0"):
        build_family("multivariate", c1=0.5, c2=0.5, block_size=1, vocab_size=V, seq_length=4,
                     mask_id=MASK)
    with pytest.raises(ValueError, match=r"diffusion\.order_logits has 3 values.*seq_length=4"):
        _multivariate(4, order_logits=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"diffusion\.order_logits must be finite"):
        _multivariate(4, order_logits=[1.0, math.inf, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"diffusion\.num_corruptions >= 2"):
        _multivariate(4, num_corruptions=1)
    assert _multivariate(4, num_corruptions=4).num_corruptions == 4


def _constant_backbone(L: int):
    def backbone(z_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = z_BL.shape[0]
        return torch.zeros(B, L, V), torch.zeros(B, L, 2)

    return backbone


def test_samplers_follow_the_learned_order() -> None:
    """The denoiser carries w: the exact sampler's first pick is w_l / sum w (Plackett-Luce); the
    ancestral sampler unmasks position l in step (t, s] with probability t^{w_l} - s^{w_l}."""
    L = 4
    family = _multivariate(L, order_logits=[-4.0, 1.5, 3.0, 0.2])
    w_L = family.exponents().detach().double()
    denoise = denoiser_from_backbone(_constant_backbone(L), family=family)
    out = denoise(torch.full((3, L), MASK))
    assert torch.equal(out.velocity_exponents_BL, family.exponents().detach().expand(3, L))

    n = 20000
    res = build_sampler("exact", mask_id=MASK, family=family).sample(
        denoise, batch_size=n, seq_length=L, generator=torch.Generator().manual_seed(0))
    first = torch.bincount((res.unmask_step_BL == 0).double().argmax(-1), minlength=L).double() / n
    se = torch.sqrt(w_L / w_L.sum() * (1 - w_L / w_L.sum()) / n)
    assert bool(((first - w_L / w_L.sum()).abs() < 5 * se).all()), (first, w_L / w_L.sum())

    def no_exponents(z_BL: torch.Tensor) -> DenoiserOutput:  # the family= (schedule()) path
        return DenoiserOutput(_constant_backbone(L)(z_BL)[0], None)

    T, B = 6, 4000
    for den in (denoise, no_exponents):
        res = build_sampler("ancestral", mask_id=MASK, num_steps=T, family=family).sample(
            den, batch_size=B, seq_length=L, generator=torch.Generator().manual_seed(1))
        assert not bool((res.tokens_BL == MASK).any())
        for k in range(T):
            t, s = float(res.grid[k]), float(res.grid[k + 1])
            frac_L = (res.unmask_step_BL == k).double().mean(0)
            p_L = t**w_L - s**w_L
            assert bool(((frac_L - p_L).abs() <= 5 * torch.sqrt(p_L * (1 - p_L) / B) + 1e-12).all())
