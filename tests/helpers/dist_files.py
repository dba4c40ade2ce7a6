"""Edit one tensor of a `dist/` checkpoint folder in place, as damage or a crafted file would.

torch's distributed checkpoint stores each tensor chunk as a `torch.save` record at a known offset
of a `.distcp` file (its `.metadata` says where); the tensor's raw bytes sit uncompressed inside
that record, so they can be overwritten without changing any file's size.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader


def fill_dist_tensor(dist_dir: Path, key: str, value: float = math.nan) -> int:
    """Overwrite every chunk of tensor `key` with `value`; returns the number of elements changed."""
    metadata = FileSystemReader(str(dist_dir)).read_metadata()
    changed = 0
    for index, info in metadata.storage_data.items():
        if index.fqn != key:
            continue
        path = dist_dir / info.relative_path
        blob = bytearray(path.read_bytes())
        record = bytes(blob[info.offset: info.offset + info.length])
        chunk = torch.load(io.BytesIO(record), weights_only=True)
        raw = chunk.contiguous().numpy().tobytes()
        at = record.find(raw)
        assert at >= 0 and record.find(raw, at + 1) < 0, f"{key}: its bytes are not found once in {path}"
        start = info.offset + at
        blob[start: start + len(raw)] = torch.full_like(chunk, value).numpy().tobytes()
        size = path.stat().st_size
        path.write_bytes(bytes(blob))
        assert path.stat().st_size == size  # edited in place: every file keeps the size meta.pt recorded
        changed += chunk.numel()
    assert changed, f"no tensor {key!r} in {dist_dir}"
    return changed
