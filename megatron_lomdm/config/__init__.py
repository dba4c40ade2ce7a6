"""Typed config: schema (dataclasses) and loading (YAML + defaults + CLI dotlist)."""

from megatron_lomdm.config.load import dump_config, load_config, save_config
from megatron_lomdm.config.schema import Config, validate_for_world

__all__ = ["Config", "dump_config", "load_config", "save_config", "validate_for_world"]
