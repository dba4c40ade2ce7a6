"""compute_loss_terms: method.md §3.4 step 7, gradient flow, pads, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.registry import FAMILIES, build_family
from megatron_lomdm.diffusion.subs import expected_token_rate, subs_logp_true
from megatron_lomdm.losses.nelbo import main_term, velocity_term
from megatron_lomdm.losses.objective import LossTerms, compute_loss_terms

F64 = torch.float64
V, MASK = 9, 8


def _lomdm(L: int) -> DiffusionFamily:
    return build_family(
        "lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK
    )


def _batch(K: int, B: int, L: int, seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_BL=torch.randint(0, V - 1, (B, L), generator=g),
        t_B=(torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05).to(dtype),
        logits_KBLV=(2 * torch.randn(K, B, L, V, generator=g, dtype=F64))
        .to(dtype)
        .requires_grad_(True),
        fwd_BL=torch.randn(B, L, generator=g, dtype=F64).to(dtype).requires_grad_(True),
        rev_KBL=torch.randn(K, B, L, generator=g, dtype=F64).to(dtype).requires_grad_(True),
        u_KBL=torch.rand(K, B, L, generator=g, dtype=F64),
    )


def _step(
    family: DiffusionFamily, b: dict, valid_BL: torch.Tensor
) -> tuple[LossTerms, torch.Tensor]:
    """The training step's wiring; returns the terms and the (detached) masks."""
    K, B, L, _ = b["logits_KBLV"].shape
    sched = family.forward_schedule(
        x_BL=b["x_BL"], t_B=b["t_B"], fwd_logits_BL=b["fwd_BL"], valid_BL=valid_BL
    )
    mask_KBL = family.sample_masks(sched, b["u_KBL"])
    x_KBL = b["x_BL"].expand(K, B, L)
    z_KBL = torch.where(mask_KBL, MASK, x_KBL)
    logits_NV = b["logits_KBLV"].reshape(-1, V)
    logp_KBL = subs_logp_true(logits_NV, z_KBL.reshape(-1), x_KBL.reshape(-1), MASK).view(K, B, L)
    rate_KBL = None
    if family.needs_expected_rate:
        rate_KBL = expected_token_rate(logits_NV, family.token_exponents(), MASK).view(K, B, L)
    velocity_hat_KBL = family.reverse_velocity(
        t_KB=b["t_B"].expand(K, B),
        rev_logits_KBL=b["rev_KBL"],
        expected_rate_KBL=rate_KBL,
        valid_BL=valid_BL,
    )
    terms = compute_loss_terms(
        family,
        sched=sched,
        mask_KBL=mask_KBL,
        logp_true_KBL=logp_KBL,
        velocity_hat_KBL=velocity_hat_KBL,
        log_q_KB=family.log_q(sched, mask_KBL, valid_BL),
        valid_BL=valid_BL,
    )
    return terms, mask_KBL


def _pseudocode_objective(
    b: dict, mask_KBL: torch.Tensor, c1: float = 0.7, c2: float = 0.65
) -> torch.Tensor:
    """method.md §3.4's reference pseudo-code, written independently (no padding)."""
    K, B, L, _ = b["logits_KBLV"].shape

    def normsig(v):
        s = torch.sigmoid(v)
        return s - s.mean(-1, keepdim=True)

    t = b["t_B"]
    e_f = c1 + c2 * normsig(b["fwd_BL"])
    logt = t.log()[:, None]
    A = e_f / t[:, None]
    log_q_mask, log_q_keep = e_f * logt, torch.log(-torch.expm1(e_f * logt))
    logits = b["logits_KBLV"].clone()
    logits[..., MASK] = float("-inf")
    logp = torch.log_softmax(logits, -1).gather(-1, b["x_BL"].expand(K, B, L)[..., None])[..., 0]
    Ah = (c1 + c2 * normsig(b["rev_KBL"])) / t[None, :, None]
    l_main = -A * logp
    l_vel = A * (torch.log(A.clamp_min(1e-6)) - torch.log(Ah.clamp_min(1e-6))) - A + Ah
    ell = (mask_KBL * (l_main + l_vel)).sum(-1) / L
    logq = torch.where(mask_KBL, log_q_mask, log_q_keep).sum(-1)
    rloo = 0.5 * (ell[0] - ell[1]).detach() * (logq[0] - logq[1])
    return (0.5 * (ell[0] + ell[1]) + rloo).mean()


