"""OeMDM diffusion math: schedules, SUBS reductions, time sampling, family registry.

Pure PyTorch; imports nothing from megatron, deepspeed or the data pipeline.
"""

from megatron_lomdm.diffusion.base import DiffusionFamily, ForwardSchedule
from megatron_lomdm.diffusion.registry import FAMILIES, build_family
from megatron_lomdm.diffusion.subs import expected_token_rate, subs_logp_true
from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t, sampling_time_grid

__all__ = [
    "FAMILIES",
    "DiffusionFamily",
    "ForwardSchedule",
    "build_family",
    "expected_token_rate",
    "low_discrepancy_t",
    "sampling_time_grid",
    "subs_logp_true",
]
