"""The learned order learns when the signal is there, and only through the score-function term.

The pairs task (data/synthetic.py: x_1..x_12 uniform over 8 letters, y_i = h(x_i, x_{i+1})) with a
fixed look-up denoiser: an x token always costs log 8; y_i costs 0 once x_i and x_{i+1} are visible
and log 5 otherwise. Generating x first is then clearly better (NELBO 12 log 8 per row against up to
12 log 8 + 12 log 5). The forward logits are free per-position parameters (the LoMDM family's
exponents c1 + c2 NormSig(v), reverse logits = forward ones) trained with the real objective
(`losses.objective.compute_loss_terms`, K = 2 RLOO). The pathwise gradient alone points the WRONG
way (it delays the positions with the higher masked loss, the x's), so removing the RLOO term or
flipping its sign must make the test fail: it pins that the score-function term carries the order.
bench/order_task.py measures the same question end to end with a trained backbone.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lomdm.diffusion.lomdm import LoMDMFamily
from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t
from megatron_lomdm.losses import objective
from megatron_lomdm.losses.nelbo import main_term

L, N_X = 26, 12  # [BOS] x_1..x_12 y_1..y_12 [EOS]
X_POS = list(range(1, 1 + N_X))
Y_POS = list(range(1 + N_X, 1 + 2 * N_X))


def lookup_logp(mask_KBL: torch.Tensor) -> torch.Tensor:
    """log p of the true token under the look-up denoiser (0 at unmasked positions)."""
    logp = torch.zeros(mask_KBL.shape)
    logp[..., X_POS] = -math.log(8)
    x_vis = ~mask_KBL[..., X_POS]
    both = x_vis & torch.roll(x_vis, -1, dims=-1)  # x_i and x_{i+1 mod n} visible
    logp[..., Y_POS] = torch.where(both, 0.0, -math.log(5))
    return torch.where(mask_KBL, logp, 0.0)


def step_loss(family: LoMDMFamily, v_L: torch.Tensor, gen: torch.Generator, B: int, rloo_sign: float):
    x_BL = torch.zeros(B, L, dtype=torch.long)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    t_B = low_discrepancy_t(torch.rand(B, generator=gen), torch.arange(B), B)
    logits_BL = v_L.expand(B, L)
    sched = family.forward_schedule(x_BL=x_BL, t_B=t_B, fwd_logits_BL=logits_BL, valid_BL=valid_BL)
    mask_KBL = family.sample_masks(sched, torch.rand(2, B, L, generator=gen))
    vel_hat = family.reverse_velocity(t_KB=t_B.expand(2, B), rev_logits_KBL=logits_BL.expand(2, B, L),
                                      valid_BL=valid_BL)
    terms = objective.compute_loss_terms(family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=lookup_logp(mask_KBL),
                                         velocity_hat_KBL=vel_hat, log_q_KB=family.log_q(sched, mask_KBL, valid_BL),
                                         valid_BL=valid_BL)
    # the NELBO part with its graph (the velocity term is exactly 0: reverse logits = forward ones)
    main_KBL = torch.where(mask_KBL, main_term(sched.velocity_BL.unsqueeze(0), lookup_logp(mask_KBL)), 0.0)
    nelbo_sum = main_KBL.sum() / mask_KBL.shape[0]
    torch.testing.assert_close(nelbo_sum.detach(), terms.nelbo.float())
    rloo_sum = terms.surrogate - nelbo_sum  # the score-function surrogate, graph to v
    return (nelbo_sum + rloo_sign * rloo_sum) / terms.num_tokens, terms.nelbo / terms.num_tokens


def train_order(rloo_sign: float, steps: int = 150, B: int = 128, seed: int = 0) -> tuple[float, float, float]:
    """Adam on the order logits; returns (exponent gap x - y, NELBO learned, NELBO at c2 = 0 logits)."""
    family = LoMDMFamily(c1=0.7, c2=0.65, seq_length=L, mask_id=3)
    v_L = torch.zeros(L, requires_grad=True)
    opt = torch.optim.Adam([v_L], lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = step_loss(family, v_L, gen, B, rloo_sign)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        e_L = family.exponents(v_L[None])[0]
        gap = float(e_L[X_POS].mean() - e_L[Y_POS].mean())
        eval_gen = torch.Generator().manual_seed(1234)
        learned = sum(float(step_loss(family, v_L, eval_gen, 512, 1.0)[1]) for _ in range(8)) / 8
        eval_gen = torch.Generator().manual_seed(1234)
        flat = sum(float(step_loss(family, torch.zeros(L), eval_gen, 512, 1.0)[1]) for _ in range(8)) / 8
    return gap, learned, flat


def test_learned_order_moves_to_the_better_order_and_lowers_the_nelbo():
    gap, learned, flat = train_order(1.0)
    assert gap > 0.2, f"exponent gap x - y = {gap:.3f}: the order did not move towards x first"
    assert learned < flat - 0.05, f"NELBO {learned:.4f} not below the c2 = 0 order's {flat:.4f}"


@pytest.mark.parametrize("rloo_sign", [0.0, -1.0], ids=["rloo_removed", "rloo_flipped"])
def test_without_the_score_function_term_the_order_goes_wrong(rloo_sign):
    gap, learned, flat = train_order(rloo_sign)
    assert gap < 0.0 and learned > flat, (gap, learned, flat)
