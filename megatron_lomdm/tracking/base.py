"""Tracking behind a tiny interface: rank 0 logs, every other rank holds a NullTracker.

`MetricsFile` (metrics.jsonl in the run directory) is always written by rank 0 and is the record
of truth; an external tracker (MLflow) is best effort on top of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None: ...
    def close(self) -> None: ...


class NullTracker:
    """Accepts everything, does nothing (non-zero ranks, tracking disabled)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsFile:
    """Appends one JSON object per logged step to `metrics.jsonl`, flushed line by line.

    On resume, lines for steps at or after the resumed step are dropped first, so the file
    holds each step exactly once after a crash-and-rerun.
    """

    def __init__(self, path: str | Path, *, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate_from(resume_step)
        self._f = self.path.open("a")

    def _truncate_from(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill mid-write
            if record.get("step", 0) < step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, sort_keys=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
