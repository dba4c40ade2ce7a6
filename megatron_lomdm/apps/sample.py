"""Fingerprinted samples from a trained run: ``tools/sample.py`` after its flags are parsed.

``main`` opens the run (``apps.run.open_run``) and the judge, ``write_samples`` draws the samples
with ``apps.generate`` and writes the JSONL, the ``.order.png`` heat map and the
``.summary.json`` (also printed) on rank 0. The flags are documented in ``tools/sample.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from megatron_lomdm.apps.evaluate import read_eval_prompts
from megatron_lomdm.apps.fingerprint import run_fingerprint
from megatron_lomdm.apps.run import RunNotReady, broadcast_object, close_run, is_rank0, open_run
from megatron_lomdm.apps.generate import generate, order_report
from megatron_lomdm.apps.judges import (
    judge_gen_ppl,
    load_run_tokenizer,
    make_judge,
    prefix_token_ids,
    sample_entropies,
)
from megatron_lomdm.sampling import SAMPLERS, build_sampler, sampler_options, sampler_record
from megatron_lomdm.sampling.grids import GridSpec
from megatron_lomdm.utils.proc import quick_exit_gc

EXIT_BAD_INPUT = 2


def grid_spec(args: argparse.Namespace, default_t_min: float | None) -> GridSpec | None:
    """The time grid the flags ask for (``--grid*``), or None for the sampler's own."""
    if args.grid is None and args.grid_t_min is None:
        return None
    t_min = args.grid_t_min if args.grid_t_min is not None else (default_t_min or 0.0)
    return GridSpec(kind=args.grid or "uniform", t_min=t_min, a=args.grid_a, b=args.grid_b, sin2=not args.no_sin2)


def main(args: argparse.Namespace) -> int:
    """``tools/sample.py`` with its parsed flags; returns the exit code (0 done, 2 bad input)."""
    quick_exit_gc()
    try:
        if args.num_samples < 1 or args.steps < 1:
            raise ValueError("--num-samples and --steps must be >= 1")
        if args.judge is not None and not Path(args.judge).is_dir():
            raise ValueError(f"--judge {args.judge}: no such folder")
        run = open_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        judge = make_judge(args.judge) if args.judge is not None and is_rank0() else None  # scores on rank 0
        code = write_samples(args, run, judge)
    except (RunNotReady, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"sample.py: {err}\n")
        return EXIT_BAD_INPUT
    close_run()
    return code


def _fingerprint(args: argparse.Namespace, run: Any, sampler: Any, grid: GridSpec | None, tok: Any,
                 *, seed: int, batch_size: int, prefix_ids: list[int] | None) -> dict[str, Any]:
    """The run's fingerprint + sampler, generation and tokenizer records (the same on every rank)."""
    cfg = run.cfg
    fingerprint = run_fingerprint(run, use_ema=args.ema, hash_checkpoint=not args.no_hash)
    fingerprint["sampler"] = sampler_record(args.sampler, sampler, steps=args.steps, grid=grid, gamma=args.gamma)
    fingerprint["generation"] = {"seed": seed, "batch_size": batch_size, "num_samples": args.num_samples,
                                 "seq_length": cfg.model.seq_length, "prefix": args.prefix, "prefix_ids": prefix_ids,
                                 "prompts": args.prompts, "prompt_key": args.prompt_key,
                                 "seed_rule": "batch b: sha256(f'{seed}:{b}')[:8]"}
    fingerprint["tokenizer"] = {"name_or_path": tok.info.get("name_or_path"), "sha256": tok.sha256,
                                "decoded": tok.tokenizer is not None}
    return broadcast_object(fingerprint)


def read_prompts(path: str | Path, key: str) -> list[str]:
    """The prompt texts of a JSONL file (field ``key`` of each non-blank line).

    Raises:
        ValueError: ``file:line`` of a line that is not a JSON object with a string ``key``, or
            a file without prompts.
    """
    return [text for _, text in read_prompt_lines(path, key)]


def file_prompt_ids(path: str | Path, key: str, tok: Any, *, seq_length: int, add_bos: bool = True,
                    max_prompts: int | None = None) -> tuple[list[str], list[list[int]]]:
    """The first ``max_prompts`` prompts of a JSONL file: texts and ids (``[BOS]`` + prompt, as
    the preprocessing tokenizes a conditioned record).

    Raises:
        ValueError: ``file:line`` of a bad line (``read_prompt_lines``) or of a prompt that leaves
            no position of the model's ``seq_length`` to generate.
    """
    texts, ids = [], []
    for line_no, text in read_prompt_lines(path, key)[:max_prompts]:
        prompt = prefix_token_ids(tok, text, add_bos=add_bos)
        if len(prompt) >= seq_length:
            raise ValueError(f"{path}:{line_no}: the prompt has {len(prompt)} tokens; the model's rows hold "
                             f"{seq_length}: nothing left to generate")
        texts.append(text)
        ids.append(prompt)
    return texts, ids


def read_prompt_lines(path: str | Path, key: str) -> list[tuple[int, str]]:
    """``(line number, prompt text)`` of each non-blank line of a JSONL file (field ``key``).

    Raises:
        ValueError: ``file:line`` of a line that is not a JSON object with a string ``key``, or
            a file without prompts.
    """
    prompts = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ValueError(f"{path}:{line_no}: no string field {key!r} (--prompt-key)")
        prompts.append((line_no, record[key]))
    if not prompts:
        raise ValueError(f"{path}: no prompt")
    return prompts


