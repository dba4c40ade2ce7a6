"""MLflow on rank 0. Never stops training: the first failure is logged once, then it goes quiet.

The MLflow run id is kept in `run.dir/mlflow_run_id`, so a requeued or resumed job keeps logging
into the same MLflow run. Default URI: a sqlite database inside the run directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_lomdm.tracking.base import NullTracker, Tracker, flatten
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
_MAX_PARAM_LEN = 500


def default_uri(run_dir: str | Path) -> str:
    """sqlite:///<absolute run dir>/mlflow.db."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MLflowTracker:
    """Logs params, metrics and artifacts to one MLflow run; degrades to a no-op on errors."""

    def __init__(self, *, uri: str, experiment: str, run_dir: str | Path, run_name: str,
                 tags: dict[str, str], system_metrics: bool = False) -> None:
        # A dead server must cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        import mlflow  # only rank 0 with tracking enabled pays this import

        self._mlflow = mlflow
        self._broken = False
        self.uri = uri
        id_file = Path(run_dir) / "mlflow_run_id"
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
            # a local store keeps its artifacts next to it, not in the current directory
            mlflow.create_experiment(experiment, artifact_location=(Path(run_dir).resolve() / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                                    log_system_metrics=system_metrics)
        id_file.write_text(self.run.info.run_id)
        self.run_id = self.run.info.run_id
        log.info("MLflow run %s at %s", self.run_id, uri)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._broken = True
            log.warning("MLflow %s failed (%s: %s); metrics.jsonl keeps everything, MLflow logging stops",
                        what, type(err).__name__, err)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(params).items()}
        self._guard("log_params", self._mlflow.log_params, flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._guard("log_metrics", self._mlflow.log_metrics, clean, step=step, synchronous=True)

    def log_artifact(self, path: str | Path) -> None:
        self._guard("log_artifact", self._mlflow.log_artifact, str(path))

    def close(self) -> None:
        self._guard("end_run", self._mlflow.end_run)


def build_tracker(*, enabled: bool, is_rank0: bool, uri: str, experiment: str, run_dir: str | Path,
                  run_name: str, tags: dict[str, str], system_metrics: bool) -> Tracker:
    """MLflowTracker on rank 0 when enabled, else a NullTracker; a failing start is logged, not raised."""
    if not (enabled and is_rank0):
        return NullTracker()
    try:
        return MLflowTracker(uri=uri or default_uri(run_dir), experiment=experiment, run_dir=run_dir,
                             run_name=run_name, tags=tags, system_metrics=system_metrics)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow unavailable (%s: %s); training continues with metrics.jsonl only", type(err).__name__, err)
        return NullTracker()
