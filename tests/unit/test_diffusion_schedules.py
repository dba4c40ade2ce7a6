"""Forward schedules of every family: velocity law, mask rates, generation order, log q."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_lomdm.diffusion.base import DiffusionFamily, ForwardSchedule
from megatron_lomdm.diffusion.bd3lm import SlotFamily
from megatron_lomdm.diffusion.registry import FAMILIES, build_family

L, V, MASK = 4, 7, 6
_KW = dict(c1=0.7, c2=0.65, block_size=2, vocab_size=V, seq_length=L, mask_id=MASK)
X_1L = torch.tensor([[0, 3, 5, 1]])
FWD_LOGITS_1L = torch.tensor([[-4.0, 1.5, 3.0, 0.2]], dtype=torch.float64)


def _family(name: str) -> DiffusionFamily:
    family = build_family(name, **_KW)
    if name == "genmd4":
        with torch.no_grad():
            family.raw_exponent_V.copy_(torch.linspace(-2.0, 1.5, V))
    return family


def _sched(family: DiffusionFamily, t_B: torch.Tensor) -> ForwardSchedule:
    B = t_B.shape[0]
    return family.forward_schedule(
        x_BL=X_1L.expand(B, L), t_B=t_B, fwd_logits_BL=FWD_LOGITS_1L.expand(B, L)
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_velocity_is_hazard_of_alpha(name: str) -> None:
    """A (1 - alpha) = -d alpha / dt, and log alpha = log(1 - (1 - alpha))."""
    family = _family(name)
    # Avoid slot boundaries (multiples of 1/4 and 1/2): the derivative is one-sided there.
    t_B = torch.tensor([0.003, 0.1, 0.37, 0.61, 0.8, 0.97], dtype=torch.float64)
    t_B.requires_grad_(True)
    sched = _sched(family, t_B)
    mask_prob_BL = torch.exp(sched.log_mask_prob_BL)
    (dmask_dt_B,) = torch.autograd.grad(mask_prob_BL.sum(), t_B, retain_graph=True)
    # Positions are independent, so differentiate each one separately.
    dmask_dt_BL = torch.stack(
        [
            torch.autograd.grad(mask_prob_BL[:, i].sum(), t_B, retain_graph=True)[0]
            for i in range(L)
        ],
        dim=-1,
    )
    torch.testing.assert_close(dmask_dt_BL.sum(-1), dmask_dt_B)
    torch.testing.assert_close(
        sched.velocity_BL * mask_prob_BL, dmask_dt_BL, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        torch.exp(sched.log_keep_prob_BL), 1 - mask_prob_BL, rtol=1e-10, atol=1e-12
    )
    assert torch.all(torch.isfinite(sched.velocity_BL)) and torch.all(sched.velocity_BL >= 0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_mask_rates(name: str) -> None:
    """Empirical mask frequency per position matches 1 - alpha (t^e for power schedules)."""
    family = _family(name)
    t_B = torch.tensor([0.05, 0.3, 0.55, 0.9])
    sched = _sched(family, t_B)
    g = torch.Generator().manual_seed(0)
    K = 20000
    mask_KBL = family.sample_masks(sched, torch.rand(K, 4, L, generator=g))
    assert mask_KBL.dtype == torch.bool and not mask_KBL.requires_grad
    p_BL = torch.exp(sched.log_mask_prob_BL).detach()
    freq_BL = mask_KBL.double().mean(0)
    se_BL = torch.sqrt(p_BL * (1 - p_BL) / K).double()
    assert torch.all((freq_BL - p_BL).abs() <= 5 * se_BL + 1e-9)
    if name in ("mdlm", "poly", "lomdm", "genmd4"):
        if name == "lomdm":
            e_BL = family.exponents(FWD_LOGITS_1L).expand(4, L)
        elif name == "genmd4":
            e_BL = family.token_exponents()[X_1L].expand(4, L)
        else:
            e_BL = torch.full((4, L), family.exponent)
        torch.testing.assert_close(
            p_BL.double(), t_B.double()[:, None] ** e_BL.double().detach(), rtol=1e-5, atol=1e-7
        )


def _masking_times(
    family: DiffusionFamily, uniform_NL: torch.Tensor, iters: int = 40
) -> torch.Tensor:
    """Masking time of each position under the coupling of ``sample_masks``, by bisection.

    Sequence (n, j) of a flattened batch carries its own time and we read position j only,
    so one bisection updates every (sample, position) interval at once.
    """
    n = uniform_NL.shape[0]
    lo = torch.zeros(n * L, dtype=torch.float64)
    hi = torch.ones(n * L, dtype=torch.float64)
    uniform_1ML = uniform_NL.repeat_interleave(L, dim=0).unsqueeze(0)
    pos_M = torch.arange(L).repeat(n)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        masked_M = family.sample_masks(_sched(family, mid), uniform_1ML)[
            0, torch.arange(n * L), pos_M
        ]
        hi = torch.where(masked_M, mid, hi)
        lo = torch.where(masked_M, lo, mid)
    return hi.view(n, L)


def test_plackett_luce_order() -> None:
    """LoMDM's generation order (decreasing masking time) is Plackett-Luce(e) (method.md §3.2)."""
    family = _family("lomdm")
    e = family.exponents(FWD_LOGITS_1L)[0].numpy()
    g = torch.Generator().manual_seed(1)
    n = 20000
    tau_NL = _masking_times(family, torch.rand(n, L, generator=g, dtype=torch.float64))
    order_NL = torch.argsort(tau_NL, dim=-1, descending=True).numpy()
    # Every permutation's frequency against its Plackett-Luce probability.
    counts = {perm: 0 for perm in itertools.permutations(range(L))}
    for row in map(tuple, order_NL):
        counts[row] += 1
    for perm, count in counts.items():
        p = 1.0
        remaining = list(perm)
        for i in perm:
            p *= e[i] / e[remaining].sum()
            remaining.remove(i)
        se = math.sqrt(p * (1 - p) / n)
        assert abs(count / n - p) <= 5 * se + 1e-4, (perm, count / n, p)
    first = np.bincount(order_NL[:, 0], minlength=L) / n
    np.testing.assert_allclose(first, e / e.sum(), atol=5 * math.sqrt(0.25 / n))
    # The masking time has CDF t^e: P(tau <= 0.5) = 0.5^e.
    frac = (tau_NL <= 0.5).double().mean(0).numpy()
    np.testing.assert_allclose(frac, 0.5**e, atol=5 * math.sqrt(0.25 / n))


