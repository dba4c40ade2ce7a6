"""`parallel.backend=deepspeed`: DeepSpeed ZeRO 0-3 behind the `Engine` protocol of `distributed/engine.py`.

Layout: PP=1, any TP (megatron-core's tensor-parallel layers, DeepSpeed told about them through an
`mpu` adapter over `parallel_state`), DP = megatron's data-parallel group, ZeRO stage
`parallel.zero`, optimizer state optionally offloaded to the CPU (`parallel.cpu_offload`, ZeRO>=2,
with DeepSpeed's `DeepSpeedCPUAdam`; otherwise a torch AdamW).

Loss scaling. Losses are token sums, and the gradient must be that of the sum divided by N, the
number of valid tokens of the whole global batch (all micro-batches, all DP ranks), as megatron's
`finalize_model_grads` makes it on the megatron backend. DeepSpeed averages gradients over DP (it
divides their sum by the DP size). The training step (`training/step.py`) reads N from the
micro-batches' `valid` masks before any forward (one all-reduce) and hands it to `backward`, which
backpropagates `surrogate_sum * DP / N` with `scale_wrt_gas=False`: exactly sum(grad surrogate) / N.

Accumulation boundary. The step calls `backward` once per micro-batch and the loop then calls
`step`. `gradient_accumulation_steps` is the number of micro-batches; before each backward the
engine is told whether it is the last one (`set_gradient_accumulation_boundary`), so DeepSpeed
reduces at the right backward whatever its internal counter says, and `step` is one
`DeepSpeedEngine.step()` at a boundary. A micro-batch whose loss is not finite is backpropagated
multiplied by NaN, so every gradient of the step is NaN and DeepSpeed's overflow path (norm not
finite) discards the update and clears its buffers; the loop then skips `step` (it checks the
loss), and the next `zero_grad` runs that discarding step so no stale gradient survives.

Model-state bytes. `state_bytes()` (logged by the loop after the first update) enumerates this
rank's tensors (`model_state_bytes`): parameters, gradients at their peak (measured at the end of
each backward of the first step, before DeepSpeed's reduction frees them), fp32 master + Adam
state, and DeepSpeed's reduction buckets apart ("buffers", not model state). At DP=2 in fp32 this
is 4+4+6, 4+2+6 and 2+2+6 B/param for ZeRO-1/2/3, in bf16 2+2+6, 2+1+6 and 1+1+6: ZeRO's
accounting (performance.md §A2) exactly.

Decisions:
    * The DeepSpeed engine wraps the training step's `MicroBatchStep` (`training/step.py`), which
      runs phase one (LoMDM's clean pass and forward head) and phase two of one micro-batch and
      returns the surrogate as the first output, which is what gets backpropagated: DeepSpeed
      hooks its backward prologue and ZeRO-3 its pre-backward gathers onto the tensors a forward
      returns (a `LossTerms` dataclass would hide them), and under ZeRO-3 every parameter use
      stays inside the engine's forward (the family's parameters, used outside `family.forward`,
      are registered as external parameters of the root). DeepSpeed checkpoints therefore name
      parameters `model.<DiffusionLM name>`.
    * ZeRO-3 partitions every parameter (`stage3_param_persistence_threshold=0`; DeepSpeed's
      default keeps tensors under 1e5 elements whole, which on small models means nearly
      everything), so memory follows the ZeRO-3 accounting and the parity tests exercise
      partitioned parameters everywhere. The cost is one gather per small tensor per pass; revisit
      with GPU measurements.
    * EMA under ZeRO-3 is rejected (`optim.ema_decay` must be 0): `training.optim.EMA` holds the
      full parameters it saw before wrapping, which ZeRO-3 empties, and gathering them every step
      would cost a full all-gather plus a full fp32 shadow per rank (4 B/param of ZeRO-3's 10).
      ZeRO 0-2 keep full parameters on every rank (the same `nn.Parameter` objects, re-pointed
      into DeepSpeed's flat buffers), so the EMA works unchanged there.
    * bf16: DeepSpeed casts every parameter, the scheduler heads included, to bf16 and keeps the
      fp32 master copy in the optimizer, as the megatron backend does (`training.build` casts the
      model); the scheduler heads compute in fp32 from their bf16 weights.
    * Stage 0 in fp32 has no overflow check in DeepSpeed: the engine clips (and measures the norm)
      itself there, with DeepSpeed's model-parallel-aware `clip_grad_norm_`.
    * Communication buckets are `min(5e8, parameters on this rank)` elements: DeepSpeed's default
      5e8 would allocate 2 GB per bucket even for a tiny model.
    * Offload (`parallel.cpu_offload`, ZeRO 2/3) uses `DeepSpeedCPUAdam` (DeepSpeed refuses a
      torch optimizer there); it JIT-compiles `cpu_adam` on first use unless prebuilt.
    * NVMe offload (`parallel.nvme_offload_dir`, ZeRO-3 only: ZeRO-Infinity) keeps the fp32 master
      weights and Adam m, v in files (DeepSpeed's optimizer swapper, async_io op) and streams them
      through CPU buffers one sub-group at a time (`NVME_SUB_GROUP_NUMEL` elements; 4 buffers of
      that size per rank), so a rank holds only its bf16 parameter and gradient partitions, the
      buffers and the activations. Buckets are capped at `NVME_BUCKET_NUMEL` there too.
    * ZeRO-3 saves gather one parameter at a time: the first DP rank keeps a full copy for the
      write, the other ranks hand dist_checkpointing zero-stride placeholders of their non-main
      replicas (never written), so a save costs one model copy on one rank, not on every rank.
    * NVMe checkpoints. DeepSpeed 0.19.8 cannot checkpoint swapped optimizer state: its ZeRO-3
      `_rigid_state_dict` saves `fp32_partitioned_groups_flat` and the Adam tensors as they are
      between steps, i.e. released to empty tensors (their values live in the swap files), and
      `_rigid_load_state_dict` then copies those empty tensors back, purges the swapper's state
      tensors and leaves the bf16 weights at the fresh initialisation -- a resume that silently
      restarts from scratch. With NVMe offload the engine therefore writes its own checkpoint:
      the rank's swap files (fp32 master + m + v, byte copies) and the optimizer's small state
      (step counts, groups) next to DeepSpeed's folder, and resumes by copying them back and
      refreshing the bf16 partitions from the restored masters. The files are per rank: resume
      needs the same DP size and model (the model itself is in the layout-free `dist/` folder
      that evaluation and the HF export read).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import types
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from torch import nn

from megatron_lomdm.config import Config
from megatron_lomdm.distributed.cpu_compat import skip_deepspeed_shm_comm
from megatron_lomdm.distributed.init import launch_env_from
from megatron_lomdm.distributed.params import SHARDING, decays, is_head_param
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
CHECKPOINT_TAG = "ds"
DEFAULT_BUCKET_NUMEL = 500_000_000  # DeepSpeed's reduce/allgather bucket default (elements)
NVME_SUB_GROUP_NUMEL = 50_000_000  # elements per swapped optimizer sub-group (4 fp32 buffers: 0.8 GB/rank)
NVME_BUCKET_NUMEL = 50_000_000  # reduce/prefetch buckets with NVMe offload (bf16: 100 MB)
NVME_BUFFER_COUNT = 4  # the swapper's CPU buffers (master, m, v and the gradient of one sub-group)
NVME_STATE_DIR = "nvme_state"  # under the checkpoint's deepspeed/ folder: rank<r>/ swap files + state.pt


def check_nvme_offload(path: str) -> Path:
    """The directory of `parallel.nvme_offload_dir`, checked before DeepSpeed opens files in it.

    Raises:
        ValueError: naming the key when the directory is missing or not writable, or when
            DeepSpeed's async_io op cannot be built (libaio missing).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"config: parallel.nvme_offload_dir: {folder} is not a directory (create it on a fast local disk)")
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"config: parallel.nvme_offload_dir: {folder} is not writable ({err})") from err
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        raise ValueError("config: parallel.nvme_offload_dir: DeepSpeed's async_io op is unavailable: it needs libaio "
                         "(`apt-get install -y libaio-dev` on Debian/Ubuntu, `yum install libaio-devel` on RHEL)")
    return folder.resolve()


