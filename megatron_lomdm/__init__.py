"""megatron_lomdm: distributed training for masked diffusion LMs with a learned generation order."""

__version__ = "0.1.0"
