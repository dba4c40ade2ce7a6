"""Conditioned sampling (issue 19 §1, method.md §5.9): every sampler keeps the prompt, and a
learned-order model's reverse exponents normalise over the positions to generate, as in training."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from megatron_lomdm.apps.generate import prompt_batch, sample_prompts
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.models.scheduler_head import SchedulerHead
from megatron_lomdm.sampling import build_sampler, denoiser_from_backbone, sampler_options
from tests.unit.test_sampling_samplers import L, MASK, SAMPLER_OPTS, V, gen

D = 8


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.out = nn.Linear(D, V)

    def forward(self, z_BL: Tensor) -> tuple[Tensor, Tensor]:
        h_BLD = self.emb(z_BL)
        return self.out(h_BLD), h_BLD


def _lomdm():
    torch.manual_seed(0)
    family = build_family("lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
    head = SchedulerHead(D, num_heads=2)
    with torch.no_grad():
        head.out[-1].weight.normal_(std=1.0)
    return family, head


def test_exponents_normalise_over_the_free_positions() -> None:
    family, head = _lomdm()
    backbone = _Backbone()
    prompt_BL, fixed_BL = prompt_batch([[1, 2, 0], [4]], L, MASK)
    assert torch.equal(prompt_BL[0, :4], torch.tensor([1, 2, 0, MASK])) and int(fixed_BL.sum()) == 4
    z_BL = torch.where(fixed_BL, prompt_BL, MASK)
    e_BL = denoiser_from_backbone(backbone, family=family, rev_head=head, given_BL=fixed_BL)(z_BL).velocity_exponents_BL
    free_BL = ~fixed_BL
    for b in range(2):  # NormSig's mean is 0 over the free positions: e averages c1 there
        torch.testing.assert_close(e_BL[b][free_BL[b]].mean(), torch.tensor(0.7))
    plain = denoiser_from_backbone(backbone, family=family, rev_head=head)(z_BL).velocity_exponents_BL
    assert not torch.allclose(plain[free_BL], e_BL[free_BL])


@pytest.mark.parametrize("name", sorted(SAMPLER_OPTS))
def test_every_sampler_keeps_the_prompt_with_a_learned_order(name: str) -> None:
    family, head = _lomdm()
    prompts = sample_prompts(4, L, prompts=[[1, 2, 0], [4], [5, 5, 5, 5, 5], [0, 1]])
    prompt_BL, fixed_BL = prompt_batch(prompts, L, MASK)
    den = denoiser_from_backbone(_Backbone(), family=family, rev_head=head, given_BL=fixed_BL)
    given = SAMPLER_OPTS[name]
    opts = sampler_options(name, mask_id=MASK, family=family, steps=given.get("num_steps"), gamma=given.get("gamma"))
    res = build_sampler(name, **opts).sample(den, prompt_BL=prompt_BL, fixed_BL=fixed_BL,
                                             generator=gen(0))
    assert torch.equal(res.tokens_BL[fixed_BL], prompt_BL[fixed_BL])
    assert not bool((res.tokens_BL == MASK).any())
    assert bool((res.unmask_step_BL[fixed_BL] == -1).all()) and bool((res.unmask_step_BL[~fixed_BL] >= 0).all())


def test_sample_prompts_errors() -> None:
    with pytest.raises(ValueError, match="not both"):
        sample_prompts(1, L, prefix_ids=[1], prompts=[[1]])
    with pytest.raises(ValueError, match="2 prompts for 3 samples"):
        sample_prompts(3, L, prompts=[[1], [2]])
    with pytest.raises(ValueError, match="nothing left to generate"):
        sample_prompts(1, L, prompts=[[1] * L])
    assert sample_prompts(2, L, prefix_ids=[3]) == [[3], [3]] and sample_prompts(2, L) is None


def test_in_place_prompts_fix_only_their_non_mask_tokens() -> None:
    rows = sample_prompts(2, L, prompts=[[1, MASK, 2] + [MASK] * (L - 3), [4]], mask_id=MASK)
    prompt_BL, fixed_BL = prompt_batch(rows, L, MASK)
    assert fixed_BL[0].tolist() == [True, False, True] + [False] * (L - 3)
    assert fixed_BL[1].tolist() == [True] + [False] * (L - 1)
    with pytest.raises(ValueError, match="nothing left to generate"):
        sample_prompts(1, L, prompts=[[1] * L], mask_id=MASK)
