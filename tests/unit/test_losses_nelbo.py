"""Per-position NELBO terms: velocity-matching term and the discrete-time limit (§1.7, App. A)."""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.losses.nelbo import main_term, velocity_term

F64 = torch.float64


def test_velocity_term() -> None:
    """>= 0 everywhere, = 0 iff A_hat = A; the generalised Poisson KL A phi(A_hat / A)."""
    grid = torch.logspace(-5, 5, 41, dtype=F64)
    a_GG, a_hat_GG = torch.meshgrid(grid, grid, indexing="ij")
    term_GG = velocity_term(a_GG, a_hat_GG)
    eye = torch.eye(41, dtype=torch.bool)
    assert torch.all(term_GG[eye] == 0.0)
    assert torch.all(term_GG[~eye] > 0.0)
    ratio_GG = a_hat_GG / a_GG
    torch.testing.assert_close(
        term_GG, a_GG * (ratio_GG - 1 - torch.log(ratio_GG)), rtol=1e-9, atol=1e-12
    )
    # fp32 stays non-negative up to rounding.
    term32 = velocity_term(a_GG.float(), a_hat_GG.float())
    assert term32.dtype == torch.float32
    assert torch.all(term32 >= -1e-6 * torch.maximum(a_GG, a_hat_GG).float())
    # Stationary at A_hat = A, with derivative 1 - A / A_hat elsewhere.
    a_hat = torch.tensor([0.3, 2.0, 2.0], dtype=F64, requires_grad=True)
    a = torch.tensor([2.0, 2.0, 0.3], dtype=F64)
    (grad,) = torch.autograd.grad(velocity_term(a, a_hat).sum(), a_hat)
    torch.testing.assert_close(grad, 1 - a / a_hat.detach())
    # Clamped logs: A = 0 gives A_hat, A = A_hat = 0 gives 0, with finite gradients.
    zeros = torch.zeros(2, dtype=F64, requires_grad=True)
    out = velocity_term(zeros, torch.tensor([0.0, 0.5], dtype=F64))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5], dtype=F64))
    out.sum().backward()
    assert torch.isfinite(zeros.grad).all()
    # LoMDM closed form: (1/t)[eF log(eF/eR) - eF + eR]  (method.md §3.2).
    e_f, e_r, t = 1.3, 0.6, 0.37
    value = velocity_term(torch.tensor(e_f / t, dtype=F64), torch.tensor(e_r / t, dtype=F64))
    assert math.isclose(float(value), (e_f * math.log(e_f / e_r) - e_f + e_r) / t, rel_tol=1e-12)


def test_main_term() -> None:
    a = torch.tensor([0.0, 2.5], dtype=F64)
    logp = torch.tensor([-1.0, -0.2], dtype=F64)
    torch.testing.assert_close(main_term(a, logp), torch.tensor([0.0, 0.5], dtype=F64))
    assert main_term(a.bfloat16(), logp.bfloat16()).dtype == torch.float32


def _discrete_kl_sum(e_f: float, e_r: float, p: float, num_steps: int) -> float:
    """Sum over T uniform reverse steps of P(masked at t) KL(true bridge || model step)."""
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=F64)
    t, s = ts[:-1], ts[1:]
    mask_prob = t**e_f
    q_unmask = 1 - (s / t) ** e_f  # (alpha_F(s) - alpha_F(t)) / (1 - alpha_F(t))
    p_unmask = 1 - (s / t) ** e_r
    kl = torch.xlogy(q_unmask, q_unmask / (p_unmask * p))
    stay = 1 - q_unmask
    kl = kl + torch.where(stay > 0, stay * torch.log(stay / (1 - p_unmask)), 0.0)
    return float((mask_prob * kl).sum())


def test_discrete_to_continuous_nelbo() -> None:
    """Per-step KL sum -> -log p + (eF log(eF/eR) - eF + eR)/eF = 1.22898 (Appendix A)."""
    e_f, e_r, p = 1.3, 0.6, 0.37
    closed = -math.log(p) + (e_f * math.log(e_f / e_r) - e_f + e_r) / e_f
    assert abs(closed - 1.2289806231158102) < 1e-12

    # The continuous NELBO from the project's schedules and terms, by quadrature over y = -log t
    # (the integrand t^eF (eF/t)(...) dt = eF t^eF (...) dy is smooth in y).
    x, w = np.polynomial.legendre.leggauss(8)
    edges = np.linspace(0.0, 60.0, 121)
    y = ((edges[1:] + edges[:-1]) / 2)[:, None] + ((edges[1:] - edges[:-1]) / 2)[:, None] * x
    w_y = torch.from_numpy((((edges[1:] - edges[:-1]) / 2)[:, None] * w).ravel())
    t_T = torch.from_numpy(np.exp(-y.ravel()))
    kw = dict(c2=0.0, block_size=1, vocab_size=2, seq_length=1, mask_id=1)
    fwd = build_family("poly", c1=e_f, **kw)
    rev = build_family("poly", c1=e_r, **kw)
    sched = fwd.forward_schedule(x_BL=torch.zeros(t_T.shape[0], 1, dtype=torch.long), t_B=t_T)
    a_hat = rev.reverse_velocity(t_KB=t_T[None])[0]
    integrand = torch.exp(sched.log_mask_prob_BL) * (
        main_term(sched.velocity_BL, torch.tensor(math.log(p), dtype=F64))
        + velocity_term(sched.velocity_BL, a_hat)
    )
    continuous = float((integrand[:, 0] * t_T * w_y).sum())
    assert abs(continuous - closed) < 1e-10

    errors = [abs(_discrete_kl_sum(e_f, e_r, p, T) - closed) for T in (1000, 10000, 100000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-6  # Appendix A: 1.2289805 at T = 100k vs 1.2289806
    assert abs(_discrete_kl_sum(e_f, e_r, p, 100000) - 1.2289805371405695) < 1e-9
