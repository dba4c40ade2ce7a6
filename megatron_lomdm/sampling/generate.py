"""Generation from a trained run: the denoiser of a built ``Run``, any sampler, decoding, order
diagnostics, and generative-perplexity judges.

The denoiser (``RunDenoiser``) makes ONE backbone pass per call (method.md §3.5):

- vocab-parallel logits are gathered across TP with megatron's
  ``tensor_parallel.gather_from_tensor_model_parallel_region`` and trimmed to the tokenizer's
  ``true_vocab_size`` (padding ids can never be drawn; [MASK] is removed by the sampler's SUBS);
- lomdm: the reverse exponents e_R = c1 + c2 NormSig(g_psi(h)) come from the hidden states of
  the SAME pass; genmd4: ``denoiser_from_backbone`` (e_R = E_x_theta[w], logits tilted by log w);
  multivariate: its learned per-position exponents w; the other context-free families (mdlm,
  poly, arm, bd3lm) return no exponents and the sampler gets ``family=`` instead;
- under PP the pass runs through megatron's forward-only pipeline schedule and the output is
  broadcast from the last stage, so every rank of a model replica runs the sampler identically
  (same generator, same outputs, same control flow).

Samples are split over data-parallel replicas by batch: batch b uses a generator seeded from
(seed, b) only, so for a given batch size the samples do not depend on TP/PP/DP.

Judges for generative perplexity: ``HFJudge`` (a local HF causal-LM folder; samples are decoded
and re-tokenised) and ``RunJudge`` (a run directory of an ARM member of our own family, scored
with its exact autoregressive likelihood ``ar_logprobs`` in a child process through
``tools/evaluate.py --score-jsonl``; token ids are reused when the tokenizers agree, else the
text is re-tokenised).

Shape legend: B sequences, L positions, V vocabulary (true size), D hidden.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_lomdm.data.shards import read_manifest
from megatron_lomdm.diffusion.registry import FAMILIES
from megatron_lomdm.sampling import SAMPLERS
from megatron_lomdm.sampling.base import DenoiserOutput, Sampler, denoiser_from_backbone
from megatron_lomdm.sampling.grids import GridSpec
from megatron_lomdm.sampling.metrics import (
    gen_ppl,
    order_heatmap,
    order_kendall_tau,
    save_order_heatmap,
    unigram_entropy,
)
from megatron_lomdm.training.evaluate import clean_launcher_env, weights
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
ROOT = Path(__file__).resolve().parents[2]
_CONF_CHUNK_ROWS = 1024


# --------------------------------------------------------------------------------------------
# The denoiser of a run
# --------------------------------------------------------------------------------------------


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _zero_loss(output_tensor: Tensor):
    """megatron-core loss contract for a pass whose outputs are captured elsewhere."""
    zero = torch.zeros((), device=output_tensor.device)
    return zero, torch.zeros((), dtype=torch.int, device=output_tensor.device), {}


class RunDenoiser:
    """``denoise(z_BL) -> DenoiserOutput`` for a built run (collective: every rank of the model
    replica calls it with the same z).

    Attributes:
        num_calls: backbone passes made so far.
        exp_sum_L / exp_count_L: per-position sums of e_R over the masked positions of every
            call (lomdm/genmd4/multivariate), fp64 (L,).
        corr: pooled sums for the Pearson correlation of e_R with the max-probability of x_theta
            at masked positions (the inference-time "Figure 4" signal).
    """

    def __init__(self, run: Any, *, diagnostics: bool = True) -> None:
        self.run = run
        self.model = run.model
        self.family = self.model.family
        self.backbone = self.model.backbone
        self.true_vocab_size = int(self.backbone.true_vocab_size)
        self.mask_id = int(self.model.mask_id)
        self.has_exponents = self.family.denoiser_exponents
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.diagnostics = diagnostics
        self.num_calls = 0
        L = run.cfg.model.seq_length
        self.exp_sum_L = torch.zeros(L, dtype=torch.float64)
        self.exp_count_L = torch.zeros(L, dtype=torch.float64)
        self.corr = dict.fromkeys(("n", "x", "y", "xx", "yy", "xy"), 0.0)

    # ---- one backbone pass ----------------------------------------------------------------
    def _full_logits(self, logits_BLV: Tensor) -> Tensor:
        """This TP rank's vocabulary slice -> the whole (true) vocabulary, fp32."""
        if self.tp > 1:
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits_BLV = gather_from_tensor_model_parallel_region(logits_BLV.contiguous())
        return logits_BLV[..., : self.true_vocab_size].float()

    def _last_stage(self, z_BL: Tensor, logits_BLV: Tensor, hidden_BLD: Tensor) -> DenoiserOutput:
        logits_BLV = self._full_logits(logits_BLV)
        denoise = denoiser_from_backbone(lambda _z: (logits_BLV, hidden_BLD), family=self.family,
                                         rev_head=self.model.rev_head)
        out = denoise(z_BL)
        e_BL = out.velocity_exponents_BL
        return DenoiserOutput(out.logits_BLV.float(), None if e_BL is None else e_BL.float())

    def forward_pass(self, z_BL: Tensor, valid_BL: Tensor | None = None, *, raw: bool = False):
        """One pass; on the last pipeline stage the ``DenoiserOutput`` (``raw``: the gathered
        fp32 logits (B, L, V) instead), elsewhere None."""
        if self.pp == 1:
            logits_BLV, hidden_BLD = self.backbone(z_BL, valid_BL)
            return self._full_logits(logits_BLV) if raw else self._last_stage(z_BL, logits_BLV, hidden_BLD)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        captured: dict[str, Any] = {}

        def forward_step(data_iterator, model):
            z, valid = next(data_iterator)
            out = self.backbone(z, valid)
            if not self.backbone.post_process:
                return out, _zero_loss
            logits_BLV, hidden_BLD = out
            captured["out"] = self._full_logits(logits_BLV) if raw else self._last_stage(z, logits_BLV, hidden_BLD)
            return hidden_BLD.sum(), _zero_loss

        B, L = z_BL.shape
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(z_BL, valid_BL)]), model=[self.run.engine.module],
            num_microbatches=1, seq_length=L, micro_batch_size=B, forward_only=True)
        return captured.get("out")

    def _broadcast_output(self, out: DenoiserOutput | None, B: int, L: int, device: torch.device) -> DenoiserOutput:
        """The last stage's output on every pipeline stage."""
        if self.pp == 1:
            return out
        group = parallel_state.get_pipeline_model_parallel_group()
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        last = parallel_state.is_pipeline_last_stage()
        logits = out.logits_BLV.contiguous() if last else torch.empty(B, L, self.true_vocab_size, device=device)
        dist.broadcast(logits, src=src, group=group)
        e_BL = None
        if self.has_exponents:
            e_BL = out.velocity_exponents_BL.contiguous() if last else torch.empty(B, L, device=device)
            dist.broadcast(e_BL, src=src, group=group)
        return DenoiserOutput(logits, e_BL)

    @torch.no_grad()
    def __call__(self, z_BL: Tensor) -> DenoiserOutput:
        B, L = z_BL.shape
        out = self._broadcast_output(self.forward_pass(z_BL), B, L, z_BL.device)
        self.num_calls += 1
        if self.diagnostics and out.velocity_exponents_BL is not None:
            self._accumulate(z_BL, out)
        return out

    def _accumulate(self, z_BL: Tensor, out: DenoiserOutput) -> None:
        masked_BL = z_BL == self.mask_id
        e_BL = out.velocity_exponents_BL.double()
        self.exp_sum_L += torch.where(masked_BL, e_BL, 0.0).sum(0).cpu()
        self.exp_count_L += masked_BL.double().sum(0).cpu()
        rows_N2 = torch.nonzero(masked_BL)
        for rows in torch.split(rows_N2, _CONF_CHUNK_ROWS):
            logits_NV = out.logits_BLV[rows[:, 0], rows[:, 1]].float()
            logits_NV[:, self.mask_id] = -math.inf  # SUBS
            conf_N = (logits_NV.max(-1).values - torch.logsumexp(logits_NV, -1)).exp().double()
            x_N = e_BL[rows[:, 0], rows[:, 1]]
            c = self.corr
            c["n"] += rows.shape[0]
            c["x"] += float(x_N.sum())
            c["y"] += float(conf_N.sum())
            c["xx"] += float((x_N * x_N).sum())
            c["yy"] += float((conf_N * conf_N).sum())
            c["xy"] += float((x_N * conf_N).sum())