def test_surrogate_matches_method_pseudocode() -> None:
    """Surrogate / num_tokens = §3.4 step 7 (value and gradients for theta, phi, psi)."""
    K, B, L = 2, 6, 8
    b = _batch(K, B, L)
    terms, mask_KBL = _step(_lomdm(L), b, torch.ones(B, L, dtype=torch.bool))
    assert int(terms.num_tokens) == B * L
    reference = _pseudocode_objective(b, mask_KBL)
    leaves = (b["logits_KBLV"], b["fwd_BL"], b["rev_KBL"])
    ours = terms.surrogate / terms.num_tokens
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for g_ours, g_ref in zip(
        torch.autograd.grad(ours, leaves), torch.autograd.grad(reference, leaves), strict=True
    ):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms.nelbo, terms.main + terms.velocity)
    torch.testing.assert_close(terms.surrogate.detach(), terms.nelbo + terms.rloo)
    for name in ("nelbo", "main", "velocity", "rloo"):
        assert not getattr(terms, name).requires_grad
    assert terms.velocity > 0


def test_gradient_flow_table() -> None:
    """Theta flows only via the main term, psi only via the velocity term (method.md §3.4 table)."""
    K, B, L = 2, 4, 6
    b = _batch(K, B, L, seed=1)
    family = _lomdm(L)
    terms, mask_KBL = _step(family, b, torch.ones(B, L, dtype=torch.bool))
    g_theta, g_phi, g_psi = torch.autograd.grad(
        terms.surrogate, (b["logits_KBLV"], b["fwd_BL"], b["rev_KBL"])
    )
    # Rebuild the masked main and velocity sums from the building blocks.
    sched = family.forward_schedule(x_BL=b["x_BL"], t_B=b["t_B"], fwd_logits_BL=b["fwd_BL"])
    x_KBL = b["x_BL"].expand(K, B, L)
    logp_KBL = subs_logp_true(
        b["logits_KBLV"].reshape(-1, V),
        torch.where(mask_KBL, MASK, x_KBL).reshape(-1),
        x_KBL.reshape(-1),
        MASK,
    ).view(K, B, L)
    velocity_hat_KBL = family.reverse_velocity(
        t_KB=b["t_B"].expand(K, B), rev_logits_KBL=b["rev_KBL"]
    )
    main = torch.where(mask_KBL, main_term(sched.velocity_BL, logp_KBL), 0.0).sum() / K
    vel = torch.where(mask_KBL, velocity_term(sched.velocity_BL, velocity_hat_KBL), 0.0).sum() / K
    (g_theta_main,) = torch.autograd.grad(main, b["logits_KBLV"], retain_graph=True)
    (g_psi_vel,) = torch.autograd.grad(vel, b["rev_KBL"], retain_graph=True)
    torch.testing.assert_close(g_theta, g_theta_main)
    torch.testing.assert_close(g_psi, g_psi_vel)
    # phi: pathwise (main + velocity) plus the score-function part, which is non-zero.
    (g_phi_path,) = torch.autograd.grad(main + vel, b["fwd_BL"])
    assert (g_phi - g_phi_path).abs().max() > 1e-6


