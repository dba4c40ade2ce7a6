"""A real single-node Slurm cluster on localhost, for the launcher tests (and by hand).

``SlurmCluster(state_dir).start()`` brings up a private ``munged``, ``slurmctld`` and ``slurmd``
whose configuration, sockets, spool, state, pid and log files all live in ``state_dir``; ``stop()``
cancels the cluster's jobs and ends exactly the processes this object started, by PID (plus any job
process left behind, recognised by the cluster's marker in its environment). Nothing under /etc or
/run is touched, so it can run beside a system Slurm or another test session's cluster (free ports,
own munge socket, random first job id so the job-id-derived rendezvous ports of two sessions differ).

Facts this relies on (stack.md §10): Debian 12's ``slurm-wlm`` 22.05 + ``munge`` run as root without
systemd or cgroups with ``proctrack/linuxproc`` + ``task/none``; ``cred_expire=5`` lets a requeued job
start again after ~6 s instead of 120 s; PID 1 reaps orphans late, so "is it running" is read from
``/proc/PID/stat`` (a zombie counts as gone).

By hand::

    python tests/helpers/slurm_cluster.py start /tmp/lomdm-slurm   # prints `export SLURM_CONF=...`
    python tests/helpers/slurm_cluster.py stop /tmp/lomdm-slurm
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "munged", "mungekey")
INSTALL_LOCK = Path(tempfile.gettempdir()) / "lomdm-slurm-install.lock"
MARKER = "LOMDM_SLURM_CLUSTER"
"""Environment variable set on the daemons and on every client call; its value is the state dir."""

TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"})
"""Where a job stays. PREEMPTED is left out: with PreemptMode=REQUEUE it passes on to PENDING."""


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why (used as a skip reason)."""


# ----------------------------------------------------------------------------------------------
# processes


def pid_running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (PID 1 here reaps orphans only every ~2 s)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM the given PIDs, wait until they are gone (or zombies), SIGKILL what is left."""
    pids = [p for p in pids if p > 1 and p != os.getpid() and pid_running(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_running(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if pid_running(p)]
        if not pids:
            return


def _has_marker(pid: int, value: str) -> bool:
    try:
        return f"{MARKER}={value}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _pids_with_marker(value: str) -> list[int]:
    """PIDs whose environment has MARKER=value: the cluster's daemons, stepds and job processes."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and int(e.name) != os.getpid() and _has_marker(int(e.name), value)]


# ----------------------------------------------------------------------------------------------
# installation


def slurm_installed() -> bool:
    return all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for b in BINARIES)


def ensure_installed(timeout: float = 600.0) -> None:
    """Install the Debian packages when missing (root only); serialised by a file lock.

    Raises:
        ClusterUnavailable: with the reason, when they are missing and cannot be installed.
    """
    if slurm_installed():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed ({' '.join(PACKAGES)}) and this is not root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if slurm_installed():
            return
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:  # a fresh machine has no package lists yet
            upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
            out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                         f"{(upd.stderr + out.stderr)[-1500:]}")
    if not slurm_installed():
        raise ClusterUnavailable("apt-get installed the packages but the Slurm binaries are missing")


