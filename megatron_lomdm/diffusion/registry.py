"""Family registry: the only place a ``diffusion.name`` string is resolved (design.md §3).

The names and the rules on each family's settings are ``config.families.FAMILY_SPECS`` (layer 0,
so that the config can check them when it is loaded); here each name is bound to the family class
whose ``spec`` it is. Import fails if the two sides disagree.
"""

from __future__ import annotations

from typing import Any

from megatron_lomdm.config.families import FAMILY_SPECS
from megatron_lomdm.diffusion.arm import ARMFamily
from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.bd3lm import BD3LMFamily
from megatron_lomdm.diffusion.genmd4 import GenMD4Family
from megatron_lomdm.diffusion.lomdm import LoMDMFamily
from megatron_lomdm.diffusion.mdlm import MDLMFamily
from megatron_lomdm.diffusion.multivariate import MultivariateFamily
from megatron_lomdm.diffusion.poly import PolyFamily

FAMILIES: dict[str, type[DiffusionFamily]] = {
    cls.spec.name: cls
    for cls in (
        MDLMFamily,
        PolyFamily,
        ARMFamily,
        BD3LMFamily,
        GenMD4Family,
        LoMDMFamily,
        MultivariateFamily,
    )
}
if list(FAMILIES) != list(FAMILY_SPECS):
    raise ImportError(
        f"diffusion.registry.FAMILIES {list(FAMILIES)} and config.families.FAMILY_SPECS "
        f"{list(FAMILY_SPECS)} must name the same families in the same order"
    )


def build_family(
    name: str, *, vocab_size: int, seq_length: int, mask_id: int, **settings: Any
) -> DiffusionFamily:
    """Build the OeMDM family named by ``diffusion.name``.

    Args:
        name: One of ``FAMILIES``.
        vocab_size: Vocabulary size V including [MASK] (genmd4).
        seq_length: Sequence length L.
        mask_id: Token id of [MASK].
        **settings: ``diffusion.*`` settings (``c1``, ``c2``, ``block_size``,
            ``num_corruptions``, ``learn_order``, ``order_logits``); each family takes the ones
            its constructor names (``DiffusionFamily.from_config``) and its defaults fill the
            others (K = 2 for the families that learn their forward schedule; the context-free
            ones use K = 1).

    Returns:
        The family module (GenMD4 and multivariate hold learnable parameters; the others
        hold none).

    Raises:
        ValueError: For an unknown name or invalid settings; the message names the key.
    """
    if name not in FAMILIES:
        raise ValueError(
            f"unknown diffusion.name {name!r}; valid choices: {', '.join(sorted(FAMILIES))}"
        )
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
    return FAMILIES[name].from_config(
        vocab_size=vocab_size, seq_length=seq_length, mask_id=mask_id, **settings
    )
