"""Refuse checkpoint files that would run code when unpickled.

Three readers below us unpickle without restriction: torch's distributed-checkpoint reader
(`pickle.load` of `dist/.metadata`, and `torch.load(weights_only=False)` of the byte items inside
`*.distcp`, e.g. Transformer-Engine `_extra_state`), megatron's `common.pt` (`torch.load`, whose
`weights_only` default an environment variable can turn off) and DeepSpeed
(`torch.load(weights_only=False)` of `*_model_states.pt` and the ZeRO `*_optim_states.pt`). None
of them can be told to load safely, so every pickle such a load would read is scanned first: the
scan walks the pickle's opcodes without executing any and checks each global it references (the
only way a pickle reaches a callable) against the allowlist of what these files legitimately hold.
A forbidden or unresolvable global raises `UnsafeCheckpointError` naming the file and the global.

The trust model: a checkpoint is data. Tensors, numbers, strings, containers and the metadata
records of torch DCP and DeepSpeed load; nothing else does. Our own files (`meta.pt`, `rank_*.pt`)
go through `load_torch_file`: the scan, then `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import io
import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# The globals a checkpoint legitimately references: found by scanning real checkpoints of both
# backends (megatron fp32/bf16; DeepSpeed ZeRO 0-3, bf16, CPU offload), plus the few that torch's own
# `weights_only` unpickler also allows for plain containers and tensor subclasses.
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("_codecs", "encode"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # DCP's StorageMeta.checkpoint_id
    ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.serialization", "_get_layout"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
})
# Modules whose dataclasses and enums are plain records (checkpoint metadata), allowed by kind.
_RECORD_MODULES: frozenset[str] = frozenset({
    "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem", "deepspeed.runtime.zero.config",
    "deepspeed.utils.tensor_fragment",
})
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NEUTRAL_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file references code that loading it would run."""


def _attribute(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def is_allowed(module: str, name: str) -> bool:
    """Whether a checkpoint may reference the global `module.name`."""
    if (module, name) in _ALLOWED:
        return True
    if module == "torch":  # dtypes (torch.float32) and typed storages (torch.FloatStorage)
        obj = _attribute(module, name)
        return isinstance(obj, torch.dtype) or (isinstance(obj, type) and issubclass(obj, torch.storage.TypedStorage))
    if module in _RECORD_MODULES:
        obj = _attribute(module, name)
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    return False


def _refusal(path: Path | str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to load {path}: it references {what}, which a checkpoint never needs")


def pickle_globals(data: bytes) -> Iterator[tuple[str, str] | None]:
    """The globals one pickle references, in order; None for one whose name is not a literal.

    Walks the opcodes only (nothing is constructed). `STACK_GLOBAL` takes its module and name from
    the two values pushed before it; `pickle` always pushes them as strings (possibly memoized).
    """
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # the recent stack pushes; None = not a string
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield module, attr
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            ok = len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str)
            yield (pushed[-2], pushed[-1]) if ok else None
            pushed.append(None)
        elif name.startswith("EXT"):
            yield None  # the copyreg extension registry: never written by torch.save or pickle.dump
        elif name in _STRING_OPS:
            pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name not in _NEUTRAL_OPS:
            pushed.append(None)
        del pushed[:-2]


def check_pickle(data: bytes, path: Path | str) -> None:
    """Raise `UnsafeCheckpointError` unless every global of the pickle `data` is allowed."""
    try:
        for ref in pickle_globals(data):
            if ref is None:
                raise _refusal(path, "a global through a computed name")
            if not is_allowed(*ref):
                raise _refusal(path, f"{ref[0]}.{ref[1]}")
    except UnsafeCheckpointError:
        raise
    except (ValueError, pickle.UnpicklingError) as err:  # pickletools' complaints about bad bytes
        raise UnsafeCheckpointError(f"refusing to load {path}: it is not a valid pickle ({err})") from err


def _check_torch_archive(source: Path | io.BytesIO, path: Path | str) -> None:
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as err:
        raise UnsafeCheckpointError(f"refusing to load {path}: it is not a torch.save file in zip format, "
                                    "which every checkpoint writer here produces") from err
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
        if not pickles:
            raise UnsafeCheckpointError(f"refusing to load {path}: a torch.save file without data.pkl")
        for member in pickles:
            check_pickle(archive.read(member), f"{path} ({member})")


def check_torch_file(path: Path) -> None:
    """Scan the pickles of a `torch.save` file (zip format) without reading its tensor data."""
    _check_torch_archive(path, path)


class _RestrictedUnpickler(pickle.Unpickler):
    """A second line behind the scan: `find_class` refuses what `is_allowed` refuses."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if not is_allowed(module, name):
            raise _refusal(self.path, f"{module}.{name}")
        return super().find_class(module, name)


def load_dcp_metadata(path: Path) -> Any:
    """A torch distributed-checkpoint `.metadata`: scanned, then unpickled under the allowlist."""
    data = path.read_bytes()
    check_pickle(data, path)
    return _RestrictedUnpickler(data, path).load()


def _check_dcp_byte_items(meta_path: Path) -> None:
    """The byte items `.metadata` points into the `*.distcp` files (DCP loads them with
    `weights_only=False`; its tensors are read with `weights_only=True`)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = load_dcp_metadata(meta_path)
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_keys:
            continue
        file = meta_path.parent / info.relative_path
        with file.open("rb") as f:
            f.seek(info.offset)
            item = f.read(info.length)
        _check_torch_archive(io.BytesIO(item), f"{file} (item {index.fqn})")


def check_checkpoint_folder(folder: Path) -> None:
    """Scan every pickle a load of this checkpoint folder (a `step_*` or its `dist/`) would read.

    Megatron's `dist/`: `.metadata`, the byte items of the `*.distcp` files, `common.pt` and any
    sharded-object `*.pt`. DeepSpeed's `dist/ds/`: the model-state and ZeRO optimizer `*.pt`
    files. Ours: `meta.pt` and the rank files. A large checkpoint costs little: only pickles are
    read, never the tensor data.

    Raises:
        UnsafeCheckpointError: a file references a global outside the allowlist, or is not a
            pickle / torch.save file at all.
    """
    for meta_path in sorted(folder.rglob(".metadata")):
        _check_dcp_byte_items(meta_path)
    for path in sorted(folder.rglob("*.pt")):
        check_torch_file(path)


def load_torch_file(path: Path, map_location: str = "cpu") -> Any:
    """`torch.load(weights_only=True)` of one of our own files, scanned first for a clear refusal."""
    check_torch_file(path)
    return torch.load(path, map_location=map_location, weights_only=True)
