"""Analytic parameter counts against counted megatron models (shims 1 + 2, world 1)."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.models.backbone import build_backbone, pad_vocab_size
from megatron_lomdm.models.param_count import backbone_param_count, formula_param_count
from tests.helpers.cpu_megatron import megatron_cpu_session

# owt_1b: 24 layers, d 2048, 16 heads, T 1024, GPT-2 vocab 50257 + [MASK], MLP 4d
OWT_1B = dict(num_layers=24, hidden_size=2048, num_heads=16, ffn_hidden_size=8192,
              seq_length=1024)
OWT_1B_VOCAB = 50257 + 1


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0) as info:
        yield info


def by_component(model: torch.nn.Module) -> dict[str, int]:
    parts = dict.fromkeys(("embedding", "attention", "mlp", "layernorms", "output_layer"), 0)
    for name, p in model.named_parameters():
        key = ("embedding" if name.startswith("embedding.") else
               "output_layer" if name.startswith("output_layer.") else
               "attention" if ".self_attention." in name else
               "mlp" if ".mlp." in name else "layernorms")
        parts[key] += p.numel()
    return parts


def test_small_model_count_is_exact(session) -> None:
    torch.manual_seed(0)
    shape = dict(num_layers=3, hidden_size=48, num_heads=4, ffn_hidden_size=136, seq_length=16)
    model = build_backbone(**shape, vocab_size=201, mask_id=200, use_cpu_initialization=True)
    count = backbone_param_count(
        num_layers=3, hidden_size=48, ffn_hidden_size=136, num_heads=4,
        padded_vocab_size=pad_vocab_size(201),
    )
    assert sum(p.numel() for p in model.parameters()) == count.total
    assert by_component(model) == {k: v for k, v in count.as_dict().items()
                                   if k not in ("total", "non_embedding")}


def test_owt_1b_count_matches_formula(session) -> None:
    with torch.device("meta"):  # shapes only, no memory
        model = build_backbone(**OWT_1B, vocab_size=OWT_1B_VOCAB, mask_id=OWT_1B_VOCAB - 1,
                               use_cpu_initialization=True)
    counted = sum(p.numel() for p in model.parameters())
    analytic = backbone_param_count(
        num_layers=24, hidden_size=2048, ffn_hidden_size=8192, num_heads=16,
        padded_vocab_size=model.vocab_size,
    )
    formula = formula_param_count(num_layers=24, hidden_size=2048, vocab_size=OWT_1B_VOCAB)
    assert model.vocab_size == 50304
    assert counted == analytic.total == 1_414_647_808
    assert formula == 1_413_816_320  # performance.md: "1.41B with untied embedding + out"
    assert abs(counted - formula) / formula < 0.01  # 0.059%
    assert abs(analytic.non_embedding - 1.21e9) / 1.21e9 < 0.01  # "1.21B non-embedding"