def _prompt_ids(args: argparse.Namespace, run: Any, tok: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """With ``--prompts``: each sample's prompt text and ids (``--num-samples`` per prompt, in
    prompt order): a JSONL file's prompts tokenized as the preprocessing does (``[BOS]`` +
    prompt), or (``valid``) the given tokens of the run's conditioned validation rows."""
    if args.prompts is None:
        return None, None
    if args.prefix is not None:
        raise ValueError("give --prefix or --prompts, not both")
    if args.prompts == "valid":
        ids = read_eval_prompts(run, max_prompts=args.max_prompts)
        texts = [tok.decode(p) for p in ids]
    else:
        texts, ids = file_prompt_ids(args.prompts, args.prompt_key, tok, seq_length=run.cfg.model.seq_length,
                                     add_bos=not args.no_bos, max_prompts=args.max_prompts)
    n = args.num_samples
    return [t for t in texts for _ in range(n)], [p for p in ids for _ in range(n)]


def write_samples(args: argparse.Namespace, run: Any, judge: Any) -> int:
    """Draw the samples (every rank), then write and print them on rank 0; returns 0."""
    cfg = run.cfg
    seed = cfg.train.seed if args.seed is None else args.seed
    tok = load_run_tokenizer(cfg)
    prompt_texts, prompts = _prompt_ids(args, run, tok)
    num_samples = args.num_samples if prompts is None else len(prompts)
    batch_size = args.batch_size or min(num_samples, 16)
    prefix_ids = prefix_token_ids(tok, args.prefix, add_bos=not args.no_bos) if args.prefix is not None else None
    grid = grid_spec(args, getattr(SAMPLERS[args.sampler], "default_t_min", None))
    opts = sampler_options(args.sampler, mask_id=cfg.model.mask_id, family=run.model.family, steps=args.steps,
                           grid=grid, temperature=args.temperature, top_p=args.top_p, use_cache=not args.no_cache,
                           gamma=args.gamma, noise_scale=args.noise_scale)
    sampler = build_sampler(args.sampler, **opts)
    gen = generate(run, sampler, num_samples=num_samples, batch_size=batch_size, seed=seed,
                   prefix_ids=prefix_ids, prompts=prompts, use_ema=args.ema)
    fingerprint = _fingerprint(args, run, sampler, grid, tok, seed=seed, batch_size=batch_size,
                               prefix_ids=prefix_ids)
    if not is_rank0():
        return 0

    step = run.state.step
    out = Path(args.out) if args.out else (Path(cfg.run.dir) / "samples" /
                                           f"{args.sampler}_T{args.steps}_seed{seed}_step{step}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.sampler}, T={args.steps}, ckpt {step} (x: progress bins)"
    order = order_report(gen, heatmap_path=out.with_suffix(".order.png"), title=title)
    entropies = sample_entropies(gen.tokens)
    records = []
    for i in range(gen.tokens.shape[0]):
        ids = [int(x) for x in gen.tokens[i].tolist()]
        b = gen.batch_of[i]
        records.append({"index": i, "text": tok.decode(ids), "token_ids": ids, "batch": b,
                        "num_calls": gen.num_calls[b], "num_steps": gen.num_steps[b],
                        "kendall_tau": order["kendall_tau"][i], "unigram_entropy": entropies[i],
                        "tokenizer_sha256": tok.sha256, "fingerprint": fingerprint,
                        **_prompt_fields(prompt_texts, prompts, i)})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
    _write_summary(args, out, gen, order, entropies, records, judge, fingerprint)
    return 0


def _prompt_fields(texts: list[str] | None, prompts: list[list[int]] | None, i: int) -> dict[str, Any]:
    """A sample's ``prompt`` and ``prompt_ids`` (with ``--prompts``)."""
    return {} if prompts is None or texts is None else {"prompt": texts[i], "prompt_ids": prompts[i]}


def _write_summary(args: argparse.Namespace, out: Path, gen: Any, order: dict[str, Any], entropies: list[float],
                   records: list[dict[str, Any]], judge: Any, fingerprint: dict[str, Any]) -> None:
    """``<out>.summary.json``, also printed as one JSON line (with ``--judge``: the generative PPL)."""
    summary = {
        "out": str(out), "num_samples": len(records), "sampler": args.sampler, "steps": args.steps,
        "num_calls": gen.total_calls, "num_calls_per_batch": gen.num_calls, "num_steps_per_batch": gen.num_steps,
        "seconds": gen.seconds, "kendall_tau_mean": order["kendall_tau_mean"], "heatmap": order["heatmap"],
        "per_position_mean_exponent": order["per_position_mean_exponent"],
        "velocity_confidence_corr": order["velocity_confidence_corr"],
        "unigram_entropy_mean": sum(entropies) / len(entropies),
    }
    if judge is not None:
        t0 = time.time()
        summary.update(judge_gen_ppl(judge, records))
        summary["judge_seconds"] = time.time() - t0
    summary["fingerprint"] = fingerprint
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
