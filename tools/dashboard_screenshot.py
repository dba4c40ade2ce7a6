"""A PNG of a run's MLflow dashboard, rendered by headless Chromium (Debian's `chromium` package).

    python tools/dashboard_screenshot.py --run-dir runs/demo_cpu --out docs/img/dashboard.png

Serves the run directory's own MLflow store (`mlflow.db`, where runs without `tracking.uri` log) on
a free port of 127.0.0.1, opens the run's page (the one `run.dir/mlflow_run_id` names) and saves a
screenshot. `--tracking-uri` photographs a run on a running server instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lomdm.tracking.mlflow_tracker import default_uri  # noqa: E402
from megatron_lomdm.tracking.ui import MlflowServer, run_page, screenshot  # noqa: E402
from megatron_lomdm.utils.logging import get_logger  # noqa: E402

log = get_logger("dashboard_screenshot")


def _page(uri: str, run_dir: Path, tab: str) -> str:
    from mlflow import MlflowClient

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    return run_page(uri, run.info.experiment_id, run_id, tab, alias=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run directory with mlflow_run_id")
    p.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    p.add_argument("--tracking-uri", default="", help="an MLflow server the run logged to (default: its mlflow.db)")
    p.add_argument("--tab", default="model-metrics", help="model-metrics, system-metrics, artifacts, ...")
    p.add_argument("--window", default="1600,3700", help="viewport WIDTH,HEIGHT in pixels")
    p.add_argument("--budget-ms", type=int, default=120_000, help="virtual time the page's scripts get")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.window.split(","))
    if args.tracking_uri:
        url = _page(args.tracking_uri, args.run_dir, args.tab)
        screenshot(url, args.out, budget_ms=args.budget_ms, window=(width, height))
    else:
        with tempfile.TemporaryDirectory() as tmp, MlflowServer(
                default_uri(args.run_dir), (args.run_dir.resolve() / "mlartifacts").as_uri(),
                log=Path(tmp) / "server.log") as server:
            url = _page(server.uri, args.run_dir, args.tab)
            screenshot(url, args.out, budget_ms=args.budget_ms, window=(width, height))
    log.info("saved %s (%s)", args.out, url)


if __name__ == "__main__":
    main()
