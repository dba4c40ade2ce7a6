"""What reproduces a sampler's draws, pure PyTorch: the sampler's record and the per-batch seed rule.

``megatron_lomdm.apps.generate`` draws samples from a run with these; they need no run.
"""

from __future__ import annotations

import hashlib
from typing import Any

from megatron_lomdm.sampling.base import Sampler
from megatron_lomdm.sampling.grids import GridSpec


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
    for key in ("gamma", "noise_scale", "checks", "drop"):
        if hasattr(sampler, key):
            rec[key] = getattr(sampler, key)
    if hasattr(sampler, "noise_removal"):
        rec["noise_removal"] = sampler.noise_removal
    return rec


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of batch ``batch``: a function of (seed, batch) only."""
    digest = hashlib.sha256(f"{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
