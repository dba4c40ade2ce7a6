"""The package logger reads the rank when a record is emitted, not when the logger was set up: a
process forked before its launcher sets RANK (torch's elastic launcher with start_method="fork")
must log under its own rank, and only rank 0 speaks below ERROR."""

from __future__ import annotations

import logging

import pytest

from megatron_lomdm.utils.logging import get_logger


def _emitted(monkeypatch: pytest.MonkeyPatch, rank: str | None,
             all_ranks: bool = False) -> list[logging.LogRecord]:
    log = get_logger("tests.rank")  # set up now, before the rank is known
    handler = logging.getLogger("megatron_lomdm").handlers[0]
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOMDM_LOG_ALL_RANKS", "1" if all_ranks else "0")
    kept = []
    for level in (logging.INFO, logging.ERROR):
        record = log.makeRecord(log.name, level, __file__, 1, "message", (), None)
        if all(f.filter(record) for f in handler.filters):
            kept.append(record)
    return kept


def test_rank_is_read_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [(r.rank, r.levelno) for r in _emitted(monkeypatch, None)] == [(0, logging.INFO), (0, logging.ERROR)]
    assert [(r.rank, r.levelno) for r in _emitted(monkeypatch, "1")] == [(1, logging.ERROR)]
    assert [(r.rank, r.levelno) for r in _emitted(monkeypatch, "3", all_ranks=True)] == [
        (3, logging.INFO), (3, logging.ERROR)]
