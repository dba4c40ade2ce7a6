"""Family registry: the only place a ``diffusion.name`` string is resolved (design.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_lomdm.diffusion.arm import ARMFamily
from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.bd3lm import BD3LMFamily
from megatron_lomdm.diffusion.genmd4 import GenMD4Family
from megatron_lomdm.diffusion.lomdm import LoMDMFamily
from megatron_lomdm.diffusion.mdlm import MDLMFamily
from megatron_lomdm.diffusion.multivariate import MultivariateFamily
from megatron_lomdm.diffusion.poly import PolyFamily

FAMILIES: dict[str, type[DiffusionFamily]] = {
    "mdlm": MDLMFamily,
    "poly": PolyFamily,
    "arm": ARMFamily,
    "bd3lm": BD3LMFamily,
    "genmd4": GenMD4Family,
    "lomdm": LoMDMFamily,
    "multivariate": MultivariateFamily,
}


def build_family(
    name: str,
    *,
    c1: float,
    c2: float,
    block_size: int,
    vocab_size: int,
    seq_length: int,
    mask_id: int,
    num_corruptions: int = 2,
    learn_order: bool = True,
    order_logits: Sequence[float] = (),
) -> DiffusionFamily:
    """Build the OeMDM family named by ``diffusion.name``.

    Args:
        name: One of ``FAMILIES``.
        c1: ``diffusion.c1``, mean exponent (poly, lomdm, multivariate).
        c2: ``diffusion.c2``, exponent spread (lomdm, multivariate).
        block_size: ``diffusion.block_size``, block length L' (bd3lm).
        vocab_size: Vocabulary size V including [MASK] (genmd4).
        seq_length: Sequence length L.
        mask_id: Token id of [MASK].
        num_corruptions: ``diffusion.num_corruptions``, K >= 2 for the families that learn
            their forward schedule (lomdm, genmd4, multivariate with learn_order); the
            context-free families ignore it (K = 1).
        learn_order: ``diffusion.learn_order`` (multivariate).
        order_logits: ``diffusion.order_logits`` (multivariate).

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
        c1=c1,
        c2=c2,
        block_size=block_size,
        vocab_size=vocab_size,
        seq_length=seq_length,
        mask_id=mask_id,
        num_corruptions=num_corruptions,
        learn_order=learn_order,
        order_logits=order_logits,
    )
