"""The Slurm launchers on a real one-node Slurm cluster (tests/helpers/slurm_cluster.py).

`sbatch slurm/train.sh` with two CPU tasks (gloo) reproduces the one-process losses; a batch-shell
USR1 makes it checkpoint, requeue itself (SLURM_RESTART_COUNT 0 -> 1) and resume to the same losses
as an uninterrupted run; `slurm/submit.py` trains through submitit's local executor and through
Slurm, where its signal (USR2) goes through the Checkpointable requeue and resumes too.
Reference losses come from `python -m megatron_lomdm.train` in one process, in this session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import zygote
from tests.helpers.slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/experiments/tiny_cpu.yaml"
LONG_STEPS = 50  # long enough that a signal sent at step 3 lands mid-run, short enough for 2 cores


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               LOMDM_PYTHON=sys.executable, **extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    # /tmp, not pytest's 0700 tmp dirs: munged wants every directory above its socket searchable.
    state = Path(tempfile.mkdtemp(prefix="lomdm-slurm-", dir="/tmp"))
    c = SlurmCluster(state)
    try:
        c.start()
    except ClusterUnavailable as err:
        c.stop(remove=True)
        pytest.skip(f"no Slurm cluster on this machine: {err}")
    try:
        yield c
    finally:
        c.stop()
        if c.log_dir.exists():  # keep the daemon logs with the test's tmp files
            shutil.copytree(c.log_dir, tmp_path_factory.mktemp("slurm-logs"), dirs_exist_ok=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """steps -> per-step losses of an uninterrupted one-process run (computed once per length)."""
    cache: dict[int, list[float]] = {}

    def get(steps: int) -> list[float]:
        if steps not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref{steps}")
            cmd = [sys.executable, "-m", "megatron_lomdm.train", "--config", TINY, f"run.dir={run_dir}",
                   f"data.train={tiny_shards}", f"train.steps={steps}", "checkpoint.interval=0"]
            out = zygote.run(cmd, env=_env(), cwd=ROOT, timeout=300)  # the reference, not under test: forked
            assert out.returncode == 0, out.stderr[-3000:]
            cache[steps] = losses(run_dir)
        return cache[steps]

    return get


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind", "train") == "train"]


def losses(run_dir: Path) -> list[float]:
    rec = records(run_dir)
    assert [r["step"] for r in rec] == list(range(1, len(rec) + 1)), "steps missing or repeated"
    return [r["loss"] for r in rec]


def launch_records(run_dir: Path, suffix: str = ".txt") -> list[dict[str, str]]:
    """The `key: value` header of every launch record (train.sh's, or submit.py's task starts)."""
    out = []
    for path in sorted((run_dir / "launch").glob(f"*{suffix}")):
        head = path.read_text().split("--- resolved config ---")[0]
        out.append(dict(re.findall(r"^(\w+): ?(.*)$", head, flags=re.M)))
    return out


def wait_for_steps(run_dir: Path, n: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while len(records(run_dir)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} steps in {run_dir} after {timeout:.0f} s"
        assert alive(), "the job ended before reaching the signal point"
        time.sleep(0.05)


def sbatch_train(cluster: SlurmCluster, tmp: Path, run_dir: Path, shards: Path, *overrides: str,
                 ntasks: int = 2) -> int:
    return cluster.sbatch("-O", f"--ntasks={ntasks}", f"--output={tmp}/slurm-%j.out",
                          "slurm/train.sh", "--config", TINY, f"run.dir={run_dir}", f"data.train={shards}",
                          *overrides, cwd=ROOT, env=_env())


def job_log(tmp: Path, job_id: int) -> str:
    path = tmp / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_sbatch_train_two_tasks(cluster: SlurmCluster, reference, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = sbatch_train(cluster, tmp_path, run_dir, tiny_shards, "train.steps=6")
    info = cluster.wait_job(job, timeout=180)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert losses(run_dir) == pytest.approx(reference(6), rel=1e-5)
    assert "world=2" in log and "dp=2" in log, log[-3000:]  # really two ranks, data-parallel
    [rec] = launch_records(run_dir)
    assert rec["job_id"] == str(job) and rec["restart_count"] == "0" and rec["ntasks"] == "2"
    assert rec["git_rev"]  # a revision, or `unknown` outside a git checkout


def test_sbatch_bad_config_fails_without_requeue(cluster: SlurmCluster, tiny_shards: Path, tmp_path: Path) -> None:
    job = sbatch_train(cluster, tmp_path, tmp_path / "run", tiny_shards, "train.no_such_key=1", ntasks=1)
    info = cluster.wait_job(job, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, job_log(tmp_path, job))
    assert info["Restarts"] == "0"
    assert "no_such_key" in job_log(tmp_path, job)


def test_sbatch_preempt_requeue_resume(cluster: SlurmCluster, reference, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = sbatch_train(cluster, tmp_path, run_dir, tiny_shards, f"train.steps={LONG_STEPS}",
                       "checkpoint.interval=0")  # only the signal (and the end) save
    wait_for_steps(run_dir, 3, timeout=120, alive=lambda: cluster.job(job).get("JobState") in ("PENDING", "RUNNING"))
    # What Slurm does before a time limit (--signal=B:USR1@...): signal the batch shell.
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait_job(job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", (info, log[-4000:])
    assert [r["restart_count"] for r in launch_records(run_dir)] == ["0", "1"]
    assert {r["job_id"] for r in launch_records(run_dir)} == {str(job)}  # same job, same run dir
    assert "caught SIGUSR1" in log and "exited with 3" in log, log[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and 3 <= int(resumed.group(1)) < LONG_STEPS, log[-4000:]
    assert losses(run_dir) == pytest.approx(reference(LONG_STEPS), rel=1e-5)


def test_partition_preemption_requeues(cluster: SlurmCluster, tiny_shards: Path, tmp_path: Path) -> None:
    """Real preemption: a job in the higher-tier partition `urgent` takes the node. Slurm sends the
    job's --signal (preempt_send_user_signal): checkpoint, requeue, resume after the urgent job."""
    run_dir, steps = tmp_path / "run", 100
    job = sbatch_train(cluster, tmp_path, run_dir, tiny_shards, f"train.steps={steps}", "checkpoint.interval=0")
    wait_for_steps(run_dir, 3, timeout=120, alive=lambda: cluster.job(job).get("JobState") in ("PENDING", "RUNNING"))
    urgent = cluster.sbatch("--partition=urgent", "--exclusive", "--ntasks=1", f"--output={tmp_path}/urgent.out",
                            "--wrap", "echo urgent ran", cwd=tmp_path, env=_env())
    info = cluster.wait_job(job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    assert cluster.job(urgent).get("JobState") == "COMPLETED"
    assert "caught SIGUSR1" in log and "exited with 3" in log, log[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and 3 <= int(resumed.group(1)) < steps, log[-4000:]
    assert [r["restart_count"] for r in launch_records(run_dir)] == ["0", "1"]
    assert len(losses(run_dir)) == steps  # every step exactly once across the two runs


def submit(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "slurm/submit.py", "--config", TINY, *args], cwd=ROOT,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_submitit_local_and_slurm(cluster: SlurmCluster, reference, tiny_shards: Path, tmp_path: Path) -> None:
    # Local executor, two tasks (gloo through TorchDistributedEnvironment).
    local = tmp_path / "local"
    out = finish(submit("--local", "--cpu-tasks", "2", "--wait", f"run.dir={local}",
                        f"data.train={tiny_shards}", "train.steps=6"))
    assert "task results [0, 0]" in out, out[-3000:]
    assert losses(local) == pytest.approx(reference(6), rel=1e-5)
    [snap] = launch_records(local, "-submit.txt")
    assert snap["executor"] == "local" and snap["git_rev"]

    # The real cluster, preempted by submitit's signal (USR2) mid-run: Checkpointable requeue, resume.
    remote = tmp_path / "slurm"
    proc = submit("--cpu-tasks", "2", "--wait", "--time-min", "60", f"run.dir={remote}",
                  f"data.train={tiny_shards}", f"train.steps={LONG_STEPS}", "checkpoint.interval=0",
                  env=cluster.client_env(_env()))
    wait_for_steps(remote, 3, timeout=120, alive=lambda: proc.poll() is None)
    [snap] = launch_records(remote, "-submit.txt")
    job = int(re.search(r"job_id: (\d+)", (next((remote / "launch").glob("*-submit.txt"))).read_text()).group(1))
    assert snap["executor"] == "slurm"
    cluster.run("scancel", "--signal=USR2", str(job))
    out = finish(proc)
    assert "task results [0, 0]" in out, out[-3000:]
    starts = launch_records(remote, "-task.txt")
    assert [r["restart_count"] for r in starts] == ["0", "1"] and {r["job_id"] for r in starts} == {str(job)}
    assert losses(remote) == pytest.approx(reference(LONG_STEPS), rel=1e-5)


def test_submit_bad_config_fails_fast(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "slurm/submit.py", "--config", TINY, "--local", "train.no_such_key=1",
                          f"run.dir={tmp_path / 'run'}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "no_such_key" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


@pytest.mark.parametrize("recipe,config", [("owt_1b", "owt_1b"), ("owt_small", "owt_small"),
                                           ("lm1b_small", "lm1b_small")])
def test_recipes_are_wired(recipe: str, config: str) -> None:
    """The recipe scripts parse, carry the requeue/signal directives and name a config that resolves."""
    script = ROOT / "slurm" / f"{recipe}.sh"
    for path in (script, ROOT / "slurm" / "train.sh"):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    text = script.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    assert f"configs/experiments/{config}.yaml" in text and "slurm/train.sh" in text
    out = subprocess.run([sys.executable, "-m", "megatron_lomdm.train", "--config",
                          f"configs/experiments/{config}.yaml", "--print-config"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_recipe_runs_with_resource_overrides(cluster: SlurmCluster, tiny_shards: Path, tmp_path: Path) -> None:
    """`sbatch [overrides] slurm/owt_small.sh k=v ...` reaches train.sh with the recipe's config."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                         "--mem=500", "--exclusive=user", f"--output={tmp_path}/slurm-%j.out", "slurm/owt_small.sh",
                         f"run.dir={run_dir}", f"data.train={tiny_shards}", "train.steps=1", "model.num_layers=1",
                         "model.hidden_size=32", "model.num_heads=2", "model.seq_length=32",
                         "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32",
                         "train.eval_interval=0", "tracking.enabled=false", cwd=ROOT, env=_env())
    info = cluster.wait_job(job, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job_log(tmp_path, job)[-3000:])
    [rec] = launch_records(run_dir)
    assert "configs/experiments/owt_small.yaml" in rec["args"]
    assert len(records(run_dir)) == 1
