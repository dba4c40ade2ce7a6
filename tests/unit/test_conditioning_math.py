"""Conditioning in the training math (method.md §5.9): a given position is clean at every t,
out of the loss, the token count, log q and NormSig's mean; identities over the free positions.

Two levels: the pure family math (the constant-predictor weight and the Plackett-Luce order over
the free positions), and the real tiny `DiffusionLM` of every family (the corruptions it feeds
the backbone never mask a given token; the loss counts only free positions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_lomdm.config import Config
from megatron_lomdm.config.schema import DiffusionConfig, ModelConfig, TrainConfig
from megatron_lomdm.diffusion.bd3lm import SlotFamily
from megatron_lomdm.diffusion.registry import FAMILIES, build_family
from megatron_lomdm.models.diffusion_lm import free_positions
from megatron_lomdm.training.build import build_model
from megatron_lomdm.training.step import MicroBatchStep
from tests.helpers.cpu_megatron import megatron_cpu_session

F64 = torch.float64
L, V, MASK = 6, 7, 6
COND_1L = torch.tensor([[True, True, False, False, False, False]])  # a two-token prompt
FWD_LOGITS_1L = torch.tensor([[2.0, -3.0, -4.0, 1.5, 3.0, 0.2]], dtype=F64)


def _family(name: str):
    family = build_family(name, c1=0.7, c2=0.65, block_size=2, vocab_size=V, seq_length=L, mask_id=MASK)
    if name == "genmd4":
        with torch.no_grad():
            family.raw_exponent_V.copy_(torch.linspace(-2.0, 1.5, V))
    return family


def _estimator(family, t_B: torch.Tensor):
    B = t_B.shape[0]
    free_BL = (~COND_1L).expand(B, L)
    return family.estimator_schedule(x_BL=torch.tensor([[0, 3, 5, 1, 2, 4]]).expand(B, L), t_B=t_B,
                                     fwd_logits_BL=FWD_LOGITS_1L.expand(B, L), valid_BL=free_BL)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_constant_predictor_weight_over_free_positions(name: str) -> None:
    """E_t[P(masked) A] = 1 at every free position of the training estimator, so a constant
    predictor's NELBO is (number of free positions) x its -log p; the prompt never counts."""
    family = _family(name)
    if isinstance(family, SlotFamily):  # piecewise constant in t: midpoints of a fine grid are exact
        n = 840 * family.num_blocks
        t = (torch.arange(n, dtype=F64) + 0.5) / n
        w = torch.full((n,), 1.0 / n, dtype=F64)
    else:  # (1 - alpha) A = e t^(e-1), singular at 0 for e < 1: integrate over y = -log t
        x, wx = np.polynomial.legendre.leggauss(8)
        edges = np.linspace(0.0, 700.0, 201)
        mids, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
        y, wy = (mids[:, None] + half[:, None] * x).ravel(), (half[:, None] * wx).ravel()
        t, w = torch.from_numpy(np.exp(-y)), torch.from_numpy(wy * np.exp(-y))
    sched = _estimator(family, t)
    weight_BL = torch.exp(sched.log_mask_prob_BL) * sched.velocity_BL
    integral_L = (weight_BL * w[:, None]).sum(0)
    free_L = ~COND_1L[0]
    torch.testing.assert_close(integral_L[free_L], torch.ones(int(free_L.sum()), dtype=F64), rtol=0, atol=1e-9)


def test_normsig_and_order_are_over_the_free_positions() -> None:
    """LoMDM's exponents at the free positions are those of the sequence without its prompt, and
    the order in which the free positions are generated is Plackett-Luce over them."""
    family = _family("lomdm")
    free_L = ~COND_1L[0]
    e_L = family.exponents(FWD_LOGITS_1L, ~COND_1L)[0]
    e_alone = family.exponents(FWD_LOGITS_1L[:, free_L])[0]
    torch.testing.assert_close(e_L[free_L], e_alone)
    assert not torch.allclose(family.exponents(FWD_LOGITS_1L)[0][free_L], e_alone)  # the mean moved
    # masking times of the free positions from the estimator's law: tau = U^(1/e)
    g = torch.Generator().manual_seed(0)
    n = 40000
    u_KBL = torch.rand(n, 1, L, generator=g, dtype=F64)
    tau_NL = u_KBL[:, 0] ** (1.0 / e_L)
    first = torch.argmax(torch.where(free_L, tau_NL, -1.0), dim=-1)
    freq = torch.bincount(first, minlength=L).double() / n
    expected = torch.where(free_L, e_L, 0.0) / e_L[free_L].sum()
    torch.testing.assert_close(freq, expected, rtol=0, atol=5 * math.sqrt(0.25 / n))
    # and sample_masks draws exactly these times: masked at t iff tau < t
    t = torch.tensor([0.4], dtype=F64)
    masks = family.sample_masks(_estimator(family, t), u_KBL)[:, 0]
    assert torch.equal(masks[:, free_L], (tau_NL < 0.4)[:, free_L])


