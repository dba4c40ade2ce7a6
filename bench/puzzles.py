#!/usr/bin/env python
"""Logic-puzzle benchmark (`make bench-puzzles`, not in CI): Sudoku accuracy per decoder and number of steps T.

Kim et al. (ICML 2025) show that on Sudoku the decoding order matters more than the model: the
same MDM solves 6.88% of puzzles with random-order (vanilla) decoding and 89.49% with the
top-probability-margin oracle. This benchmark measures, at CPU scale, on one generated data set:

1. data: `tools/make_puzzles.py sudoku` (verified, unique solutions, test never shares a solution
   with train), then `tools/preprocess_data.py --ids-key tokens`: in-place rows [BOS] + 81 cells +
   [EOS] with the givens conditioned (docs/puzzles.md);
2. training through the CLI (`python -m megatron_lomdm.train --config configs/experiments/sudoku_cpu.yaml`):
   MDLM and LoMDM with the same backbone, data, batch and steps, and LoMDM again at MDLM's FLOPs
   (`lomdm_eqc`: steps x FLOPs(MDLM step) / FLOPs(LoMDM step), utils/flops.py);
3. decoding the test split with every decoder at every T (`--grid`): on MDLM vanilla (its
   ancestral sampler: random order), top_prob, top_margin, top_margin with Gumbel noise 0.5 on the
   score, remask (top_margin + confidence-drop remasking); on LoMDM its ancestral sampler (the
   learned reverse order, no oracle), lomdm_top_margin and top_margin;
4. whole-puzzle accuracy (`exact`; `valid` checks the constraints independently) and cell accuracy
   (puzzles/metrics.py) per decoder x T, a plot of accuracy vs T, and a picture of LoMDM's learned
   order: the forward (clean x) and initial reverse (the puzzle) exponent of each blank cell against
   the number of digits its givens leave possible (1 = a naked single).

Outputs under --out-dir (default bench/_work/puzzles): puzzles.md, puzzles.json, puzzles_accuracy.png;
per run RUN/decode.json and, for LoMDM runs, RUN/order/puzzle_order.png (also logged to the run's
MLflow run when it is tracked); bench/figures/puzzles_accuracy_<date>.png and
puzzles_lomdm_order_<date>.png; one JSON line per run in bench/results.jsonl. Wall and CPU seconds of every stage
(generation, preprocessing, each run's training and decoding) go into puzzles.md and puzzles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORK, environment, record  # noqa: E402
from learning import run_all  # noqa: E402

CONFIG = "configs/experiments/sudoku_cpu.yaml"
LOMDM = ["diffusion.name=lomdm", "diffusion.c1=0.7", "diffusion.c2=0.65"]
VARIANTS = {"mdlm": ["diffusion.name=mdlm"], "lomdm": LOMDM, "lomdm_eqc": LOMDM}
# per model: (row label, sampler, options)
DECODERS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "mdlm": [("vanilla", "ancestral", {}), ("top_prob", "top_prob", {}), ("top_margin", "top_margin", {}),
             ("top_margin+gumbel0.5", "top_margin", {"noise_scale": 0.5}), ("remask", "remask", {})],
    "lomdm": [("lomdm_ancestral", "ancestral", {}), ("lomdm_top_margin", "lomdm_top_margin", {}),
              ("top_margin", "top_margin", {})],
    "lomdm_eqc": [("lomdm_ancestral", "ancestral", {}), ("lomdm_top_margin", "lomdm_top_margin", {})],
}
NUM_CELLS = 81


def timed(cmd: list[str], path: Path | None = None) -> dict[str, float]:
    """Run `cmd` to completion (raising on failure); its wall and CPU seconds (user + system of it and
    its children), written to `path` as JSON when given."""
    t0, ru0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, check=True, stderr=subprocess.DEVNULL if path is None else None)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = {"wall_s": round(time.time() - t0, 1),
            "cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1)}
    if path is not None:
        path.write_text(json.dumps(cost) + "\n")
    return cost


def make_data(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, dict[str, float]]]:
    """Puzzles and their in-place shards (kept between runs of the same settings), and what each stage
    cost here (empty for a stage whose output was already there)."""
    d = Path(args.data_dir) if args.data_dir else out / f"sudoku_g{args.givens.replace(':', '-')}_n{args.train}_s{args.data_seed}"
    stages: dict[str, dict[str, float]] = {}
    if not (d / "shards" / "manifest.json").exists():
        if not (d / "manifest.json").exists():
            stages["generate"] = timed([sys.executable, "tools/make_puzzles.py", "sudoku", "--out", str(d), "--train",
                                        str(args.train), "--valid", str(args.valid), "--test", str(args.test),
                                        "--givens", args.givens, "--seed", str(args.data_seed), "--force"])
        stages["preprocess"] = timed([sys.executable, "tools/preprocess_data.py", "--input", str(d / "train.jsonl"),
                                      str(d / "valid.jsonl"), "--tokenizer", str(d / "tokenizer"), "--seq-length", "83",
                                      "--layout", "padded", "--ids-key", "tokens", "--valid-last-docs", str(args.valid),
                                      "--workers", "0", "--no-progress", "--overwrite", "--output-dir",
                                      str(d / "shards")])
    return d, stages


def flop_ratio(args: argparse.Namespace) -> float:
    """FLOPs of a LoMDM step / an MDLM step at this shape (K = 2 corruptions, clean pass, heads)."""
    from megatron_lomdm.utils.flops import Shape, step_flops

    s = Shape(args.layers, args.hidden, 4 * args.hidden, 14, 83)
    lomdm = step_flops(s, unique_sequences=args.batch, num_corruptions=2, clean_pass=True, heads=True)
    return lomdm / step_flops(s, unique_sequences=args.batch, num_corruptions=1, clean_pass=False, heads=False)


def train_command(name: str, steps: int, args: argparse.Namespace, data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_lomdm.train", "--config", args.config, *VARIANTS[name],
            f"data.train={data / 'shards'}", f"run.dir={run_dir}", f"run.name=puzzles_{name}", f"train.seed={args.seed}",
            f"train.steps={steps}", f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
            f"train.lr={args.lr}", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_heads={args.heads}", f"tracking.enabled={'true' if args.track else 'false'}",
            *args.extra]


def decode_command(name: str, run_dir: Path, data: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "bench/puzzles.py", "--decode", str(run_dir), "--decode-model", name,
            "--decode-data", str(data), "--grid", *map(str, args.grid), "--max-puzzles", str(args.test),
            "--seed", str(args.seed), *(["--decoders", *args.decoders] if args.decoders else [])]


def timed_command(path: Path, cmd: list[str]) -> list[str]:
    """`cmd` run through `bench/puzzles.py --timed PATH -- ...`, which writes its wall and CPU seconds."""
    return [sys.executable, "bench/puzzles.py", "--timed", str(path), "--", *cmd]


# --------------------------------------------------------------------------------------------
# Decoding one trained run (a subprocess: `--decode RUN`)
# --------------------------------------------------------------------------------------------


def decode(run_dir: Path, model: str, data: Path, grid: list[int], max_puzzles: int, seed: int,
           only: list[str] | None = None) -> None:
    """Every decoder of `model` at every T on the test split; writes RUN/decode.json (and the order picture)."""
    import torch

    from megatron_lomdm.apps.generate import generate
    from megatron_lomdm.apps.run import close_run, open_run
    from megatron_lomdm.puzzles.dataset import read_split
    from megatron_lomdm.puzzles.format import encode
    from megatron_lomdm.puzzles.metrics import score, summarize
    from megatron_lomdm.sampling import build_sampler, sampler_options

    torch.set_num_threads(1)
    run = open_run(run_dir)
    cfg = run.cfg
    tok = json.loads((data / "shards" / "manifest.json").read_text())["tokenizer"]
    puzzles = read_split(data / "test.jsonl")[:max_puzzles]
    prompts = [[tok["bos_id"]] + [i if c else cfg.model.mask_id for i, c in zip(*encode(p))] for p in puzzles]
    use_ema = run.ema.decay > 0
    rows = []
    for label, name, opts in DECODERS[model]:
        if only and label not in only:
            continue
        for T in grid:
            sampler = build_sampler(name, **sampler_options(name, mask_id=cfg.model.mask_id, family=run.model.family,
                                                            steps=T, **opts))
            gen = generate(run, sampler, num_samples=len(prompts), batch_size=len(prompts), seed=seed,
                           prompts=prompts, use_ema=use_ema, diagnostics=False)
            scores = [score(tokens[1: 1 + NUM_CELLS].tolist(), p) for tokens, p in zip(gen.tokens, puzzles)]
            rows.append({"model": model, "decoder": label, "sampler": name, "T": T, **summarize(scores),
                         "calls": gen.total_calls, "seconds": gen.seconds,
                         "remasked": gen.extras.get("num_remasked", 0)})
            print(json.dumps(rows[-1]), flush=True)
    out: dict[str, Any] = {"rows": rows}
    if run.model.family.needs_clean_features:
        out["order"] = order_picture(run, puzzles, prompts, tok["eos_id"], run_dir / "order", use_ema)
    (run_dir / "decode.json").write_text(json.dumps(out, indent=1) + "\n")
    close_run()


def _candidates(puzzle: Any) -> list[int]:
    """Per cell, how many digits its givens leave possible (0 for a given)."""
    from megatron_lomdm.puzzles.sudoku import PEERS

    grid = puzzle.puzzle
    return [0 if grid[i] else 9 - len({grid[j] for j in PEERS[i] if grid[j]}) for i in range(NUM_CELLS)]


def order_picture(run: Any, puzzles: list[Any], prompts: list[list[int]], eos_id: int, folder: Path,
                  use_ema: bool) -> dict[str, Any]:
    """LoMDM's order on the test puzzles: forward exponents (clean solution) and the reverse exponents
    of the first reverse step (the puzzle with its blanks masked), per blank cell, against its number
    of candidates; a picture in `folder` (logged to MLflow when the run is tracked) and the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from megatron_lomdm.apps.generate import RunDenoiser
    from megatron_lomdm.apps.run import weights
    from megatron_lomdm.puzzles.format import encode
    from megatron_lomdm.training.step import clean_head_logits, free_positions

    cfg, model, family = run.cfg, run.model, run.model.family
    enc = [encode(p) for p in puzzles]
    x_BL = torch.tensor([[p[0], *ids, eos_id] for p, (ids, _) in zip(prompts, enc)], device=run.device)
    cond_BL = torch.tensor([[True, *c, False] for _, c in enc], device=run.device)
    z_BL = torch.tensor([p + [cfg.model.mask_id] for p in prompts], device=run.device)
    valid_BL = torch.ones_like(x_BL, dtype=torch.bool)
    with torch.no_grad(), weights(run, use_ema):
        fwd_BL = family.exponents(clean_head_logits(model, x_BL, valid_BL, cond_BL), free_positions(valid_BL, cond_BL))
        den = RunDenoiser(run, diagnostics=False)
        den.given_BL = cond_BL
        rev_BL = den(z_BL).velocity_exponents_BL
    cand_N = torch.tensor([_candidates(p) for p in puzzles]).flatten()
    fwd_N, rev_N = fwd_BL[:, 1:82].double().cpu().flatten(), rev_BL[:, 1:82].double().cpu().flatten()
    blank_N = cand_N > 0
    means = {kind: {int(c): float(e_N[blank_N & (cand_N == c)].mean()) for c in cand_N[blank_N].unique()}
             for kind, e_N in (("forward", fwd_N), ("reverse", rev_N))}
    corr = {kind: float(torch.corrcoef(torch.stack([e_N[blank_N], cand_N[blank_N].double()]))[0, 1])
            for kind, e_N in (("forward", fwd_N), ("reverse", rev_N))}
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for kind, e_N, color in (("forward (clean x)", fwd_N, "C0"), ("reverse, first step", rev_N, "C1")):
        axes[0].scatter(cand_N[blank_N] + (0.1 if color == "C1" else -0.1), e_N[blank_N], s=3, alpha=0.3, c=color,
                        label=kind)
    for kind, color in (("forward", "C0"), ("reverse", "C1")):
        xs = sorted(means[kind])
        axes[0].plot(xs, [means[kind][x] for x in xs], "o-", c=color, lw=2)
    axes[0].set(xlabel="digits the givens leave possible (1 = naked single)", ylabel="exponent (larger: generated earlier)",
                title=f"{cfg.diffusion.name}: exponents of blank cells")
    axes[0].legend()
    for ax, b in zip(axes[1:], range(2)):
        grid = fwd_BL[b, 1:82].double().cpu().view(9, 9).clone()
        grid[torch.tensor(enc[b][1]).view(9, 9)] = float("nan")
        im = ax.imshow(grid, cmap="viridis")
        for i in range(NUM_CELLS):
            c = _candidates(puzzles[b])[i]
            ax.text(i % 9, i // 9, str(puzzles[b].puzzle[i]) if c == 0 else f"c{c}", ha="center", va="center",
                    fontsize=7, color="black" if c == 0 else "white")
        ax.set(title=f"test puzzle {b}: forward exponent per blank\n(black: given digit; cN: N candidates)", xticks=[],
               yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = folder / "puzzle_order.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    summary = {"mean_exponent_by_candidates": means, "corr_exponent_candidates": corr, "picture": str(path)}
    (folder / "puzzle_order.json").write_text(json.dumps(summary, indent=1) + "\n")
    if (Path(cfg.run.dir) / "mlflow_run_id").is_file():
        from megatron_lomdm.tracking.mlflow_tracker import log_to_tracked_run

        summary["mlflow_run_id"] = log_to_tracked_run(cfg.run.dir, folder, "puzzle_order", uri=cfg.tracking.uri,
                                                      experiment=cfg.tracking.experiment, tags={})
    return summary


# --------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], grid: list[int]) -> str:
    keyed = {(r["model"], r["decoder"], r["T"]): r for r in rows}
    lines = ["| model | decoder | " + " | ".join(f"T={t}" for t in grid) + " |", "|---|---|" + "---|" * len(grid)]
    for model, decs in DECODERS.items():
        for label, _, _ in decs:
            cells = [keyed.get((model, label, t)) for t in grid]
            if not any(cells):
                continue
            lines.append(f"| {model} | {label} | " + " | ".join(
                "—" if c is None else f"{100 * c['exact']:.1f} / {100 * c['cell']:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], paths: list[Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = 0
    for i, (model, decs) in enumerate(DECODERS.items()):
        for label, _, _ in decs:
            pts = sorted((r["T"], r["exact"], r["cell"]) for r in rows if r["model"] == model and r["decoder"] == label)
            if not pts:
                continue
            style = ["-", "--", ":"][i]
            for ax, k in zip(axes, (1, 2)):
                ax.plot([p[0] for p in pts], [100 * p[k] for p in pts], style, marker="o", c=f"C{series % 10}",
                        label=f"{model}: {label}")
            series += 1
    for ax, name in zip(axes, ("whole-puzzle accuracy (%)", "cell accuracy (%)")):
        ax.set(xscale="log", xlabel="reverse steps T", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_table(stages: dict[str, dict[str, float]]) -> str:
    """| stage | wall | CPU | for the data stages and each run's training and decoding."""
    lines = ["| stage | wall (s) | CPU (s) |", "|---|---|---|"]
    lines += [f"| {name} | {c['wall_s']:.0f} | {c['cpu_s']:.0f} |" for name, c in stages.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--timed"] and argv[2:3] == ["--"]:  # a stage of a run (see timed_command)
        timed(argv[3:], Path(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--givens", default="40:50", help="givens per puzzle, MIN:MAX (more: easier)")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="puzzle folder to use (made there when missing; default under --out-dir)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, nargs="+", default=[4, 8, 16, 32, 81], help="reverse steps T")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--track", action=argparse.BooleanOptionalAction, default=True, help="MLflow-track the runs")
    p.add_argument("--out-dir", default=str(WORK / "puzzles"))
    p.add_argument("--reuse", action="store_true", help="keep finished runs (decode.json present)")
    p.add_argument("--extra", nargs="*", default=[], help="dotted overrides for every training run")
    p.add_argument("--decode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-puzzles", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--decoders", nargs="+", default=None, help="decode with these decoders only (row labels)")
    args = p.parse_args(argv)
    if args.decode:
        decode(Path(args.decode), args.decode_model, Path(args.decode_data), args.grid, args.max_puzzles, args.seed,
               args.decoders)
        return 0
    out = Path(args.out_dir)
    t0, cpu0, load0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN), f"{os.getloadavg()[0]:.1f}"
    data, stages = make_data(args, out / "data")
    t_data = time.time() - t0
    ratio = flop_ratio(args)
    steps = {"mdlm": args.steps, "lomdm": args.steps, "lomdm_eqc": max(1, round(args.steps / ratio))}
    jobs = []
    for name in args.variants:
        run_dir = out / "runs" / name
        if args.reuse and (run_dir / "decode.json").exists():
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train_cmd = train_command(name, steps[name], args, data, run_dir)
        chained = " && ".join(" ".join(f"'{c}'" for c in cmd) for cmd in
                              [timed_command(run_dir / "time_train.json", train_cmd),
                               timed_command(run_dir / "time_decode.json", decode_command(name, run_dir, data, args))])
        jobs.append((name, args.seed, ["bash", "-c", chained], run_dir))
    run_all(jobs, args.parallel)
    elapsed = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    rows, runs = [], {}
    for name in args.variants:
        run_dir = out / "runs" / name
        dec = json.loads((run_dir / "decode.json").read_text())
        rows += dec["rows"]
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if m.get("kind", "train") == "train"]
        for stage in ("train", "decode"):
            stages[f"{name} {stage}"] = json.loads((run_dir / f"time_{stage}.json").read_text())
        # `loss` is what the optimizer minimised (for LoMDM a surrogate with the RLOO term); `nelbo` is comparable
        runs[name] = {"steps": steps[name], "final_loss": train[-1].get("loss"), "final_nelbo": train[-1].get("nelbo"),
                      "order": dec.get("order"),
                      "train_s": stages[f"{name} train"], "decode_s": stages[f"{name} decode"]}
    date = time.strftime("%Y-%m-%d")
    cmdline = " ".join(["python bench/puzzles.py", *argv])
    title = (f"Sudoku {args.givens} givens, {args.train} train / {args.test} test puzzles; {args.layers}L d{args.hidden}, "
             f"batch {args.batch}, {args.steps} steps (lomdm_eqc {steps['lomdm_eqc']}); {date}")
    plot(rows, [out / "puzzles_accuracy.png", ROOT / "bench" / "figures" / f"puzzles_accuracy_{date}.png"], title)
    if (runs.get("lomdm", {}).get("order") or {}).get("picture"):
        shutil.copyfile(runs["lomdm"]["order"]["picture"],
                        ROOT / "bench" / "figures" / f"puzzles_lomdm_order_{date}.png")
    text = (f"# Puzzle benchmark\n\n`{cmdline}` — {elapsed / 60:.1f} min wall ({t_data / 60:.1f} min data), "
            f"{cpu / 60:.1f} min CPU (children), load average {load0} at the start, {os.getloadavg()[0]:.1f} at the "
            f"end\n\n{stage_table(stages)}\n\n{title}. Cells: whole-puzzle accuracy / cell accuracy (%) "
            f"on the test split. LoMDM/MDLM step FLOPs {ratio:.2f}.\n\n{table(rows, args.grid)}\n\n"
            + "\n".join(f"- {n}: {r['steps']} steps, final train NELBO {r['final_nelbo']} (loss {r['final_loss']}), "
                        f"order {json.dumps((r['order'] or {}).get('corr_exponent_candidates'))}" for n, r in runs.items())
            + "\n")
    (out / "puzzles.md").write_text(text)
    summary = {"rows": rows, "runs": runs, "args": vars(args), "flop_ratio": ratio, "wall_s": elapsed, "cpu_s": cpu,
               "stages": stages, "load_start": load0, "load_end": os.getloadavg()[0], "env": environment()}
    (out / "puzzles.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name in args.variants:
        record(f"puzzles/sudoku/{name}", {"rows": [r for r in rows if r["model"] == name], **runs[name]})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
