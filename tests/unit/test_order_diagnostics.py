"""The learned-order diagnostics: the within-sequence velocity-confidence correlation (issue #16 A).

The old statistic pooled the masked positions of sequences with different t into one Pearson
correlation; since high-exponent positions are masked mostly at large t, where confidence is low,
it came out negative with no relation at all. The tests below show both: the pooled value on the
same data is kept as a documented counter-example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_lomdm.diffusion.base import ForwardSchedule, power_schedule
from megatron_lomdm.losses.grad_snr import SNR_KEYS
from megatron_lomdm.models.diffusion_lm import DIAG_KEYS, order_diagnostics
from megatron_lomdm.sampling.metrics import velocity_confidence_corr
from megatron_lomdm.training.step import IntervalSums, StepReport, interval_stats, order_stats
from megatron_lomdm.utils.stats import row_pearson

F64 = torch.float64


def _synthetic(spread: float, slope: float, *, B: int = 512, L: int = 64, K: int = 2, seed: int = 0):
    """Exponents e = 0.7 +- spread, masks by t^e, confidence p = 0.9 - 0.8 t + slope (e - 0.7) + noise.

    With slope = 0 the confidence depends on t only: no relation between e and p.
    """
    g = torch.Generator().manual_seed(seed)
    e_BL = 0.7 + spread * (2 * torch.rand(B, L, generator=g, dtype=F64) - 1)
    t_B = torch.rand(B, generator=g, dtype=F64) * 0.98 + 0.01
    sched = power_schedule(e_BL, t_B)
    mask_KBL = torch.rand(K, B, L, generator=g, dtype=F64) < sched.log_mask_prob_BL.exp()
    noise_KBL = 0.05 * torch.randn(K, B, L, generator=g, dtype=F64)
    p_KBL = (0.9 - 0.8 * t_B[:, None] + slope * (e_BL - 0.7) + noise_KBL).clamp(0.01, 0.99)
    return sched, mask_KBL, p_KBL.log(), torch.ones(B, L, dtype=torch.bool)


def _pooled(sched, mask_KBL, logp_KBL) -> float:
    """The old statistic: one Pearson correlation over every masked position of the batch."""
    K, B, L = mask_KBL.shape
    a_KBL = (sched.velocity_BL * sched.t_B[:, None]).expand(K, B, L)
    return float(velocity_confidence_corr(a_KBL.reshape(K * B, L), logp_KBL.exp().reshape(K * B, L),
                                          mask_KBL.reshape(K * B, L)))


def _new(sched, mask_KBL, logp_KBL, valid_BL) -> float:
    d = order_diagnostics(sched, mask_KBL, logp_KBL, valid_BL)
    assert d["corr_seqs"] > 0.9 * mask_KBL.shape[0] * mask_KBL.shape[1]
    return float(d["corr_sum"] / d["corr_seqs"])


def test_row_pearson_matches_numpy_and_skips_undefined_rows() -> None:
    g = torch.Generator().manual_seed(1)
    x_NL, y_NL = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    w_NL = torch.rand(5, 12, generator=g) < 0.7
    w_NL[3] = False
    w_NL[3, :2] = True  # 2 points: below min_count=3
    x_NL[4] = 0.25  # constant x
    corr_N = row_pearson(x_NL, y_NL, w_NL, min_count=3)
    for n in range(3):
        sel = w_NL[n].numpy()
        ref = np.corrcoef(x_NL[n].numpy()[sel], y_NL[n].numpy()[sel])[0, 1]
        assert corr_N[n].item() == pytest.approx(ref, rel=1e-6)
    assert math.isnan(corr_N[3]) and math.isnan(corr_N[4])
    assert not math.isnan(row_pearson(x_NL[3:4], y_NL[3:4], w_NL[3:4], min_count=2)[0])


def test_known_positive_relation_within_sequences() -> None:
    """Confidence rising with the exponent inside each sequence gives a clearly positive value."""
    sched, mask_KBL, logp_KBL, valid_BL = _synthetic(0.3, slope=0.2)
    assert _new(sched, mask_KBL, logp_KBL, valid_BL) > 0.4


@pytest.mark.parametrize("spread", [0.3, 0.6])
def test_no_relation_under_the_t_confound_gives_zero(spread: float) -> None:
    """p depends on t only, masks on t^e: the per-sequence statistic is ~0, the pooled one is not."""
    sched, mask_KBL, logp_KBL, valid_BL = _synthetic(spread, slope=0.0)
    assert abs(_new(sched, mask_KBL, logp_KBL, valid_BL)) < 0.03
    assert _pooled(sched, mask_KBL, logp_KBL) < -0.08  # why it was replaced: -0.10 / -0.19 here


def test_sums_combine_over_micro_batches_and_steps() -> None:
    """Micro-batch sums add up to the batch's, and a log interval's statistics are those of its steps'
    pooled sums; a step with non-finite sums is left out."""
    sched, mask_KBL, logp_KBL, valid_BL = _synthetic(0.3, slope=0.1, B=64, L=32)
    whole = order_diagnostics(sched, mask_KBL, logp_KBL, valid_BL)
    halves = []
    for sl in (slice(0, 24), slice(24, 64)):
        part = ForwardSchedule(sched.log_mask_prob_BL[sl], sched.log_keep_prob_BL[sl], sched.velocity_BL[sl],
                               sched.t_B[sl])
        halves.append(order_diagnostics(part, mask_KBL[:, sl], logp_KBL[:, sl], valid_BL[sl]))
    assert set(whole) == set(DIAG_KEYS) - set(SNR_KEYS)
    for key in whole:
        torch.testing.assert_close(halves[0][key] + halves[1][key], whole[key], rtol=1e-12, atol=1e-12)

    def report(d: dict) -> StepReport:
        sums = {**dict.fromkeys(SNR_KEYS, 0.0), **{k: float(v) for k, v in d.items()}}
        return StepReport(values={}, num_tokens=0, sums=sums)

    interval = IntervalSums()
    interval.add(report(halves[0]))
    interval.add(report({**halves[0], "corr_sum": torch.tensor(math.nan)}))
    interval.add(report(halves[1]))
    got = interval.pop()
    expected = float(whole["corr_sum"] / whole["corr_seqs"])
    assert got["velocity_confidence_corr"] == pytest.approx(expected, rel=1e-12)
    assert interval.pop() == {"velocity_confidence_corr": 0.0}  # emptied; no gradient SNR without a head
    assert order_stats(report(whole).sums)["velocity_confidence_corr"] == got[
        "velocity_confidence_corr"]


def test_equal_exponents_define_no_correlation() -> None:
    """At init (zero head: every exponent c1) no sequence qualifies: reported as 0, not noise."""
    B, L, K = 8, 16, 2
    sched = power_schedule(torch.full((B, L), 0.7, dtype=torch.float32), torch.rand(B) * 0.9 + 0.05)
    mask_KBL = torch.rand(K, B, L) < 0.5
    d = order_diagnostics(sched, mask_KBL, -torch.rand(K, B, L), torch.ones(B, L, dtype=torch.bool))
    assert d["corr_seqs"] == 0 and d["corr_sum"] == 0
    stats = interval_stats({**dict.fromkeys(SNR_KEYS, 0.0), **{k: float(v) for k, v in d.items()}})
    assert stats == {"velocity_confidence_corr": 0.0}
