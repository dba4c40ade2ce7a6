"""The puzzle benchmark's decoders: Gumbel noise on the oracles' score, LoMDM + top_margin, remasking.

The generic properties (no [MASK] left, prompts kept, one call per step, reproducible) are checked
for every registered sampler in test_sampling_samplers.py; here each new rule on a denoiser built so
that a wrong rule gives another answer.

Legend: B sequences, L positions, V vocabulary (including [MASK]).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from megatron_lomdm.sampling import DenoiserOutput, build_sampler
from tests.unit.test_sampling_samplers import KNOWN_P, MASK, V, FixedDenoiser, StubDenoiser, _probs_to_logits, gen


def test_gumbel_noise_changes_the_selection_only_when_scale_is_positive() -> None:
    den = FixedDenoiser(_probs_to_logits(KNOWN_P))
    expected = torch.tensor([2, 1, 0, 2, 0, 1]).expand(3, 6)  # the margin order, K = 2 per step
    for seed in range(4):
        res = build_sampler("top_margin", mask_id=MASK, num_steps=3, noise_scale=0.0).sample(
            den, batch_size=3, seq_length=6, generator=gen(seed))
        assert torch.equal(res.unmask_step_BL, expected)
    orders = set()
    for seed in range(8):
        noisy = [build_sampler("top_margin", mask_id=MASK, num_steps=3, noise_scale=0.5).sample(
            den, batch_size=3, seq_length=6, generator=gen(seed)) for _ in range(2)]
        assert torch.equal(noisy[0].unmask_step_BL, noisy[1].unmask_step_BL)  # same seed, same draw
        orders |= {tuple(row) for row in noisy[0].unmask_step_BL.tolist()}
    assert len(orders) > 1  # the noise reorders the selection
    with pytest.raises(ValueError, match="noise_scale"):
        build_sampler("top_prob", mask_id=MASK, num_steps=3, noise_scale=-1.0)


def test_lomdm_top_margin_equal_exponents_is_top_margin() -> None:
    den = FixedDenoiser(_probs_to_logits(KNOWN_P), torch.ones(6, dtype=torch.float64))
    res = build_sampler("lomdm_top_margin", mask_id=MASK, num_steps=3).sample(
        den, batch_size=2, seq_length=6, generator=gen(0))
    assert torch.equal(res.unmask_step_BL, torch.tensor([2, 1, 0, 2, 0, 1]).expand(2, 6))


def test_lomdm_top_margin_count_and_choice_follow_the_learned_exponents() -> None:
    # position 0 has the second-lowest margin but a huge exponent: the learned scheduler wants it now
    e_L = torch.full((6,), 0.01, dtype=torch.float64)
    e_L[0] = 50.0
    den = FixedDenoiser(_probs_to_logits(KNOWN_P), e_L)
    res = build_sampler("lomdm_top_margin", mask_id=MASK, num_steps=3).sample(
        den, batch_size=1, seq_length=6, generator=gen(0))
    # step 0 (t = 1, s = 2/3): p_0 ~ 1, the others 1 - (2/3)^0.01 ~ 0.004: K = round(1.02) = 1
    p_other = 1 - (2 / 3) ** 0.01
    assert round(1 + 5 * p_other) == 1
    assert res.unmask_step_BL[0].tolist()[0] == 0 and int((res.unmask_step_BL == 0).sum()) == 1
    plain = build_sampler("top_margin", mask_id=MASK, num_steps=3).sample(
        den, batch_size=1, seq_length=6, generator=gen(0))
    assert plain.unmask_step_BL[0, 0] != 0  # the margin alone does not pick it first
    assert not bool((res.tokens_BL == MASK).any())


class FlipDenoiser:
    """Position 0 says token 0 while position 1 is masked, token 1 once position 1 holds token 2.

    Position 1 is token 2 (almost surely, slightly less sharp than position 0 so it comes second);
    positions 2..3 are flat (low margin, decoded last). A token-0 decoded at position 0 is right
    early on and wrong once position 1 is known: only remasking can repair it.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z_BL: Tensor) -> DenoiserOutput:
        self.calls += 1
        B, L = z_BL.shape
        logits_BLV = torch.zeros(B, L, V, dtype=torch.float64)
        knows_BL = (z_BL[:, 1] == 2)[:, None]
        logits_BLV[:, 0, 0] = torch.where(knows_BL[:, 0], -20.0, 20.0)
        logits_BLV[:, 0, 1] = torch.where(knows_BL[:, 0], 20.0, -20.0)
        logits_BLV[:, 1, 2] = 12.0
        return DenoiserOutput(logits_BLV)


def test_remasking_repairs_a_token_whose_confidence_dropped() -> None:
    repaired = 0
    for seed in range(12):
        res = build_sampler("remask", mask_id=MASK, num_steps=6, checks=1, drop=0.5).sample(
            FlipDenoiser(), batch_size=1, seq_length=4, generator=gen(seed))
        assert int(res.tokens_BL[0, 1]) == 2 and not bool((res.tokens_BL == MASK).any())
        assert res.num_calls <= 6
        if res.num_remasked:
            assert int(res.tokens_BL[0, 0]) == 1  # re-decoded with position 1 known
            repaired += 1
        else:
            assert int(res.tokens_BL[0, 0]) == 0
    assert repaired >= 6  # position 0 is re-checked with probability 1/2 at each of 2+ steps
    for opts in ({"checks": 0}, {"checks": 4, "drop": 0.0}):
        res = build_sampler("remask", mask_id=MASK, num_steps=6, **opts).sample(
            FlipDenoiser(), batch_size=1, seq_length=4, generator=gen(0))
        assert res.num_remasked == 0 and int(res.tokens_BL[0, 0]) == 0  # the early mistake stays
    plain = build_sampler("top_margin", mask_id=MASK, num_steps=6).sample(
        FlipDenoiser(), batch_size=1, seq_length=4, generator=gen(0))
    assert int(plain.tokens_BL[0, 0]) == 0


def test_remasking_never_touches_the_prompt() -> None:
    g = gen(3)
    B, L = 6, 10
    prompt_BL = torch.randint(0, MASK, (B, L), generator=g)
    fixed_BL = torch.rand(B, L, generator=g) < 0.5
    den = StubDenoiser(seq_length=L, scale=0.3)  # flat laws: confidences drop often
    res = build_sampler("remask", mask_id=MASK, num_steps=8, checks=2, drop=1.0).sample(
        den, prompt_BL=prompt_BL, fixed_BL=fixed_BL, generator=gen(0))
    assert res.num_remasked > 0
    assert torch.equal(res.tokens_BL[fixed_BL], prompt_BL[fixed_BL])
    for z_BL in den.inputs:  # no call ever saw a prompt position masked
        assert torch.equal(z_BL[fixed_BL], prompt_BL[fixed_BL])
    assert not bool((res.tokens_BL == MASK).any())
    assert bool((res.unmask_step_BL[~fixed_BL] >= 0).all())
    with pytest.raises(ValueError, match="drop"):
        build_sampler("remask", mask_id=MASK, num_steps=4, drop=1.5)
