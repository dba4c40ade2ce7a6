"""The HF model (``trust_remote_code``) that ``tools/convert_to_hf.py`` exports.

``configuration_lomdm.py`` and ``modeling_lomdm.py`` import only torch, transformers, math and,
through ``oemdm_math.py``, the project's pure OeMDM code: ``save_pretrained`` copies them into the
export as they are, and ``checkpoint/hf_code.py`` ships ``oemdm_math`` with every project module it
imports, with the imports made relative, so the export runs without the package.
"""

from megatron_lomdm.checkpoint.hf_modeling.configuration_lomdm import LoMDMConfig
from megatron_lomdm.checkpoint.hf_modeling.modeling_lomdm import (
    LoMDMForMaskedDiffusion,
    LoMDMOutput,
)

__all__ = ["LoMDMConfig", "LoMDMForMaskedDiffusion", "LoMDMOutput"]
