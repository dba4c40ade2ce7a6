"""Registry: names, error messages and per-family config validation."""

from __future__ import annotations

import pytest

from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.registry import FAMILIES, build_family

_KW = dict(c1=0.7, c2=0.65, block_size=4, vocab_size=11, seq_length=8, mask_id=10)


def test_family_names() -> None:
    assert set(FAMILIES) == {"mdlm", "poly", "arm", "bd3lm", "genmd4", "lomdm", "multivariate"}
    for name, cls in FAMILIES.items():
        family = build_family(name, **_KW)
        assert isinstance(family, cls) and isinstance(family, DiffusionFamily)
        assert family.num_corruptions == (2 if name in ("genmd4", "lomdm", "multivariate") else 1)
        assert family.needs_clean_features == (name == "lomdm")
        assert family.needs_reverse_head == (name == "lomdm")
        assert family.needs_expected_rate == (name == "genmd4")


def test_unknown_name_error_message() -> None:
    with pytest.raises(ValueError) as err:
        build_family("mdml", **_KW)
    message = str(err.value)
    assert "diffusion.name" in message and "'mdml'" in message
    for name in FAMILIES:
        assert name in message


@pytest.mark.parametrize("c1, c2", [(0.5, 0.5), (0.5, 0.7), (0.7, -0.1), (0.0, 0.0)])
def test_lomdm_c1_c2_validation(c1: float, c2: float) -> None:
    with pytest.raises(ValueError, match=r"diffusion\.c1 > diffusion\.c2 >= 0"):
        build_family("lomdm", **{**_KW, "c1": c1, "c2": c2})


def test_lomdm_valid_c1_c2() -> None:
    family = build_family("lomdm", **{**_KW, "c1": 1.0, "c2": 0.0})
    assert family.c1 == 1.0 and family.c2 == 0.0


@pytest.mark.parametrize("c1", [0.0, -1.0])
def test_poly_c1_validation(c1: float) -> None:
    with pytest.raises(ValueError, match=r"diffusion\.c1"):
        build_family("poly", **{**_KW, "c1": c1})


@pytest.mark.parametrize("block_size", [0, 3, 16])
def test_bd3lm_block_size_validation(block_size: int) -> None:
    with pytest.raises(ValueError, match=r"diffusion\.block_size"):
        build_family("bd3lm", **{**_KW, "block_size": block_size})


def test_common_validation() -> None:
    with pytest.raises(ValueError, match="mask_id"):
        build_family("mdlm", **{**_KW, "mask_id": 11})
    with pytest.raises(ValueError, match="seq_length"):
        build_family("mdlm", **{**_KW, "seq_length": 0})


def test_genmd4_parameters_and_init() -> None:
    family = build_family("genmd4", **_KW)
    params = list(family.parameters())
    assert len(params) == 1 and params[0].shape == (11,)
    assert family.token_exponents().sub(1.0).abs().max() < 1e-6
    for name in ("mdlm", "poly", "arm", "bd3lm", "lomdm"):
        assert not list(build_family(name, **_KW).parameters())


@pytest.mark.parametrize("name", ["lomdm", "genmd4", "multivariate"])
def test_num_corruptions_is_an_instance_setting(name: str) -> None:
    """K comes from diffusion.num_corruptions for learned forward schedules; < 2 names the key."""
    assert build_family(name, **_KW, num_corruptions=4).num_corruptions == 4
    assert build_family(name, **_KW).num_corruptions == 2
    for bad in (1, 0):
        with pytest.raises(ValueError, match=r"diffusion\.num_corruptions >= 2"):
            build_family(name, **_KW, num_corruptions=bad)


@pytest.mark.parametrize("name", ["mdlm", "poly", "arm", "bd3lm"])
def test_context_free_families_ignore_num_corruptions(name: str) -> None:
    assert build_family(name, **_KW, num_corruptions=4).num_corruptions == 1
    assert build_family(name, **_KW, num_corruptions=1).num_corruptions == 1
