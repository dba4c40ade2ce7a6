"""Progress bars for long work (evaluation, sampling): tqdm on global rank 0, on a terminal only.

`tqdm(disable=None)` turns itself off when stderr is not a TTY, so logs of batch jobs and tests
stay free of bar redraws; other ranks never draw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on rank 0 when stderr is a terminal."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
