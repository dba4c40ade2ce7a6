"""The MLflow dashboard in a real browser: a real `mlflow server` on 127.0.0.1, a tiny tracked run
trained through the CLI, its run page rendered by headless Chromium (Debian's package, installed by
the fixture when missing; the test skips, with the reason, only where it cannot be).
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pytest

from megatron_lomdm.tracking.dashboard import METRICS, DashboardRouter
from megatron_lomdm.tracking.ui import MlflowServer, render_dom, run_page
from tests.helpers.chromium import BrowserUnavailable, ensure_chromium
from tests.helpers.runs import clean_env, read_metrics, train


@pytest.fixture(scope="module")
def browser() -> str:
    try:
        return ensure_chromium()
    except BrowserUnavailable as err:
        pytest.skip(f"no headless Chromium on this machine: {err}")


def _text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _expected_history(run_dir: Path) -> dict[str, list[int]]:
    """The steps at which each MLflow name should have a value, replaying metrics.jsonl through the router."""
    router, steps = DashboardRouter(), {}
    records = sorted(read_metrics(run_dir) + read_metrics(run_dir, "valid"), key=lambda r: (r["step"], r["kind"]))
    for r in records:
        prefix = "" if r["kind"] == "train" else f"{r['kind']}/"
        sent = router.route({f"{prefix}{k}": v for k, v in r.items() if k not in ("step", "kind") and v is not None})
        for name in sent:
            steps.setdefault(name, []).append(r["step"])
    return steps


@pytest.mark.slow
def test_dashboard_in_a_browser(browser: str, tiny_shards: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    t0 = time.time()
    with MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri(),
                      log=tmp_path / "server.log", env=clean_env()) as server:
        # started without MLflow's job runner (this project submits no MLflow jobs; ~20 s of start-up)
        assert "mlflow.server.jobs" not in server.log.read_text()
        run_dir = tmp_path / "run"
        out = train(run_dir, tiny_shards, "train.steps=4", "train.eval_interval=2", "train.eval_batches=1",
                    "tracking.enabled=true", f"tracking.uri={server.uri}", "tracking.experiment=dashboard",
                    "tracking.system_metrics=false")
        assert out.returncode == 0, out.stderr[-3000:]
        client = MlflowClient(tracking_uri=server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("dashboard").experiment_id])
        run_id, exp_id = run.info.run_id, run.info.experiment_id

        # every key the loop wrote has its row in tracking/dashboard.py (a new key needs a decision)
        written = {f"{'' if r['kind'] == 'train' else r['kind'] + '/'}{k}" for r in
                   read_metrics(run_dir) + read_metrics(run_dir, "valid") for k in r if k not in ("step", "kind")}
        assert not {k for k in written if k not in METRICS and not k.startswith("data/")}
        expected = _expected_history(run_dir)
        assert set(run.data.metrics) == set(expected)
        for name, steps in expected.items():
            assert [m.step for m in client.get_metric_history(run_id, name)] == steps, name
        assert run.info.run_name == "lomdm-c1=0.7-c2=0.65-K2-tp1pp1dp1"
        for tag in ("family", "c1", "c2", "K", "layout", "zero", "backend", "precision", "git_sha", "git_dirty",
                    "data_manifest", "restarts"):
            assert tag in run.data.tags, tag

        metrics = _text(render_dom(run_page(server.uri, exp_id, run_id, "model-metrics", alias=True)))
        artifacts = _text(render_dom(run_page(server.uri, exp_id, run_id, "artifacts", alias=True), budget_ms=15_000))
    for section in ("train", "order", "valid", "perf"):  # MLflow's section headers read "train (7)"
        assert re.search(rf"\b{section} \(\d+\)", metrics), f"no {section}/ section in: {metrics[:1500]}"
    assert not re.search(r"Model metrics \([1-9]", metrics)  # MLflow's catch-all section stays empty
    assert "config.yaml" in artifacts and "eval" in artifacts, artifacts[:1500]  # eval/: apps/artifacts.py
    assert time.time() - t0 < 150  # the budget is 90 s on an idle 2-core machine; leave room for load
