"""MLflow on rank 0. Never stops training: the first failure is logged once, then it goes quiet.

The MLflow run id is kept in `run.dir/mlflow_run_id`, so a requeued or resumed job keeps logging
into the same MLflow run (its `restarts` tag counts the reopenings). Default URI: a sqlite database
inside the run directory. Metrics go out from a background thread (`tracking.sender`), renamed
for the dashboard (`tracking.dashboard`): a step never waits on the tracking server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from megatron_lomdm.tracking.base import NullTracker, Tracker, flatten
from megatron_lomdm.tracking.dashboard import DashboardRouter
from megatron_lomdm.tracking.sender import BackgroundSender
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
_MAX_PARAM_LEN = 500
CLOSE_TIMEOUT_S = 30.0
"""How long `close` waits for queued metrics to reach the server (then they are dropped)."""


def default_uri(run_dir: str | Path) -> str:
    """sqlite:///<absolute run dir>/mlflow.db."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _restart_tags(client: Any, run_id: str | None) -> dict[str, str]:
    """`restarts`: how many times this MLflow run was reopened (requeues, resumes); plus Slurm's count."""
    previous = int(client.get_run(run_id).data.tags.get("restarts", "0")) if run_id else -1
    tags = {"restarts": str(previous + 1)}
    if "SLURM_RESTART_COUNT" in os.environ:
        tags["slurm_restart_count"] = os.environ["SLURM_RESTART_COUNT"]
    return tags


class MLflowTracker:
    """Logs params, metrics and artifacts to one MLflow run; degrades to a no-op on errors.

    Args:
        asynchronous: Send metrics from a background thread (the default); False sends them on
            the calling thread (the benchmark's baseline).
        restart: Reopening the run's MLflow run counts as a restart (a trainer); False for a tool
            that only adds to a finished run (e.g. an export logging its result).
    """

    def __init__(self, *, uri: str, experiment: str, run_dir: str | Path, run_name: str,
                 tags: dict[str, str], system_metrics: bool = False, asynchronous: bool = True,
                 restart: bool = True) -> None:
        # A dead server must cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        import mlflow  # only rank 0 with tracking enabled pays this import

        self._mlflow = mlflow
        self._metric = mlflow.entities.Metric
        self._broken = False
        self.uri = uri
        id_file = Path(run_dir) / "mlflow_run_id"
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
            # a local store keeps its artifacts next to it, not in the current directory
            mlflow.create_experiment(experiment, artifact_location=(Path(run_dir).resolve() / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = id_file.read_text().strip() if id_file.exists() else None
        tags = {**tags, **_restart_tags(self._client, run_id)} if restart else tags
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                                    log_system_metrics=system_metrics)
        id_file.write_text(self.run.info.run_id)
        self.run_id = self.run.info.run_id
        self._router = DashboardRouter()
        self._sender: BackgroundSender | None = None
        if asynchronous:
            self._sender = BackgroundSender(self._send, on_error=lambda err: self._fail("log_metrics", err))
        # folders of files (evaluation artifacts) upload from their own thread: a slow server never blocks a step
        self._uploads: BackgroundSender = BackgroundSender(self._upload, on_error=self._upload_failed, capacity=64,
                                                           batch=1, name="tracking-uploads")
        log.info("MLflow run %s at %s", self.run_id, uri)

    def _fail(self, what: str, err: Exception) -> None:
        self._broken = True
        log.warning("MLflow %s failed (%s: %s); metrics.jsonl keeps everything, MLflow logging stops",
                    what, type(err).__name__, err)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._fail(what, err)

    def _send(self, metrics: list[Any]) -> None:
        self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(params).items()}
        self._guard("log_params", self._mlflow.log_params, flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics under their dashboard names (`tracking.dashboard.METRICS`)."""
        if self._broken:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        now = int(time.time() * 1000)
        batch = [self._metric(key, value, now, step) for key, value in self._router.route(clean).items()]
        if not batch:
            return
        if self._sender is not None:
            self._sender.put(batch)
        else:
            self._guard("log_metrics", self._send, batch)

    def log_artifact(self, path: str | Path) -> None:
        self._guard("log_artifact", self._mlflow.log_artifact, str(path))

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        """Queue a folder's files for upload under `artifact_path` of the run (in the background)."""
        if not self._broken:
            self._uploads.put([(str(folder), artifact_path)])

    @staticmethod
    def _upload_failed(err: Exception) -> None:
        log.warning("MLflow artifact upload failed (%s: %s); uploads stop, run.dir/artifacts keeps the files",
                    type(err).__name__, err)

    def _upload(self, items: list[tuple[str, str]]) -> None:
        for folder, artifact_path in items:
            self._client.log_artifacts(self.run_id, folder, artifact_path)

    def close(self) -> None:
        """Send the queued metrics (at most `CLOSE_TIMEOUT_S`), then end the MLflow run."""
        if self._sender is not None and not self._sender.close(CLOSE_TIMEOUT_S) and not self._broken:
            log.warning("MLflow: metrics still queued after %.0f s were dropped; metrics.jsonl has them",
                        CLOSE_TIMEOUT_S)
        if self._sender is not None and self._sender.dropped:
            log.warning("MLflow: %d metric values were dropped (queue full); metrics.jsonl has them",
                        self._sender.dropped)
        if not self._uploads.close(CLOSE_TIMEOUT_S) and not self._broken:
            log.warning("MLflow: artifact uploads still queued after %.0f s were dropped; run.dir/artifacts has them",
                        CLOSE_TIMEOUT_S)
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


def log_to_tracked_run(run_dir: str | Path, folder: str | Path, artifact_path: str, *, uri: str, experiment: str,
                       tags: dict[str, str]) -> str | None:
    """Add `folder` (e.g. the HF export) to the MLflow run of a tracked run directory, after training.

    Returns the MLflow run id, or None when the run directory was never tracked (no
    `mlflow_run_id`) or MLflow is unavailable (logged, not raised: the files are where they are).
    """
    if not (Path(run_dir) / "mlflow_run_id").is_file():
        return None
    try:
        tracker = MLflowTracker(uri=uri or default_uri(run_dir), experiment=experiment, run_dir=run_dir, run_name="",
                                tags=tags, restart=False)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow unavailable (%s: %s); %s is not logged to the run", type(err).__name__, err, folder)
        return None
    tracker.log_artifacts(folder, artifact_path)
    tracker.close()
    return tracker.run_id

