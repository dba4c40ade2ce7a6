"""Shard datasets, the public face: read a manifest (any source), check it against a model, read
rows, write a folder. Each name lives in its home (see ``format``'s docstring for the layout of
the package); this module only gathers them, and nothing in ``data/`` imports it.

=================================  ===========================================================
name                               home
=================================  ===========================================================
``Manifest``, ``LAYOUTS``...       ``format``: names, the manifest and its validation
``ShardFile``, ``ShardDataError``  ``reader``: random access to one local shard, checked
``verify_shard_file``
``read_manifest``, ``read_split``  ``sources``: specs and manifest resolution (local, remote,
``check_tokenizer_compat``         blend)
``write_shards``, ``ShardJob``     ``preprocess``: text -> a shard folder, in stages
=================================  ===========================================================
"""

from __future__ import annotations

from megatron_lomdm.data.format import LAYOUTS, MANIFEST_NAME, Manifest, storage_dtype
from megatron_lomdm.data.preprocess import ShardJob, write_shards
from megatron_lomdm.data.reader import ShardDataError, ShardFile, verify_shard_file
from megatron_lomdm.data.sources import check_tokenizer_compat, read_manifest, read_split

__all__ = [
    "LAYOUTS",
    "MANIFEST_NAME",
    "Manifest",
    "ShardDataError",
    "ShardFile",
    "ShardJob",
    "check_tokenizer_compat",
    "read_manifest",
    "read_split",
    "storage_dtype",
    "verify_shard_file",
    "write_shards",
]