# --------------------------------------------------------------------------------------------
# Samplers for a run
# --------------------------------------------------------------------------------------------


def sampler_options(name: str, *, mask_id: int, family: Any, steps: int | None, grid: GridSpec | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
                    gamma: float | None = None) -> dict[str, Any]:
    """The keyword options ``build_sampler(name, ...)`` gets for a model of ``family``.

    Options a sampler does not take are left out (``entropy_bound`` has no steps or grid;
    ``mdlm_cache`` is MDLM's alpha = 1 - t whatever the family); ``family=`` is passed wherever
    accepted so context-free families supply their reverse schedule.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(sorted(SAMPLERS))}")
    accepted = set(inspect.signature(SAMPLERS[name].__init__).parameters)
    opts: dict[str, Any] = {"mask_id": mask_id, "temperature": temperature, "top_p": top_p, "use_cache": use_cache}
    if "num_steps" in accepted and steps is not None:
        opts["num_steps"] = steps
    if "grid" in accepted and grid is not None:
        opts["grid"] = grid
    if "family" in accepted:
        opts["family"] = family
    if "gamma" in accepted and gamma is not None:
        opts["gamma"] = gamma
    return opts


def sampler_record(name: str, sampler: Sampler, *, steps: int | None, grid: GridSpec | None,
                   gamma: float | None) -> dict[str, Any]:
    """What reproduces a sampler: name, steps, grid (spec + sha256 of its points), temperature,
    top_p, cache, gamma, and the fp64 draws."""
    grid_T1 = getattr(sampler, "grid_T1", None)
    rec: dict[str, Any] = {
        "name": name, "steps": steps, "uses_steps": hasattr(sampler, "num_steps"),
        "temperature": sampler.temperature, "top_p": sampler.top_p, "use_cache": sampler.use_cache, "draw_precision": "fp64",
        "grid": None if grid_T1 is None else {
            **({"kind": "default"} if grid is None else {"kind": grid.kind, "t_min": grid.t_min, "a": grid.a,
                                                         "b": grid.b, "sin2": grid.sin2, "exponent": grid.exponent}),
            "first": float(grid_T1[0]), "last": float(grid_T1[-1]), "points": int(grid_T1.numel()),
            "sha256": hashlib.sha256(grid_T1.double().numpy().tobytes()).hexdigest()},
    }
    if hasattr(sampler, "gamma"):
        rec["gamma"] = sampler.gamma
    if hasattr(sampler, "noise_removal"):
        rec["noise_removal"] = sampler.noise_removal
    return rec


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of batch ``batch``: a function of (seed, batch) only."""
    digest = hashlib.sha256(f"{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """Samples of all batches (identical on every rank after ``generate``).

    Attributes:
        tokens: (N, L) int64 token ids (no [MASK]).
        unmask_step: (N, L) step at which each position was unmasked; -1 for prefix positions.
        batch_of: batch index of each sample.
        num_calls: backbone calls per batch.
        num_steps: executed steps per batch.
        exp_sum_L / exp_count_L / corr: ``RunDenoiser`` diagnostics summed over batches.
        seconds: wall time of the sampling loop.
    """

    tokens: Tensor
    unmask_step: Tensor
    batch_of: list[int]
    num_calls: list[int]
    num_steps: list[int]
    exp_sum_L: Tensor
    exp_count_L: Tensor
    corr: dict[str, float]
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return int(sum(self.num_calls))

    def per_position_mean_exponent(self) -> list[float | None]:
        """Mean e_R per position over the masked positions of every call (None: not learned-order)."""
        return [None if c == 0 else float(s / c) for s, c in zip(self.exp_sum_L.tolist(), self.exp_count_L.tolist())]

    def velocity_confidence_corr(self) -> float | None:
        c = self.corr
        n = c["n"]
        if n < 2:
            return None
        vx = c["xx"] / n - (c["x"] / n) ** 2
        vy = c["yy"] / n - (c["y"] / n) ** 2
        if vx <= 1e-18 or vy <= 1e-18:
            return None
        return (c["xy"] / n - c["x"] / n * c["y"] / n) / math.sqrt(vx * vy)


@torch.no_grad()
def generate(run: Any, sampler: Sampler, *, num_samples: int, batch_size: int, seed: int,
             prefix_ids: Sequence[int] | None = None, use_ema: bool = True, diagnostics: bool = True) -> Generation:
    """Draw ``num_samples`` sequences of the model's length with ``sampler`` (collective).

    Args:
        run: from ``training.evaluate.open_run``.
        sampler: from ``build_sampler(name, **sampler_options(...))``.
        num_samples: N >= 1.
        batch_size: sequences per sampler call (the last batch may be smaller).
        seed: batch b draws with a generator seeded by ``batch_seed(seed, b)``.
        prefix_ids: tokens fixed at positions 0..P-1 of every sample (prefix conditioning).
        use_ema: EMA weights (default) or the live weights.
        diagnostics: accumulate the per-position exponent and e_R/confidence correlation.

    Returns:
        The ``Generation``, identical on every rank.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    L = run.cfg.model.seq_length
    device = run.device
    prefix = list(prefix_ids or [])
    if len(prefix) >= L:
        raise ValueError(f"the prefix has {len(prefix)} tokens; the model generates {L}: nothing left to generate")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    num_batches = -(-num_samples // batch_size)
    denoiser = RunDenoiser(run, diagnostics=diagnostics)
    mine: list[dict[str, Any]] = []
    t0 = time.time()
    run.model.eval()
    with weights(run, use_ema):
        for b in range(dp_rank, num_batches, dp):
            B = min(batch_size, num_samples - b * batch_size)
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
            kwargs: dict[str, Any] = {"batch_size": B, "seq_length": L}
            if prefix:
                prompt = torch.full((B, L), sampler.mask_id, dtype=torch.int64, device=device)
                prompt[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.int64, device=device)
                fixed = torch.zeros(B, L, dtype=torch.bool, device=device)
                fixed[:, : len(prefix)] = True
                kwargs = {"prompt_BL": prompt, "fixed_BL": fixed}
            res = sampler.sample(denoiser, generator=generator, device=device, **kwargs)
            mine.append({"batch": b, "tokens": res.tokens_BL.cpu(), "unmask_step": res.unmask_step_BL.cpu(),
                         "num_calls": res.num_calls, "num_steps": res.num_steps})
    seconds = time.time() - t0
    diag = {"exp_sum": denoiser.exp_sum_L, "exp_count": denoiser.exp_count_L, "corr": denoiser.corr}
    gathered = [(mine, diag)]
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, (mine, diag), group=parallel_state.get_data_parallel_group())
    batches = sorted((item for part, _ in gathered for item in part), key=lambda item: item["batch"])
    exp_sum = sum(d["exp_sum"] for _, d in gathered)
    exp_count = sum(d["exp_count"] for _, d in gathered)
    corr = {k: sum(d["corr"][k] for _, d in gathered) for k in denoiser.corr}
    return Generation(
        tokens=torch.cat([item["tokens"] for item in batches]),
        unmask_step=torch.cat([item["unmask_step"] for item in batches]),
        batch_of=[item["batch"] for item in batches for _ in range(item["tokens"].shape[0])],
        num_calls=[item["num_calls"] for item in batches], num_steps=[item["num_steps"] for item in batches],
        exp_sum_L=exp_sum, exp_count_L=exp_count, corr=corr, seconds=seconds)


def order_report(gen: Generation, *, heatmap_path: str | Path | None = None, title: str | None = None,
                 num_bins: int | None = None) -> dict[str, Any]:
    """Order diagnostics: Kendall tau vs left-to-right (per sample and mean), the position x
    relative-progress heat map (PNG when ``heatmap_path``), per-position mean exponent, and the
    e_R / confidence correlation."""
    tau_B = order_kendall_tau(gen.unmask_step)
    L = gen.tokens.shape[1]
    bins = num_bins or min(64, L)
    heat_LS = order_heatmap(gen.unmask_step, num_bins=bins)
    written = None
    if heatmap_path is not None and save_order_heatmap(heat_LS, heatmap_path, title=title):
        written = str(heatmap_path)
    finite = tau_B[~torch.isnan(tau_B)]
    return {
        "kendall_tau": [None if math.isnan(x) else x for x in tau_B.tolist()],
        "kendall_tau_mean": float(finite.mean()) if finite.numel() else None,
        "heatmap": written,
        "heatmap_bins": bins,
        "per_position_mean_exponent": gen.per_position_mean_exponent(),
        "velocity_confidence_corr": gen.velocity_confidence_corr(),
    }


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
# Judges (generative perplexity)
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
        from megatron_lomdm.training.evaluate import load_run_config, resolve_checkpoint

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
    "Generation", "HFJudge", "RunDenoiser", "RunJudge", "RunTokenizer", "ar_logprobs", "batch_seed", "generate",
    "judge_gen_ppl", "load_run_tokenizer", "make_judge", "order_report", "prefix_token_ids", "sample_entropies",
    "sampler_options", "sampler_record", "score_jsonl",
]
