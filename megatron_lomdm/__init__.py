"""megatron_lomdm: distributed training for masked diffusion LMs with a learned generation order."""

__version__ = "0.1.0"

from megatron_lomdm.distributed import cpu_import as _cpu_import

_cpu_import.install()
