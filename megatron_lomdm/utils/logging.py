"""Rank-aware logging: rank 0 speaks by default, every rank can be enabled with LOMDM_LOG_ALL_RANKS=1."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    """The global rank from the launcher's environment (torchrun or Slurm), 0 when alone."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _RankFilter(logging.Filter):
    """Tags each record with the rank and keeps it on rank 0 (or every rank, or an error). Both are read
    per record: a process forked before its launcher sets RANK (torch's elastic launcher with
    start_method="fork") has set up its logger already."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank = _rank()
        return rank == 0 or record.levelno >= logging.ERROR or os.environ.get("LOMDM_LOG_ALL_RANKS") == "1"


def setup_logging(level: int | str | None = None) -> None:
    """Configure the package logger once: one stream handler on stderr with the rank in each line.

    Args:
        level: a logging level; defaults to env LOMDM_LOG_LEVEL or INFO.
    """
    global _CONFIGURED
    if _CONFIGURED:
        return
    level = level or os.environ.get("LOMDM_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("megatron_lomdm")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """A logger under the package namespace; errors are shown on every rank, the rest on rank 0."""
    setup_logging()
    if not name.startswith("megatron_lomdm"):
        name = f"megatron_lomdm.{name}"
    return logging.getLogger(name)
