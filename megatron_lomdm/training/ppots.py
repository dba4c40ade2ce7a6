"""P-POTS time sampling state: per-bin loss statistics and the proposal refreshed from them.

method.md §5.8 (Jia et al., arXiv 2511.18159). The pure math (inverse-CDF draws, importance
weights, bin sums, the proposal) is in `diffusion.time_sampling`; this module holds what changes
during training and must resume:

- every training step, each sequence's unweighted per-token NELBO is summed into N bins of t
  (count, sum, sum of squares) by `DiffusionLM.forward` (``diag["time_stats"]``, no extra
  pass); `PPOTSEstimator.observe` sums them over micro-batches, all-reduces them over data
  parallelism and shares them from the last pipeline stage, exactly as
  `training.step.reduce_reports` does for the loss report, so every rank holds the same sums;
- after every step count c >= `diffusion.ppots_warmup` with c % `diffusion.ppots_refresh` == 0
  the window's sums join an exponential average over refreshes (old sums weighted by
  `diffusion.ppots_decay`), and the proposal p = (1 - lambda) w/Z + lambda u is rebuilt from it
  (`loss_scale_mass`), then broadcast from global rank 0 so every rank draws with the very same
  tensor (the draws of a sequence depend only on seed, step, global index and p);
- before the first refresh p is uniform and the training step is bit-identical to the default
  low-discrepancy sampler (statistics still accumulate).

Window sums, averaged sums and the proposal are saved with the checkpoint (`state_dict`), so a
resumed run draws and weights exactly as an uninterrupted one.

Legend: N bins over [eps_t, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lomdm.config.schema import DiffusionConfig
from megatron_lomdm.diffusion.time_sampling import loss_scale_mass
from megatron_lomdm.models.diffusion_lm import DiffusionLM
from megatron_lomdm.utils.logging import get_logger

log = get_logger(__name__)
STATS_KEY = "time_stats"


def reduce_time_stats(reports: list[dict], num_bins: int, device: torch.device) -> torch.Tensor:
    """This step's per-bin loss sums over micro-batches and DP ranks, shared from the last PP stage.

    Args:
        reports: the step's micro-batch reports (empty off the last pipeline stage).
        num_bins: N.
        device: where the collective runs.

    Returns:
        fp64 (3, N), identical on every rank.
    """
    sums_3N = torch.zeros(3, num_bins, dtype=torch.float64, device=device)
    for report in reports:
        if STATS_KEY in report:
            sums_3N += report[STATS_KEY].to(device, torch.float64)
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums_3N, group=parallel_state.get_data_parallel_group())
    if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(sums_3N, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return sums_3N


class PPOTSEstimator:
    """Loss-scale estimates per t bin and the P-POTS proposal the model draws from.

    Args:
        model: the (unwrapped) DiffusionLM whose `time_bins` / `time_mass` this drives.
        num_bins: N equal bins of [eps_t, 1].
        refresh: steps between proposal refreshes.
        warmup: steps before the first refresh (the proposal is uniform until then).
        uniform_mix: lambda in (0, 1]: importance weights are at most 1 / lambda.
        decay: weight of the previous averaged sums at a refresh, in [0, 1).
        device: device of the statistics (the rank's device).
    """

    def __init__(self, model: DiffusionLM, *, num_bins: int, refresh: int, warmup: int, uniform_mix: float,
                 decay: float, device: torch.device) -> None:
        self.model = model
        self.num_bins, self.refresh_every, self.warmup = num_bins, refresh, warmup
        self.uniform_mix, self.decay, self.device = uniform_mix, decay, device
        self.window_3N = torch.zeros(3, num_bins, dtype=torch.float64, device=device)  # since the last refresh
        self.stats_3N = torch.zeros(3, num_bins, dtype=torch.float64, device=device)  # averaged over refreshes
        self.mass_N: torch.Tensor | None = None  # None: uniform (the plain low-discrepancy sampler)
        self.dropped_steps = 0  # steps whose statistics were not finite (skipped updates)
        model.time_bins = num_bins
        self._install()

    def _install(self) -> None:
        self.model.time_mass = self.mass_N

    def observe(self, reports: list[dict], *, step: int) -> None:
        """Add the statistics of optimizer step `step` (0-based) and refresh when due (collective)."""
        sums_3N = reduce_time_stats(reports, self.num_bins, self.device)
        if bool(torch.isfinite(sums_3N).all()):
            self.window_3N = self.window_3N + sums_3N
        else:  # a non-finite loss (the loop skips that update): keep it out of the estimates
            self.dropped_steps += 1
        done = step + 1
        if done >= self.warmup and done % self.refresh_every == 0:
            self.refresh(done)

    def refresh(self, done: int) -> None:
        """Fold the window into the averaged sums and rebuild the proposal (collective)."""
        self.stats_3N = self.decay * self.stats_3N + self.window_3N
        self.window_3N = torch.zeros_like(self.window_3N)
        mass_N = loss_scale_mass(self.stats_3N, self.uniform_mix).to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(mass_N, src=0)  # one tensor everywhere, whatever the reduction rounding
        self.mass_N = mass_N
        self._install()
        log.info("P-POTS proposal refreshed after step %d: max weight %.3g, min weight %.3g, %d sequences",
                 done, 1.0 / (self.num_bins * float(mass_N.min())), 1.0 / (self.num_bins * float(mass_N.max())),
                 int(self.stats_3N[0].sum()))

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (CPU tensors)."""
        def copy(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().cpu().clone()

        return {"num_bins": self.num_bins, "window": copy(self.window_3N), "stats": copy(self.stats_3N),
                "mass": copy(self.mass_N), "dropped_steps": self.dropped_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict()` and hand its proposal to the model.

        Raises:
            ValueError: the checkpoint's bin count differs from `diffusion.ppots_bins`.
        """
        if int(sd["num_bins"]) != self.num_bins:
            raise ValueError(f"config: diffusion.ppots_bins: the checkpoint's P-POTS state has {sd['num_bins']} "
                             f"bins, the config {self.num_bins}; keep the bin count to resume")
        self.window_3N = sd["window"].to(self.device, torch.float64, copy=True)
        self.stats_3N = sd["stats"].to(self.device, torch.float64, copy=True)
        self.mass_N = None if sd["mass"] is None else sd["mass"].to(self.device, torch.float64, copy=True)
        self.dropped_steps = int(sd["dropped_steps"])
        self._install()


def build_ppots(d: DiffusionConfig, model: DiffusionLM, device: torch.device) -> PPOTSEstimator | None:
    """The P-POTS estimator for `diffusion.time_sampler=ppots`; None for the default sampler."""
    if d.time_sampler != "ppots":
        return None
    return PPOTSEstimator(model, num_bins=d.ppots_bins, refresh=d.ppots_refresh, warmup=d.ppots_warmup,
                          uniform_mix=d.ppots_uniform_mix, decay=d.ppots_decay, device=device)
