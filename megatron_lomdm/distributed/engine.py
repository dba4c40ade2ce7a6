"""Data parallelism behind one interface: megatron-core DDP + (distributed) optimizer, or DeepSpeed.

An `Engine` owns the data-parallel wrapper, the optimizer and its checkpoint state. The training
step (`training/step.py`, the one home of forward/backward) calls the engine's `module`; the loop
calls `zero_grad`, `set_lr`, `step` and the state methods. Gradients are token sums; each engine
turns them into the gradient of the per-token loss of the whole global batch, so every layout
computes the same update.

Supported layouts (anything else raises ValueError before work starts):

| backend  | zero | TP | PP | what it is                                                   |
|----------|------|----|----|--------------------------------------------------------------|
| megatron | 0    | ✓  | ✓  | mcore DDP (fp32 grad buffers, optional overlap) + Adam        |
| megatron | 1    | ✓  | ✓  | + DistributedOptimizer (optimizer state sharded over DP)      |
| megatron | 0-1  | +SP| +VP| sequence parallelism (TP > 1), interleaved stages (PP > 1)    |
| deepspeed| 0-3  | ✓  | 1  | DeepSpeed engine, megatron TP through an mpu adapter          |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from megatron_lomdm.config import Config


class Engine(Protocol):
    """What the step and the loop need from a data-parallel backend.

    `pipeline_schedule`: True when megatron-core's schedule runs each micro-batch's forward and
    backward on `model_chunks` (their DDP hooks reduce the gradients): `[module]`, or one module
    per virtual pipeline stage; False when the step calls `module` per micro-batch and hands the
    loss to `backward`.
    """

    module: nn.Module
    pipeline_schedule: bool
    model_chunks: list[nn.Module]

    def backward(self, loss_sum: torch.Tensor, *, global_tokens: int, last: bool) -> None:
        """Backpropagate one micro-batch's token-sum loss (engines without `pipeline_schedule`)."""
        ...

    def zero_grad(self) -> None: ...
    def set_lr(self, multiplier: float) -> float: ...
    def step(self) -> tuple[bool, float]: ...

    def save_sharded(self, folder: Path, extra: dict[str, Any]) -> None:
        """Write model, optimizer and the caller's `extra` sharded entries (the EMA) into `folder`
        with dist_checkpointing (collective); DeepSpeed adds its optimizer files next to it."""
        ...

    def load_sharded(self, folder: Path, extra: dict[str, Any] | None) -> dict[str, Any]:
        """Load model and optimizer in place; return the loaded `extra` entries (`None`: a format-1
        checkpoint, nothing extra in `folder`)."""
        ...

    def state_bytes(self) -> dict[str, int]: ...


def build_engine(module: nn.Module, cfg: Config) -> Engine:
    """The engine for `parallel.backend`.

    `module` is what the engine wraps: the DiffusionLM under megatron (its schedule calls the model
    stage by stage), the training step's one-micro-batch module under DeepSpeed (ZeRO-3 gathers
    parameters inside the engine's forward, so both LoMDM phases must run there).
    """
    if cfg.parallel.backend == "megatron":
        from megatron_lomdm.distributed.megatron_engine import MegatronEngine

        return MegatronEngine(module, cfg)
    from megatron_lomdm.distributed.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(module, cfg)


def unwrap(module: nn.Module) -> Any:
    """The model inside data-parallel and step wrappers (`.module`, then `.model`)."""
    while hasattr(module, "module") or hasattr(module, "model"):
        module = module.module if hasattr(module, "module") else module.model
    return module