def test_pads_contribute_nothing() -> None:
    """Changing anything at pad positions changes no term; num_tokens counts valid positions."""
    K, B, L = 2, 3, 6
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[0, 4:] = False
    valid_BL[2, 1:] = False
    b = _batch(K, B, L, seed=2)
    family = _lomdm(L)
    terms, _ = _step(family, b, valid_BL)
    assert int(terms.num_tokens) == int(valid_BL.sum())
    g = torch.Generator().manual_seed(9)
    pad_BL = ~valid_BL
    changed = dict(b)
    changed["x_BL"] = torch.where(pad_BL, torch.randint(0, V - 1, (B, L), generator=g), b["x_BL"])
    changed["u_KBL"] = torch.where(pad_BL, torch.rand(K, B, L, generator=g, dtype=F64), b["u_KBL"])
    changed["fwd_BL"] = torch.where(
        pad_BL, 50 * torch.randn(B, L, generator=g, dtype=F64), b["fwd_BL"]
    )
    changed["rev_KBL"] = torch.where(
        pad_BL, 50 * torch.randn(K, B, L, generator=g, dtype=F64), b["rev_KBL"]
    )
    changed["logits_KBLV"] = torch.where(
        pad_BL[..., None], 9 * torch.randn(K, B, L, V, generator=g, dtype=F64), b["logits_KBLV"]
    )
    terms2, _ = _step(family, changed, valid_BL)
    for name in ("surrogate", "nelbo", "main", "velocity", "rloo"):
        torch.testing.assert_close(getattr(terms2, name).detach(), getattr(terms, name).detach())
    # RLOO per-sequence losses are normalised by the valid count and scaled back.
    assert terms.rloo != 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_autocast_finite(name: str) -> None:
    """Under bf16 autocast, at t = eps, t = 1 and exponent extremes: fp32, finite terms."""
    K, B, L, D = 2, 4, 16, 8
    family = build_family(
        name, c1=0.7, c2=0.65, block_size=4, vocab_size=V, seq_length=L, mask_id=MASK
    )
    if name == "genmd4":
        with torch.no_grad():  # exponents spanning softplus(-10) ~ 5e-5 to softplus(10) ~ 10
            family.raw_exponent_V.copy_(torch.linspace(-10.0, 10.0, V))
    g = torch.Generator().manual_seed(5)
    backbone = torch.nn.Linear(D, V)
    fwd_head = torch.nn.Linear(D, 1)
    rev_head = torch.nn.Linear(D, 1)
    h_BLD = torch.randn(B, L, D, generator=g)
    # Extreme scheduler logits: one position at sigmoid ~ 1, the rest at ~ 0, and the reverse,
    # so the exponents reach c1 + c2 (1 - 1/L) and c1 - c2 (1 - 1/L).
    extreme_BL = torch.full((B, L), -40.0)
    extreme_BL[0::2, 0] = 40.0
    extreme_BL[1::2] = 40.0
    extreme_BL[1::2, 0] = -40.0
    b = dict(
        x_BL=torch.randint(0, V - 1, (B, L), generator=g),
        t_B=torch.tensor([1e-3, 1e-3, 0.9999999, 1.0]),
        u_KBL=torch.rand(K, B, L, generator=g),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b["logits_KBLV"] = backbone(h_BLD).unsqueeze(0).expand(K, B, L, V)
        b["fwd_BL"] = fwd_head(h_BLD)[..., 0] * 0 + extreme_BL.bfloat16()
        b["rev_KBL"] = (rev_head(h_BLD)[..., 0] * 0 - extreme_BL.bfloat16()).expand(K, B, L)
        assert b["logits_KBLV"].dtype == torch.bfloat16
        terms, mask_KBL = _step(family, b, torch.ones(B, L, dtype=torch.bool))
    for field in ("surrogate", "nelbo", "main", "velocity", "rloo"):
        value = getattr(terms, field)
        assert value.dtype == torch.float32 and torch.isfinite(value), field
    assert mask_KBL.any()
    terms.surrogate.backward()
    params = [
        *backbone.parameters(),
        *fwd_head.parameters(),
        *rev_head.parameters(),
        *family.parameters(),
    ]
    for p in params:
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert backbone.weight.grad is not None and backbone.weight.grad.abs().sum() > 0
    if name == "lomdm":
        e_BL = family.exponents(extreme_BL)
        assert (
            e_BL.max() > 0.7 + 0.65 * (1 - 1 / L) - 1e-4
            and e_BL.min() < 0.7 - 0.65 * (1 - 1 / L) + 1e-4
        )


def test_argument_errors() -> None:
    K, B, L = 2, 2, 4
    family = _lomdm(L)
    b = _batch(K, B, L)
    sched = family.forward_schedule(x_BL=b["x_BL"], t_B=b["t_B"], fwd_logits_BL=b["fwd_BL"])
    mask_KBL = family.sample_masks(sched, b["u_KBL"])
    ok = dict(
        sched=sched,
        mask_KBL=mask_KBL,
        logp_true_KBL=torch.zeros(K, B, L),
        velocity_hat_KBL=torch.ones(K, B, L),
        log_q_KB=torch.zeros(K, B),
        valid_BL=torch.ones(B, L, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="logp_true_KBL"):
        compute_loss_terms(family, **{**ok, "logp_true_KBL": torch.zeros(K, B, L + 1)})
    with pytest.raises(ValueError, match="log_q_KB"):
        compute_loss_terms(family, **{**ok, "log_q_KB": None})
    mdlm = build_family("mdlm", c1=1, c2=0, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
    terms = compute_loss_terms(mdlm, **{**ok, "log_q_KB": None})
    assert terms.rloo == 0