def init_deepspeed_comm() -> None:
    """DeepSpeed's comm layer on the process groups `init_distributed` made (what `deepspeed.initialize`
    would otherwise start): on CPU without its shared-memory op (cpu_compat shim 5)."""
    import deepspeed

    if not torch.cuda.is_available():
        skip_deepspeed_shm_comm()
    # DeepSpeed asserts LOCAL_RANK, which only torchrun sets; a plain or Slurm launch has its own.
    os.environ.setdefault("LOCAL_RANK", str(launch_env_from(os.environ).local_rank))
    deepspeed.init_distributed(dist_init_required=False)


def partitioned_build(cfg: Config) -> contextlib.AbstractContextManager[Any]:
    """The context `training.build` constructs the model in: ZeRO-3 partitions each module's
    parameters over the DP group at the end of its `__init__` (DeepSpeed's `zero.Init`), so no rank
    ever holds the whole model; other stages and backends build as before (a null context).

    The weights are those of a plain build: megatron's `use_cpu_initialization` draws each full
    weight and slices it inside the layer's `__init__`, before the partition. DeepSpeed's tensor
    overrides (which would create every tensor, megatron's fp32 init draws included, in bf16) and
    its memory-efficient linear (a global `F.linear` replacement) are off; a bf16 run casts each
    parameter to bf16 just before its partition, as `build_model`'s cast of the whole model would.
    """
    if cfg.parallel.backend != "deepspeed" or cfg.parallel.zero != 3:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    class _CastThenPartition(deepspeed.zero.Init):
        def _post_init_method(self, module: nn.Module) -> None:
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype and not is_zero_param(p):
                    p.data = p.data.to(dtype)
            super()._post_init_method(module)

    init_deepspeed_comm()
    return _CastThenPartition(data_parallel_group=parallel_state.get_data_parallel_group(), dtype=dtype,
                              mem_efficient_linear=False, tensor_overrides=[])


