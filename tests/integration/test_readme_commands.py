"""Every command README.md shows runs here, as written, after a stand-in for `make demo`.

The commands: each line of the README's ```bash blocks (backslash continuations joined, comment
lines dropped) and each inline span that starts with `make`, `python`, `torchrun`, `sbatch`,
`mlflow` or `source` and has an argument. A block's commands run in order (a later one may read what
an earlier one wrote); blocks are independent. Each command runs through bash in a folder laid out
like a fresh clone after `make demo`: links to the repository's code folders (tools/, bench/),
copies of what a command may write into (configs/, slurm/, docs/: nothing here writes into the
repository), and the demo's demo_data/ and runs/demo_cpu/ (the `demo_checkout` fixture).
`.venv/bin` is first on PATH, which is what `source .venv/bin/activate` does. Every command must
exit 0; a few also have their output checked (`EXPECT`). An inline span that is the start of a
command a block shows (e.g. `mlflow ui`) refers to it and is not run again.

Differences from a user's shell, all of them:
- `make demo` is stood in for by its own stages (`tools/demo.py`: `data_stages`, `train_command`),
  with the training shortened to `LOMDM_README_DEMO_STEPS` steps (default 4; 200 is the demo's own
  length, ~2 min on 2 cores). The README's commands read that run; none depends on its length.
- `mlflow ui` / `mlflow server` get a free port instead of the README's 5000, and start without
  MLflow's job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`: huey consumers for MLflow jobs,
  which nothing here submits; they cost ~20 s of start-up on 2 cores). They are started, must answer
  `/health` and list the demo's run over the REST API, and are then stopped.
- A command that needs a program the machine may lack (`REQUIRES`: headless Chromium) gets it the
  way the browser test does, or is skipped with the reason.

A command that cannot run on CPU CI (a cluster, a GPU, an hour-long benchmark, the suite itself)
is in `SKIP` with the reason and what covers it instead; the script or make target it names must
exist. A new README command that is neither in `SKIP` nor runnable here fails this test, and so
does a `SKIP` entry the README no longer shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.runs import ROOT, clean_env, read_metrics

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
LINKED = ("tools", "bench")
COPIED = ("configs", "slurm", "docs")
INLINE = re.compile(r"`((?:make|python|torchrun|sbatch|mlflow|source) [^`]+)`")
DEMO_STEPS = int(os.environ.get("LOMDM_README_DEMO_STEPS", "4"))
COMMAND_TIMEOUT_S = 300
SERVER_TIMEOUT_S = 120

SKIP: dict[str, str] = {
    "make demo": "stood in for by the `demo_checkout` fixture: the demo's own stages and training command "
                 "(tools/demo.py), the training shortened to LOMDM_README_DEMO_STEPS steps",
    "make test": "the test suite itself, of which this test is a part",
    "make setup": "builds the .venv/ this test already runs in",
    "source .venv/bin/activate": "done for every command here: .venv/bin comes first on PATH, which is all it does",
    "make bench": "the CPU benchmarks (~6 min on 2 cores); not CI, results in bench/RESULTS.md",
    "make bench-learning": "learning curves, ~50 min on 2 cores; not CI",
    "make bench-order": "the order-learning benchmark, ~7 min on 2 cores; not CI",
    "python bench/order_task.py --variants lomdm_k4 poly_k4 lomdm_ppots --reuse":
        "three more order-benchmark variants x 3 seeds (tens of minutes), reusing make bench-order's data",
    "python bench/gpu.py": "measures MFU on a CUDA GPU",
    "make bench-puzzles": "the Sudoku benchmark, ~20 min wall on the shared 2-core box; not CI (tests/unit/test_bench_puzzles.py "
                          "runs its pieces), results in bench/RESULTS.md",
    "make bench-scale": "the 1.5B model end to end on CPU (~20 min from a fresh clone, ~20 GB of NVMe-offloaded "
                        "optimizer state, libaio-dev); not CI (tests/unit/test_nvme_offload.py checks its offload config and "
                        "errors, test_hf_export.py its sharded export), results in bench/RESULTS.md",
    "python tools/dashboard_screenshot.py --run-dir runs/demo_cpu --out docs/img/dashboard.png":
        "rewrites the committed picture (~90 s with Chromium); tests/integration/test_mlflow_dashboard.py renders "
        "the same run page through the same tracking/ui.py in headless Chromium",
    "sbatch slurm/owt_1b.sh": "needs a Slurm cluster with 4 nodes x 8 GPUs; tests/integration/test_slurm.py runs "
                              "sbatch against a real slurmctld, and ::test_recipes_are_wired checks this script",
    "python slurm/submit.py --config configs/experiments/owt_small.yaml --nodes 1 --gpus-per-node 8":
        "needs Slurm and 8 GPUs; test_slurm.py::test_submitit_local_and_slurm submits through the same script",
}


def _normal(command: str) -> str:
    """A command as one line of words, its trailing comment dropped (the key of `SKIP`)."""
    return " ".join(shlex.split(command, comments=True))


def readme_units(text: str) -> list[tuple[str, list[str]]]:
    """(name, commands in order) for each ```bash block and each inline command of the README."""
    units = []
    for k, block in enumerate(re.findall(r"```bash\n(.*?)```", text, re.S)):
        lines = [ln.strip() for ln in block.replace("\\\n", " ").splitlines()]
        commands = [ln for ln in lines if ln and not ln.startswith("#")]
        units.append((f"block{k}:{' '.join(_normal(commands[0]).split()[:3])}", commands))
    seen = {_normal(c) for _, commands in units for c in commands}
    for span in INLINE.findall(text):
        if not any(c == _normal(span) or c.startswith(_normal(span) + " ") for c in seen):  # once; not a reference
            seen.add(_normal(span))
            units.append((f"inline:{span}", [span]))
    return units


UNITS = readme_units(README.read_text())


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lomdm_demo", ROOT / "tools" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shell_env() -> dict[str, str]:
    """The test environment with .venv/bin first on PATH, as after `source .venv/bin/activate`."""
    venv_bin = Path(sys.executable).parent
    env = clean_env(VIRTUAL_ENV=str(venv_bin.parent))
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def _bash(command: str, cwd: Path, timeout: int = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_shell_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like a fresh clone after `make demo`: the demo's data and a (short) demo_cpu run."""
    root = tmp_path_factory.mktemp("checkout")
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    for name in COPIED:
        shutil.copytree(ROOT / name, root / name)
    demo, py = _demo_module(), sys.executable
    for _, cmd in demo.data_stages(py, root / "demo_data"):
        out = subprocess.run(cmd, cwd=root, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
    short = [f"train.steps={DEMO_STEPS}", f"train.eval_interval={DEMO_STEPS}", "train.eval_batches=1",
             f"checkpoint.interval={DEMO_STEPS}", "train.log_interval=1"]
    cmd = demo.train_command(py, "configs/experiments/demo_cpu.yaml", root / "demo_data" / "shards", short)
    out = subprocess.run(cmd, cwd=root, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None) -> dict:
    """GET (or POST `body` to) an MLflow REST endpoint."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _serve_and_check(command: str, cwd: Path) -> None:
    """Start an `mlflow ui/server` command on a free port, check it serves the demo run, stop it."""
    port = _free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command) if "--port" in command else f"{command} --port {port}"
    log = cwd / f"mlflow_{port}.log"
    env = dict(_shell_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + SERVER_TIMEOUT_S
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"{command} did not come up: {log.read_text()[-2000:]}")
        experiments = _api(f"{base}/api/2.0/mlflow/experiments/search?max_results=100")["experiments"]
        runs = _api(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [e["experiment_id"] for e in experiments]})
        names = [r["info"].get("run_name") for r in runs.get("runs", [])]
        assert "demo_cpu" in names, f"the demo's run is not on the dashboard: {names}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own group: its workers too
        proc.wait(timeout=30)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


EXPECT: dict[str, Callable[[Path, subprocess.CompletedProcess], None]] = {
    "python -m megatron_lomdm.train --config configs/experiments/tiny_cpu.yaml train.steps=50":
        lambda root, out: _check(_steps(root / "runs/tiny_cpu")[-1] == 50, "tiny_cpu did not reach step 50"),
    "python -m megatron_lomdm.train --config configs/experiments/owt_small.yaml --print-config":
        lambda root, out: _check("dir: runs/owt_small" in out.stdout, "no resolved config printed"),
    "python tools/evaluate.py --run-dir runs/demo_cpu --t-draws 4":
        lambda root, out: _check("nelbo" in json.loads(out.stdout.strip().splitlines()[-1]), "no NELBO JSON"),
    "python tools/convert_to_hf.py --run-dir runs/demo_cpu --output hf/demo_cpu --verify":
        lambda root, out: _check((root / "hf/demo_cpu/config.json").is_file(), "no HF export"),
}


def _check(ok: bool, what: str) -> None:
    assert ok, what


def _chromium() -> None:
    """Headless Chromium, installed the way the browser test installs it, or a skip with the reason."""
    from tests.helpers.chromium import BrowserUnavailable, ensure_chromium

    try:
        ensure_chromium()
    except BrowserUnavailable as err:
        pytest.skip(f"no headless Chromium on this machine: {err}")


REQUIRES: dict[str, Callable[[], None]] = {"python tools/dashboard_screenshot.py": _chromium}
"""Command prefix -> what provides the program it needs (or skips with the reason)."""


def _run_one(command: str, root: Path) -> None:
    words = shlex.split(command, comments=True)
    if words[:2] in (["mlflow", "ui"], ["mlflow", "server"]):
        _serve_and_check(command, root)
        return
    for prefix, provide in REQUIRES.items():
        if _normal(command).startswith(prefix):
            provide()
    out = _bash(command, root)
    assert out.returncode == 0, f"README command failed ({out.returncode}): {command}\n{out.stderr[-4000:]}"
    check = EXPECT.get(_normal(command))
    if check is not None:
        check(root, out)


@pytest.mark.parametrize("name,commands", UNITS, ids=[u[0] for u in UNITS])
def test_readme_command_runs_as_written(name: str, commands: list[str], request: pytest.FixtureRequest) -> None:
    """Each README command, in its block's order, in a checkout after the demo (or skipped with a reason)."""
    runnable = [c for c in commands if _normal(c) not in SKIP]
    if not runnable:
        pytest.skip("; ".join(f"{_normal(c)}: {SKIP[_normal(c)]}" for c in commands))
    root = request.getfixturevalue("demo_checkout")  # only when something runs
    for command in runnable:
        _run_one(command, root)


def _store(uri: str, cwd: Path) -> Path:
    """The file of a sqlite:/// tracking URI (absolute, or relative to `cwd`)."""
    assert uri.startswith("sqlite:///"), uri
    return (cwd / uri[len("sqlite:///"):]).resolve()


def test_demo_ends_with_the_readme_dashboard_command(demo_checkout: Path) -> None:
    """The end of `make demo` prints the README's `mlflow ui` command (which the README block test serves)
    for the run's own store, and the run's page on it; only the executable's path and the URI's spelling
    (absolute there, relative in the README) differ."""
    demo, run_dir = _demo_module(), demo_checkout / "runs" / "demo_cpu"
    uri = demo.tracking_uri(run_dir)
    printed = shlex.split(demo.dashboard_command(uri, root=demo_checkout))
    shown = next(shlex.split(c, comments=True) for _, cs in UNITS for c in cs if c.startswith("mlflow ui "))
    i = shown.index("--backend-store-uri") + 1
    assert Path(printed[0]).name == "mlflow" and printed[1:i] == shown[1:i] and printed[i + 1:] == shown[i + 1:]
    assert _store(printed[i], demo_checkout) == _store(shown[i], demo_checkout) == run_dir.resolve() / "mlflow.db"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    page = demo.run_page(uri, run_dir)
    assert page.startswith("http://127.0.0.1:5000/#/experiments/") and page.endswith(f"/runs/{run_id}"), page


def test_skip_table_is_current_and_names_what_exists() -> None:
    """Every SKIP and EXPECT entry is still a README command, and the script / make target it names exists."""
    shown = {_normal(c) for _, commands in UNITS for c in commands}
    stale = sorted((set(SKIP) | set(EXPECT)) - shown)
    assert not stale, f"SKIP / EXPECT name commands the README no longer shows: {stale}"
    makefile = (ROOT / "Makefile").read_text()
    for command in SKIP:
        words = command.split()
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), f"no make target {words[1]}"
        elif words[0] in ("python", "sbatch"):
            assert (ROOT / words[1]).is_file(), f"{command}: {words[1]} does not exist"


def test_readme_has_the_commands_a_newcomer_needs() -> None:
    """The extraction sees the quickstart, the first training command and the dashboard command."""
    shown = {_normal(c) for _, commands in UNITS for c in commands}
    assert {"make demo", "make test"} <= shown
    assert any(c.startswith("python -m megatron_lomdm.train --config configs/experiments/tiny_cpu.yaml")
               for c in shown)
    assert any(c.startswith("mlflow ui --backend-store-uri") and "--host 127.0.0.1" in c for c in shown)
