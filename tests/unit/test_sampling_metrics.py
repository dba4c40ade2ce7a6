"""Sample metrics: unigram entropy, gen PPL, order statistics, velocity-confidence correlation.

Legend: B sequences, L positions, S steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_lomdm.sampling import (
    gen_ppl,
    order_heatmap,
    order_kendall_tau,
    save_order_heatmap,
    unigram_entropy,
    velocity_confidence_corr,
)


def test_kendall_tau_left_to_right() -> None:
    L = 10
    ltr = torch.arange(L).expand(2, L)
    torch.testing.assert_close(order_kendall_tau(ltr), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(order_kendall_tau(ltr.flip(-1)), -torch.ones(2, dtype=torch.float64))
    blocks = torch.arange(L).expand(1, L) // 5  # block by block: ties inside a block
    assert float(order_kendall_tau(blocks)[0]) == 1.0
    n0, n_u = L * (L - 1) / 2, 25
    assert math.isclose(float(order_kendall_tau(blocks, ties="b")[0]), n_u / math.sqrt(n0 * n_u))
    with_fixed = torch.tensor([[-1, -1, 0, 1, 2]])  # fixed positions are excluded
    assert float(order_kendall_tau(with_fixed)[0]) == 1.0
    assert math.isnan(float(order_kendall_tau(torch.zeros(1, 4, dtype=torch.long))[0]))
    # a known value: one discordant pair out of 3 -> (2 - 1) / 3
    assert math.isclose(float(order_kendall_tau(torch.tensor([[0, 2, 1]]))[0]), 1 / 3)


def test_unigram_entropy_known() -> None:
    ent = unigram_entropy(torch.tensor([[0, 1, 2, 3], [5, 5, 7, 7], [3, 3, 3, 3]]))
    torch.testing.assert_close(ent, torch.tensor([math.log(4), math.log(2), 0.0],
                                                 dtype=torch.float64))
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    (ent2,) = unigram_entropy([[0, 0, 1, 2]])
    assert math.isclose(float(ent2), float(-(p * p.log()).sum()))


def test_gen_ppl_known_judge() -> None:
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    calls = []

    def uniform_judge(batch):
        calls.append(len(batch))
        return [torch.full((len(s),), math.log(1 / 4), dtype=torch.float64) for s in batch]

    assert math.isclose(gen_ppl(uniform_judge, seqs, batch_size=2), 4.0, rel_tol=1e-12)
    assert calls == [2, 1]

    def varied_judge(batch):  # token-weighted pooling: exp((1 + 1 + 4) / 3) = e^2
        table = {2: [-1.0, -1.0], 1: [-4.0]}
        return [table[len(s)] for s in batch]

    assert math.isclose(gen_ppl(varied_judge, [[0, 0], [0]]), math.e**2, rel_tol=1e-12)
    with pytest.raises(ValueError):
        gen_ppl(lambda batch: [[] for _ in batch], seqs)


def test_order_heatmap_and_png(tmp_path: Path) -> None:
    steps = torch.tensor([[0, 1, 2, -1], [0, 2, 1, -1]])
    heat = order_heatmap(steps)
    assert heat.shape == (4, 3)
    expected = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5], [0, 0, 0]],
                            dtype=torch.float64)
    torch.testing.assert_close(heat, expected)
    binned = order_heatmap(steps, num_bins=2)
    torch.testing.assert_close(binned.sum(-1), torch.tensor([1.0, 1.0, 1.0, 0.0],
                                                            dtype=torch.float64))
    pytest.importorskip("matplotlib")
    path = tmp_path / "order.png"
    assert save_order_heatmap(heat, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_velocity_confidence_corr() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.rand(3, 20, generator=g)
    valid = torch.rand(3, 20, generator=g) < 0.7
    junk = torch.where(valid, 2 * e + 1, torch.rand(3, 20, generator=g) * 100)
    torch.testing.assert_close(velocity_confidence_corr(e, junk, valid),
                               torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(velocity_confidence_corr(e, -e, per_sequence=True),
                               -torch.ones(3, dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    assert math.isclose(float(velocity_confidence_corr(x, y)), 0.8, rel_tol=1e-12)
    assert math.isnan(float(velocity_confidence_corr(x, torch.ones_like(x))))
