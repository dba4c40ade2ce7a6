"""The 1.3B model (owt_1b: 24 x 2048, vocab 50258, ~1.5B parameters with the heads) end to end on CPU.

    python bench/scale_1b.py                 # the full size (`make bench-scale`; ~1 h on 2 cores)
    python bench/scale_1b.py --small         # the same code path at 2 x 256 (minutes)

Layout: DeepSpeed ZeRO-3, bf16, DP = 2 (two gloo ranks under torchrun), the fp32 master weights
and Adam state offloaded to NVMe (`parallel.nvme_offload_dir`, ZeRO-Infinity), micro-batch 1,
sequence length 128, `optim.ema_decay=0`. Data: packed shards of the demo corpus (bench/common.py,
an 8k BPE written locally, nothing downloaded) under a model vocabulary of 50258 (GPT-2 + [MASK]).

Phases, each a fresh process launched by the project's own entry points:
    train      `python -m torch.distributed.run ... -m megatron_lomdm.train`: build, 2 LoMDM steps, save at step 2
    resume     the same command to step 4: load step 2, 2 more steps, save at step 4
    evaluate   `tools/evaluate.py --no-ema` on a few validation sequences
    export     `tools/convert_to_hf.py --no-ema --max-shard-size 1GB` (sharded safetensors)
    verify     the export loaded with `transformers` (trust_remote_code) in a fresh process, its
               logits compared with the native model rebuilt from the checkpoint
Per phase: wall time, peak RSS of every process (VmHWM, polled from /proc every 0.2 s: the
kernel's own high-water mark, so only a peak in a process's last 0.2 s could be missed) and the
sum over live processes (sampled), checkpoint size on disk; the training log gives build, step,
save and load times. Each peak is compared with the planner's prediction (apps/plan.py) plus the
RSS of a process that has only imported the stack (measured here, phase `baseline`).

Big files live under bench/_work/scale_1b[_small]/ and are deleted at the end unless --keep;
results go to that folder's results.json and to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORK, ensure_shards, environment, record  # noqa: E402

CONFIG = ROOT / "configs" / "experiments" / "owt_1b.yaml"
SEQ_LENGTH = 128
VOCAB = 50258  # GPT-2 + [MASK]
GiB = 1024**3
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------------
# memory of a process tree


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS (bytes) of a live process; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for key in ("VmHWM", "VmRSS"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return ""


@dataclass
class TreeMonitor:
    """Polls a process tree: each process's peak VmHWM (by depth and pid) and the peak of the summed RSS."""

    root: int
    interval: float = 0.2
    tick: Callable[[], None] | None = None  # called every poll (the resume phase's disk saver)
    peaks: dict[int, dict[str, Any]] = field(default_factory=dict)
    total_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _walk(self, pid: int, depth: int, parent: int) -> int:
        st = _status(pid)
        if not st:
            return 0
        entry = self.peaks.setdefault(pid, {"depth": depth, "parent": parent, "cmd": _cmdline(pid), "hwm": 0})
        entry["hwm"] = max(entry["hwm"], st.get("VmHWM", 0))
        return st.get("VmRSS", 0) + sum(self._walk(c, depth + 1, pid) for c in _children(pid))

    def run(self) -> None:
        while not self._stop.is_set():
            self.total_peak = max(self.total_peak, self._walk(self.root, 0, 0))
            if self.tick is not None:
                self.tick()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def run_phase(name: str, cmd: list[str], log: Path, timeout: float,
              tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `cmd` (cwd = repository root) with its tree monitored; returns rc, wall time and peaks."""
    print(f"[scale_1b] {name}: {' '.join(cmd)[:300]}", file=sys.stderr, flush=True)
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        mon = TreeMonitor(proc.pid, tick=tick)
        thread = threading.Thread(target=mon.run, daemon=True)
        thread.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        mon.stop()
        thread.join()
    wall = time.time() - t0
    procs = [{"pid": pid, **v} for pid, v in sorted(mon.peaks.items())]
    print(f"[scale_1b] {name}: rc {rc}, {wall:.0f} s, summed RSS peak {mon.total_peak / GiB:.2f} GiB",
          file=sys.stderr, flush=True)
    return {"rc": rc, "wall_s": wall, "total_rss_peak": mon.total_peak, "processes": procs, "log": str(log)}


def rank_peaks(phase: dict[str, Any]) -> list[int]:
    """Peak VmHWM of the torchrun workers (the launcher's children), in pid order (= rank order)."""
    procs = phase["processes"]
    launcher = [p for p in procs if p["depth"] == 0 and "torch.distributed.run" in p["cmd"]]
    workers = [p for p in procs if launcher and p["parent"] == launcher[0]["pid"]]
    return [p["hwm"] for p in workers]


def biggest(phase: dict[str, Any]) -> int:
    return max((p["hwm"] for p in phase["processes"]), default=0)


def tail(path: str | Path, n: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-n:]


# ---------------------------------------------------------------------------------------------
# the phases


def train_cmd(args: argparse.Namespace, run_dir: Path, nvme: Path, shards: Path, steps: int) -> list[str]:
    shape = ["model.num_layers=2", "model.hidden_size=256", "model.num_heads=4"] if args.small else []
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megatron_lomdm.train",
            "--config", str(CONFIG), f"data.train={shards}", f"model.seq_length={SEQ_LENGTH}",
            f"model.vocab_size={VOCAB}", *shape, "parallel.backend=deepspeed", "parallel.zero=3",
            f"parallel.nvme_offload_dir={nvme}", "train.precision=bf16", "train.micro_batch_size=1",
            "train.global_batch_size=2", f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0",
            "optim.ema_decay=0", "optim.warmup_steps=1", "checkpoint.interval=2", "checkpoint.keep_last=1",
            "tracking.enabled=false", f"run.dir={run_dir}"]


class DropConsumedNvmeState:
    """Once the resume log says it resumed, delete the step-2 checkpoint's NVMe optimizer state.

    Disk: at full size each checkpoint holds 18 GB of swap-file copies and the live swap folder
    24 GB; keeping step 2's copies while step 4 is written would need ~67 GB. The resumed process
    has read them by then (the model and small state of step 2 stay).
    """

    def __init__(self, log: Path, folder: Path) -> None:
        self.log, self.folder, self.done_at = log, folder, None

    def __call__(self) -> None:
        if self.done_at is None and self.log.exists() and "resumed from" in self.log.read_text(errors="replace"):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.done_at = time.time()


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_comparison(resumed: list[dict[str, Any]], straight: list[dict[str, Any]]) -> dict[str, Any]:
    """Training losses per step of the resumed run and of the uninterrupted one."""
    def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
        return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and "step" in r}

    a, b = losses(resumed), losses(straight)
    steps = sorted(set(a) & set(b))
    return {"steps": steps, "resumed": [a[s] for s in steps], "straight": [b[s] for s in steps],
            "max_abs_diff": max((abs(a[s] - b[s]) for s in steps), default=None)}