def test_slot_order_is_deterministic() -> None:
    """ARM generates left to right; BD3LM block by block."""
    g = torch.Generator().manual_seed(2)
    u_NL = torch.rand(500, L, generator=g, dtype=torch.float64)
    arm_tau = _masking_times(_family("arm"), u_NL)
    assert torch.all(arm_tau[:, :-1] > arm_tau[:, 1:])
    bd_tau = _masking_times(_family("bd3lm"), u_NL)
    assert torch.all(bd_tau[:, :2].min(-1).values > bd_tau[:, 2:].max(-1).values)


def _gauss_legendre(
    a: float, b: float, panels: int, nodes: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes and weights on [a, b]."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(a, b, panels + 1)
    mids, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mids[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_constant_predictor_weight(name: str) -> None:
    """int_0^1 (1 - alpha) A dt = 1 at every position, for every family (method.md §1.7)."""
    family = _family(name)
    if isinstance(family, SlotFamily):
        # Piecewise smooth in t: integrate slot by slot.
        pieces = [_gauss_legendre(k / L, (k + 1) / L, 1) for k in range(L)]
        t = np.concatenate([p[0] for p in pieces])
        w_t = np.concatenate([p[1] for p in pieces])
    else:
        # (1 - alpha) A = e t^(e-1) is singular at 0 for e < 1: integrate over y = -log t.
        y, w_y = _gauss_legendre(0.0, 700.0, 200)
        t, w_t = np.exp(-y), w_y * np.exp(-y)
    sched = _sched(family, torch.from_numpy(t))
    weight_BL = torch.exp(sched.log_mask_prob_BL) * sched.velocity_BL
    integral_L = (weight_BL * torch.from_numpy(w_t)[:, None]).sum(0)
    torch.testing.assert_close(integral_L, torch.ones(L, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_log_q_is_normalised(name: str) -> None:
    """exp(log q) sums to 1 over all 2^L masks, pads contribute nothing."""
    family = _family(name)
    t_B = torch.tensor([0.2, 0.7], dtype=torch.float64)
    sched = _sched(family, t_B)
    masks_KBL = (
        torch.tensor(list(itertools.product([False, True], repeat=L))).unsqueeze(1).expand(-1, 2, L)
    )
    log_q_KB = family.log_q(sched, masks_KBL)
    torch.testing.assert_close(torch.exp(log_q_KB).sum(0), torch.ones(2, dtype=torch.float64))
    valid_BL = torch.tensor([[True, True, False, True]] * 2)
    log_q_valid_KB = family.log_q(sched, masks_KBL, valid_BL)
    # Marginalising out the pad position: each mask of the valid positions appears twice.
    torch.testing.assert_close(
        torch.exp(log_q_valid_KB).sum(0), torch.full((2,), 2.0, dtype=torch.float64)
    )
    flipped = masks_KBL.clone()
    flipped[..., 2] = ~flipped[..., 2]
    torch.testing.assert_close(family.log_q(sched, flipped, valid_BL), log_q_valid_KB)


def test_masks_are_nested_in_t() -> None:
    """With shared uniforms, a position masked at t stays masked at every later t."""
    family = _family("lomdm")
    g = torch.Generator().manual_seed(3)
    u_KBL = torch.rand(200, 1, L, generator=g, dtype=torch.float64)
    previous = torch.zeros(200, 1, L, dtype=torch.bool)
    for t in torch.linspace(0.01, 0.99, 30, dtype=torch.float64):
        masks = family.sample_masks(_sched(family, t.reshape(1)), u_KBL)
        assert torch.all(masks | ~previous)
        previous = masks


def test_power_schedule_t_equal_one_is_finite() -> None:
    """Time t == 1 (fp32 rounding of the sampler) gives finite log alpha and gradients."""
    family = _family("lomdm")
    logits = FWD_LOGITS_1L.float().clone().requires_grad_(True)
    sched = family.forward_schedule(x_BL=X_1L, t_B=torch.ones(1), fwd_logits_BL=logits)
    assert torch.isfinite(sched.log_keep_prob_BL).all()
    sched.log_keep_prob_BL.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_forward_schedule_length_check() -> None:
    family = _family("mdlm")
    with pytest.raises(ValueError, match="seq_length"):
        family.forward_schedule(x_BL=torch.zeros(1, L + 1, dtype=torch.long), t_B=torch.ones(1))
    with pytest.raises(ValueError, match="fwd_logits_BL"):
        _family("lomdm").forward_schedule(x_BL=X_1L, t_B=torch.ones(1))
    with pytest.raises(ValueError, match="rev_logits_KBL"):
        _family("lomdm").reverse_velocity(t_KB=torch.ones(1, 1))
    with pytest.raises(ValueError, match="expected_rate_KBL"):
        _family("genmd4").reverse_velocity(t_KB=torch.ones(1, 1))
