"""Optimizer pieces for the one-process and tensor-parallel paths: parameter groups, LR schedule,
TP-aware gradient-norm clipping, and the EMA of the weights.

The backbone and the scheduler heads (plus GenMD4's exponents) are separate groups so the heads
may run at their own LR (`optim.head_lr`). Norms count a tensor-parallel shard once per rank and
a replicated tensor (heads, layer norms) once in total.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lomdm.config.schema import OptimConfig, TrainConfig


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR / peak LR at 0-based `step`: linear warmup, then constant or cosine down to min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(backbone_params: Iterable[nn.Parameter], head_params: Iterable[nn.Parameter],
                    *, optim: OptimConfig, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups; each group remembers its peak LR in `base_lr`."""
    head_lr = optim.head_lr or train.lr
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "base_lr": train.lr, "name": "backbone"},
        {"params": [p for p in head_params if p.requires_grad], "base_lr": head_lr, "name": "scheduler_heads"},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Scale every group's peak LR; returns the backbone LR."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


def _is_tp_shard(p: nn.Parameter) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, *, tp_group: dist.ProcessGroup | None = None,
                   pp_group: dist.ProcessGroup | None = None) -> float:
    """Global L2 norm of all gradients across TP shards and PP stages; clips in place if max_norm > 0.

    Returns the norm before clipping (inf/nan propagate so the caller can skip the step).
    """
    grads_tp = [p.grad for p in params if p.grad is not None and _is_tp_shard(p)]
    grads_rep = [p.grad for p in params if p.grad is not None and not _is_tp_shard(p)]
    device = (grads_tp + grads_rep)[0].device if grads_tp or grads_rep else torch.device("cpu")
    sq_tp = sum((g.float().pow(2).sum() for g in grads_tp), torch.zeros((), device=device))
    sq_rep = sum((g.float().pow(2).sum() for g in grads_rep), torch.zeros((), device=device))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sq_tp, group=tp_group)
    total = sq_tp + sq_rep
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    norm = total.sqrt().item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads_tp + grads_rep:
            g.mul_(scale)
    return norm


class EMA:
    """Exponential moving average of named parameters (each rank keeps the shards it owns), in fp32.

    The state dict maps parameter names (as in `model.named_parameters()`) to fp32 tensors, so
    exporters can read EMA weights by name.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in named_params}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live weights and EMA weights (call twice to restore)."""
        for name, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[name].to(p.dtype))
            self.shadow[name].copy_(live.float())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model; differing names: {sorted(missing)[:5]}")
        for name, saved in state["shadow"].items():
            self.shadow[name].copy_(saved)
