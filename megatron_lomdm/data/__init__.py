"""Data: tokenization, WebDataset shards with a manifest, and the layout-independent loader.

The modules and their order: ``format``'s docstring.

Names are re-exported lazily so that ``import megatron_lomdm.data.tokenize`` (preprocessing
workers) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendLoader": "loader",
    "ShardLoader": "loader",
    "Manifest": "format",
    "ShardFile": "reader",
    "check_tokenizer_compat": "sources",
    "read_manifest": "sources",
    "read_split": "sources",
    "storage_dtype": "format",
    "write_shards": "preprocess",
    "TokenizerInfo": "tokenize",
    "load_tokenizer": "tokenize",
    "train_bpe_tokenizer": "tokenize",
    "write_demo_corpus": "demo_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