_TIMED = re.compile(r"(\d\d):(\d\d):(\d\d) \[rank0\] INFO ([\w.]+): (.*)")


def log_events(log: Path) -> list[tuple[float, str]]:
    """(seconds of day, message) of rank 0's INFO lines."""
    out = []
    for line in Path(log).read_text(errors="replace").splitlines():
        m = _TIMED.search(line)
        if m:
            h, mi, s = (int(x) for x in m.groups()[:3])
            out.append((h * 3600 + mi * 60 + s, m.group(5)))
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def checkpoint_sizes(run_dir: Path) -> dict[str, Any]:
    """On-disk bytes of each checkpoint folder and of its parts (dist/ model, DeepSpeed / NVMe state)."""
    out: dict[str, Any] = {}
    root = run_dir / "checkpoints"
    for ck in sorted(p for p in root.glob("*") if p.is_dir()) if root.exists() else []:
        parts = {p.name: dir_bytes(p) for p in ck.iterdir() if p.is_dir()}
        out[ck.name] = {"total": dir_bytes(ck), **parts}
    return out


VERIFY = r"""
import json, sys, torch
from pathlib import Path
from megatron_lomdm.apps.hf_export import (native_model_from_dist, native_outputs, native_session,
                                           run_fresh_process, verification_batch)
from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.config import load_config
run_dir, export = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(run_dir / "config.yaml")
m = cfg.model
batch = verification_batch(vocab_size=m.vocab_size, mask_id=m.mask_id, pad_id=m.pad_id,
                           seq_length=m.seq_length, seed=cfg.train.seed)
hf = run_fresh_process(export, batch)  # transformers, trust_remote_code, no project import
ckpt = CheckpointManager.reader(run_dir / "checkpoints")
folder = ckpt.folder(ckpt.latest_step())
with native_session(cfg.train.seed):
    model = native_model_from_dist(cfg, folder)
    ref = native_outputs(model, batch)
diff = {k: float((hf[k] - v).abs().max()) for k, v in ref.items()}
scale = {k: float(v.abs().max()) for k, v in ref.items()}
print("VERIFY " + json.dumps({"max_abs_diff": diff, "max_abs_native": scale, "batch": list(batch["input_ids"].shape)}))
"""

