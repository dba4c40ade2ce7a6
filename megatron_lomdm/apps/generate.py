"""Generation from a trained run: the denoiser of an opened run, any sampler, order diagnostics.

The denoiser (``RunDenoiser``) makes ONE backbone pass per call (method.md §3.5):

- vocab-parallel logits are gathered across TP with megatron's
  ``tensor_parallel.gather_from_tensor_model_parallel_region`` and trimmed to the tokenizer's
  ``true_vocab_size`` (padding ids can never be drawn; [MASK] is removed by the sampler's SUBS);
- the family turns the pass into the sampler's logits and reverse exponents
  (``DiffusionFamily.denoiser_outputs`` through ``sampling.denoiser_from_backbone``): lomdm's
  e_R = c1 + c2 NormSig(g_psi(h)) from the hidden states of the SAME pass, genmd4's
  e_R = E_x_theta[w] with logits tilted by log w, multivariate's learned per-position exponents;
  the other context-free families (mdlm, poly, arm, bd3lm) return no exponents and the sampler
  gets ``family=`` instead;
- under PP the pass runs through megatron's forward-only pipeline schedule and the output is
  broadcast from the last stage, so every rank of a model replica runs the sampler identically
  (same generator, same outputs, same control flow).

Samples are split over data-parallel replicas by batch: batch b uses a generator seeded from
(seed, b) only (``sampling.batch_seed``), so for a given batch size the samples do not depend on
TP/PP/DP. The samplers themselves (``megatron_lomdm.sampling``) are pure torch; this module is
what binds them to an opened run (``apps.run.open_run``).

Shape legend: B sequences, L positions, V vocabulary (true size), D hidden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_lomdm.apps.run import weights
from megatron_lomdm.sampling.base import DenoiserOutput, Sampler, denoiser_from_backbone
from megatron_lomdm.sampling.metrics import order_heatmap, order_kendall_tau, save_order_heatmap
from megatron_lomdm.sampling.record import batch_seed
from megatron_lomdm.utils.progress import progress

_CONF_CHUNK_ROWS = 1024


# --------------------------------------------------------------------------------------------
# The denoiser of a run
# --------------------------------------------------------------------------------------------


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
        self.given_BL: Tensor | None = None  # the current batch's prompt positions (`generate` sets it)

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
                                         rev_head=self.model.rev_head, given_BL=self.given_BL)
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
        extras: ``num_remasked``, tokens masked again by a remasking sampler over all batches.
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
             prefix_ids: Sequence[int] | None = None, prompts: Sequence[Sequence[int]] | None = None,
             use_ema: bool = True, diagnostics: bool = True) -> Generation:
    """Draw ``num_samples`` sequences of the model's length with ``sampler`` (collective).

    Args:
        run: from ``apps.run.open_run``.
        sampler: from ``build_sampler(name, **sampler_options(...))``.
        num_samples: N >= 1.
        batch_size: sequences per sampler call (the last batch may be smaller).
        seed: batch b draws with a generator seeded by ``batch_seed(seed, b)``.
        prefix_ids: tokens fixed at positions 0..P-1 of every sample (prefix conditioning).
        prompts: per sample (N of them), the tokens fixed at its first positions (conditioned
            generation: the model's exponents normalise over the other positions, as in training);
            a [MASK] inside a prompt is generated (in-place infilling); exclusive with ``prefix_ids``.
        use_ema: EMA weights (default) or the live weights.
        diagnostics: accumulate the per-position exponent and e_R/confidence correlation.

    Returns:
        The ``Generation``, identical on every rank.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    L = run.cfg.model.seq_length
    device = run.device
    rows = sample_prompts(num_samples, L, prefix_ids=prefix_ids, prompts=prompts, mask_id=sampler.mask_id)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    num_batches = -(-num_samples // batch_size)
    denoiser = RunDenoiser(run, diagnostics=diagnostics)
    mine: list[dict[str, Any]] = []
    t0 = time.time()
    run.model.eval()
    with weights(run, use_ema):
        mine_b = range(dp_rank, num_batches, dp)
        for b in progress(mine_b, total=len(mine_b), desc=f"sampling ({type(sampler).__name__})", unit="batch"):
            B = min(batch_size, num_samples - b * batch_size)
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
            kwargs: dict[str, Any] = {"batch_size": B, "seq_length": L}
            if rows is not None:
                prompt_BL, fixed_BL = prompt_batch(rows[b * batch_size: b * batch_size + B], L, sampler.mask_id)
                kwargs = {"prompt_BL": prompt_BL.to(device), "fixed_BL": fixed_BL.to(device)}
            denoiser.given_BL = kwargs.get("fixed_BL")
            res = sampler.sample(denoiser, generator=generator, device=device, **kwargs)
            mine.append({"batch": b, "tokens": res.tokens_BL.cpu(), "unmask_step": res.unmask_step_BL.cpu(),
                         "num_calls": res.num_calls, "num_steps": res.num_steps, "num_remasked": res.num_remasked})
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
        exp_sum_L=exp_sum, exp_count_L=exp_count, corr=corr, seconds=seconds,
        extras={"num_remasked": sum(item["num_remasked"] for item in batches)})


def sample_prompts(num_samples: int, seq_length: int, *, prefix_ids: Sequence[int] | None = None,
                   prompts: Sequence[Sequence[int]] | None = None,
                   mask_id: int | None = None) -> list[list[int]] | None:
    """Each sample's prompt ids (None: unconditional): ``prefix_ids`` for all, or ``prompts``.

    A prompt fixes the first positions of its row; with ``mask_id``, a [MASK] inside it is a
    position to generate (in-place infilling, e.g. a Sudoku's blanks: docs/puzzles.md).

    Raises:
        ValueError: both given, a count other than ``num_samples``, or a prompt that leaves
            nothing to generate.
    """
    if prefix_ids is not None and prompts is not None:
        raise ValueError("give prefix_ids or prompts, not both")
    if prompts is None:
        prompts = None if not prefix_ids else [list(prefix_ids)] * num_samples
    if prompts is None:
        return None
    if len(prompts) != num_samples:
        raise ValueError(f"{len(prompts)} prompts for {num_samples} samples")
    for i, ids in enumerate(prompts):
        has_blank = mask_id is not None and mask_id in ids
        if len(ids) > seq_length or (len(ids) == seq_length and not has_blank):
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model generates {seq_length}: "
                             "nothing left to generate")
    return [list(ids) for ids in prompts]


def prompt_batch(prompts: Sequence[Sequence[int]], seq_length: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """The samplers' initial state for prompts: ``prompt_BL`` ([MASK] after each prompt) and
    ``fixed_BL`` (True on each prompt's positions except the [MASK]s inside it), (B, L) each."""
    prompt_BL = torch.full((len(prompts), seq_length), mask_id, dtype=torch.int64)
    for i, ids in enumerate(prompts):
        prompt_BL[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
    return prompt_BL, prompt_BL != mask_id


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


__all__ = ["Generation", "RunDenoiser", "generate", "order_report"]