# ---- the real tiny DiffusionLM of every family ---------------------------------------------

B, LM, VM, MASK_M, PAD_M = 3, 8, 20, 19, 18


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True) as info:
        yield info


def _model(name: str, info):
    cfg = Config(
        model=ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_length=LM, vocab_size=VM, mask_id=MASK_M,
                          pad_id=PAD_M),
        diffusion=DiffusionConfig(name=name, block_size=2),
        train=TrainConfig(precision="fp32", micro_batch_size=B, global_batch_size=B),
    )
    return build_model(cfg, info)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, PAD_M, (B, LM), generator=g)
    valid = torch.ones(B, LM, dtype=torch.bool)
    valid[1, -3:] = False
    cond = torch.zeros(B, LM, dtype=torch.bool)
    cond[0, :3] = True
    cond[1, :5] = True  # the whole valid part is given: no free position at all
    cond[2, :1] = True
    return tokens.masked_fill(~valid, PAD_M), valid, cond


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_given_tokens_never_masked_and_never_counted(name: str, session) -> None:
    """Over many steps (every t), the corruptions the backbone sees keep each given token, and
    the loss's token count is the number of free positions."""
    model = _model(name, session)
    step_module = MicroBatchStep(model)
    tokens, valid, cond = _batch()
    free = free_positions(valid, cond)
    seen: list[torch.Tensor] = []
    forward = model.backbone.forward

    def spy(z_NL, *args, **kw):
        seen.append(z_NL.detach().clone())
        return forward(z_NL, *args, **kw)

    model.backbone.forward = spy
    try:
        for step in range(40):
            _, terms, _ = step_module(tokens, valid, torch.arange(B), step, cond)
            assert int(terms.num_tokens) == int(free.sum())
            assert torch.isfinite(terms.nelbo)
    finally:
        model.backbone.forward = forward
    K = model.family.num_corruptions
    z_SKBL = torch.stack([z for z in seen if z.shape[0] == K * B]).view(-1, K, B, LM)
    given = cond & valid
    assert torch.equal(z_SKBL[..., given], tokens[given].expand_as(z_SKBL[..., given]))
    assert (z_SKBL[..., free] == MASK_M).any()  # free positions do get masked


def test_arm_conditioned_nelbo_is_the_response_nll() -> None:
    """ARM's training estimator with a given prompt, averaged exactly over t: the NELBO is the
    autoregressive NLL of the response given the prompt, sum_{i free} -log p(x_i | x_<i)."""
    from tests.unit.test_diffusion_reductions import MASK as RMASK
    from tests.unit.test_diffusion_reductions import V as RV
    from tests.unit.test_diffusion_reductions import _logp, _table_predictor

    n = 5
    x_L = torch.tensor([3, 0, 7, 7, 2])
    free_L = torch.tensor([False, False, True, True, True])  # a two-token prompt
    predictor = _table_predictor(n, causal=True, seed=4)
    exact = -_logp(predictor(x_L), x_L)[free_L].sum()
    arm = build_family("arm", c1=1.0, c2=0.0, block_size=1, vocab_size=RV, seq_length=n, mask_id=RMASK)
    total = torch.zeros((), dtype=F64)
    for slot in range(n):  # the estimator is constant on each slot: its midpoint is exact
        t_B = torch.tensor([(slot + 0.5) / n], dtype=F64)
        sched = arm.estimator_schedule(x_BL=x_L[None], t_B=t_B, valid_BL=free_L[None])
        mask_KBL = arm.sample_masks(sched, torch.rand(1, 1, n, dtype=F64)) & free_L
        z_L = torch.where(mask_KBL[0, 0], RMASK, x_L)
        terms = _estimator_terms(arm, x_L, t_B, sched, mask_KBL, predictor(z_L), free_L, RMASK)
        assert int(terms.num_tokens) == int(free_L.sum())
        total = total + terms.nelbo / n
    torch.testing.assert_close(total, exact, rtol=0, atol=1e-10)


def _estimator_terms(family, x_L, t_B, sched, mask_KBL, logits_LV, free_L, mask_id):
    """`DiffusionLM.forward`'s loss for one sequence and K = 1, given the backbone's logits."""
    from megatron_lomdm.diffusion.subs import subs_logp_true
    from megatron_lomdm.losses.objective import compute_loss_terms

    n = logits_LV.shape[0]
    z_L = torch.where(mask_KBL[0, 0], mask_id, x_L)
    logp_KBL = subs_logp_true(logits_LV, z_L, x_L, mask_id).view(1, 1, n)
    velocity_KBL = family.estimator_reverse_velocity(sched=sched, t_KB=t_B[None], rev_logits_KBL=None,
                                                     expected_rate_KBL=None, valid_BL=free_L[None])
    return compute_loss_terms(family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=logp_KBL,
                              velocity_hat_KBL=velocity_KBL, log_q_KB=family.log_q(sched, mask_KBL, free_L[None]),
                              valid_BL=free_L[None])
