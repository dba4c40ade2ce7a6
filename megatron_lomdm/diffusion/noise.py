"""Layout-independent diffusion noise: uniforms that are a pure function of (seed, step, sample, slot).

interface.md promises that a training step's noise (the time t and every corruption mask) depends
only on (`train.seed`, step, global sample index). A stateful RNG cannot promise that: its stream
depends on how many samples this rank drew before. So we hash integer counters instead, on the
device the tensors live on (no host round trip, no per-sample generator objects).

The hash is the 32-bit integer mixer `x ^= x >> 16; x *= 0x45d9f3b` applied twice (a well-known
avalanche mixer); its multiplier is < 2^27 so every product of a 32-bit value fits in int64.
Uniforms carry 24 bits, so the smallest non-zero mask probability they resolve is 2^-24 ≈ 6e-8.

Legend: B sequences, K corruptions per sequence, L positions.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B
_STREAM_T = 0x7F4A7C15  # stream tag of the time draw
_STREAM_MASK = 0x2545F491  # stream tag of the mask draws


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a tensor of int64 values in [0, 2^32) to another such tensor."""
    x = ((x >> 16) ^ x) * _MULT & _MASK32
    x = ((x >> 16) ^ x) * _MULT & _MASK32
    return (x >> 16) ^ x


def _combine(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Fold one more counter into a running hash."""
    return _mix32((h ^ (torch.as_tensor(value, dtype=torch.int64, device=h.device) & _MASK32)) & _MASK32)


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """24 high bits of a 32-bit hash -> float32 uniform in [0, 1)."""
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _sample_keys(seed: int, step: int, stream: int, index_B: torch.Tensor) -> torch.Tensor:
    base = torch.tensor(seed & _MASK32, dtype=torch.int64, device=index_B.device)
    h = _combine(_mix32(base), (seed >> 32) & _MASK32)
    h = _combine(h, step)
    h = _combine(h, stream)
    return _combine(h.expand_as(index_B), index_B.to(torch.int64))


def time_uniforms(*, seed: int, step: int, index_B: torch.Tensor) -> torch.Tensor:
    """One uniform per sequence for the antithetic time draw.

    Args:
        seed: the run's seed (`train.seed`).
        step: the optimizer step (0-based).
        index_B: each sequence's index within the global batch, int64 (B,).
    Returns:
        float32 (B,) in [0, 1).
    """
    return _to_unit(_sample_keys(seed, step, _STREAM_T, index_B))


def mask_uniforms(*, seed: int, step: int, index_B: torch.Tensor, num_corruptions: int, seq_length: int) -> torch.Tensor:
    """Uniforms for the Bernoulli mask draws of every corruption k and position i.

    Args:
        seed, step, index_B: as in `time_uniforms`.
        num_corruptions: K.
        seq_length: L.
    Returns:
        float32 (K, B, L) in [0, 1); entry (k, b, i) depends only on (seed, step, index_B[b], k, i).
    """
    key_B = _sample_keys(seed, step, _STREAM_MASK, index_B)
    device = index_B.device
    k_K = torch.arange(num_corruptions, dtype=torch.int64, device=device)
    i_L = torch.arange(seq_length, dtype=torch.int64, device=device)
    h_KB = _combine(key_B[None, :], k_K[:, None])
    h_KBL = _combine(h_KB[:, :, None], i_L[None, None, :])
    return _to_unit(h_KBL)
