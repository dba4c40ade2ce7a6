"""Sampling time grids: uniform and Beta-CDF grids, the incomplete beta function.

Legend: T grid steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lomdm.sampling import GridSpec, beta_grid, betainc, build_sampler, uniform_grid
from megatron_lomdm.sampling.base import DenoiserOutput
from megatron_lomdm.sampling.grids import resolve_grid


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.5, 0.5), (2.0, 5.0), (3.0, 0.7), (0.2, 8.0)])
@pytest.mark.parametrize("sin2", [True, False])
def test_beta_grid(a: float, b: float, sin2: bool) -> None:
    T = 16
    for t_min in (0.0, 1e-5):
        grid = beta_grid(T, a, b, t_min=t_min, sin2=sin2)
        assert grid.shape == (T + 1,) and grid.dtype == torch.float64
        assert float(grid[0]) == 1.0 and float(grid[-1]) == t_min  # endpoints
        assert bool((grid[1:] <= grid[:-1]).all())  # monotone (non-increasing)
    # the grid's meaning: unmasked fraction of the reference schedule 1 - t^c at step k
    c = 0.7
    grid = beta_grid(T, a, b, sin2=sin2, exponent=c)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    gamma = betainc(u, a, b)
    frac = torch.sin(0.5 * math.pi * gamma) ** 2 if sin2 else gamma
    torch.testing.assert_close(1 - grid**c, frac, atol=1e-12, rtol=0)


def test_beta_grid_reduces_to_uniform() -> None:
    T = 10
    k = torch.arange(T + 1, dtype=torch.float64)
    torch.testing.assert_close(beta_grid(T, 1.0, 1.0, sin2=False), uniform_grid(T))
    torch.testing.assert_close(beta_grid(T, 1.0, 1.0, sin2=False, t_min=1e-5),
                               uniform_grid(T, 1e-5))
    # with the sin^2 map, a = b = 1 is the uniform progress seen through sin^2
    torch.testing.assert_close(beta_grid(T, 1.0, 1.0), torch.cos(0.5 * math.pi * k / T) ** 2)


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.5, 0.3), (2.0, 5.0), (10.0, 0.7), (0.05, 3.0),
                                  (50.0, 50.0)])
def test_betainc_quadrature_matches_scipy(a: float, b: float) -> None:
    pytest.importorskip("scipy")
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(betainc(x, a, b, use_scipy=False),
                               betainc(x, a, b, use_scipy=True), atol=1e-10, rtol=0)


def test_grid_options_of_samplers() -> None:
    spec = GridSpec(kind="beta", a=2.0, b=0.5)
    torch.testing.assert_close(resolve_grid(spec, 8), beta_grid(8, 2.0, 0.5))
    torch.testing.assert_close(resolve_grid({"kind": "beta", "a": 2.0, "b": 0.5}, 8),
                               beta_grid(8, 2.0, 0.5))
    torch.testing.assert_close(resolve_grid(None, 8, 1e-5), uniform_grid(8, 1e-5))
    explicit = torch.tensor([1.0, 0.5, 0.1, 0.0])
    torch.testing.assert_close(resolve_grid(explicit, None), explicit.double())
    with pytest.raises(ValueError):
        resolve_grid(torch.tensor([0.9, 0.5, 0.0]), None)  # must start at 1
    with pytest.raises(ValueError):
        resolve_grid(torch.tensor([1.0, 0.2, 0.5, 0.0]), None)  # must not increase
    with pytest.raises(ValueError):
        resolve_grid(explicit, 5)  # T mismatch
    with pytest.raises(ValueError):
        GridSpec(kind="cosine")
    mask_id, V, L = 4, 5, 6

    def den(z):
        return DenoiserOutput(torch.zeros(*z.shape, V), None)

    for name in ("ancestral", "mdlm_cache", "top_prob", "top_margin"):
        opts = {"exponent": 1.0} if name == "ancestral" else {}
        sampler = build_sampler(name, mask_id=mask_id, num_steps=8, grid=spec, **opts)
        res = sampler.sample(den, batch_size=2, seq_length=L, generator=torch.Generator())
        torch.testing.assert_close(res.grid, beta_grid(8, 2.0, 0.5))
        assert not bool((res.tokens_BL == mask_id).any())
