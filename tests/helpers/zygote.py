"""Training runs for tests without paying the interpreter start-up each time.

Every process of the training CLI spends ~4 CPU-s importing torch, megatron-core and DeepSpeed
before its first step, and a tiny test run needs well under one more (bench/RESULTS.md). Most of
the suite's training runs only need the CLI's behaviour, not a fresh interpreter, so
`tests.helpers.runs.train` sends them to a fork server (`_zygote_server.py`): one per pytest worker,
started on first use, which has done those imports once and forks a child per run. A run with
several processes goes through torch's elastic launcher, the library `torchrun --standalone` wraps,
with its workers forked from that child instead of started as fresh interpreters.

What still runs as real separate commands: every test that starts the CLI itself (`start_train`,
`train_cmd`, the README, recipe, Slurm and CLI tests), so the `python -m megatron_lomdm.train` and
`torchrun` entry points keep their own coverage. `LOMDM_TEST_FRESH_PROCESSES=1` sends every run to a
fresh interpreter (the way to rule the server out when a test fails).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600  # a new server's imports on a loaded 2-core machine


class Zygote:
    """A fork server process and the pipe to it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = Path(tempfile.gettempdir()) / f"lomdm-zygote-{os.getpid()}.log"  # its own errors, if any
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers._zygote_server"], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         bufsize=1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _answer(self, timeout: float | None) -> dict:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server exited ({self.proc.poll()}): {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """`subprocess.run(cmd, capture_output=True, text=True)` for a command `split_command` accepts,
        in a forked child."""
        assert self.proc.stdin is not None
        target, args, nproc = split_command(cmd)
        with tempfile.TemporaryDirectory(prefix="zygote_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"target": target, "args": args, "nproc": nproc, "env": env, "cwd": str(cwd),
                       "stdout": str(out), "stderr": str(err)}
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                pid = self._answer(START_TIMEOUT_S)["pid"]  # the first request also waits for the imports
            except BaseException:
                self.kill()  # a request half answered: the next run starts a new server
                raise
            try:
                rc = self._answer(timeout)["rc"]
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.kill()
                if isinstance(exc, TimeoutError):
                    raise subprocess.TimeoutExpired(cmd, timeout, *(p.read_text() if p.exists() else ""
                                                                      for p in (out, err))) from None
                raise
            return subprocess.CompletedProcess(cmd, rc, out.read_text(), err.read_text())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def split_command(cmd: list[str]) -> tuple[list[str], list[str], int]:
    """`[python, -m MODULE | SCRIPT, ARGS...]`, or the same after
    `python -m torch.distributed.run --standalone --nproc_per_node=N`, as (target, args, nproc)."""
    nproc, original = 1, cmd
    if cmd[:4] == _TORCHRUN and len(cmd) > 4 and cmd[4].startswith("--nproc_per_node="):
        nproc, cmd = int(cmd[4].split("=", 1)[1]), [sys.executable, *cmd[5:]]
    if len(cmd) < 2 or cmd[0] != sys.executable or cmd[1].startswith("-") and (cmd[1] != "-m" or len(cmd) < 3):
        raise ValueError(f"not a command the fork server runs: {original}")
    if cmd[1] == "-m":
        return cmd[1:3], cmd[3:], nproc
    return cmd[1:2], cmd[2:], nproc


def run(cmd: list[str], *, env: dict[str, str], cwd: Path = ROOT, timeout: float = 300,
        fresh: bool = False) -> subprocess.CompletedProcess:
    """`cmd` (a python or torchrun command line, see `split_command`) to completion with its output
    captured: through this pytest process's fork server, or as a fresh process when `fresh` or when the
    server is off."""
    if fresh or not enabled():
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # as the server's children
    return server(env).run(cmd, env=env, cwd=cwd, timeout=timeout)


_server: Zygote | None = None


def enabled() -> bool:
    return os.environ.get("LOMDM_TEST_FRESH_PROCESSES") != "1"


def server(env: dict[str, str]) -> Zygote:
    """This pytest process's fork server, (re)started when needed."""
    global _server
    if _server is None or not _server.alive():
        _server = Zygote(env)
        atexit.register(_server.close)
    return _server
