"""How the loop's flat metric keys appear on the MLflow dashboard: one table, one router.

MLflow's run page groups charts by the prefix before ``/``, so each key the loop logs gets a
section: ``train/`` (the loss terms, lr, grad norm), ``order/`` (is the learned order learning?),
``valid/``, ``perf/`` and ``data/``. ``metrics.jsonl`` keeps the flat names; only the MLflow
tracker renames. Keys whose value rarely moves (counters, token counts, MFU on CPU, the order
statistics of a family without a learned order) are sent only when they change, so the page is
never a wall of flat-zero charts. The README's "MLflow dashboard" table mirrors ``METRICS``
(tests/unit/test_tracking_dashboard.py checks that it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Send(Enum):
    """When the router passes a key's value on to MLflow."""

    ALWAYS = "always"
    """every logged step"""
    ON_CHANGE = "on change"
    """when it differs from the last value sent (the first value only when non-zero)"""
    NEVER = "never (metrics.jsonl only)"
    """metrics.jsonl only (a duplicate of another key)"""


@dataclass(frozen=True)
class Entry:
    """One row of the table: the MLflow name of a flat key and when it is sent."""

    name: str
    send: Send = Send.ALWAYS


A, C = Send.ALWAYS, Send.ON_CHANGE
METRICS: dict[str, Entry] = {
    # training step (metrics.jsonl kind "train")
    "loss": Entry("train/loss"),
    "nelbo": Entry("train/nelbo"),
    "main": Entry("train/main"),
    "velocity": Entry("train/velocity", C),
    "rloo": Entry("train/rloo", C),
    "surrogate": Entry("train/surrogate", Send.NEVER),  # the value of `loss`
    "lr": Entry("train/lr"),
    "grad_norm": Entry("train/grad_norm"),
    "exponent_mean": Entry("order/exponent_mean", C),
    "exponent_std": Entry("order/exponent_std", C),
    "velocity_confidence_corr": Entry("order/velocity_confidence_corr", C),
    "order_grad_snr": Entry("order/grad_snr", C),
    "tokens_per_s": Entry("perf/tokens_per_s"),
    "step_time_s": Entry("perf/step_time_s"),
    "mfu": Entry("perf/mfu", C),
    "memory_gb": Entry("perf/memory_gb"),
    "num_tokens": Entry("perf/num_tokens", C),
    "skipped_steps": Entry("perf/skipped_steps", C),
    # evaluation (kind "valid"; the loop hands them to the tracker as valid/<key>)
    "valid/nelbo": Entry("valid/nelbo"),
    "valid/ppl": Entry("valid/ppl"),
    "valid/main": Entry("valid/main"),
    "valid/velocity": Entry("valid/velocity", C),
    "valid/num_tokens": Entry("valid/num_tokens", C),
}
"""Flat key (as the tracker receives it) -> MLflow name and rule. Keys not listed: ``data/...``
(loader counters, blend shares) keep their name and are sent on change; any other key with a
``/`` keeps its name and is always sent; a new flat key goes to ``train/`` (add it here)."""


def entry(key: str) -> Entry:
    """The table's row for `key`, or the default rule for a key the table does not list."""
    if key in METRICS:
        return METRICS[key]
    if key.startswith("data/"):
        return Entry(key, C)
    return Entry(key if "/" in key else f"train/{key}")


def mlflow_name(key: str) -> str:
    """The MLflow metric name of a flat key, e.g. ``exponent_std`` -> ``order/exponent_std``."""
    return entry(key).name


class DashboardRouter:
    """Renames a record's keys for MLflow and drops the values its rule says not to send.

    It remembers the last value sent per ON_CHANGE key (starting from 0.0), so it must see every
    record of the run in order, as the tracker does.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def route(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics to send for one logged step, under their MLflow names."""
        out: dict[str, float] = {}
        for key, value in metrics.items():
            row = entry(key)
            if row.send is Send.NEVER:
                continue
            if row.send is Send.ON_CHANGE:
                if value == self._last.get(row.name, 0.0):
                    continue
                self._last[row.name] = value
            out[row.name] = value
        return out


def _jsonl_key(key: str) -> str:
    """How `metrics.jsonl` writes a tracker key: ``valid/nelbo`` is ``nelbo`` on a ``kind: valid`` line."""
    kind, _, name = key.rpartition("/")
    return f"`{name}` (kind `{kind}`)" if kind == "valid" else f"`{key}`"


def markdown_table() -> str:
    """The README's table: `metrics.jsonl` key, MLflow name, when it is sent."""
    rows = ["| `metrics.jsonl` key | MLflow name | sent |", "|---|---|---|"]
    rows += [f"| {_jsonl_key(key)} | {'—' if e.send is Send.NEVER else f'`{e.name}`'} | {e.send.value} |"
             for key, e in METRICS.items()]
    rows.append("| `data/...` (loader counters, blend shares) | the same | on change |")
    return "\n".join(rows)
