"""Non-finite weights are named (``utils.finite``) and a NaN mask probability never masks nothing."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.base import power_schedule
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.utils.finite import NonFiniteWeightsError, check_finite, first_non_finite


def test_check_finite_names_the_first_bad_tensor_and_its_count() -> None:
    bad = torch.zeros(4, 5)
    bad[1, :3] = float("nan")
    bad[2, 0] = float("-inf")
    named = [("ids", torch.arange(3)), ("a.weight", torch.ones(2)), ("b.weight", bad), ("c.weight", bad.clone())]
    assert first_non_finite(named) == ("b.weight", 4)
    with pytest.raises(NonFiniteWeightsError,
                       match=r"^checkpoint runs/x/step_0000010: ema weight 'b\.weight' has 4 non-finite values"):
        check_finite(named, source="checkpoint runs/x/step_0000010", kind="ema weight")
    check_finite(named[:2], source="x", kind="weight")  # finite: no error


def _lomdm(L: int):
    return build_family("lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=9, seq_length=L, mask_id=8,
                        num_corruptions=2, learn_order=True, order_logits=[])


def test_nan_mask_probability_masks_and_poisons_the_loss() -> None:
    """NaN head logits give NaN mask probabilities; `uniform < NaN` would mask nothing (NELBO 0).
    A NaN position is masked instead, so the NaN reaches the loss rather than reading as perfect."""
    family = _lomdm(6)
    x_BL = torch.zeros(2, 6, dtype=torch.long)
    logits_BL = torch.zeros(2, 6)
    logits_BL[1, 2] = float("nan")
    sched = family.forward_schedule(x_BL=x_BL, t_B=torch.tensor([0.5, 0.9]), fwd_logits_BL=logits_BL)
    mask_KBL = family.sample_masks(sched, torch.rand(2, 2, 6))
    assert mask_KBL[:, 1, 2].all()
    assert torch.isnan(sched.log_mask_prob_BL[1, 2])


def test_finite_mask_draws_are_unchanged() -> None:
    """The check does not change a single draw for finite schedules (bit-identical to the plain rule)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        e_BL = torch.rand(3, 7, generator=g, dtype=dtype) * 2 + 0.1
        t_B = torch.tensor([1e-3, 0.5, 1.0], dtype=dtype)
        sched = power_schedule(e_BL, t_B)
        u_KBL = torch.rand(2, 3, 7, generator=g, dtype=dtype)
        expected = u_KBL < torch.exp(sched.log_mask_prob_BL).unsqueeze(0)
        assert torch.equal(_lomdm(7).sample_masks(sched, u_KBL), expected)
