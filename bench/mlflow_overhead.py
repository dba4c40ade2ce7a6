"""What MLflow logging costs the training step, against a real local server made slow or dead.

    python bench/mlflow_overhead.py [--delay-ms 200] [--calls 40]

A real `mlflow server` on 127.0.0.1 sits behind a tiny proxy (stdlib) that adds `--delay-ms` to every
request. One training record (the keys of a demo metrics.jsonl line) is logged `--calls` times and
the time spent on the calling thread is measured for: our tracker sending on the calling thread
(`sync`), our tracker's background sender (`async`, the default) and MLflow's own
`log_metrics(..., synchronous=False)` (`mlflow_async`); then the same after the server died
(`*_dead`: the proxy's port then refuses connections). The figure of merit is the per-call cost
as a fraction of the demo step time (logging every step; `make demo` logs every 10th). Target:
<= 1% (issue 20). Results: bench/RESULTS.md (2026-12-03) and a line in bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, WORK, record  # noqa: E402
from megatron_lomdm.tracking.mlflow_tracker import MLflowTracker  # noqa: E402
from megatron_lomdm.tracking.ui import MlflowServer  # noqa: E402

RECORD = {"loss": 1.7, "nelbo": 6.2, "main": 6.2, "velocity": 1e-8, "rloo": -4.4, "surrogate": 1.7,
          "exponent_mean": 0.7, "exponent_std": 1e-3, "velocity_confidence_corr": 0.07, "order_grad_snr": -0.1,
          "lr": 5e-4, "grad_norm": 8.7, "num_tokens": 1024, "tokens_per_s": 2000.0, "step_time_s": 0.45,
          "mfu": 0.0, "skipped_steps": 0, "memory_gb": 0.9, "data/skipped_shards": 0.0,
          "data/fetched_shards": 0.0, "data/cache_evictions": 0.0}
"""One train line of a demo metrics.jsonl (values vary per call below, as they do in training)."""


def delay_proxy(upstream_port: int, delay_s: float) -> ThreadingHTTPServer:
    """An HTTP proxy on 127.0.0.1 that waits `delay_s` before forwarding each request upstream."""

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            time.sleep(delay_s)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            try:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                status, data, out_headers = resp.status, resp.read(), resp.getheaders()
            except OSError:
                status, data, out_headers = 502, b"upstream down", []
            self.send_response(status)
            for k, v in out_headers:
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def demo_step_time(steps: int = 30) -> float:
    """Median `step_time_s` of the demo config (configs/experiments/demo_cpu.yaml), untracked."""
    run_dir = WORK / "mlflow_overhead_demo"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    subprocess.run([sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/demo_cpu.yaml",
                    f"run.dir={run_dir}", f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0",
                    "checkpoint.interval=0", "tracking.enabled=false"], cwd=ROOT, check=True, capture_output=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in lines if r.get("kind") == "train" and r["step"] > 3)


def time_calls(log: Any, calls: int) -> list[float]:
    """Seconds on the calling thread for each of `calls` log calls of a (varying) training record."""
    costs = []
    for step in range(1, calls + 1):
        metrics = {k: v * (1 + 0.01 * step) if isinstance(v, float) else v for k, v in RECORD.items()}
        t0 = time.perf_counter()
        log(metrics, step)
        costs.append(time.perf_counter() - t0)
    return costs


def measure(mode: str, uri: str, tmp: Path, calls: int, kill: Any = None) -> list[float]:
    """Open a tracker through `uri`, optionally `kill` the server, then time `calls` log calls."""
    (tmp / mode).mkdir(parents=True, exist_ok=True)
    tracker = MLflowTracker(uri=uri, experiment="overhead", run_dir=tmp / mode, run_name=mode, tags={},
                            asynchronous=mode.startswith("async"))
    if kill is not None:
        kill()
    if mode.startswith("mlflow_async"):
        import mlflow

        def log(metrics: dict, step: int) -> None:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False)
    else:
        log = tracker.log_metrics
    costs = time_calls(log, calls)
    tracker.close()
    return costs


def summary(costs: list[float], step_s: float) -> dict[str, float]:
    mean = statistics.fmean(costs)
    return {"median_ms": 1e3 * statistics.median(costs), "mean_ms": 1e3 * mean, "max_ms": 1e3 * max(costs),
            "mean_pct_of_step": 100 * mean / step_s}


MODES = ("sync", "async", "mlflow_async", "sync_dead", "async_dead", "mlflow_async_dead")


def one_mode(mode: str, server_port: int, delay_ms: float, calls: int) -> list[float]:
    """One mode in this process (MLflow's active-run state is per process): proxy, tracker, timed calls."""
    proxy = delay_proxy(server_port, delay_ms / 1e3)

    def die() -> None:  # the "server" port now refuses connections
        proxy.shutdown()
        proxy.server_close()

    with tempfile.TemporaryDirectory() as tmp:
        costs = measure(mode, f"http://127.0.0.1:{proxy.server_address[1]}", Path(tmp), calls,
                        die if mode.endswith("_dead") else None)
    if not mode.endswith("_dead"):
        die()
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--delay-ms", type=float, default=200.0)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode, JSON costs on stdout
    p.add_argument("--server-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.server_port, args.delay_ms, args.calls)))
        return
    step_s = demo_step_time()
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = MlflowServer(f"sqlite:///{tmp / 'mlflow.db'}", (tmp / "art").as_uri(), log=tmp / "server.log")
        server.start()
        try:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--mode", mode, "--server-port", str(server.port),
                                      "--delay-ms", str(args.delay_ms), "--calls", str(args.calls)],
                                     capture_output=True, text=True, check=True, timeout=900)
                costs = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("["))
                rows[mode] = summary(json.loads(costs), step_s)
                print(f"{mode:18s} " + "  ".join(f"{k} {v:8.3f}" for k, v in rows[mode].items()), flush=True)
        finally:
            server.stop()
    record("mlflow_overhead", {"delay_ms": args.delay_ms, "calls": args.calls, "demo_step_s": step_s, **{
        f"{mode}_{k}": v for mode, row in rows.items() for k, v in row.items()}})
    print(f"demo step {step_s * 1e3:.0f} ms; proxy delay {args.delay_ms:.0f} ms per request")


if __name__ == "__main__":
    main()
