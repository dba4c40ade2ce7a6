"""P-POTS wired into a tiny DiffusionLM (one process, CPU) and the estimator's state.

Checks: the default sampler is untouched (bit-identical t and losses), evaluation stays uniform,
the weighted NELBO of a real (untrained) model is unbiased and, with a proposal fitted from the
model's own loss statistics, has a lower variance; the estimator's refresh rule and checkpoint
round trip.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.config.schema import DiffusionConfig
from megatron_lomdm.diffusion.noise import time_uniforms
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.diffusion.time_sampling import loss_scale_mass, low_discrepancy_t
from megatron_lomdm.models.backbone import build_backbone
from megatron_lomdm.models.diffusion_lm import DiffusionLM
from megatron_lomdm.training.ppots import PPOTSEstimator, build_ppots
from tests.helpers.cpu_megatron import megatron_cpu_session

V, MASK, L, B, BINS = 64, 63, 16, 16, 16


@pytest.fixture(scope="module")
def model():
    with megatron_cpu_session(tp=1, pp=1, seed=0):
        torch.manual_seed(0)
        backbone = build_backbone(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=V,
                                  seq_length=L, mask_id=MASK, use_cpu_initialization=True)
        family = build_family("mdlm", c1=1.0, c2=0.0, block_size=1, vocab_size=V, seq_length=L, mask_id=MASK)
        lm = DiffusionLM(backbone, family, None, None, mask_id=MASK, seed=7, global_batch_size=B, eps_t=1e-3)
        yield lm.train()


@pytest.fixture()
def fresh(model):
    """The model with P-POTS off, restored after the test."""
    model.time_bins, model.time_mass = 0, None
    model.train()
    yield model
    model.time_bins, model.time_mass = 0, None
    model.train()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[3, 10:] = False
    return tokens, valid, torch.arange(B)


def _skewed_mass() -> torch.Tensor:
    w = torch.linspace(4.0, 1.0, BINS, dtype=torch.float64)
    return 0.9 * w / w.sum() + 0.1 / BINS


def _nelbo_per_token(model: DiffusionLM, steps: range, batch) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for step in steps:
            terms, _ = model(*batch, step)
            out.append(terms.nelbo / terms.num_tokens)
    return torch.stack(out).double()


def test_default_sampler_bit_identical(fresh: DiffusionLM) -> None:
    """(4) The default config builds no estimator; draw_time is low_discrepancy_t bit for bit, and
    collecting P-POTS statistics (warm-up) changes no loss value."""
    assert DiffusionConfig().time_sampler == "low_discrepancy"
    assert build_ppots(DiffusionConfig(), fresh, torch.device("cpu")) is None
    index = torch.arange(B)
    for step in (0, 5, 123):
        ref = low_discrepancy_t(time_uniforms(seed=7, step=step, index_B=index), index, B, eps=1e-3)
        assert torch.equal(fresh.draw_time(index, step), ref)
    batch = _batch()
    with torch.no_grad():
        plain, diag = fresh(*batch, 3)
        assert "time_stats" not in diag
        fresh.time_bins = BINS  # P-POTS warm-up: statistics on, proposal uniform
        warm, diag = fresh(*batch, 3)
    for key in ("surrogate", "nelbo", "main", "velocity", "rloo"):
        assert torch.equal(getattr(plain, key), getattr(warm, key)), key
    stats = diag["time_stats"]
    assert stats.shape == (3, BINS) and int(stats[0].sum()) == B


def test_evaluation_stays_uniform(fresh: DiffusionLM) -> None:
    index = torch.arange(B)
    fresh.time_mass = _skewed_mass()
    ref = fresh.draw_time(index, -5)  # negative (evaluation) steps: uniform sampler
    assert torch.equal(ref, low_discrepancy_t(time_uniforms(seed=7, step=-5, index_B=index), index, B, eps=1e-3))
    assert not torch.equal(fresh.draw_time(index, 5), low_discrepancy_t(
        time_uniforms(seed=7, step=5, index_B=index), index, B, eps=1e-3))
    fresh.eval()
    assert fresh.time_weight(fresh.draw_time(index, 5), 5) is None
    assert torch.equal(fresh.draw_time(index, 5), low_discrepancy_t(
        time_uniforms(seed=7, step=5, index_B=index), index, B, eps=1e-3))


def test_model_weighted_nelbo_unbiased_and_lower_variance(fresh: DiffusionLM) -> None:
    """(2) + (3) on a real (untrained) tiny model: over many steps' noise, the P-POTS NELBO has
    the uniform sampler's mean (a skewed proposal, and one fitted from the model's own loss
    statistics), and the fitted proposal lowers its variance."""
    batch, R = _batch(1), 150
    fresh.time_bins = BINS
    stats = torch.zeros(3, BINS, dtype=torch.float64)
    uniform = []
    with torch.no_grad():
        for step in range(R):
            terms, diag = fresh(*batch, step)
            uniform.append(terms.nelbo / terms.num_tokens)
            stats += diag["time_stats"]
    uniform = torch.stack(uniform).double()
    fresh.time_mass = _skewed_mass()
    skewed = _nelbo_per_token(fresh, range(R, 2 * R), batch)
    fresh.time_mass = loss_scale_mass(stats, uniform_mix=0.1)
    fitted = _nelbo_per_token(fresh, range(2 * R, 3 * R), batch)
    for other in (skewed, fitted):
        se = (uniform.var() / R + other.var() / R).sqrt()
        assert (uniform.mean() - other.mean()).abs() < 4 * se
    ratio = float(fitted.var() / uniform.var())
    print(f"tiny model: NELBO/token variance ratio fitted-P-POTS/uniform = {ratio:.3f}")
    assert ratio < 0.9, ratio


def _report(t_bin: int, loss: float) -> dict:
    stats = torch.zeros(3, 4, dtype=torch.float64)
    stats[:, t_bin] = torch.tensor([1.0, loss, loss * loss], dtype=torch.float64)
    return {"time_stats": stats}


def test_estimator_refresh_rule_and_state_round_trip(fresh: DiffusionLM) -> None:
    """Refresh after every step count >= warm-up that is a multiple of the interval; non-finite
    statistics are dropped; the averaged sums decay; a state_dict round trip continues identically."""
    est = PPOTSEstimator(fresh, num_bins=4, refresh=2, warmup=3, uniform_mix=0.2, decay=0.5,
                         device=torch.device("cpu"))
    assert fresh.time_bins == 4 and fresh.time_mass is None
    est.observe([_report(0, 4.0)], step=0)
    est.observe([_report(1, 2.0), _report(0, 4.0)], step=1)  # 2 steps done < warm-up 3: no refresh
    assert est.mass_N is None and fresh.time_mass is None
    est.observe([_report(2, float("nan"))], step=2)  # non-finite: dropped
    assert est.dropped_steps == 1 and est.mass_N is None
    est.observe([_report(3, 1.0)], step=3)  # 4 done: >= 3 and a multiple of 2 -> refresh
    assert fresh.time_mass is est.mass_N
    expected = loss_scale_mass(torch.tensor([[2, 1, 0, 1], [8, 2, 0, 1], [32, 4, 0, 1]], dtype=torch.float64), 0.2)
    torch.testing.assert_close(est.mass_N, expected)
    assert torch.equal(est.window_3N, torch.zeros(3, 4, dtype=torch.float64))
    est.observe([_report(1, 3.0)], step=4)
    saved = est.state_dict()
    twin = PPOTSEstimator(fresh, num_bins=4, refresh=2, warmup=3, uniform_mix=0.2, decay=0.5,
                          device=torch.device("cpu"))
    twin.load_state_dict(saved)
    assert fresh.time_mass is twin.mass_N
    for copy in (est, twin):
        copy.observe([_report(2, 5.0)], step=5)
    assert torch.equal(est.mass_N, twin.mass_N) and torch.equal(est.stats_3N, twin.stats_3N)
    torch.testing.assert_close(est.stats_3N[:, 0], torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64))  # decayed
    with pytest.raises(ValueError, match="diffusion.ppots_bins"):
        PPOTSEstimator(fresh, num_bins=5, refresh=2, warmup=0, uniform_mix=0.2, decay=0.5,
                       device=torch.device("cpu")).load_state_dict(saved)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"time_sampler": "sobol"}, "diffusion.time_sampler"),
        ({"ppots_bins": 0}, "diffusion.ppots_bins"),
        ({"ppots_refresh": 0}, "diffusion.ppots_refresh"),
        ({"ppots_warmup": -1}, "diffusion.ppots_warmup"),
        ({"ppots_uniform_mix": 0.0}, "diffusion.ppots_uniform_mix"),
        ({"ppots_decay": 1.0}, "diffusion.ppots_decay"),
    ],
)
def test_config_checks_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DiffusionConfig(**override)
