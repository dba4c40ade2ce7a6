"""The self-contained HF model (``trust_remote_code``) that ``tools/convert_to_hf.py`` exports.

``configuration_lomdm.py`` and ``modeling_lomdm.py`` import only torch, transformers and math:
``save_pretrained`` copies them into the export as they are.
"""

from megatron_lomdm.checkpoint.hf_modeling.configuration_lomdm import LoMDMConfig
from megatron_lomdm.checkpoint.hf_modeling.modeling_lomdm import (
    LoMDMForMaskedDiffusion,
    LoMDMOutput,
)

__all__ = ["LoMDMConfig", "LoMDMForMaskedDiffusion", "LoMDMOutput"]
