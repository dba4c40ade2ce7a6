"""The project's own OeMDM math, as the exported model imports it.

``modeling_lomdm.py`` and ``configuration_lomdm.py`` take every formula from here: the family
registry and settings rules (``config/families.py``, ``diffusion/``: schedules, NormSig exponents,
GenMD4's token rate, reverse schedules, what a backbone pass gives a sampler) and the ancestral
sampler (``sampling/``: the SUBS sampling law, fp64 draws, the grid), and the scheduler head's
centring (``models/scheduler_head.py``: over the valid positions, or over the positions to generate
when a prompt is given, method.md §5.9). In the package these are the
imports below; in an export, ``checkpoint/hf_code.py`` copies the modules they reach next to this
file and makes the imports relative, so the export runs the same code without the package.
"""

from megatron_lomdm.config.families import FAMILY_SPECS
from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.registry import FAMILIES, build_family
from megatron_lomdm.models.scheduler_head import center_logits
from megatron_lomdm.sampling.ancestral import AncestralSampler
from megatron_lomdm.sampling.base import denoiser_from_backbone

__all__ = ["FAMILIES", "FAMILY_SPECS", "AncestralSampler", "DiffusionFamily", "build_family",
           "center_logits", "denoiser_from_backbone"]
