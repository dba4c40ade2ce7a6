"""A run's MLflow dashboard in a browser: a local ``mlflow server``, the run page's address, and
headless Chromium to render it (the browser test and ``tools/dashboard_screenshot.py``).

MLflow's UI is a React app: the run page is ``<server>/#/experiments/<id>/runs/<run id>/<tab>``
(tabs ``model-metrics``, ``system-metrics``, ``artifacts``), and its content exists only after the
scripts ran, hence Chromium's ``--virtual-time-budget``. The UI opens its "Assistant" side panel on
the first visit from localhost/127.0.0.1; `HOST_ALIAS` reaches the same server under another name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

HOST_ALIAS = "dashboard.localtest"
"""A name Chromium maps to 127.0.0.1 (``--host-resolver-rules``); the server allows it as a Host."""
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (one worker), in its own process group; a context manager.

    Args:
        backend_uri: The tracking store, e.g. ``sqlite:///<run dir>/mlflow.db``.
        artifact_root: Where new experiments keep artifacts (a ``file://`` URI).
        log: The server's stdout and stderr.
    """

    def __init__(self, backend_uri: str, artifact_root: str, *, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = log
        hosts = f"127.0.0.1:{self.port},localhost:{self.port},{HOST_ALIAS}:{self.port}"
        self._cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                     "--default-artifact-root", artifact_root, "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", "1", "--allowed-hosts", hosts,
                     "--cors-allowed-origins", f"http://{HOST_ALIAS}:{self.port},http://127.0.0.1:{self.port}"]
        # MLflow 3 starts a job runner (huey consumers) beside the server for jobs this project never
        # submits; without it the server answers in ~8 s instead of ~30 s on a loaded 2-core box
        self._env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> str:
        """Start it and wait until ``/health`` answers; returns its URI.

        Raises:
            RuntimeError: it exited or did not answer in time (with the end of its log).
        """
        self.proc = subprocess.Popen(self._cmd, env=self._env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill the server's process group (its uvicorn worker included)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def run_page(uri: str, experiment_id: str, run_id: str, tab: str = "model-metrics", *, alias: bool = False) -> str:
    """The UI address of one run's tab; `alias` reaches the server as `HOST_ALIAS` (no Assistant panel)."""
    base = uri.replace("127.0.0.1", HOST_ALIAS) if alias else uri
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/{tab}"


def find_chromium() -> str | None:
    """The path of a Chromium-like browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def chromium(url: str, *args: str, budget_ms: int = 30_000, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless Chromium on `url` with extra `args` after the page's scripts had `budget_ms`.

    Raises:
        FileNotFoundError: no Chromium on PATH.
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(f"none of {', '.join(BROWSERS)} is on PATH")
    # without the compositor flag, a screenshot now and then shows the charts' loading spinners
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--run-all-compositor-stages-before-draw",
           f"--host-resolver-rules=MAP {HOST_ALIAS} 127.0.0.1", f"--virtual-time-budget={budget_ms}"]
    cmd += ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    return subprocess.run([*cmd, *args, url], capture_output=True, text=True, timeout=timeout, check=True)


def render_dom(url: str, *, budget_ms: int = 30_000, window: tuple[int, int] = (1400, 2000)) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    return chromium(url, "--dump-dom", f"--window-size={window[0]},{window[1]}", budget_ms=budget_ms).stdout


def screenshot(url: str, out: Path, *, budget_ms: int = 120_000, window: tuple[int, int] = (1600, 3700)) -> Path:
    """Save a PNG of the page as rendered in a `window`-sized viewport.

    A first, discarded rendering warms the server up (its first metric-history requests are slow,
    and a screenshot taken then shows empty charts).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    render_dom(url, budget_ms=budget_ms, window=window)
    chromium(url, f"--screenshot={out.resolve()}", f"--window-size={window[0]},{window[1]}", budget_ms=budget_ms)
    return out
