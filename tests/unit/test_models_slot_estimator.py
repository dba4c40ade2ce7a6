"""The slot families' finite-variance estimator through DiffusionLM (training and evaluation path).

A tiny megatron backbone in one CPU process (as test_models_backbone.py). ARM: with the global
batch = L copies of one sequence and t uniform on [0, 1) (no eps_t floor for slot families), the
antithetic sampler gives each position's slot exactly once, so the batch's NELBO sum is L times
the exact AR NLL. BD3LM: the loss is the hand computation from the same counter-based noise, and
a few optimiser steps on it lower it.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lomdm.diffusion.arm import ARMFamily
from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.bd3lm import BD3LMFamily
from megatron_lomdm.diffusion.noise import mask_uniforms
from megatron_lomdm.models.backbone import build_backbone
from megatron_lomdm.models.diffusion_lm import DiffusionLM
from tests.helpers.cpu_megatron import megatron_cpu_session

V, MASK_ID, L, D = 100, 99, 16, 64


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0) as info:
        yield info


def _model(family: DiffusionFamily, global_batch_size: int) -> DiffusionLM:
    torch.manual_seed(0)
    backbone = build_backbone(num_layers=2, hidden_size=D, num_heads=4, ffn_hidden_size=4 * D, vocab_size=V,
                              seq_length=L, mask_id=MASK_ID, use_cpu_initialization=True)
    return DiffusionLM(backbone, family, None, None, mask_id=MASK_ID, seed=5,
                       global_batch_size=global_batch_size, eps_t=1e-3)


def _logp_true(model: DiffusionLM, z_BL: torch.Tensor, x_BL: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
    """SUBS log p(x_i | z) at every position, by hand from the backbone's logits."""
    logits_BLV = model.backbone(z_BL, valid_BL)[0][..., :V].double()
    logits_BLV[..., MASK_ID] = -math.inf
    return torch.log_softmax(logits_BLV, -1).gather(-1, x_BL[..., None])[..., 0]


def test_arm_estimator_through_model_is_exact_ar_nll(session) -> None:
    model = _model(ARMFamily(seq_length=L, mask_id=MASK_ID), global_batch_size=L).eval()
    assert model.eps_t == 0.0  # no time floor for slot families: exactly unbiased
    x_L = torch.randint(0, MASK_ID, (L,), generator=torch.Generator().manual_seed(1))
    index_B = torch.arange(L)
    for num_pads in (0, 5):
        valid_BL = (torch.arange(L) < L - num_pads).expand(L, L)
        tokens_BL = x_L.expand(L, L)
        with torch.no_grad():
            terms, diag = model(tokens_BL, valid_BL, index_B, -1)  # evaluation noise
            # row i: positions >= i masked (pads keep their token), the AR conditional of x_i
            ar_BL = (torch.arange(L)[None, :] >= torch.arange(L)[:, None]) & valid_BL
            logp_L = _logp_true(model, torch.where(ar_BL, MASK_ID, tokens_BL), tokens_BL, valid_BL).diagonal()
        exact_ar_nll = float(-logp_L[: L - num_pads].sum())
        assert float(terms.nelbo) / L == pytest.approx(exact_ar_nll, rel=1e-5)
        assert float(terms.velocity) == 0.0 and int(terms.num_tokens) == L * (L - num_pads)
        assert all(math.isfinite(float(v)) for v in diag.values())


def test_bd3lm_estimator_through_model_loss_and_training(session) -> None:
    family = BD3LMFamily(block_size=4, seq_length=L, mask_id=MASK_ID)
    B, step = 8, 2
    model = _model(family, global_batch_size=B).train()
    g = torch.Generator().manual_seed(2)
    tokens_BL = torch.randint(0, MASK_ID, (B, L), generator=g)
    valid_BL = torch.arange(L)[None, :] < torch.tensor([16, 16, 16, 13, 10, 7, 4, 2])[:, None]
    index_B = torch.arange(B)

    terms, _ = model(tokens_BL, valid_BL, index_B, step)
    with torch.no_grad():
        t_B = model.draw_time(index_B, step)
        sched = family.estimator_schedule(x_BL=tokens_BL, t_B=t_B, valid_BL=valid_BL)
        u_1BL = mask_uniforms(seed=model.seed, step=step, index_B=index_B, num_corruptions=1, seq_length=L)
        mask_BL = (family.sample_masks(sched, u_1BL) & valid_BL)[0]
        assert torch.equal((mask_BL & sched.active_BL).sum(-1), sched.num_masked_B)
        logp_BL = _logp_true(model, torch.where(mask_BL, MASK_ID, tokens_BL), tokens_BL, valid_BL)
        expected = torch.where(mask_BL, -sched.velocity_BL.double() * logp_BL, 0.0).sum()
    assert float(terms.nelbo) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms.velocity) == 0.0

    # the gradient trains: Adam on this fixed noise lowers the estimate
    opt = torch.optim.Adam(model.backbone.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        terms, _ = model(tokens_BL, valid_BL, index_B, step)
        opt.zero_grad()
        (terms.surrogate / terms.num_tokens).backward()
        grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)
        opt.step()
        losses.append(float(terms.nelbo))
    assert losses[-1] < 0.8 * losses[0], losses
