"""Scoring samples: the tokenizer of a run, exact autoregressive likelihoods, and the judges of
generative perplexity.

Judges: ``HFJudge`` (a local HF causal-LM folder; samples are decoded and re-tokenised) and
``RunJudge`` (a run directory of an ARM member of our own family, scored with its exact
autoregressive likelihood ``ar_logprobs`` in a child process through ``tools/evaluate.py
--score-jsonl``; token ids are reused when the tokenizers agree, else the text is re-tokenised).

Shape legend: N samples, L positions, V vocabulary (true size).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_lomdm.apps.generate import RunDenoiser
from megatron_lomdm.apps.run import clean_launcher_env, load_run_config, resolve_checkpoint, weights
from megatron_lomdm.data.shards import read_manifest
from megatron_lomdm.diffusion.registry import FAMILIES
from megatron_lomdm.sampling.metrics import gen_ppl, unigram_entropy
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Tokenizer of a run
# --------------------------------------------------------------------------------------------


@dataclass
class RunTokenizer:
    """The tokenizer the run's data was made with (``None`` tokenizer: not loadable here)."""

    tokenizer: Any
    info: dict[str, Any]
    problem: str | None = None

    @property
    def sha256(self) -> str | None:
        return self.info.get("tokenizer_json_sha256")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"cannot encode text: {self.problem}")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_run_tokenizer(cfg: Any) -> RunTokenizer:
    """Load the tokenizer named by the run's training manifest; its sha256 must match the manifest's."""
    from megatron_lomdm.data.tokenize import load_tokenizer

    info = dict(read_manifest(cfg.data.train).tokenizer)
    try:
        tok, loaded = load_tokenizer(info["name_or_path"])
    except Exception as err:  # noqa: BLE001
        problem = f"tokenizer {info.get('name_or_path')!r} of the training manifest cannot be loaded ({err})"
        log.warning("%s; samples are written as token ids only", problem)
        return RunTokenizer(None, info, problem)
    if info.get("tokenizer_json_sha256") and loaded.tokenizer_json_sha256 != info["tokenizer_json_sha256"]:
        problem = (f"tokenizer at {info['name_or_path']} has sha256 {loaded.tokenizer_json_sha256[:16]}... but the "
                   f"data was made with {info['tokenizer_json_sha256'][:16]}...")
        log.warning("%s; samples are written as token ids only", problem)
        return RunTokenizer(None, info, problem)
    return RunTokenizer(tok, info)


def prefix_token_ids(tok: RunTokenizer, text: str, *, add_bos: bool = True) -> list[int]:
    """Prefix ids as documents begin in the shards: BOS (where the tokenizer has a distinct one) + text."""
    bos, eos = tok.info.get("bos_id"), tok.info.get("eos_id")
    head = [int(bos)] if add_bos and bos is not None and bos != eos else []
    return head + tok.encode(text)