def megatron_mpu() -> types.SimpleNamespace:
    """megatron-core's `parallel_state` in the shape DeepSpeed's `mpu` argument expects.

    DeepSpeed calls the old Megatron-LM API (`get_model_parallel_rank/world_size/group`), which
    megatron-core removed or redefined (its model-parallel group spans TP x PP); here they are the
    tensor-parallel ones (PP is 1 on this backend). Every other `get_*` is passed through.
    """
    funcs = {name: getattr(parallel_state, name) for name in dir(parallel_state) if name.startswith("get_")}
    funcs.update(
        get_model_parallel_rank=parallel_state.get_tensor_model_parallel_rank,
        get_model_parallel_world_size=parallel_state.get_tensor_model_parallel_world_size,
        get_model_parallel_group=parallel_state.get_tensor_model_parallel_group,
    )
    return types.SimpleNamespace(**funcs)


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, as the megatron backend forms them.

    Backbone and scheduler heads with the family's parameters (LR `optim.head_lr or train.lr`),
    each split by `distributed.params.decays` into weight-decayed and exempt parameters. Empty
    groups are dropped.
    """
    head_lr = cfg.optim.head_lr or cfg.train.lr
    wd = cfg.optim.weight_decay
    groups = {"backbone": ([], cfg.train.lr, wd), "backbone_no_wd": ([], cfg.train.lr, 0.0),
              "heads": ([], head_lr, wd), "heads_no_wd": ([], head_lr, 0.0)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("heads" if is_head_param(name) else "backbone") + ("" if decays(name, p) else "_no_wd")
        groups[key][0].append(p)
    return [{"name": key, "params": params, "lr": lr, "weight_decay": decay}
            for key, (params, lr, decay) in groups.items() if params]


def deepspeed_config(cfg: Config, *, dp: int, num_microbatches: int, bucket_numel: int,
                     engine_clips: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (see the module docstring for the choices)."""
    zero: dict[str, Any] = {"stage": cfg.parallel.zero, "reduce_bucket_size": bucket_numel,
                            "allgather_bucket_size": bucket_numel}
    if cfg.parallel.zero == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=bucket_numel)
    if cfg.parallel.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    extra: dict[str, Any] = {}
    if cfg.parallel.nvme_offload_dir:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": cfg.parallel.nvme_offload_dir,
                                     "pin_memory": False, "buffer_count": NVME_BUFFER_COUNT}
        zero["sub_group_size"] = NVME_SUB_GROUP_NUMEL
        # DeepSpeed's aio defaults, written out: 1 MiB blocks, 8 requests in flight, one thread
        extra["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1,
                        "single_submit": False, "overlap_events": True}
    return {
        "train_batch_size": cfg.train.micro_batch_size * num_microbatches * dp,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": 0.0 if engine_clips else cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 2**62,  # the loop logs; DeepSpeed's own progress lines stay quiet
        "wall_clock_breakdown": False,
        **extra,
    }


