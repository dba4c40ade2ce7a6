"""Tracking against a real `mlflow server` on 127.0.0.1, including the server dying mid-run."""

from __future__ import annotations

import json

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT, clean_env, read_metrics, start_train, train, wait_for_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--default-artifact-root", (tmp / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # without MLflow's job runner, as tracking/ui.py starts it (this project submits no MLflow jobs)
    proc = subprocess.Popen(cmd, cwd=tmp, env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            stdout=(tmp / "server.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    _stop(proc)
    raise AssertionError(f"mlflow server did not come up: {(tmp / 'server.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's own group: uvicorn workers included
        proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_real_server(tiny_shards: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    server, uri = _start_server(tmp_path)
    try:
        run_dir = tmp_path / "run"
        out = train(run_dir, tiny_shards, "train.steps=6", "tracking.enabled=true", f"tracking.uri={uri}",
                    "tracking.experiment=server_test", "run.name=tiny_lomdm", "train.eval_interval=3",
                    "train.eval_batches=1")
        assert out.returncode == 0, out.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("server_test")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.run_name == "tiny_lomdm"
        assert run.data.params["diffusion.name"] == "lomdm" and run.data.params["train.steps"] == "6"
        assert run.data.tags["family"] == "lomdm" and run.data.tags["layout"] == "tp1_pp1_dp1"
        for key in ("train/loss", "train/nelbo", "train/main", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                    "perf/step_time_s"):  # names of tracking/dashboard.py; test_mlflow_dashboard.py checks them all
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2, 3, 4, 5, 6], key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "valid/nelbo")] == [3, 6]
        jsonl = {r["step"]: r["nelbo"] for r in read_metrics(run_dir)}
        for m in client.get_metric_history(run.info.run_id, "train/nelbo"):
            assert m.value == pytest.approx(jsonl[m.step], rel=1e-6)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "config.yaml" in artifacts and "eval" in artifacts
        # the evaluation artifacts of each evaluation, written to run.dir and uploaded (apps/artifacts.py)
        for step in (3, 6):
            folder = f"eval/step_{step:07d}"
            uploaded = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, folder))
            assert uploaded == ["eval.json", "exponents.png", "order.png", "samples.txt"], (folder, uploaded)
            assert sorted(p.name for p in (run_dir / "artifacts" / f"step_{step:07d}").iterdir()) == uploaded
        record = json.loads((run_dir / "artifacts" / "step_0000006" / "eval.json").read_text())
        assert record["step"] == 6 and record["valid"]["nelbo"] == pytest.approx(read_metrics(run_dir, "valid")[-1]["nelbo"])
        assert record["sampler"]["name"] == "ancestral" and record["fingerprint"]["model"]["family"] == "lomdm"
        assert record["forward_rate"]["n"] > 0 and record["reverse_exponent"]["n"] > 0
        assert "seed" in (run_dir / "artifacts" / "step_0000006" / "samples.txt").read_text().splitlines()[0]
        # tools/convert_to_hf.py on a tracked run logs the export to the same MLflow run
        from megatron_lomdm.apps.hf_export import export_run

        export_run(run_dir, tmp_path / "hf")
        exported = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "hf_export/step_0000006")}
        assert {"config.json", "model.safetensors", "README.md"} <= exported, exported
        assert client.get_run(run.info.run_id).data.tags["hf_export"] == "hf_export/step_0000006"
    finally:
        _stop(server)


@pytest.mark.slow
def test_mlflow_server_dies_mid_run(tiny_shards: Path, tmp_path: Path) -> None:
    server, uri = _start_server(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, tiny_shards, "model.hidden_size=128", "model.num_layers=4", "train.steps=30",
                       "tracking.enabled=true", f"tracking.uri={uri}", log=tmp_path / "train.log")
    try:
        wait_for_step(run_dir, 3, proc)
        _stop(server)
        assert proc.wait(timeout=240) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(server)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 31))
    log = (tmp_path / "train.log").read_text()
    assert log.count("MLflow log_metrics failed") == 1  # the gap is reported once, not every step
