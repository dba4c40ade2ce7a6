#!/usr/bin/env python
"""Bytes per parameter of model states at DP=2, by enumerating tensors (performance.md §A2, §B2.5).

Layouts: megatron DDP + Adam (ZeRO-0), megatron distributed optimizer (ZeRO-1), DeepSpeed ZeRO-1/2/3
(`parallel.backend=deepspeed`). Each layout is one `torchrun --nproc_per_node 2` launch of this
file with `--worker`, which builds the run with `build_run`, takes one training step (optimizer
state exists only after the first update) and counts this rank's distinct tensor storages:

* params: the parameters' storages (megatron: the DDP param buffers; ZeRO-3: the local partitions);
* grads: megatron's `main_grad` buffers (fp32, `grad_reduce_in_fp32`); DeepSpeed: its gradient
  partitions at their peak within the first step (what `deepspeed_engine.model_state_bytes` sees);
* optimizer: fp32 master copies (when parameters are not fp32) + Adam m, v.

Views of one flat buffer count once, padding included; communication buckets are not model state.
Theory (§A2), per element sizes P (params), G (grads), K (Adam m + v, + fp32 master: always under
DeepSpeed, on megatron only when P != 4), Nd = 2:
ZeRO-0 P+G+K; ZeRO-1 P+G+K/Nd; ZeRO-2 P+(G+K)/Nd; ZeRO-3 (P+G+K)/Nd. Megatron keeps fp32 gradient
buffers, so its bf16 rows are §A2's "bf16 / fp32" (18 and 6 + 12/d).

The parent prints a table and appends one JSON line per layout to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, ROOT, WORK, Progress, config_hash, ensure_shards, environment, make_config,  # noqa: E402
                    record)

LAYOUTS = [("megatron", 0), ("megatron", 1), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def theory(stage: int, dp: int, p: int, g: int, k: int) -> dict[str, float]:
    params = p / dp if stage >= 3 else p
    grads = g / dp if stage >= 2 else g
    optim = k / dp if stage >= 1 else k
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def _storages(tensors, seen: set[int]) -> int:
    import torch

    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def megatron_bytes(engine) -> dict[str, float]:
    """Enumerate the megatron engine's tensors: DDP param/grad buffers, master shards, Adam state."""
    ddp, opt = engine.module, engine.optimizer
    params = list(ddp.module.parameters())
    seen: set[int] = set()
    out = {"num_params": float(sum(p.numel() for p in params))}
    out["params"] = float(_storages([p.data for p in params], seen))
    out["grads"] = float(_storages([getattr(p, "main_grad", None) for p in params] + [p.grad for p in params], seen))
    inner = getattr(opt, "chained_optimizers", [opt])
    tensors = []
    for o in inner:
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups", "shard_fp32_groups"):
            for group in getattr(o, attr, None) or []:
                tensors += list(group)
        torch_opt = o.optimizer
        tensors += [p for g in torch_opt.param_groups for p in g["params"]]
        tensors += [v for st in torch_opt.state.values() for v in st.values() if getattr(v, "dim", lambda: 0)() > 0]
    out["optimizer"] = float(_storages(tensors, seen))
    return out


def deepspeed_bytes(engine) -> dict[str, float]:
    """The DeepSpeed engine's own enumeration, with gradients at their peak in the first step."""
    from megatron_lomdm.distributed.deepspeed_engine import model_state_bytes

    recorded = getattr(engine, "state_bytes", None)
    recorded = recorded() if callable(recorded) else recorded
    now = model_state_bytes(engine)
    if isinstance(recorded, dict):  # gradients at their peak within the first step (the engine tracks it)
        now["grads"] = max(now["grads"], recorded["grads"])
    return {k: now[k] for k in ("num_params", "params", "grads", "optimizer")}


