"""The training loop: resume -> (step, clip, optimizer, EMA, log, eval, checkpoint, preemption)*.

Everything it touches is built by `training.build`; this file is the loop and nothing else.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

import torch

from megatron_lomdm.config import Config
from megatron_lomdm.training.build import Run, build_run
from megatron_lomdm.training.optim import lr_multiplier
from megatron_lomdm.training.step import IntervalSums, forward_backward, reduce_reports
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process (GiB), or the peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train_step(run: Run, interval: IntervalSums | None = None) -> dict[str, float]:
    """One optimizer step on the next global batch; returns its metrics (per-token values).

    `interval`, if given, accumulates the step's sums for the log-interval statistics.
    """
    cfg, state = run.cfg, run.state
    lr = run.engine.set_lr(lr_multiplier(state.step, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                                         schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio))
    run.engine.zero_grad()
    t0 = time.perf_counter()
    reports = forward_backward(run.engine, run.train_iter, step=state.step, num_microbatches=run.num_microbatches,
                               seq_length=cfg.model.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                               device=run.device)
    out = reduce_reports(reports, run.device)
    if interval is not None:
        interval.add(out)
    if run.ppots is not None:  # P-POTS: this step's loss statistics; refreshes the t proposal when due
        run.ppots.observe(reports, step=state.step)
    applied, grad_norm = run.engine.step() if math.isfinite(out.values["surrogate"]) else (False, math.nan)
    if applied:
        run.ema.update()
        state.bad_steps = 0
    else:  # non-finite loss or gradient: the update is skipped, the data is consumed
        state.bad_steps += 1
        state.skipped_steps += 1
    dt = time.perf_counter() - t0
    state.step += 1
    state.consumed_samples += cfg.train.global_batch_size
    unique_tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return {"step": state.step, "loss": out.values["surrogate"], **out.values, "lr": lr, "grad_norm": grad_norm,
            "num_tokens": out.num_tokens, "tokens_per_s": unique_tokens / dt, "step_time_s": dt,
            "mfu": run.flops_per_step / dt / run.peak_flops if run.peak_flops else 0.0,
            "skipped_steps": state.skipped_steps, "memory_gb": peak_memory_gb(run.device)}


def log_state_bytes(run: Run) -> None:
    """Per-rank bytes of parameters, gradients and optimizer state (what ZeRO bought)."""
    b = run.engine.state_bytes()
    n = max(b.pop("num_params"), 1)
    log.info("model states on rank 0: " + ", ".join(f"{k} {v / 2**20:.1f} MiB ({v / n:.2f} B/param)" for k, v in b.items()))


def run_training(cfg: Config, on_eval: Callable[[Run, dict[str, float]], None] | None = None) -> bool:
    """Train `cfg` to `train.steps`, resuming from `run.dir` if it has a checkpoint.

    `on_eval(run, valid_metrics)` runs on every rank after each evaluation (the training entry
    passes the evaluation artifacts of `apps/artifacts.py`; the loop itself imports no app).

    Returns:
        True if the run stopped early on a preemption signal (after checkpointing).
    """
    run = build_run(cfg)
    ended = False
    interval = IntervalSums()  # velocity-confidence correlation (and gradient SNR) of each log interval
    try:
        while run.state.step < cfg.train.steps:
            step = run.state.step + 1
            logged = step % cfg.train.log_interval == 0 or step == cfg.train.steps
            run.model.grad_snr = logged  # the forward head's gradient SNR on log steps only (~7% of a tiny step)
            metrics = train_step(run, interval)
            if step == 1:  # optimizer state exists only after the first update
                log_state_bytes(run)
            if logged:
                run.log_metrics({**metrics, **interval.pop()})
            if run.state.bad_steps >= run.max_bad_steps:
                run.save_checkpoint()
                raise ValueError(f"{run.state.bad_steps} consecutive steps with a non-finite loss or gradient "
                                 f"(last at step {step}); saved the last good state to {run.ckpt.root}")
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                valid = run.evaluate()
                run.log_metrics(valid, kind="valid")
                if on_eval is not None:
                    on_eval(run, valid)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                run.save_checkpoint()
            if run.preemption.requested(run.device):
                run.save_checkpoint()
                log.warning("preempted at step %d: checkpoint saved, exiting for requeue", step)
                ended = True
                return True
        if run.ckpt.latest_step() != run.state.step:
            run.save_checkpoint()
        ended = True
        return False
    finally:
        run.close(teardown=ended)