# ----------------------------------------------------------------------------------------------
# the cluster


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """`slurmd -C`'s hardware line for this machine, as NodeName=localhost with 95% of the memory."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    parts = [f"{k}={fields[k]}" for k in keep if k in fields]
    if "RealMemory" in fields:
        parts.append(f"RealMemory={max(1, int(int(fields['RealMemory']) * 0.95))}")
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(parts) + " State=UNKNOWN"


class SlurmCluster:
    """One Slurm cluster (controller + one node called ``localhost``) owned by ``state_dir``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"  # key, seed, log: 0700
        self.run_dir = self.root / "run"  # munge socket + pid: 0755 (munged insists)
        self.munge_socket = self.run_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.pid_files = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid",
                          "munged": self.run_dir / "munged.pid"}
        self._started: dict[str, int] = {}

    # -- environment and client commands ------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """os.environ minus any Slurm job variables, plus SLURM_CONF and the marker."""
        return self.client_env()

    def client_env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_"))}
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        env.update(SLURM_CONF=str(self.conf), **{MARKER: str(self.root)}, **extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, *args: str, cwd: str | Path | None = None, env: Mapping[str, str] | None = None) -> int:
        """Submit; returns the job id (``--parsable``)."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=self.client_env(env))
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (empty once the controller has forgotten the job)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_job(self, job_id: int, timeout: float = 120.0, poll: float = 0.2) -> dict[str, str]:
        """Poll until the job reaches a terminal state; returns its last record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {info}\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.log_dir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- life cycle ----------------------------------------------------------------------------

    def _daemon_pid(self, name: str) -> int | None:
        pid = _read_pid(self.pid_files[name])  # checked for our marker: a stale file may name a reused PID
        return pid if pid is not None and pid_running(pid) and _has_marker(pid, str(self.root)) else None

    def is_up(self) -> bool:
        """Controller answers, node is usable and the munge socket works."""
        if not self.conf.exists() or any(self._daemon_pid(n) is None for n in self.pid_files):
            return False
        ping = self.run("scontrol", "ping", check=False, timeout=15)
        if "UP" not in ping.stdout:
            return False
        state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False, timeout=15).stdout.strip()
        return state.rstrip("*~#$@") in ("idle", "mixed", "allocated", "completing")

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Bring the cluster up (idempotent: a live cluster in this state dir is reused).

        Raises:
            ClusterUnavailable: Slurm cannot be installed or a daemon does not come up (logs included).
        """
        if self.is_up():
            return self
        ensure_installed()
        self._kill_leftovers()  # a half-dead earlier cluster in this dir: its state would hold the node
        for sub in ("state", "spool", "log", "munge", "run"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants every directory above its socket searchable by all
        for sub, mode in (("state", 0o755), ("spool", 0o755), ("log", 0o755), ("munge", 0o700), ("run", 0o755)):
            (self.root / sub).mkdir(mode=mode)
            (self.root / sub).chmod(mode)
        self._write_conf()
        daemon_env = self.env
        try:
            self._start_munged(daemon_env)
            self._spawn("slurmctld", ["slurmctld", "-f", str(self.conf)], daemon_env)
            self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False, timeout=15).stdout,
                       timeout, "slurmctld did not answer `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-f", str(self.conf), "-N", "localhost"], daemon_env)
            self._wait(self._node_ready, timeout, "slurmd did not bring node localhost to idle")
        except ClusterUnavailable:
            self.stop(remove=False)
            raise
        return self

    def _write_conf(self) -> None:
        r = self.root
        conf = f"""\
# Generated by tests/helpers/slurm_cluster.py: a one-node cluster on localhost, state in {r}.
ClusterName=lomdm
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=600
FirstJobId={random.randint(1000, 19000)}
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
{_node_line()}
# `debug` (default) is preemptible: a job in `urgent` requeues it after its --signal and GraceTime.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=urgent Nodes=localhost MaxTime=INFINITE PriorityTier=10 PreemptMode=OFF
"""
        self.conf.write_text(conf)

    def _start_munged(self, env: dict[str, str]) -> None:
        key = self.munge_dir / "munge.key"
        self.run("mungekey", "--create", f"--keyfile={key}", env=env)
        key.chmod(0o400)
        self._spawn("munged", ["munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir}/munged.log",
                               f"--seed-file={self.munge_dir}/munged.seed"], env)

        def works() -> bool:
            enc = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, env=env)
            dec = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=enc.stdout,
                                 capture_output=True, env=env)
            return enc.returncode == 0 and dec.returncode == 0

        self._wait(works, 20, "munged does not answer on its socket")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        """Run a self-daemonizing command and remember the PID from its pid file."""
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
        if out.returncode != 0:
            raise ClusterUnavailable(f"{cmd[0]} failed to start ({out.returncode}): {out.stderr.strip()[-1500:]}\n"
                                     f"{self.log_tail()}")
        self._wait(lambda: self._daemon_pid(name) is not None, 20, f"{name} wrote no live pid file")
        self._started[name] = self._daemon_pid(name)  # type: ignore[assignment]

    def _node_ready(self) -> bool:
        state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).stdout.strip().rstrip("*~#$@")
        if state in ("down", "drained", "draining", "drain"):
            self.run("scontrol", "update", "NodeName=localhost", "State=RESUME", check=False)
        return state == "idle"

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise ClusterUnavailable(f"{what} within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, remove: bool = False) -> None:
        """Cancel the cluster's jobs, then end its daemons and any job process by PID."""
        if self._daemon_pid("slurmctld") is not None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.strip():
                    time.sleep(0.2)
        self._kill_leftovers()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        # Daemons in dependency order (nodes, controller, then munge), then stragglers: slurmstepd
        # outlives slurmd by design, and job processes would keep running.
        for name in ("slurmd", "slurmctld", "munged"):
            pids = {p for p in (self._started.pop(name, None), self._daemon_pid(name)) if p}
            _terminate(pids)
        _terminate(_pids_with_marker(str(self.root)), timeout=5)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.stderr.write("usage: slurm_cluster.py {start|stop} STATE_DIR\n")
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
