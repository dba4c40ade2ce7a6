#!/usr/bin/env python
"""CPU ratios measured side by side in one process (performance.md §B1, §B2.1/2.3/2.9).

1. ``lomdm_mdlm``: LoMDM step / MDLM step at equal model and unique batch, against the analytic
   FLOP prediction (`megatron_lomdm.utils.flops.step_flops`), with a per-phase breakdown (clean
   no-grad pass, 2B forward+backward, scheduler heads, loss + RLOO + rest, optimizer).
2. ``flop_counter``: our FLOP counter / `torch.utils.flop_counter.FlopCounterMode` on the MDLM and
   LoMDM steps (deterministic). torch 2.13 has no formula for the CPU SDPA kernels
   (`_scaled_dot_product_flash_attention_for_cpu[_backward]`, used by the scheduler heads), so the
   reference registers torch's own SDPA formulas for them; the raw figure is recorded too.
3. ``megatron_plain``: megatron-core backbone step / plain-PyTorch bidirectional transformer step of
   identical shape (same parameter count, same loss, torch AdamW on both: framework overhead).
4. ``mdlm_arm``: MDLM step / ARM step on the same backbone (anchor ~1.05, arXiv 2603.22075).

Each run is built with `build_run` in this one process (CPU shims are process-global on purpose:
every side sees the same ones). Ratios use 1 thread (§B1). Appends JSON lines to
bench/results.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import (BENCH_SHAPE, RESULTS, Progress, config_hash, ensure_shards, environment,  # noqa: E402
                    interleaved_ratio, make_config, record)

aten = torch.ops.aten


# ---- FLOP counting ---------------------------------------------------------------------------------
def flop_counter_mode(cpu_sdpa: bool = True):
    """FlopCounterMode, with torch's SDPA formulas registered for the CPU SDPA kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    mapping = {}
    if cpu_sdpa:
        def fwd(query, key, value, *args, out_val=None, **kwargs):
            return sdpa_flop_count(query.shape, key.shape, value.shape)

        def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
            return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

        fwd._get_raw = bwd._get_raw = True  # receive tensors, not shapes
        mapping = {aten._scaled_dot_product_flash_attention_for_cpu: fwd,  # keys are overload packets
                   aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_step_flops(run, cpu_sdpa: bool = True) -> tuple[float, dict[str, float]]:
    from megatron_lomdm.training.loop import train_step

    with flop_counter_mode(cpu_sdpa) as fc:
        train_step(run)
    per_op = {str(k): float(v) for k, v in fc.get_flop_counts()["Global"].items()}
    return float(fc.get_total_flops()), per_op


def shape_of(run):
    from megatron_lomdm.utils.flops import Shape

    m = run.cfg.model
    return Shape(m.num_layers, m.hidden_size, m.ffn_size, m.vocab_size, m.seq_length)


def predicted_terms(run) -> dict[str, float]:
    """The analytic counter's terms for this run's step (what `step_flops` adds up)."""
    from megatron_lomdm.utils.flops import forward_flops_per_token, head_forward_flops_per_token

    s, fam = shape_of(run), run.model.family
    tokens = run.cfg.train.global_batch_size * s.seq_length
    terms = {"corruptions_fwd_bwd": 3 * forward_flops_per_token(s) * tokens * fam.num_corruptions}
    if fam.needs_clean_features:
        terms["clean_pass"] = forward_flops_per_token(s, with_logits=False) * tokens
        terms["heads_fwd_bwd"] = 3 * head_forward_flops_per_token(s) * tokens * (1 + fam.num_corruptions)
    return terms


# ---- phase breakdown -------------------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def phase_breakdown(run, reps: int = 5) -> dict[str, float]:
    """Median seconds of each phase of one step, each timed on the run's own modules and shapes.

    fwd_bwd / optimizer are the engine's two calls of the real step; the clean no-grad pass, the
    K*B corruptions' forward + backward (backbone + SUBS log-prob) and the two heads' forward +
    backward are re-run standalone; loss_rloo_rest = fwd_bwd - (clean + corruptions + heads) is
    schedule, masks, loss, RLOO and framework overhead. The phases are timed round-robin, `reps`
    rounds after one warm-up round, so machine noise spreads over all of them alike.
    """
    from megatron_lomdm.models.vocab_parallel import subs_logp_true_vocab_parallel
    from megatron_lomdm.training.step import forward_backward

    model, engine, cfg = run.model, run.engine, run.cfg
    fam = model.family
    K, B, L = fam.num_corruptions, cfg.train.micro_batch_size, cfg.model.seq_length
    batch = next(run.train_iter)
    tokens, valid = batch["tokens"], batch["valid"]
    gen = torch.Generator().manual_seed(0)
    z = torch.where(torch.rand(K * B, L, generator=gen) < 0.5, model.mask_id, tokens.repeat(K, 1))
    valid_N = valid.repeat(K, 1)
    times: dict[str, list[float]] = {}

    def real_step():
        engine.zero_grad()
        t0 = time.perf_counter()
        forward_backward(engine, iter([batch]), step=0, num_microbatches=1, seq_length=L, micro_batch_size=B,
                                device=run.device)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        return {"fwd_bwd": t1 - t0, "optimizer": t2 - t1}

    def clean():
        with torch.no_grad():
            model.clean_features(tokens, valid)

    def corruptions():
        logits, _ = model.backbone(z, valid_N)
        logp = subs_logp_true_vocab_parallel(logits, z, tokens.repeat(K, 1), model.mask_id,
                                             vocab_size=model.backbone.true_vocab_size)
        logp.sum().backward()

    units = {f"corruptions_fwd_bwd_{K}B": corruptions}
    if fam.needs_clean_features:
        with torch.no_grad():
            h_B = model.clean_features(tokens, valid)
            h_N = model.backbone(z, valid_N, compute_logits=False)[1]

        def heads():
            a = model.fwd_head(h_B, valid)
            b = model.rev_head(h_N, valid_N)
            (a.sum() + b.sum()).backward()

        units = {"clean_nograd": clean, **units, "heads_fwd_bwd": heads}
    for r in range(reps + 1):
        for k, v in real_step().items():
            times.setdefault(k, []).append(v)
        for name, fn in units.items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    engine.zero_grad()
    out = {k: statistics.median(v[1:]) for k, v in times.items()}  # round 0 is the warm-up
    out["loss_rloo_rest"] = out["fwd_bwd"] - sum(out[k] for k in units)
    out["step"] = out["fwd_bwd"] + out["optimizer"]
    return out


# ---- plain PyTorch transformer of the backbone's shape -----------------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x_BLD, cos_LQ, sin_LQ):
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.ln1(x_BLD)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = rope(q, cos_LQ, sin_LQ), rope(k, cos_LQ, sin_LQ)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x_BLD = x_BLD + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x_BLD + self.fc2(F.gelu(self.fc1(self.ln2(x_BLD))))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainTransformer(nn.Module):
    """Pre-LN bidirectional transformer: embedding, rotary, LN/attention/LN/GELU-MLP blocks with
    biases, final LN, untied bias-free output layer: the megatron backbone's shape."""

    def __init__(self, layers: int, d: int, heads: int, ffn: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        q = d // heads
        inv = 1.0 / 10000 ** (torch.arange(0, q, 2).float() / q)
        ang = torch.outer(torch.arange(seq).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens_BL):
        x = self.emb(tokens_BL)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return self.out(self.ln(x))


def megatron_vs_plain(run, pairs: int) -> dict:
    """megatron-core Backbone (local spec, as build_run builds it) vs PlainTransformer: forward,
    cross-entropy on every position, backward, torch AdamW; same shape, batch and tokens."""
    from megatron_lomdm.models.backbone import build_backbone

    m, B = run.cfg.model, run.cfg.train.micro_batch_size
    mega = build_backbone(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                          ffn_hidden_size=m.ffn_size, vocab_size=m.vocab_size, seq_length=m.seq_length,
                          mask_id=m.mask_id, use_cpu_initialization=True)
    vocab = mega.output_layer.weight.shape[0]  # padded exactly as megatron pads it
    plain = PlainTransformer(m.num_layers, m.hidden_size, m.num_heads, m.ffn_size, vocab, m.seq_length)
    n_mega = sum(p.numel() for p in mega.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (B, m.seq_length), generator=gen)
    opt_m = torch.optim.AdamW(mega.parameters(), lr=1e-4)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def step_mega():
        opt_m.zero_grad(set_to_none=True)
        logits, _ = mega(tokens)
        F.cross_entropy(logits.float().reshape(-1, vocab), tokens.reshape(-1)).backward()
        opt_m.step()

    def step_plain():
        opt_p.zero_grad(set_to_none=True)
        F.cross_entropy(plain(tokens).reshape(-1, vocab), tokens.reshape(-1)).backward()
        opt_p.step()

    res = interleaved_ratio(step_plain, step_mega, pairs=pairs)
    res.update(params_megatron=n_mega, params_plain=n_plain)
    return res


def step_fn(run):
    from megatron_lomdm.training.loop import train_step

    return lambda: train_step(run)


def table(rows: list[dict]) -> str:
    lines = [f"{'benchmark':<28} {'median':>8} {'min':>7} {'max':>7}  {'predicted / band':<22} ok"]
    for r in rows:
        band = r.get("band")
        b = f"{r.get('predicted') or '':>6}" if r.get("predicted") is None else f"{r['predicted']:.3f}"
        b += f" [{band[0]:.2f}, {band[1]:.2f}]" if band else ""
        med = r.get("ratio_median", r.get("ratio"))
        lines.append(f"{r['bench']:<28} {med:>8.3f} {r.get('ratio_min', med):>7.3f} {r.get('ratio_max', med):>7.3f}  "
                     f"{b:<22} {'yes' if r.get('in_band') else 'NO' if band else '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="repetitions of each phase in the breakdown")
    p.add_argument("--out", default=str(RESULTS), help="JSON-lines file to append to ('' = none)")
    p.add_argument("--only", nargs="*", default=None,
                   help="subset of: lomdm_mdlm flop_counter megatron_plain mdlm_arm")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    only = set(args.only or ["lomdm_mdlm", "flop_counter", "megatron_plain", "mdlm_arm"])

    from megatron_lomdm.training.build import build_run
    from megatron_lomdm.utils.flops import step_flops

    shards = ensure_shards(BENCH_SHAPE["seq_length"], BENCH_SHAPE["vocab_size"])
    # one line per measurement: building the runs, then each selected one (flop_counter measures two)
    progress = Progress("cpu_ratios", 1 + len(only) + ("flop_counter" in only))
    progress.step("building the MDLM, LoMDM" + (" and ARM runs" if "mdlm_arm" in only else " runs"))
    runs = {}
    for name, fam, c1, c2 in (("mdlm", "mdlm", None, None), ("lomdm", "lomdm", 0.7, 0.65), ("arm", "arm", None, None)):
        if name == "arm" and "mdlm_arm" not in only:
            continue
        runs[name] = build_run(make_config(fam, shards, c1=c1, c2=c2))
    env = environment()
    mdlm, lomdm = runs["mdlm"], runs["lomdm"]
    shape = shape_of(mdlm)
    info = {"shape": {**shape.__dict__, "batch": mdlm.cfg.train.global_batch_size,
                      "padded_vocab": int(mdlm.model.backbone.output_layer.weight.shape[0])}}
    rows = []
    flops = {k: r.flops_per_step for k, r in runs.items()}

    if "lomdm_mdlm" in only:
        progress.step(f"LoMDM/MDLM step, {args.pairs} interleaved pairs, then the phase breakdown")
        predicted = flops["lomdm"] / flops["mdlm"]
        res = interleaved_ratio(step_fn(mdlm), step_fn(lomdm), pairs=args.pairs)
        phases = {"mdlm": phase_breakdown(mdlm, args.reps), "lomdm": phase_breakdown(lomdm, args.reps)}
        terms = {"mdlm": predicted_terms(mdlm), "lomdm": predicted_terms(lomdm)}
        res.update(info, phases_s=phases, flop_terms=terms,
                   unique_tokens_per_s={"mdlm": mdlm.cfg.train.global_batch_size * shape.seq_length / res["a_s_median"],
                                        "lomdm": lomdm.cfg.train.global_batch_size * shape.seq_length / res["b_s_median"]},
                   gflops_per_s={"mdlm": flops["mdlm"] / res["a_s_median"] / 1e9,
                                 "lomdm": flops["lomdm"] / res["b_s_median"] / 1e9})
        rows.append(record("lomdm_step/mdlm_step", res, predicted=predicted, band=(0.9 * predicted, 1.1 * predicted),
                           cfg_hash=config_hash(lomdm.cfg), out=out, env=env))

    if "flop_counter" in only:
        for name in ("mdlm", "lomdm"):
            progress.step(f"our FLOP counter vs FlopCounterMode, {name}")
            counted, per_op = counted_step_flops(runs[name], cpu_sdpa=True)
            raw, raw_per_op = counted_step_flops(runs[name], cpu_sdpa=False)
            ours = runs[name].flops_per_step
            res = {"ratio": ours / counted, "ours_flops": ours, "torch_flops": counted, "torch_per_op": per_op,
                   "ratio_without_cpu_sdpa_formula": ours / raw, "torch_flops_without_cpu_sdpa_formula": raw,
                   "our_terms": predicted_terms(runs[name]), **info}
            rows.append(record(f"flops_ours/flop_counter_{name}", res, predicted=1.0, band=(0.98, 1.02),
                               cfg_hash=config_hash(runs[name].cfg), out=out, env=env))

    if "megatron_plain" in only:
        progress.step(f"megatron-core backbone vs plain PyTorch, {args.pairs} pairs")
        res = megatron_vs_plain(mdlm, args.pairs)
        res.update(info)
        rows.append(record("megatron_backbone/plain_torch", res, predicted=1.0, band=(0.8, 1.2),
                           cfg_hash=config_hash(mdlm.cfg), out=out, env=env))

    if "mdlm_arm" in only:
        progress.step(f"MDLM/ARM step, {args.pairs} pairs")
        res = interleaved_ratio(step_fn(runs["arm"]), step_fn(mdlm), pairs=args.pairs)
        res.update(info, flops_ratio=flops["mdlm"] / flops["arm"])
        rows.append(record("mdlm_step/arm_step", res, predicted=1.05, band=(0.95, 1.15),
                           cfg_hash=config_hash(mdlm.cfg), out=out, env=env))

    for r in runs.values():
        r.close()
    print(table(rows))
    if "lomdm_mdlm" in only:
        print("phases (s):", json.dumps({k: {n: round(v, 4) for n, v in ph.items()} for k, ph in rows[0]["phases_s"].items()}))
    return rows


if __name__ == "__main__":
    main()
