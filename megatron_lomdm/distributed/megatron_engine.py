"""`parallel.backend=megatron`: mcore DDP + (distributed) optimizer behind the `Engine` protocol.

megatron-core's pipeline schedule runs each micro-batch's forward and backward on `module` (the
DDP-wrapped DiffusionLM); `finalize_model_grads` divides the token-sum gradients by the global
number of valid tokens after the data-parallel reduce (`calculate_per_token_loss`).
"""

from __future__ import annotations

import math
import queue
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_lomdm.config import Config
from megatron_lomdm.distributed.params import SHARDING
from megatron_lomdm.distributed.params import decays, is_head_param
from megatron_lomdm.utils.proc import forks_die_with_parent


class MegatronEngine:
    """mcore `DistributedDataParallel` + `get_megatron_optimizer` (ZeRO-1 with `parallel.zero=1`).

    Scheduler heads get their own parameter group (lr_mult = `optim.head_lr / train.lr`); they are replicated
    over TP, so megatron counts them once in the gradient norm, and DDP averages them over DP only.
    Parameters exempt from weight decay (`decays`) get wd_mult = 0, which `set_lr` applies (megatron's
    OptimizerParamScheduler, which would, is not used).

    Interleaved pipeline stages (`ModelChunks`, an `nn.ModuleList` of the rank's chunks): one DDP per
    chunk (bucketing only for the first, as Megatron-LM does), one optimizer over all of them;
    `model_chunks` is what megatron's schedule takes, `module` the first chunk's DDP.
    """

    pipeline_schedule = True  # megatron-core's schedule runs forward and backward on `module`

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        config = model.config
        config.calculate_per_token_loss = True  # read by DDP at construction: grads are summed, not averaged
        distributed_optimizer = cfg.parallel.zero == 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=distributed_optimizer, check_for_nan_in_grad=False,
        )
        self.model = model  # unwrapped: its (sharded) state dicts are the checkpoint's
        chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
        self.model_chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                                     disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
        self.module = self.model_chunks[0]
        single = len(self.model_chunks) == 1
        config.no_sync_func = self.module.no_sync if single else [c.no_sync for c in self.model_chunks]
        if cfg.parallel.overlap_grad_reduce:
            config.grad_sync_func = self.module.start_grad_sync if single else [c.start_grad_sync for c in self.model_chunks]
        config.finalize_model_grads_func = finalize_model_grads
        bf16 = cfg.train.precision == "bf16"
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.train.lr, min_lr=cfg.train.lr * cfg.optim.min_lr_ratio,
            weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2,
            adam_eps=cfg.optim.eps, clip_grad=cfg.optim.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        )
        heads = ParamKey(with_name_predicate=ParamWithNamePredicate(name="scheduler_heads", fn=lambda p, n: is_head_param(n)))
        no_wd = ParamKey(with_name_predicate=ParamWithNamePredicate(name="no_wd", fn=lambda p, n: not decays(n, p)))
        overrides = {no_wd: ParamGroupOverride(wd_mult=0.0)}  # merged with the heads' lr_mult where both match
        if cfg.optim.head_lr:
            # lr_mult (not max_lr): megatron matches checkpointed param groups by (wd_mult, lr_mult, ...)
            overrides[heads] = ParamGroupOverride(lr_mult=cfg.optim.head_lr / cfg.train.lr)
        self.optimizer = get_megatron_optimizer(opt_config, self.model_chunks, config_overrides=overrides)
        self.weight_decay = cfg.optim.weight_decay
        self.set_lr(1.0)  # per-group lr and weight decay from their multipliers

    def backward(self, loss_sum: torch.Tensor, *, global_tokens: int, last: bool) -> None:
        raise NotImplementedError("the megatron backend backpropagates inside megatron-core's schedule")

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def set_lr(self, multiplier: float) -> float:
        """Each group's lr (peak x lr_mult x multiplier) and weight decay (optim.weight_decay x wd_mult)."""
        for g in self.optimizer.param_groups:
            g["lr"] = g["max_lr"] * g.get("lr_mult", 1.0) * multiplier
            g["weight_decay"] = self.weight_decay * g.get("wd_mult", 1.0)
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> tuple[bool, float]:
        """Apply the update unless the global gradient norm is not finite; returns (applied, norm).

        `prepare_grads` first: megatron copies the DDP gradient buffers into `.grad` there, so a norm
        read before it sees the zeroed `.grad` of `zero_grad` (0.0) and lets a NaN through.
        `optimizer.step()` repeats the copy, which is idempotent.
        """
        self.optimizer.prepare_grads()
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return False, norm
        ok, norm, _ = self.optimizer.step()
        return bool(ok), float(norm if norm is not None else 0.0)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradient buffers and optimizer state (tensors
        enumerated, shared storage counted once): what ZeRO saves shows up here."""
        seen: set[int] = set()

        def total(tensors) -> int:
            n = 0
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    n += t.numel() * t.element_size()
            return n

        params = list(self.model.parameters())
        out = {"params": total(params), "grads": total(getattr(p, "main_grad", None) for p in params)}
        inner = [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        opt_tensors = [p for o in inner for g in o.param_groups for p in g["params"]]
        opt_tensors += [v for o in inner for st in o.state.values() for v in st.values()]
        out["optimizer"] = total(opt_tensors)
        out["num_params"] = sum(p.numel() for p in params)
        return out

    def _optimizer_has_state(self) -> bool:
        inner = [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        return any(len(o.state) for o in inner)

    def _sharded(self, is_loading: bool, with_optimizer: bool) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict(metadata=SHARDING)
        if not with_optimizer:
            return {"model": model_sd}
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDING)}

    def save_sharded(self, folder: Path, extra: dict[str, Any]) -> None:
        """Model, optimizer and the caller's `extra` sharded entries (the EMA) via dist_checkpointing.

        Before the first update Adam has no state (megatron cannot save an empty one); then only
        the model is saved and a marker says so.
        """
        folder.mkdir(parents=True, exist_ok=True)
        with_optimizer = self._optimizer_has_state()
        write_dist_checkpoint({**self._sharded(is_loading=False, with_optimizer=with_optimizer), **extra}, folder)
        if not with_optimizer and torch.distributed.get_rank() == 0:
            (folder / "NO_OPTIMIZER_STATE").touch()

    def load_sharded(self, folder: Path, extra: dict[str, Any] | None) -> dict[str, Any]:
        """Load model and optimizer in place; returns the loaded `extra` entries (None: none)."""
        from megatron.core import dist_checkpointing

        extra = extra or {}
        with_optimizer = not (folder / "NO_OPTIMIZER_STATE").exists()
        state = dist_checkpointing.load({**self._sharded(is_loading=True, with_optimizer=with_optimizer), **extra},
                                        str(folder))
        self.model.load_state_dict(state["model"], strict=False)
        if with_optimizer:
            with torch.no_grad():  # mcore: loading optimizer state in place needs no autograd
                self.optimizer.load_state_dict(state["optimizer"])
        return {key: state[key] for key in extra}


def write_dist_checkpoint(sharded_state_dict: dict[str, Any], folder: Path) -> None:
    """`dist_checkpointing.save`, synchronously, its forked writers bound to this process."""
    from megatron.core import dist_checkpointing

    _write_results_in_process()
    with forks_die_with_parent():  # its forked writers must not outlive a killed trainer
        dist_checkpointing.save(sharded_state_dict, str(folder))


def _write_results_in_process() -> None:
    """megatron hands its writer workers' results to the saver through a queue served by a spawned
    manager process, which outlives a killed trainer (and takes seconds to start). Our saves are
    synchronous, so that queue's producer and consumer are this process: a plain queue serves."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
