"""The tensors of a run in megatron-core `dist_checkpointing` form (checkpoint format 2).

Every tensor of a checkpoint lives in its `dist/` folder, whichever the backend and layout:

| entry       | what                                       | sharded as                                 |
|-------------|--------------------------------------------|--------------------------------------------|
| `model`     | this rank's parameters                     | the model's own `sharded_state_dict`         |
| `optimizer` | megatron backend: Adam state               | megatron's optimizer `sharded_state_dict`    |
| `ema`       | the EMA shadows (fp32)                     | exactly like the parameter each one tracks  |

The EMA mirrors the model's `ShardedTensor`s (same global shape, offsets and replicas) under the
keys `ema.<key>`, so it reshards like the weights: a checkpoint resumes on any TP x PP x DP
layout, and one process reads the full model or EMA at TP = PP = 1 (the HF export) through the
same reader for both backends. The plain per-rank state (RNG, train/loader position) stays in
the small rank files of `checkpoint/manager.py`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from megatron_lomdm.distributed.params import SHARDING


def model_sharded_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's `sharded_state_dict` with the project's optimizer-sharding metadata."""
    return model.sharded_state_dict(metadata=SHARDING)


def ema_sharded_state_dict(model_sd: Mapping[str, Any], model: nn.Module,
                           shadow: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Sharded entries for the EMA shadows, keyed by parameter name: each a copy of its parameter's
    entry in `model_sd` (same sharding metadata) under the key `ema.<key>`, holding the shadow."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, Any] = {}
    for entry in model_sd.values():
        name = name_of.get(id(getattr(entry, "data", None)))
        if name is None or name not in shadow:
            continue  # extra state; parameters the EMA does not track
        fields = {"key": f"ema.{entry.key}", "data": shadow[name]}
        if "dtype" in {f.name for f in dataclasses.fields(entry)}:
            fields["dtype"] = shadow[name].dtype
        out[name] = dataclasses.replace(entry, **fields)
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, Python, CUDA where present)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
