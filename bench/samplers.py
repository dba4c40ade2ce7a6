#!/usr/bin/env python
"""Sampler throughput and executed backbone calls (performance.md §A4, §B2.5).

For ``ancestral`` and ``mdlm_cache`` at L = 128 and T in {16, 64, 256, 1024}, cache on and off,
and for ``entropy_bound`` (no grid: its number of calls is set by the entropy budget gamma),
on the benchmark-shape MDLM model (4 layers, d 256, V 8192; weights as initialised, which only
matters for ``entropy_bound``'s entropies):

- tokens/s (B L / wall) and the executed backbone calls, averaged over ``--samples`` samples;
- with the cache, the calls against the expected number of occupied grid steps. Under the
  linear schedule every position unmasks in a uniformly drawn step, so with n = B L positions
  the calls are the occupied bins of n draws into T bins: E = T (1 - (1 - 1/T)^n), which is
  T (1 - e^{-L/T}) of §A4 for B = 1, with variance
  T (T-1) (1-2/T)^n + T (1-1/T)^n - T^2 (1-1/T)^{2n}. ``ok`` = within 4 standard errors;
- the work outside the backbone: wall - backbone time, per sample and per executed step, next to
  the time of ONE full (L, V) fp64 log-softmax (what a sampler that touched every row every step
  would pay per step). Per-step work must be O(#masked rows drawn), not O(L V): for
  ``ancestral`` at T = 1024 almost every step draws 0-1 rows, so its per-step overhead must be a
  small fraction of that reference. ``entropy_bound`` needs the entropy of every masked row each
  step, O(#masked V) by its definition.

Appends one JSON line per configuration to bench/results.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import BENCH_SHAPE, RESULTS, config_hash, ensure_shards, environment, make_config, record  # noqa: E402


def occupied_bins(T: int, n: int) -> tuple[float, float]:
    """Mean and variance of the number of occupied bins when n balls fall uniformly into T bins."""
    q1, q2 = (1 - 1 / T) ** n, (1 - 2 / T) ** n
    mean = T * (1 - q1)
    var = T * (T - 1) * q2 + T * q1 - T * T * q1 * q1
    return mean, max(var, 0.0)


class TimedDenoiser:
    """Wraps a denoiser; accumulates the seconds spent inside it (the backbone pass + gather)."""

    def __init__(self, denoise) -> None:
        self.denoise = denoise
        self.seconds = 0.0

    def __call__(self, z_BL):
        t0 = time.perf_counter()
        out = self.denoise(z_BL)
        self.seconds += time.perf_counter() - t0
        return out


def full_row_reference_s(B: int, L: int, V: int, reps: int = 21) -> float:
    """Seconds of one fp64 log-softmax over every (b, l) row: the O(L V) per-step cost (the fastest
    of `reps`, so machine noise does not inflate the reference)."""
    logits = torch.randn(B, L, V)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.log_softmax(logits.double(), -1)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def bench_one(denoise, sampler, *, B: int, L: int, samples: int, seed: int) -> dict:
    timed = TimedDenoiser(denoise)
    calls, steps, walls, backbone = [], [], [], []
    for i in range(samples):
        timed.seconds = 0.0
        gen = torch.Generator().manual_seed(seed + i)
        t0 = time.perf_counter()
        res = sampler.sample(timed, batch_size=B, seq_length=L, generator=gen)
        walls.append(time.perf_counter() - t0)
        backbone.append(timed.seconds)
        calls.append(res.num_calls)
        steps.append(res.num_steps)
        assert not bool((res.tokens_BL == sampler.mask_id).any()), "a [MASK] was left"
    wall, bb = sum(walls), sum(backbone)
    return {"calls_mean": statistics.mean(calls), "calls_min": min(calls), "calls_max": max(calls),
            "steps_mean": statistics.mean(steps), "wall_s_per_sample": wall / samples,
            "backbone_s_per_sample": bb / samples, "tokens_per_s": B * L * samples / wall,
            "outside_backbone_s_per_sample": (wall - bb) / samples,
            "outside_backbone_s_per_step": (wall - bb) / max(sum(steps), 1),
            "backbone_s_per_call": bb / max(sum(calls), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="*", default=[16, 64, 256, 1024])
    p.add_argument("--gammas", type=float, nargs="*", default=[0.0, 9.0, 36.0, 144.0])
    p.add_argument("--samples", type=int, default=4, help="samples per configuration (cache on)")
    p.add_argument("--samples-nocache", type=int, default=1, help="samples per configuration (cache off)")
    p.add_argument("--batch", type=int, default=1, help="B (the §A4 formula is for B = 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samplers", nargs="*", default=["ancestral", "mdlm_cache", "entropy_bound"])
    p.add_argument("--out", default=str(RESULTS), help="JSON-lines file to append to ('' = none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None

    from megatron_lomdm.apps.generate import RunDenoiser
    from megatron_lomdm.sampling import build_sampler, sampler_options
    from megatron_lomdm.training.build import build_run

    shards = ensure_shards(BENCH_SHAPE["seq_length"], BENCH_SHAPE["vocab_size"])
    run = build_run(make_config("mdlm", shards))
    run.model.eval()
    denoise = RunDenoiser(run, diagnostics=False)
    B, L, V = args.batch, run.cfg.model.seq_length, denoise.true_vocab_size
    mask_id, family = denoise.mask_id, run.model.family
    reference_s = full_row_reference_s(B, L, V)
    env, cfg_hash = environment(), config_hash(run.cfg)
    shape = {"num_layers": run.cfg.model.num_layers, "hidden_size": run.cfg.model.hidden_size,
             "vocab_size": V, "seq_length": L, "batch": B}
    rows = []
    configs = []
    for name in args.samplers:
        if name == "entropy_bound":
            configs += [(name, None, g, True) for g in args.gammas]
        else:
            configs += [(name, T, None, cache) for T in args.steps for cache in (True, False)]
    for name, T, gamma, cache in configs:
        sampler = build_sampler(name, **sampler_options(name, mask_id=mask_id, family=family, steps=T,
                                                        use_cache=cache, gamma=gamma))
        samples = args.samples if cache else args.samples_nocache
        res = bench_one(denoise, sampler, B=B, L=L, samples=samples, seed=1000)
        res.update(sampler=name, T=T, gamma=gamma, cache=cache, samples=samples, shape=shape,
                   full_LV_logsoftmax_s=reference_s,
                   step_overhead_over_full_LV=res["outside_backbone_s_per_step"] / reference_s)
        predicted = band = None
        if T is not None and cache:
            mean, var = occupied_bins(T, B * L)
            se = math.sqrt(var / samples)
            predicted, band = mean, (mean - 4 * se - 1e-9, mean + 4 * se + 1e-9)
            res.update(expected_calls=mean, expected_calls_sd=math.sqrt(var),
                       expected_calls_a4=T * (1 - math.exp(-L / T)) if B == 1 else None,
                       ratio=res["calls_mean"] / mean)
        label = f"sampler/{name}" + (f"_T{T}" if T is not None else f"_gamma{gamma:g}") + ("" if cache else "_nocache")
        rows.append(record(label, res, predicted=predicted, band=None if band is None else
                           (band[0] / predicted, band[1] / predicted), cfg_hash=cfg_hash, out=out, env=env))
        rows[-1]["label"] = label
        print(f"{label:<34} calls {res['calls_mean']:8.2f}"
              + (f" (E {predicted:7.2f})" if predicted else " " * 13)
              + f"  {res['tokens_per_s']:8.1f} tok/s  backbone {res['backbone_s_per_call'] * 1e3:6.2f} ms/call"
              f"  outside {res['outside_backbone_s_per_step'] * 1e3:6.3f} ms/step"
              f" = {res['step_overhead_over_full_LV']:.3f} x full (L,V) log-softmax", flush=True)
    run.close()
    print(f"full (L, V) = ({L}, {V}) fp64 log-softmax: {reference_s * 1e3:.2f} ms")
    return rows


if __name__ == "__main__":
    main()
