"""Config loading: dataclass defaults < YAML (with `defaults:` inheritance) < CLI dotlist.

Keys are strict: an unknown key is an error naming its full dotted path and the closest valid
key. Values are type-checked against the schema (an int where a float is expected is accepted);
NaN and infinity are rejected everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from megatron_lomdm.config.schema import Config

_MAX_DEFAULTS_DEPTH = 16


def merge_dicts(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins, nested mappings are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_with_defaults(path: str | Path, _depth: int = 0) -> dict:
    """Read a YAML config, first merging the files its `defaults:` list names (relative to it).

    Entries are merged in order, then the file's own keys on top. `.yaml` may be omitted.
    """
    path = Path(path)
    if _depth > _MAX_DEFAULTS_DEPTH:
        raise ValueError(f"{path}: `defaults:` nesting deeper than {_MAX_DEFAULTS_DEPTH} (a cycle?)")
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    with path.open() as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("defaults", []) or []
    if not isinstance(parents, list):
        raise ValueError(f"{path}: `defaults:` must be a list of file names")
    merged: dict = {}
    for entry in parents:
        parent = path.parent / (entry if str(entry).endswith(".yaml") else f"{entry}.yaml")
        merged = merge_dicts(merged, read_yaml_with_defaults(parent, _depth + 1))
    return merge_dicts(merged, raw)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and minimally coerce) a value against a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arm)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"config: {key}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config: {key}: expected a list, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # `1e-3` in a YAML file is a string under YAML 1.1
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ValueError(f"config: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_finite(key: str, value: Any) -> None:
    """Reject NaN and +-inf anywhere in a value (inside lists and mappings too), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config: {key}: must be a finite number, got {value}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(f"{key}.{name}", item)


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, strictly."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"config: unknown key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config: {dotted}: expected a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
            _check_finite(dotted, kwargs[key])
    return cls(**kwargs)


def _scalar(raw: str) -> Any:
    """A YAML scalar, except that `1e-3` is a float (YAML 1.1 would read it as a string)."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_dotlist(overrides: list[str]) -> dict:
    """`["train.steps=100", "model.dropout=0.1"]` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"config override {item!r} has an empty key part")
        value = _scalar(raw)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Strictly build a Config from a nested dict (missing keys take their defaults)."""
    return _build(Config, data, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a config: schema defaults < YAML file (+ its `defaults:`) < dotted CLI overrides."""
    data = read_yaml_with_defaults(path) if path is not None else {}
    data = merge_dicts(data, parse_dotlist(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of a Config (for YAML, MLflow params, fingerprints)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text, sections in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of `cfg` with fields replaced, e.g. `replace(cfg, model={"vocab_size": 512})`, re-validated."""
    data = config_to_dict(cfg)
    return config_from_dict(merge_dicts(data, sections))
