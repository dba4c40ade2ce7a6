"""Low-discrepancy training times and sampling grids."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t, sampling_time_grid


def test_low_discrepancy_t_formula() -> None:
    u = torch.tensor([0.25, 0.5, 0.0, 0.999], dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 3])
    t = low_discrepancy_t(u, idx, num_total=4, eps=1e-3)
    expected = (1 - 1e-3) * ((u + idx) / 4) + 1e-3
    torch.testing.assert_close(t, expected)
    assert t.dtype == torch.float64
    assert low_discrepancy_t(u.float(), idx, 4).dtype == torch.float32
    assert low_discrepancy_t(u.bfloat16(), idx, 4).dtype == torch.float32


def test_low_discrepancy_t_stratified_over_global_batch() -> None:
    g = torch.Generator().manual_seed(0)
    n, eps = 64, 1e-3
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = low_discrepancy_t(u, torch.arange(n), num_total=n, eps=eps)
    assert t.min() >= eps and t.max() <= 1.0
    strata = torch.floor((t - eps) / (1 - eps) * n).long()
    assert torch.equal(torch.sort(strata).values, torch.arange(n))  # one t per stratum


def test_low_discrepancy_t_layout_independent() -> None:
    g = torch.Generator().manual_seed(1)
    n = 24
    u = torch.rand(n, generator=g)
    reference = low_discrepancy_t(u, torch.arange(n), num_total=n)
    # 4 data-parallel ranks x 3 micro-batches of 2, with an interleaved sample assignment.
    pieces = torch.zeros(n)
    for rank in range(4):
        rank_idx = torch.arange(rank, n, 4)
        for micro in rank_idx.split(2):
            pieces[micro] = low_discrepancy_t(u[micro], micro, num_total=n)
    torch.testing.assert_close(pieces, reference, rtol=0, atol=0)


def test_low_discrepancy_t_errors() -> None:
    u, idx = torch.rand(3), torch.arange(3)
    with pytest.raises(ValueError, match="num_total"):
        low_discrepancy_t(u, idx, num_total=0)
    with pytest.raises(ValueError, match="eps"):
        low_discrepancy_t(u, idx, num_total=3, eps=1.0)
    with pytest.raises(ValueError):
        low_discrepancy_t(u, torch.arange(2), num_total=3)


def test_sampling_time_grid() -> None:
    grid = sampling_time_grid(4)
    torch.testing.assert_close(grid, torch.linspace(1, 1e-5, 5, dtype=torch.float64))
    assert grid.dtype == torch.float64 and grid[0] == 1.0
    assert torch.all(grid[1:] < grid[:-1])
    assert sampling_time_grid(2, t_min=0.0)[-1] == 0.0
    with pytest.raises(ValueError):
        sampling_time_grid(0)
