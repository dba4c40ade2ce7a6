"""The CPU development backend: shims that let megatron-core 0.16.1 run without a GPU.

megatron-core assumes CUDA in a few places on the dense-GPT path (stack.md §3.3). On a machine
with no GPU — CI, laptops, the `make demo` run — `training.build` installs these shims once per
process, after the model-parallel groups exist and before megatron's RNG tracker is seeded. They
are never installed when CUDA is available, so GPU runs take megatron's real CUDA paths.

Shims:
    1. ``rng``: a CPU RNG-states tracker in place of megatron's CUDA one, plus CPU versions of
       ``_get/_set_cuda_rng_state`` (DotProductAttention always forks the tracker; activation
       recompute saves and restores its state).
    2. ``current_device``: ``torch.cuda.current_device()`` returns the CPU device (RoPE frequencies,
       the global memory buffer, DDP/p2p buffers).
    3. ``cuda_to_cpu``: a TorchFunctionMode that rewrites ``device="cuda..."``, ``.cuda()`` and
       ``.to("cuda")`` to the CPU (the forward/backward schedules, clip_grads, the optimizers), and
       a no-op ``torch.cuda.synchronize``.
    4. ``fake_cuda_types``: in the same mode, ``t.type()`` reports ``torch.cuda.*Tensor`` names for
       CPU tensors and ``t.type("torch.cuda.X")`` means ``t.type("torch.X")`` (distributed
       optimizer, megatron's grad clipping).

    5. ``skip_deepspeed_shm_comm`` (DeepSpeed backend): DeepSpeed's comm layer JIT-compiles its
       shared-memory all-reduce op (``deepspeed_shm_comm``, ~25 s on 2 cores, per machine) when it
       starts on a CPU. Only DeepSpeed-inference's ``inference_all_reduce`` calls it; training's
       collectives go through torch.distributed (gloo), so the op is declared unavailable and
       DeepSpeed falls back to torch.distributed, as it does where the op cannot build.

Which features need which shims (megatron-core 0.16.1):
    * GPTModel forward/backward, TP, torch optimizer: 1 + 2.
    * forward/backward schedules (even PP=1), mcore DDP, ChainedOptimizer: 1 + 2 + 3 (+ 4).
    * DistributedOptimizer, dist-checkpointing: 1 + 2 + 3 + 4.

Sequence parallelism needs no further shim: megatron's sequence-parallel linears and mappings call
``all_gather_into_tensor`` and ``reduce_scatter_tensor``, which gloo implements in torch 2.13 (the
TP2 + SP parity test runs on it as is).

``install_cpu_shims`` returns a handle whose ``uninstall()`` restores everything, so an in-process
test can leave the interpreter as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker API over torch's CPU generator state."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            previous = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(previous)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outside = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outside)

    return CpuRNGStatesTracker


_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Shims 3 and 4: CUDA device requests become CPU ones; optionally fake CUDA type names."""

    def __init__(self, fake_cuda_types: bool) -> None:
        super().__init__()
        self.fake_cuda_types = fake_cuda_types

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if self.fake_cuda_types and func is torch.Tensor.type:
            requested = args[1] if len(args) > 1 else kwargs.pop("dtype", None)
            if requested is None:
                name = func(args[0])
                return _TYPE_NAMES.get(name, name) if args[0].device.type == "cpu" else name
            if isinstance(requested, str):
                requested = requested.replace("torch.cuda.", "torch.")
            return func(args[0], requested, **kwargs)
        return func(*args, **kwargs)


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_deepspeed_shm_comm() -> None:
    """Shim 5: DeepSpeed's comm backend, created by ``deepspeed.initialize``, skips building its
    shared-memory all-reduce op (training does not use it; see the module docstring)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


@dataclass
class CpuShims:
    """What ``install_cpu_shims`` changed, so that ``uninstall`` can put it back."""

    installed: list[str] = field(default_factory=list)
    _saved: dict[str, Any] = field(default_factory=dict)
    _mode: _CudaToCpuMode | None = None

    def uninstall(self) -> None:
        """Restore megatron's tracker and torch.cuda's functions; leave the mode stack."""
        from megatron.core.tensor_parallel import random as mrandom

        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for key, value in self._saved.items():
            owner, attr = key.split(":")
            setattr(mrandom if owner == "random" else torch.cuda, attr, value)
        self._saved.clear()
        self.installed.clear()
        global _ACTIVE
        _ACTIVE = None


_ACTIVE: CpuShims | None = None


def install_cpu_shims(
    *,
    rng: bool = True,
    current_device: bool = True,
    cuda_to_cpu: bool = True,
    fake_cuda_types: bool = True,
) -> CpuShims:
    """Install the chosen shims once per process (a second call returns the first handle).

    Args:
        rng: shim 1, the CPU RNG tracker.
        current_device: shim 2, ``torch.cuda.current_device()`` -> CPU.
        cuda_to_cpu: shim 3, the CUDA->CPU TorchFunctionMode and a no-op synchronize.
        fake_cuda_types: shim 4, CUDA type names (implies ``cuda_to_cpu``'s mode).

    Returns:
        A handle with ``installed`` (the shim names) and ``uninstall()``.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    from megatron.core.tensor_parallel import random as mrandom

    shims = CpuShims()
    if rng:
        for attr in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                     "_get_cuda_rng_state", "_set_cuda_rng_state"):
            shims._saved[f"random:{attr}"] = getattr(mrandom, attr)
        mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_class()()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        shims.installed.append("rng")
    if current_device:
        shims._saved["cuda:current_device"] = torch.cuda.current_device
        torch.cuda.current_device = lambda: _CPU
        shims.installed.append("current_device")
    if cuda_to_cpu or fake_cuda_types:
        shims._saved["cuda:synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: None
        shims._mode = _CudaToCpuMode(fake_cuda_types=fake_cuda_types)
        shims._mode.__enter__()
        shims.installed.append("cuda_to_cpu")
        if fake_cuda_types:
            shims.installed.append("fake_cuda_types")
    _ACTIVE = shims
    return shims
