"""What a training run shows at each evaluation, next to its metrics (`tracking.artifacts`).

`eval_artifacts(run, valid)` (every rank: the sampler and the clean pass are collective) writes
`run.dir/artifacts/step_XXXXXXX/`, on rank 0 and atomically (a temporary folder renamed):

* `samples.txt`: a few samples (ancestral sampler, EMA weights) with the sampler, steps and seed
  that made them, decoded when the run's tokenizer loads;
* `order.png`: which positions were unmasked when (position x relative progress), those samples;
* `exponents.png`: histograms of the forward rate t A(t) at t = 1 of the validation data (the
  power exponent e of poly/LoMDM, 1 for MDLM) and of the reverse exponent e_R per position seen
  while sampling (learned-order families);
* `eval.json`: the validation metrics, the sampler record, the order statistics, both exponent
  summaries and the run's fingerprint.

The folder is then queued for upload to the run's MLflow run (`eval/step_XXXXXXX/`, in the
background). Not under DeepSpeed ZeRO-3, whose partitioned parameters exist whole only inside the
engine's forward. The cost is one batch of `tracking.artifact_samples` sequences for
`tracking.artifact_steps` reverse steps plus one clean pass per evaluation (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_lomdm.apps.evaluate import read_eval_sequences
from megatron_lomdm.apps.fingerprint import run_fingerprint
from megatron_lomdm.apps.generate import Generation, generate, order_report
from megatron_lomdm.apps.judges import RunTokenizer, load_run_tokenizer
from megatron_lomdm.apps.run import weights
from megatron_lomdm.sampling import build_sampler, sampler_options, sampler_record
from megatron_lomdm.training.step import clean_head_logits
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
SAMPLER = "ancestral"


_TOKENIZERS: dict[str, RunTokenizer] = {}


def _tokenizer(cfg: Any) -> RunTokenizer:
    """The run's tokenizer, loaded once per process."""
    key = str(cfg.data.train)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_run_tokenizer(cfg)
    return _TOKENIZERS[key]


@torch.no_grad()
def forward_rates(run: Any, max_sequences: int) -> torch.Tensor | None:
    """t A(t) at t = 1 of every valid position of the first validation sequences (EMA weights),
    or None under pipeline parallelism (the clean pass is then pipelined; not drawn)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return None
    cfg, model = run.cfg, run.model
    rows = read_eval_sequences(run, max_sequences=max_sequences)
    L = cfg.model.seq_length
    tokens_BL = torch.full((len(rows), L), cfg.model.pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens_BL[i, : len(row)] = torch.tensor(row[:L], dtype=torch.int64)
    valid_BL = torch.zeros_like(tokens_BL, dtype=torch.bool)
    for i, row in enumerate(rows):
        valid_BL[i, : len(row)] = True
    tokens_BL, valid_BL = tokens_BL.to(run.device), valid_BL.to(run.device)
    family = model.family
    was_training = model.training
    model.eval()
    try:
        with weights(run, use_ema=True):
            fwd_logits_BL = clean_head_logits(model, tokens_BL, valid_BL) if family.needs_clean_features else None
            ones_B = torch.ones(len(rows), dtype=torch.float64, device=run.device)
            sched = family.forward_schedule(x_BL=tokens_BL, t_B=ones_B, fwd_logits_BL=fwd_logits_BL, valid_BL=valid_BL)
    finally:
        model.train(was_training)
    return sched.velocity_BL[valid_BL].float().cpu()


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = torch.tensor(values, dtype=torch.float64)
    return {"n": v.numel(), "mean": float(v.mean()), "std": float(v.std(unbiased=False)),
            "min": float(v.min()), "max": float(v.max())}


def _histograms(forward: list[float], reverse: list[float], path: Path, title: str) -> bool:
    """Both exponent histograms side by side in one PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    panels = ((forward, "forward rate t·A(t) at t = 1 (validation data)"),
              (reverse, "reverse exponent e_R per position (sampling)"))
    for ax, (values, label) in zip(axes, panels, strict=True):
        if values:
            ax.hist(values, bins=40, color="tab:blue")
        else:
            ax.text(0.5, 0.5, "not learned by this family", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _samples_text(gen: Generation, tok: RunTokenizer, header: str) -> str:
    lines = [header, ""]
    for i, ids in enumerate(gen.tokens.tolist()):
        text = tok.decode(ids)
        lines += [f"--- sample {i}", text if text is not None else " ".join(map(str, ids)), ""]
    return "\n".join(lines)


def _write(folder: Path, files: dict[str, str], gen: Generation, forward: list[float], reverse: list[float],
           title: str) -> None:
    """Write the artifact folder atomically (rank 0)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    order = order_report(gen, heatmap_path=tmp / "order.png", title=title)
    _histograms(forward, reverse, tmp / "exponents.png", title)
    record = json.loads((tmp / "eval.json").read_text())
    record["order"] = {k: order[k] for k in ("kendall_tau_mean", "velocity_confidence_corr")}
    (tmp / "eval.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def eval_artifacts(run: Any, valid: dict[str, float]) -> None:
    """Draw, write and queue for upload the evaluation artifacts of the run's current step (collective)."""
    t0 = time.perf_counter()
    cfg, step = run.cfg, run.state.step
    if cfg.parallel.backend == "deepspeed" and cfg.parallel.zero == 3:
        if run.info.rank == 0 and step == cfg.train.eval_interval:
            log.info("no evaluation artifacts under DeepSpeed ZeRO-3: sampling runs the model outside the engine, "
                     "whose parameters ZeRO-3 partitions")
        return
    if cfg.parallel.virtual_stages > 1:
        if run.info.rank == 0 and step == cfg.train.eval_interval:
            log.info("no evaluation artifacts with parallel.virtual_stages > 1: sampling runs one model per "
                     "pipeline stage (open the run with tools/sample.py, which reads it without interleaving)")
        return
    n, steps = cfg.tracking.artifact_samples, cfg.tracking.artifact_steps or cfg.model.seq_length
    seed = cfg.train.seed + step
    opts = sampler_options(SAMPLER, mask_id=cfg.model.mask_id, family=run.model.family, steps=steps)
    sampler = build_sampler(SAMPLER, **opts)
    gen = generate(run, sampler, num_samples=n, batch_size=n, seed=seed, use_ema=True)
    rates = forward_rates(run, n)
    run.model.train()
    if run.info.rank != 0:
        return
    forward = [] if rates is None or not run.model.family.needs_clean_features else rates.tolist()
    reverse = [x for x in gen.per_position_mean_exponent() if x is not None]
    title = f"{cfg.diffusion.name} step {step}: {n} samples, {SAMPLER}, {steps} steps, seed {seed}"
    record = {"step": step, "valid": valid, "sampler": sampler_record(SAMPLER, sampler, steps=steps, grid=None,
                                                                      gamma=None),
              "seed": seed, "num_samples": n, "seconds": gen.seconds,
              "forward_rate": _summary(rates.tolist() if rates is not None else []),
              "reverse_exponent": _summary(reverse),
              "fingerprint": run_fingerprint(run, use_ema=True, hash_checkpoint=False)}
    files = {"samples.txt": _samples_text(gen, _tokenizer(cfg), title),
             "eval.json": json.dumps(record, default=str)}
    folder = Path(cfg.run.dir) / "artifacts" / f"step_{step:07d}"
    _write(folder, files, gen, forward, reverse, title)
    run.tracker.log_artifacts(folder, f"eval/step_{step:07d}")
    log.info("evaluation artifacts of step %d in %s (%.2f s, %.2f s of it sampling)", step, folder,
             time.perf_counter() - t0, gen.seconds)