# --------------------------------------------------------------------------------------------
# Exact AR likelihood and judges (generative perplexity)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ar_logprobs(run: Any, sequences: Sequence[Sequence[int]], *, use_ema: bool = True,
                rows_per_pass: int = 64) -> list[np.ndarray]:
    """Exact autoregressive log-likelihood of each sequence under an ARM run (collective).

    For ``diffusion.name=arm`` the OeMDM NELBO integral collapses to sum_i -log p(x_i | x_<i)
    (alpha^(i) is 1 before position i's slot and 0 after): position i is predicted from the clean
    x_<i with every position >= i masked. So each token costs one row; rows are batched, and a
    sequence longer than the model's length is scored in consecutive windows of that length
    (each window's first token conditioned on nothing but masks).

    Returns:
        Per sequence, the fp64 log-probabilities of all its tokens.
    """
    if not run.model.family.autoregressive:
        raise ValueError(f"the run is diffusion.name={run.cfg.diffusion.name}; exact AR scoring needs an arm run")
    L = run.cfg.model.seq_length
    mask_id, vocab = int(run.model.mask_id), int(run.model.backbone.true_vocab_size)
    denoiser = RunDenoiser(run, diagnostics=False)
    rows: list[tuple[int, int, list[int], int]] = []  # (sequence, token position, window, position in window)
    for s, seq in enumerate(sequences):
        seq = [int(x) for x in seq]
        bad = [x for x in seq if not 0 <= x < vocab or x == mask_id]
        if bad:
            raise ValueError(f"sequence {s} has ids outside the judge's vocabulary or [MASK]: {bad[:5]}")
        for w0 in range(0, len(seq), L):
            window = seq[w0:w0 + L]
            rows += [(s, w0 + i, window, i) for i in range(len(window))]
    out = [np.zeros(len(seq), dtype=np.float64) for seq in sequences]
    last = parallel_state.is_pipeline_last_stage()
    with weights(run, use_ema):
        for start in range(0, len(rows), rows_per_pass):
            chunk = rows[start:start + rows_per_pass]
            z = torch.full((len(chunk), L), mask_id, dtype=torch.int64)
            target = torch.zeros(len(chunk), dtype=torch.int64)
            pos = torch.zeros(len(chunk), dtype=torch.int64)
            for r, (_, _, window, i) in enumerate(chunk):
                z[r, :i] = torch.tensor(window[:i], dtype=torch.int64)
                target[r], pos[r] = window[i], i
            z = z.to(run.device)
            logits = denoiser.forward_pass(z, raw=True)
            logp = torch.empty(len(chunk), dtype=torch.float64, device=run.device)
            if last:
                logits_NV = logits[torch.arange(len(chunk)), pos.to(run.device)].double()
                logits_NV[:, mask_id] = -math.inf  # SUBS
                logp = torch.log_softmax(logits_NV, -1).gather(1, target.to(run.device)[:, None])[:, 0]
            if denoiser.pp > 1:
                dist.broadcast(logp, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
            for r, (s, p, _, _) in enumerate(chunk):
                out[s][p] = float(logp[r])
    return out


def score_jsonl(run: Any, path: str | Path, *, use_ema: bool = True) -> list[dict[str, Any]]:
    """Score a JSONL file of samples with an ARM run (``tools/evaluate.py --score-jsonl``).

    Each line has ``token_ids`` and/or ``text`` (and optionally ``tokenizer_sha256``): ids are used
    when their tokenizer is the judge's, otherwise the text is re-tokenised with the judge's.

    Returns:
        One ``{"logprobs", "num_tokens", "retokenized"}`` per line.
    """
    tok = load_run_tokenizer(run.cfg)
    ours = read_manifest(run.cfg.data.train).tokenizer.get("tokenizer_json_sha256")
    seqs, retok = [], []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        same = rec.get("token_ids") is not None and rec.get("tokenizer_sha256", ours) == ours
        if same:
            seqs.append(rec["token_ids"])
        elif rec.get("text") is not None:
            seqs.append(tok.encode(rec["text"]))
        else:
            raise ValueError(f"{path}:{n + 1}: needs token_ids from the judge's tokenizer or text")
        retok.append(not same)
    rows = ar_logprobs(run, seqs, use_ema=use_ema)
    return [{"logprobs": r.tolist(), "num_tokens": len(r), "retokenized": t} for r, t in zip(rows, retok)]


class RunJudge:
    """A run directory of an ARM member of our family, scored in a child process."""

    def __init__(self, run_dir: str | Path, *, use_ema: bool = True, timeout: float = 3600) -> None:
        self.run_dir = Path(run_dir)
        self.use_ema = use_ema
        self.timeout = timeout
        cfg = load_run_config(self.run_dir)
        if not FAMILIES[cfg.diffusion.name].autoregressive:
            raise ValueError(f"judge run {run_dir} is diffusion.name={cfg.diffusion.name}; a run judge must be arm")
        self.step = resolve_checkpoint(self.run_dir, None)
        self.describe = {"kind": "run", "path": str(self.run_dir.resolve()), "family": cfg.diffusion.name,
                         "checkpoint_step": self.step, "weights": "ema" if use_ema else "live",
                         "likelihood": "exact autoregressive"}

    def logprobs(self, samples: Sequence[dict[str, Any]]) -> list[list[float]]:
        """Log-probs of every scored token of each sample (dicts with token_ids/text/tokenizer_sha256)."""
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            src.write_text("".join(json.dumps({k: s.get(k) for k in ("token_ids", "text", "tokenizer_sha256")}) + "\n"
                                   for s in samples))
            cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--run-dir", str(self.run_dir),
                   "--score-jsonl", str(src), "--score-out", str(dst)] + ([] if self.use_ema else ["--no-ema"])
            proc = subprocess.run(cmd, cwd=ROOT, env=clean_launcher_env(), capture_output=True, text=True,
                                  timeout=self.timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"judge {self.run_dir} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            lines = [json.loads(x) for x in dst.read_text().splitlines() if x.strip()]
        self.retokenized = any(x["retokenized"] for x in lines)
        self.describe["retokenized"] = self.retokenized
        return [x["logprobs"] for x in lines]


class HFJudge:
    """A local Hugging Face causal-LM folder (e.g. GPT-2 Large): samples are decoded and re-tokenised.

    A BOS token is prepended where the tokenizer has one (every sample token is scored), else the
    first token is context only. Sequences longer than the model's context are scored in
    consecutive windows. Log-softmax in fp64.
    """

    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), local_files_only=True).to(device).eval()
        self.device = torch.device(device)
        cfg = self.model.config
        self.context = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024))
        self.batch_size = batch_size
        self.describe = {"kind": "hf", "path": str(self.folder.resolve()), "model_type": cfg.model_type,
                         "context": self.context, "retokenized": True}

    @torch.no_grad()
    def logprobs(self, samples: Sequence[dict[str, Any]]) -> list[list[float]]:
        out = []
        bos = self.tokenizer.bos_token_id
        for s in samples:
            if s.get("text") is None:
                raise ValueError("the HF judge needs decoded text (the run's tokenizer could not be loaded)")
            ids = self.tokenizer(s["text"], add_special_tokens=False)["input_ids"]
            ids = ([bos] if bos is not None else []) + list(ids)
            scored: list[float] = []
            for w0 in range(0, max(len(ids) - 1, 0), self.context):
                window = ids[w0:w0 + self.context + 1]
                x = torch.tensor([window[:-1]], device=self.device)
                logits = self.model(input_ids=x).logits[0].double()
                logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:], device=self.device)[:, None])
                scored += logp[:, 0].tolist()
            out.append(scored)
        return out


