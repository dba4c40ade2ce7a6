"""Parameter rules both backends share: which are scheduler heads, which are weight-decayed, how
they are sharded in checkpoints."""

from __future__ import annotations

import torch

HEAD_PREFIXES = ("fwd_head.", "rev_head.", "family.")
# dist_checkpointing metadata of every sharded model/optimizer/EMA state dict: the distributed
# optimizer's state reshards across data-parallel sizes
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def is_head_param(name: str) -> bool:
    """A scheduler-head (or family) parameter: replicated over TP, its own optimizer group."""
    return name.startswith(HEAD_PREFIXES) or any(f".{p}" in name for p in HEAD_PREFIXES)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether `optim.weight_decay` applies to a parameter.

    Decayed: weight matrices and embeddings (2+ dims), of the backbone and the scheduler heads.
    Exempt: biases and LayerNorm weights (1 dim, heads included) and the family's parameters
    (GenMD4's exponents).
    """
    is_family = name.startswith("family.") or ".family." in name
    dims = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitioned: the full shape
    return dims >= 2 and not is_family