BASELINE = r"""
import re, resource
from pathlib import Path
import torch, deepspeed  # noqa: F401
from megatron_lomdm.training import build, loop  # noqa: F401
from megatron_lomdm.distributed import deepspeed_engine  # noqa: F401
text = Path("/proc/self/status").read_text()
print("BASELINE", int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024)
"""


def planner(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    """The planner's per-rank figures for this run's config and layout (DP 2, DeepSpeed ZeRO-3, NVMe)."""
    from megatron_lomdm.apps import plan
    from megatron_lomdm.config import load_config

    shape = ["model.num_layers=2", "model.hidden_size=256", "model.num_heads=4"] if args.small else []
    cfg = load_config(CONFIG, [f"data.train={shards}", f"model.seq_length={SEQ_LENGTH}", f"model.vocab_size={VOCAB}",
                               *shape, "parallel.backend=deepspeed", "parallel.zero=3", "train.precision=bf16",
                               "train.micro_batch_size=1", "train.global_batch_size=2", "optim.ema_decay=0"])
    m = plan.model_plan(cfg)
    lay = plan.Layout(tp=1, pp=1, dp=2, backend="deepspeed", zero=3, micro_batch_size=1, recompute=m.recompute,
                      attention="local")
    n = plan.stage_params(m, 1, 1, 0)
    st = plan.state_bytes(n, "deepspeed", 3, 2, bf16=True, ema=False, offload="nvme")
    act = plan.activation_bytes(m, lay)
    return {"num_params": n, "state": {k: getattr(st, k) for k in ("params", "grads", "optimizer", "ema", "nvme")},
            "state_total": st.total, "activation_peak": act.peak, "model_bf16": 2 * n, "model_fp32": 4 * n,
            "build": plan.build_bytes(m, lay), "build_unpartitioned": plan.build_bytes(m, lay, partitioned=False),
            "recompute": m.recompute}


def predictions(p: dict[str, Any], baseline: int) -> dict[str, float]:
    """Peak RSS per process and phase: the import baseline + the planner's bytes for what that phase holds.

    train/resume rank: baseline + what a rank holds while building its partitioned model
        (`plan.build_bytes`: its backbone partition, the heads whole, the LM head's init draw), or the
        ZeRO-3 + NVMe state (bf16 parameter and gradient partitions, swap buffers) + activations
        (steps); the saving rank (DP rank 0) adds one full bf16 copy (`_save_zero3_model`).
    evaluate: under torchrun on the run's layout (DeepSpeed loads its partitions only there): a
        training rank's build and resident state.
    export: baseline + the fp32 state dict the export writes + one 1 GB shard's bytes.
    verify: the native fp32 model + baseline (the HF process is a separate process, the same size).
    """
    b = baseline
    step = b + p["state_total"] + p["activation_peak"]
    return {"build": b + p["build"], "step": step, "save_rank0": step + p["model_bf16"],
            "evaluate": max(b + p["build"], step), "export": b + p["model_fp32"] + min(GiB, p["model_fp32"]),
            "verify": b + p["model_fp32"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2 x 256 instead of 24 x 2048 (same code path)")
    ap.add_argument("--keep", action="store_true", help="keep the run, checkpoints, NVMe files and the export")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per phase")
    args = ap.parse_args(argv)
    work = WORK / ("scale_1b_small" if args.small else "scale_1b")
    if work.exists():
        shutil.rmtree(work)
    run_dir, nvme, export, logs = work / "run", work / "nvme", work / "hf", work / "logs"
    for d in (nvme, logs):
        d.mkdir(parents=True)
    shards = ensure_shards(SEQ_LENGTH, 8192)
    pl = planner(args, shards)
    res: dict[str, Any] = {"size": "small (2 x 256)" if args.small else "owt_1b (24 x 2048)", "planner": pl,
                           "phases": {}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    phases = res["phases"]
    base = subprocess.run([PY, "-c", BASELINE], cwd=ROOT, env=ENV, capture_output=True, text=True)
    baseline = int(base.stdout.split("BASELINE")[-1]) if "BASELINE" in base.stdout else 0
    res["baseline_rss"] = baseline
    res["predicted"] = predictions(pl, baseline)
    try:
        phases["train"] = run_phase("train", train_cmd(args, run_dir, nvme, shards, 2), logs / "train.log",
                                    args.timeout)
        if phases["train"]["rc"]:
            raise RuntimeError(f"train failed:\n{tail(logs / 'train.log')}")
        res["after_train"] = {"checkpoints": checkpoint_sizes(run_dir), "nvme_bytes": dir_bytes(nvme)}
        dropper = DropConsumedNvmeState(logs / "resume.log",
                                        run_dir / "checkpoints" / "step_0000002" / "deepspeed" / "nvme_state")
        phases["resume"] = run_phase("resume", train_cmd(args, run_dir, nvme, shards, 4), logs / "resume.log",
                                     args.timeout, tick=dropper)
        res["dropped_step2_nvme_state"] = dropper.done_at is not None
        if phases["resume"]["rc"]:
            raise RuntimeError(f"resume failed:\n{tail(logs / 'resume.log')}")
        res["metrics"] = metrics(run_dir)
        if args.small:  # the resume must reproduce an uninterrupted run exactly (affordable at this size)
            straight, nvme2 = work / "straight", work / "nvme_straight"
            nvme2.mkdir()
            phases["straight"] = run_phase("straight", train_cmd(args, straight, nvme2, shards, 4),
                                           logs / "straight.log", args.timeout)
            res["resume_vs_straight"] = loss_comparison(res["metrics"], metrics(straight))
            shutil.rmtree(nvme2, ignore_errors=True)
            shutil.rmtree(straight / "checkpoints", ignore_errors=True)
        res["checkpoints"] = checkpoint_sizes(run_dir)
        res["nvme_bytes"] = dir_bytes(nvme)
        # the run's own layout (DeepSpeed refuses its ZeRO partitions on another DP size)
        torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        phases["evaluate"] = run_phase("evaluate", [*torchrun, "tools/evaluate.py", "--run-dir", str(run_dir), "--no-ema",
                                                    "--max-sequences", "4", "--micro-batch-size", "1", "--t-draws", "1",
                                                    "--no-hash", "--out", str(work / "eval.json")],
                                       logs / "evaluate.log", args.timeout)
        phases["export"] = run_phase("export", [PY, "tools/convert_to_hf.py", "--run-dir", str(run_dir), "--output",
                                                str(export), "--no-ema", "--max-shard-size", "1GB"],
                                     logs / "export.log", args.timeout)
        res["export_files"] = {f.name: f.stat().st_size for f in sorted(export.glob("*.safetensors*"))} \
            if export.exists() else {}
        if export.exists():
            phases["verify"] = run_phase("verify", [PY, "-c", VERIFY, str(run_dir), str(export)],
                                         logs / "verify.log", args.timeout)
            line = [x for x in Path(logs / "verify.log").read_text().splitlines() if x.startswith("VERIFY ")]
            res["verify"] = json.loads(line[-1][7:]) if line else None
        if (work / "eval.json").exists():
            res["evaluation"] = json.loads((work / "eval.json").read_text())
    except RuntimeError as err:
        res["error"] = str(err)
        print(f"[scale_1b] {err}", file=sys.stderr)
    finally:
        res["events"] = {name: log_events(logs / f"{name}.log") for name in ("train", "resume")
                         if (logs / f"{name}.log").exists()}
        (work.parent / f"{work.name}_results.json").write_text(json.dumps(res, indent=1, default=str))
        if not args.keep:
            for d in (run_dir / "checkpoints", nvme, export):
                shutil.rmtree(d, ignore_errors=True)
    summary(res)
    record(f"scale_1b/{'small' if args.small else 'full'}",
           {"phases": {k: {x: v[x] for x in ("rc", "wall_s", "total_rss_peak")} | {"rank_peaks": rank_peaks(v)}
                       for k, v in res["phases"].items()}, "predicted_rss": res["predicted"],
            "checkpoints": res.get("checkpoints"), "verify": res.get("verify"), "error": res.get("error")},
           env=environment())
    return res


def summary(res: dict[str, Any]) -> None:
    """One line per phase: wall time, peak per process vs the prediction."""
    pred = res["predicted"]
    print(f"scale_1b {res['size']}: {res['planner']['num_params'] / 1e9:.3f}B parameters, "
          f"import baseline {res['baseline_rss'] / GiB:.2f} GiB")
    for name, ph in res["phases"].items():
        ranks = rank_peaks(ph)
        peaks = ranks or [biggest(ph)]
        print(f"  {name:<9} rc {ph['rc']:>3}  {ph['wall_s']:7.0f} s  peak RSS " +
              " / ".join(f"{x / GiB:.2f}" for x in peaks) + f" GiB  (sum {ph['total_rss_peak'] / GiB:.2f} GiB)")
    print("  predicted per process (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in pred.items()))
    if res.get("resume_vs_straight"):
        print(f"  resumed vs uninterrupted losses: {res['resume_vs_straight']}")
    if res.get("verify"):
        print(f"  HF vs native max |diff|: {res['verify']['max_abs_diff']}")
    if res.get("error"):
        print(f"  FAILED: {res['error'][:2000]}")


if __name__ == "__main__":
    main()