def _storages(tensors: list[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not already in `seen` (views count once)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _flat(value: Any) -> list[torch.Tensor]:
    """The tensors in a tensor / list / tuple / dict attribute value (one level of nesting)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


# Where DeepSpeed 0.19 keeps gradient partitions and fp32 master weights, per optimizer class
# (stage 1/2: DeepSpeedZeroOptimizer; stage 3: DeepSpeedZeroOptimizer_Stage3; bf16 stage 0: BF16_Optimizer).
_GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
               "fp32_groups_gradients_flat")
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def model_state_bytes(engine: DeepSpeedEngine) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state right now, by enumerating tensors.

    Parameters: the model's parameter storages (under ZeRO-3 the local partitions). Gradients:
    `.grad` of parameters and master partitions plus DeepSpeed's gradient partitions. Optimizer:
    the fp32 master partitions and the optimizer's state tensors (Adam m, v). Buffers: DeepSpeed's
    gradient-reduction buckets, which are not model state (ZeRO's accounting leaves them out);
    gradients waiting in a bucket count there. Views of one flat buffer count once, padding
    included. `num_params` is this rank's (TP slice's) full parameter count, partitioned or not.

    Gradients exist only between a backward and the step (ZeRO-1 holds them whole until the last
    backward of a step reduces them to partitions), the Adam state only after the first step; see
    `DeepSpeedEngine.state_bytes` for the per-run figure.
    """
    opt = engine.ds.optimizer
    params = list(engine.module.parameters())
    seen: set[int] = set()
    param_bytes = _storages([getattr(p, "ds_tensor", None) for p in params] + [p.data for p in params], seen)
    buckets = getattr(opt, "ipg_buckets", None) or {}
    buffer_bytes = _storages([t for b in buckets.values() for t in _flat(getattr(b, "buffer", None))], seen)
    masters = [t for a in _MASTER_ATTRS for t in _flat(getattr(opt, a, None))]
    grad_tensors = [p.grad for p in params] + [t.grad for t in masters]
    grad_tensors += [t for a in _GRAD_ATTRS for t in _flat(getattr(opt, a, None))]
    grad_bytes = _storages(grad_tensors, seen)
    inner = getattr(opt, "optimizer", opt)
    states = [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": _storages(masters + states, seen),
            "buffers": buffer_bytes, "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


class DeepSpeedEngine:
    """DeepSpeed ZeRO engine with megatron-core TP; the `Engine` protocol of `distributed.engine`.

    Args:
        step_module: the training step's one-micro-batch module around the DiffusionLM (this
            rank's TP slice, on its device); `module` is the DeepSpeed engine wrapping it.
        cfg: the run's config (`parallel.zero`, `parallel.cpu_offload`, `optim.*`, `train.*`).

    Raises:
        ValueError: for `parallel.pp > 1`, or `optim.ema_decay > 0` with ZeRO-3.
    """

    pipeline_schedule = False  # the step runs each micro-batch and calls `backward`

    def __init__(self, step_module: nn.Module, cfg: Config) -> None:
        import deepspeed

        stage = cfg.parallel.zero
        if cfg.parallel.pp > 1:
            raise ValueError(f"parallel.backend=deepspeed runs without pipeline parallelism, got parallel.pp="
                             f"{cfg.parallel.pp}; use parallel.backend=megatron for pp > 1")
        if stage == 3 and cfg.optim.ema_decay > 0:
            raise ValueError(f"optim.ema_decay={cfg.optim.ema_decay} needs full parameters on every rank, but "
                             "parallel.zero=3 partitions them: set optim.ema_decay=0 or use parallel.zero <= 2")
        model = step_module.model  # the DiffusionLM
        self.cfg = cfg
        self.stage = stage
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        self._engine_clips = stage == 0 and cfg.train.precision == "fp32"
        self._mpu = megatron_mpu()
        groups = param_groups(model, cfg)
        self.base_lrs = [g["lr"] for g in groups]
        described = [(g["name"], len(g["params"]), g["lr"]) for g in groups]  # DeepSpeed flattens the groups
        self.nvme = check_nvme_offload(cfg.parallel.nvme_offload_dir) if cfg.parallel.nvme_offload_dir else None
        optimizer = self._optimizer(groups, cfg)
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # partitioned: full size
        cap = NVME_BUCKET_NUMEL if self.nvme else DEFAULT_BUCKET_NUMEL
        config = deepspeed_config(cfg, dp=self.dp, num_microbatches=self.num_microbatches,
                                  bucket_numel=min(cap, max(numel, 1)), engine_clips=self._engine_clips)
        if stage == 3:  # the family's parameters are used in DiffusionLM.forward, not in family.forward
            for p in model.family.parameters():
                deepspeed.zero.register_external_parameter(step_module, p)
        init_deepspeed_comm()
        self.ds, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, config=config,
                                                mpu=self._mpu, dist_init_required=False)
        self.module = self.ds
        self.model_chunks = [self.module]
        self._backwards = 0  # micro-batches backpropagated in this step so far
        self._pending = False  # backpropagated gradients that no step() consumed yet
        self._updated = False  # an update has been applied (the first step is over)
        self._peak = {"grads": 0, "buffers": 0}  # largest bytes seen in a backward before the first update
        self._watching = False  # DeepSpeed's end-of-backward reduction is wrapped to measure gradients
        log.info("DeepSpeed ZeRO-%d engine: dp=%d tp=%d, %d micro-batches per step, groups %s, optimizer %s%s",
                 stage, self.dp, parallel_state.get_tensor_model_parallel_world_size(), self.num_microbatches,
                 described, type(optimizer).__name__,
                 ", optimizer state offloaded to CPU" if cfg.parallel.cpu_offload else
                 f", optimizer state offloaded to NVMe under {self.nvme}" if self.nvme else "")

    @staticmethod
    def _optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
        o = cfg.optim
        kwargs = {"lr": cfg.train.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
        if cfg.parallel.cpu_offload or cfg.parallel.nvme_offload_dir:  # DeepSpeed requires its CPU Adam there
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    # ---- backward ---------------------------------------------------------------------------------
    def backward(self, loss_sum: torch.Tensor, *, global_tokens: int, last: bool) -> None:
        """Backpropagate one micro-batch's token-sum loss as its share of the global per-token loss.

        `loss_sum` must be the engine's forward output (DeepSpeed hooks onto it). A non-finite loss
        poisons every gradient, so DeepSpeed's overflow check drops the step.
        """
        self._backwards += 1
        if last and self._backwards != self.num_microbatches:
            raise ValueError(f"{self._backwards} micro-batches per step, but the DeepSpeed engine was built for "
                             f"{self.num_microbatches} (train.global_batch_size / (micro_batch_size x DP))")
        if not self._updated and not self._watching:
            self._watch_gradient_peak()
        self.ds.set_gradient_accumulation_boundary(last)
        scale = self.dp / max(global_tokens, 1)  # DeepSpeed averages over DP: surrogate * DP / N -> sum / N
        poison = torch.where(torch.isfinite(loss_sum.detach()), 1.0, math.nan)
        self.ds.backward(loss_sum * (poison * scale), scale_wrt_gas=False)
        if self._watching:  # after DeepSpeed's reduction (partitions, accumulation buffers)
            self._measure_peak()
        if last:
            self._backwards = 0
        self._pending = True

    def _watch_gradient_peak(self) -> None:
        """Measure gradient bytes at the end of each backward, before DeepSpeed's reduction frees
        them (ZeRO 0/1 hold every full gradient exactly then), until the first update."""
        reduce = self.ds.allreduce_gradients  # the engine calls it once, at the end of each backward

        def measured_reduce(*args: Any, **kwargs: Any) -> None:
            self._measure_peak()
            reduce(*args, **kwargs)

        self.ds.allreduce_gradients = measured_reduce  # instance attribute: removed after the first update
        self._watching = True

    def _measure_peak(self) -> None:
        now = model_state_bytes(self)
        for key in self._peak:
            self._peak[key] = max(self._peak[key], now[key])

    # ---- optimizer --------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """DeepSpeed clears gradients in its step; gradients of a skipped step are discarded here."""
        if self._pending:  # the loop skipped step() after a non-finite loss: the gradients are poisoned
            applied, norm = self.step()
            assert not applied, f"a step with a non-finite loss was applied (grad norm {norm})"

    def set_lr(self, multiplier: float) -> float:
        groups = self.ds.optimizer.param_groups
        for group, base in zip(groups, self.base_lrs, strict=True):
            group["lr"] = base * multiplier
        return groups[0]["lr"]

    def step(self) -> tuple[bool, float]:
        """Apply the update unless the global gradient norm is not finite; returns (applied, norm)."""
        self._pending = False
        if self._engine_clips:
            applied, norm = self._clipped_step()
        else:
            self.ds.step()
            value = self.ds.get_global_grad_norm()
            norm = float(value) if value is not None else math.nan
            applied = bool(self.ds.was_step_applied()) and math.isfinite(norm)
        self._updated |= applied
        if self._updated and self._watching:  # the gradient peak of the first update is known
            del self.ds.allreduce_gradients
            self._watching = False
        return applied, norm

    def _clipped_step(self) -> tuple[bool, float]:
        """ZeRO-0 fp32: DeepSpeed has no overflow check there, so clip and check the norm here."""
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.clip_grad or math.inf
        norm = float(clip_grad_norm_(params, max_norm=max_norm, mpu=self._mpu))
        if not math.isfinite(norm):
            self.ds.zero_grad()
            return False, norm
        self.ds.step()
        return True, norm

    def state_bytes(self) -> dict[str, int]:
        """This rank's model-state bytes (`model_state_bytes`), gradients and buckets at their peak.

        DeepSpeed frees gradients and buckets in its reduction and step, so until the first update
        the engine measures them at the end of every backward (before and after the reduction) and
        reports the largest figures.
        """
        now = model_state_bytes(self)
        for key, peak in self._peak.items():
            now[key] = max(now[key], peak)
        return now

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_sharded(self, folder: Path, extra: dict[str, Any]) -> None:
        """The model and the caller's `extra` entries (the EMA) via dist_checkpointing into `folder`
        (the one format every reader uses: resume, evaluation, HF export), and DeepSpeed's own
        checkpoint of its ZeRO partitions and optimizer state next to it (`../deepspeed/`; with
        NVMe offload the engine's own copy of the swapped state, see the module docstring)."""
        from megatron_lomdm.distributed.megatron_engine import write_dist_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        model = self.module.module.model
        if self.stage == 3:
            self._save_zero3_model(model, extra, folder)
        else:
            write_dist_checkpoint({"model": model.sharded_state_dict(metadata=SHARDING), **extra}, folder)
        if self.nvme is not None:
            self._save_nvme_state(folder.parent / "deepspeed" / NVME_STATE_DIR)
        else:
            self.ds.save_checkpoint(str(folder.parent / "deepspeed"), tag=CHECKPOINT_TAG, save_latest=False)

    def load_sharded(self, folder: Path, extra: dict[str, Any] | None) -> dict[str, Any]:
        """Model, ZeRO partitions and optimizer from DeepSpeed's checkpoint; returns the loaded `extra`
        entries from `folder`. `extra=None`: a format-1 checkpoint (DeepSpeed's files in `folder/ds`)."""
        from megatron.core import dist_checkpointing

        ds_dir = folder if extra is None else folder.parent / "deepspeed"
        if self.nvme is not None:
            self._load_nvme_state(ds_dir / NVME_STATE_DIR)
        else:
            path, _ = self.ds.load_checkpoint(str(ds_dir), tag=CHECKPOINT_TAG)
            if path is None:
                raise ValueError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {ds_dir}")
        if not extra:
            return {}
        state = dist_checkpointing.load(dict(extra), str(folder))
        return {key: state[key] for key in extra}

    def _save_zero3_model(self, model: nn.Module, extra: dict[str, Any], folder: Path) -> None:
        """ZeRO-3: the dist checkpoint with one full copy of the model, on the first DP rank only.

        Each parameter is gathered alone; the first DP rank keeps a copy, the others a zero-stride
        placeholder of the right shape (they only hold non-main replicas, which dist_checkpointing
        never writes; checked). The partitioned tensors are put back afterwards.
        """
        import deepspeed
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

        from megatron_lomdm.distributed.megatron_engine import write_dist_checkpoint

        writer = parallel_state.get_data_parallel_rank() == 0
        partitioned: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for p in model.parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.clone() if writer else torch.zeros((), dtype=p.dtype).expand(p.data.shape)
                partitioned.append((p, p.data))
                p.data = full
            sharded = model.sharded_state_dict(metadata=SHARDING)
            if not writer:
                for key, item in _sharded_items(sharded):
                    if isinstance(item, ShardedTensor) and is_main_replica(item.replica_id):
                        raise RuntimeError(f"ZeRO-3 save: {key} is a main replica on DP rank "
                                           f"{parallel_state.get_data_parallel_rank()}, which holds no copy of it")
            write_dist_checkpoint({"model": sharded, **extra}, folder)
        finally:
            for p, data in partitioned:
                p.data = data

    def _optimizer_swapper(self) -> Any:
        opt = self.ds.optimizer
        swapper = getattr(opt, "optimizer_swapper", None)
        if swapper is None:
            raise RuntimeError("parallel.nvme_offload_dir is set but DeepSpeed's ZeRO-3 optimizer has no swapper")
        return swapper

    def _swap_files(self) -> list[Path]:
        """This rank's swapped optimizer tensors (fp32 master, m, v per sub-group), not the gradients."""
        folder = Path(self._optimizer_swapper().swap_folder)
        return sorted(f for f in folder.glob("*.tensor.swp") if "_gradient_" not in f.name)

    def _small_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state that is not in swap files, per sub-group: step counts and group
        settings, and whole (fp32 master + Adam tensors) for the sub-groups DeepSpeed keeps in
        memory because they are below the swapper's minimum I/O size."""
        opt = self.ds.optimizer
        inner = opt.optimizer
        state = {}
        for i, p in enumerate(opt.fp32_partitioned_groups_flat):
            swapped = opt._swappable_optimizer_subgroup(i)
            entry = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inner.state.get(p, {}).items()
                     if not (swapped and isinstance(v, torch.Tensor) and v.dim() > 0)}
            if not swapped:
                entry["__master__"] = p.detach().clone()
            state[i] = entry
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        return {"state": state, "param_groups": groups, "global_steps": self.ds.global_steps,
                "global_samples": self.ds.global_samples, "skipped_steps": self.ds.skipped_steps}

    def _save_nvme_state(self, root: Path) -> None:
        """Byte copies of this rank's swap files and its small optimizer state under `root/rank<r>`."""
        rank_dir = root / f"rank{torch.distributed.get_rank()}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        files = self._swap_files()
        for f in files:
            shutil.copyfile(f, rank_dir / f.name)
        torch.save(self._small_optimizer_state(), rank_dir / "state.pt")
        (rank_dir / "files.json").write_text(json.dumps({"dp": self.dp, "files": [f.name for f in files]}))

    def _load_nvme_state(self, root: Path) -> None:
        """Put this rank's saved swap files back, restore the small state, refresh the bf16 partitions.

        Raises:
            ValueError: when the checkpoint has no NVMe state for this rank or was written by another
                layout (its DP size or its set of swap files differ).
        """
        rank_dir = root / f"rank{torch.distributed.get_rank()}"
        if not (rank_dir / "files.json").is_file():
            raise ValueError(f"no NVMe optimizer state for this rank under {rank_dir} (was the checkpoint written "
                             "with parallel.nvme_offload_dir and the same number of ranks?)")
        saved = json.loads((rank_dir / "files.json").read_text())
        saved_files = saved["files"]
        # a fresh engine has swapped its masters (`<sub-group id>.tensor.swp`) but no Adam state yet
        masters = sorted(name for name in saved_files if "-" not in name)
        current = [f.name for f in self._swap_files() if "-" not in f.name]
        if saved["dp"] != self.dp or masters != current:
            raise ValueError(f"the NVMe optimizer state in {rank_dir} was written with DP={saved['dp']} and "
                             f"{len(masters)} swapped sub-groups; this run has DP={self.dp} and {len(current)}: "
                             "resume with the same layout")
        folder = Path(self._optimizer_swapper().swap_folder)
        for name in saved_files:
            shutil.copyfile(rank_dir / name, folder / name)
        small = torch.load(rank_dir / "state.pt", weights_only=False)
        opt = self.ds.optimizer
        for group, values in zip(opt.optimizer.param_groups, small["param_groups"], strict=True):
            group.update(values)
        self.ds.global_steps = small["global_steps"]
        self.ds.global_samples = small["global_samples"]
        self.ds.skipped_steps = small["skipped_steps"]
        for i, p in enumerate(opt.fp32_partitioned_groups_flat):  # then bf16 partitions <- restored masters
            entry = dict(small["state"][i])
            master = entry.pop("__master__", None)
            state = opt.optimizer.state.setdefault(p, {})
            if master is None:  # swapped: the files hold master, m and v
                state.update(entry)
                # A fresh engine creates the Adam tensors at its first step; the swapper reads the saved
                # ones into tensors it finds in the state (file `<key>-<sub-group id>.tensor.swp`).
                for key in _swapped_state_keys(saved_files, p.ds_id):
                    state[key] = torch.zeros(opt.fp16_partitioned_groups_flat_numel[i], dtype=p.dtype)
                opt._optimizer_states_and_gradient_swap_in(i)
                opt._reassign_or_swap_out_partitioned_parameters(i)
                opt._release_swap_buffers(i)
                continue
            with torch.no_grad():
                p.copy_(master)
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                        state[key].copy_(value)
                    else:
                        state[key] = value
            opt._reassign_or_swap_out_partitioned_parameters(i)


def _swapped_state_keys(files: list[str], sub_group_id: str) -> list[str]:
    """The optimizer-state keys (`exp_avg`, ...) of a sub-group's swap files `<key>-<id>.tensor.swp`."""
    suffix = f"-{sub_group_id}.tensor.swp"
    return sorted(name[: -len(suffix)] for name in files if name.endswith(suffix))


def _sharded_items(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, leaf) of a nested sharded state dict."""
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _sharded_items(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _sharded_items(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)]
