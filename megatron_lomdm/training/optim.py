"""The LR schedule and the EMA of the weights (optimizers live in `distributed/megatron_engine.py` and `distributed/deepspeed_engine.py`)."""

from __future__ import annotations

import math

import torch
from torch import nn



def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR / peak LR at 0-based `step`: linear warmup, then constant or cosine down to min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of named parameters (each rank keeps the shards it owns), in fp32.

    The state dict maps parameter names (as in `model.named_parameters()`) to fp32 tensors, so
    exporters can read EMA weights by name. With decay 0 it is disabled: no shadow, evaluation and
    export use the live weights.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay = decay
        tracked = list(named_params) if decay > 0 else []  # decay 0 disables the EMA (no shadow at all)
        self.params = dict(tracked)
        self.shadow = {name: p.detach().float().clone() for name, p in tracked}
        self._live: dict[str, torch.Tensor] | None = None  # the live weights while the EMA is swapped in

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Swap the EMA weights in, or (every second call) the live weights back.

        The fp32 shadow itself is never overwritten: the live weights wait in a copy (in their own
        dtype), so a bf16 model's EMA does not get rounded to bf16 at every evaluation.
        """
        if self._live is None:
            self._live = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        else:
            for name, p in self.params.items():
                p.copy_(self._live[name])
            self._live = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy saved shadows in. `strict=False`: shadows the state lacks keep their values (a
        sharded checkpoint leaves out the family's parameter copies off the last pipeline stage)."""
        missing = set(self.shadow) ^ set(state["shadow"]) if strict else set(state["shadow"]) - set(self.shadow)
        if missing:
            raise ValueError(f"EMA state does not match the model; differing names: {sorted(missing)[:5]}")
        for name, saved in state["shadow"].items():
            self.shadow[name].copy_(saved)