def worker(args: argparse.Namespace) -> None:
    import torch

    from megatron_lomdm.training.build import build_run
    from megatron_lomdm.training.loop import train_step

    torch.set_num_threads(1)
    extra = [f"parallel.backend={args.backend}", f"parallel.zero={args.zero}", f"train.precision={args.precision}",
             "parallel.overlap_grad_reduce=false"]
    cfg = make_config("lomdm" if args.family == "lomdm" else args.family, Path(args.shards),
                      num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads, batch=args.batch,
                      run_dir=WORK / "runs" / f"zero_{args.backend}{args.zero}_{args.precision}", extra=extra)
    from megatron_lomdm.config.load import replace

    # two micro-batches per DP rank: after the first backward ZeRO-1/2 still hold their gradient peak
    cfg = replace(cfg, train={"global_batch_size": 4 * args.batch})
    run = build_run(cfg)
    if args.backend == "deepspeed" and args.zero == 3:
        # EMA.update() (called by train_step even at optim.ema_decay=0) reads full parameters, which
        # ZeRO-3 has partitioned (size-0 local tensors): skip it; the EMA is not model state here.
        run.ema.update = lambda: None
    metrics = train_step(run)
    counts = megatron_bytes(run.engine) if args.backend == "megatron" else deepspeed_bytes(run.engine)
    if run.info.rank == 0:
        print("RESULT " + json.dumps({**counts, "loss": metrics["loss"], "config_hash": config_hash(cfg),
                                      "dp": run.info.dp}), flush=True)
    run.close()


def launch(backend: str, zero: int, args: argparse.Namespace, shards: Path) -> dict | str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
           __file__, "--worker", "--backend", backend, "--zero", str(zero), "--precision", args.precision,
           "--shards", str(shards), "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--heads", str(args.heads), "--batch", str(args.batch), "--family", args.family]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return f"failed (rc {proc.returncode}): {tail}"
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--backend", default="megatron")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--family", default="mdlm")
    p.add_argument("--shards", default="")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--layouts", nargs="*", default=None, help="e.g. megatron:1 deepspeed:3")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    shards = ensure_shards()
    layouts = [(x.split(":")[0], int(x.split(":")[1])) for x in args.layouts] if args.layouts else LAYOUTS
    engine_file = ROOT / "megatron_lomdm" / "distributed" / "deepspeed_engine.py"
    env = environment()
    pbytes = 2 if args.precision == "bf16" else 4
    rows = []
    progress = Progress("zero_memory", len(layouts))
    for backend, zero in layouts:
        progress.step(f"{backend} ZeRO-{zero}, {args.precision}, DP=2")
        # megatron reduces gradients in fp32 buffers whatever the parameter dtype; DeepSpeed in the param dtype
        g = 4 if backend == "megatron" else pbytes
        # Adam m + v, + an fp32 master copy: DeepSpeed's ZeRO optimizers always keep one (fp32 params
        # too); megatron only when the params are not fp32 (fp32 params are their own master)
        k = 12 if backend == "deepspeed" or pbytes != 4 else 8
        th = theory(zero, 2, pbytes, g, k)
        name = f"zero_bytes_per_param/{backend}_zero{zero}_{args.precision}"
        if backend == "deepspeed" and not engine_file.exists():
            res: dict | str = "not measured: engine missing"
        else:
            res = launch(backend, zero, args, shards)
        if isinstance(res, str):
            rows.append(record(name, {"status": res, "theory_per_param": th}, predicted=th["total"],
                               out=Path(args.out) if args.out else None, env=env))
            continue
        n = res["num_params"]
        per = {k2: res[k2] / n for k2 in ("params", "grads", "optimizer")}
        per["total"] = sum(per.values())
        band = (th["total"] * 0.98, th["total"] * 1.02)
        rows.append(record(name, {"ratio": per["total"], "per_param": per, "theory_per_param": th,
                                  "num_params_per_rank": n, "dp": res["dp"], "loss": res["loss"],
                                  "status": "measured"},
                           predicted=th["total"], band=band, cfg_hash=res["config_hash"],
                           out=Path(args.out) if args.out else None, env=env))
    print(f"{'layout':<44} {'params':>7} {'grads':>7} {'optim':>7} {'total':>7}   theory (P+G+K)")
    for r in rows:
        th = r["theory_per_param"]
        tht = f"{th['params']:.2f}+{th['grads']:.2f}+{th['optimizer']:.2f}={th['total']:.2f}"
        if r.get("status") != "measured":
            print(f"{r['bench']:<44} {r['status'][:60]}   {tht}")
            continue
        pp = r["per_param"]
        print(f"{r['bench']:<44} {pp['params']:>7.2f} {pp['grads']:>7.2f} {pp['optimizer']:>7.2f} {pp['total']:>7.2f}"
              f"   {tht}")
    return rows


if __name__ == "__main__":
    main()