def make_judge(path: str | Path, *, device: str | torch.device = "cpu") -> RunJudge | HFJudge:
    """A run directory (has config.yaml) -> ``RunJudge``; a folder with config.json -> ``HFJudge``."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return RunJudge(path)
    if (path / "config.json").is_file():
        return HFJudge(path, device=device)
    raise ValueError(f"--judge {path}: neither a run directory (config.yaml) nor a local HF model folder "
                     "(config.json)")


def judge_gen_ppl(judge: RunJudge | HFJudge, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generative perplexity of ``samples`` (dicts with token_ids/text/tokenizer_sha256) under ``judge``."""
    rows = judge.logprobs(samples)
    scored = iter(rows)
    value = gen_ppl(lambda batch: [next(scored) for _ in batch], list(samples), batch_size=len(samples) or 1)
    return {"gen_ppl": value, "scored_tokens": int(sum(len(r) for r in rows)), "judge": judge.describe}


def sample_entropies(tokens: Tensor) -> list[float]:
    """Unigram entropy of each sample (nats)."""
    return unigram_entropy(tokens).tolist()


__all__ = [
    "HFJudge", "RunJudge", "RunTokenizer", "ar_logprobs", "judge_gen_ppl", "load_run_tokenizer", "make_judge",
    "prefix_token_ids", "sample_entropies", "score_jsonl",
]
