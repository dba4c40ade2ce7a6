"""SUBS parameterisation (method.md §1.2): memory-bounded, differentiable reductions.

SUBS sets the [MASK] logit to -inf (zero masking probability) and carries unmasked tokens
over (x_theta = z there, so log <x_theta, x> = 0 exactly). The functions below reduce the
(N, V) logits chunk by chunk over N: each chunk is upcast to fp32 (bf16 logits under
autocast) and only a (chunk_size, V) fp32 block exists at a time, in the forward and in
the hand-written backward. Only rows at masked positions are processed.

Shape legend:
    N  flattened positions (K * B * L)
    C  positions in one chunk
    V  vocabulary size (including [MASK])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatron_lomdm.diffusion.base import compute_dtype

DEFAULT_CHUNK_SIZE = 4096


def _check_args(logits_NV: Tensor, mask_id: int, chunk_size: int, **ids_N: Tensor) -> None:
    """Raise ValueError for mismatched shapes, a bad [MASK] id or chunk size."""
    if logits_NV.dim() != 2:
        raise ValueError(f"logits_NV must be 2-D (N, V), got shape {tuple(logits_NV.shape)}")
    if not 0 <= mask_id < logits_NV.shape[1]:
        raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {logits_NV.shape[1]})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, ids in ids_N.items():
        if ids.shape != logits_NV.shape[:1]:
            raise ValueError(
                f"{name} must have shape ({logits_NV.shape[0]},), got {tuple(ids.shape)}"
            )


def _subs_log_softmax_chunk(logits_CV: Tensor, mask_id: int, dtype: torch.dtype) -> Tensor:
    """Upcast one chunk and set its [MASK] logit to -inf (a copy; the input is untouched)."""
    mask_col = torch.tensor([mask_id], device=logits_CV.device)
    return logits_CV.to(dtype).index_fill(1, mask_col, float("-inf"))


class _SubsLogpTrue(torch.autograd.Function):
    """log softmax_SUBS(logits)[x] at masked rows, 0 at unmasked rows; chunked backward."""

    @staticmethod
    def forward(
        ctx: Any, logits_NV: Tensor, z_N: Tensor, x_N: Tensor, mask_id: int, chunk_size: int
    ) -> Tensor:
        dtype = compute_dtype(logits_NV)
        rows_M = torch.nonzero(z_N == mask_id).squeeze(-1)
        logp_N = torch.zeros(logits_NV.shape[0], dtype=dtype, device=logits_NV.device)
        lse_M = torch.empty(rows_M.shape[0], dtype=dtype, device=logits_NV.device)
        for start in range(0, rows_M.shape[0], chunk_size):
            rows_C = rows_M[start : start + chunk_size]
            chunk_CV = _subs_log_softmax_chunk(logits_NV.index_select(0, rows_C), mask_id, dtype)
            lse_C = torch.logsumexp(chunk_CV, dim=-1)
            true_C = chunk_CV.gather(1, x_N.index_select(0, rows_C).unsqueeze(-1)).squeeze(-1)
            logp_N[rows_C] = true_C - lse_C
            lse_M[start : start + chunk_size] = lse_C
        ctx.save_for_backward(logits_NV, x_N, rows_M, lse_M)
        ctx.mask_id, ctx.chunk_size = mask_id, chunk_size
        return logp_N

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        logits_NV, x_N, rows_M, lse_M = ctx.saved_tensors
        dtype = lse_M.dtype
        grad_logits_NV = torch.zeros_like(logits_NV)
        for start in range(0, rows_M.shape[0], ctx.chunk_size):
            rows_C = rows_M[start : start + ctx.chunk_size]
            chunk_CV = _subs_log_softmax_chunk(
                logits_NV.index_select(0, rows_C), ctx.mask_id, dtype
            )
            prob_CV = torch.exp(chunk_CV - lse_M[start : start + ctx.chunk_size, None])
            g_C1 = grad_N.index_select(0, rows_C).to(dtype).unsqueeze(-1)
            # d log p_x / d logits = onehot(x) - p  (p is 0 at the [MASK] column).
            grad_CV = -g_C1 * prob_CV
            grad_CV.scatter_add_(1, x_N.index_select(0, rows_C).unsqueeze(-1), g_C1)
            grad_logits_NV.index_copy_(0, rows_C, grad_CV.to(logits_NV.dtype))
        return grad_logits_NV, None, None, None, None


def subs_logp_true(
    logits_NV: Tensor,
    z_N: Tensor,
    x_N: Tensor,
    mask_id: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Log-probability of the true token under SUBS, computed in chunks.

    At masked positions (z == mask_id) this is logits[x] - logsumexp(logits without the
    [MASK] column); at unmasked positions it is exactly 0 (carry-over). The full fp32
    log-softmax of (N, V) is never materialised: each chunk of rows is upcast to fp32
    separately, and the backward recomputes the softmax chunk by chunk.

    Args:
        logits_NV: Backbone logits (any float dtype; bf16 is upcast per chunk), (N, V).
        z_N: Noisy input ids, (N,).
        x_N: Clean target ids, (N,).
        mask_id: Token id of [MASK].
        chunk_size: Rows per chunk.

    Returns:
        log <x_theta, x>, fp32 (fp64 for fp64 logits), (N,); differentiable w.r.t. logits.

    Raises:
        ValueError: On mismatched shapes, a mask_id outside the vocabulary or chunk_size < 1.
    """
    _check_args(logits_NV, mask_id, chunk_size, z_N=z_N, x_N=x_N)
    return _SubsLogpTrue.apply(logits_NV, z_N, x_N, mask_id, chunk_size)


class _ExpectedTokenRate(torch.autograd.Function):
    """sum_v softmax_SUBS(logits)_v w_v per row; chunked forward and backward."""

    @staticmethod
    def forward(ctx: Any, logits_NV: Tensor, w_V: Tensor, mask_id: int, chunk_size: int) -> Tensor:
        dtype = compute_dtype(logits_NV, w_V)
        ctx.w_dtype = w_V.dtype
        w_V = w_V.to(dtype)
        rate_N = torch.empty(logits_NV.shape[0], dtype=dtype, device=logits_NV.device)
        for start in range(0, logits_NV.shape[0], chunk_size):
            chunk_CV = _subs_log_softmax_chunk(
                logits_NV[start : start + chunk_size], mask_id, dtype
            )
            # Elementwise product + sum, not a matmul: autocast must not lower it to bf16.
            rate_N[start : start + chunk_size] = (torch.softmax(chunk_CV, -1) * w_V).sum(-1)
        ctx.save_for_backward(logits_NV, w_V, rate_N)
        ctx.mask_id, ctx.chunk_size = mask_id, chunk_size
        return rate_N

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        logits_NV, w_V, rate_N = ctx.saved_tensors
        dtype = rate_N.dtype
        grad_logits_NV = torch.empty_like(logits_NV)
        grad_w_V = torch.zeros_like(w_V)
        for start in range(0, logits_NV.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            prob_CV = torch.softmax(_subs_log_softmax_chunk(logits_NV[sl], ctx.mask_id, dtype), -1)
            g_C1 = grad_N[sl].to(dtype).unsqueeze(-1)
            # d rate / d logit_v = p_v (w_v - rate);  d rate / d w_v = p_v.
            grad_logits_NV[sl] = (g_C1 * prob_CV * (w_V - rate_N[sl, None])).to(logits_NV.dtype)
            grad_w_V += (g_C1 * prob_CV).sum(0)
        return grad_logits_NV, grad_w_V.to(ctx.w_dtype), None, None


def expected_token_rate(
    logits_NV: Tensor,
    w_V: Tensor,
    mask_id: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """E_{v ~ softmax_SUBS(logits)}[w_v] per row, single-process, computed in chunks.

    This is GenMD4's t * A_hat (method.md §2): pass the result as ``expected_rate_KBL``.
    The [MASK] column has probability 0. Rows are processed as at masked positions
    (unmasked positions carry no loss, so their value is unused).

    Args:
        logits_NV: Backbone logits (bf16 is upcast per chunk), (N, V).
        w_V: Per-token exponents, (V,), e.g. ``GenMD4Family.token_exponents()``.
        mask_id: Token id of [MASK].
        chunk_size: Rows per chunk.

    Returns:
        The expected rate, fp32 (fp64 for fp64 inputs), (N,); differentiable w.r.t. both
        ``logits_NV`` and ``w_V``.

    Raises:
        ValueError: On mismatched shapes, a mask_id outside the vocabulary or chunk_size < 1.
    """
    _check_args(logits_NV, mask_id, chunk_size)
    if w_V.shape != logits_NV.shape[1:]:
        raise ValueError(f"w_V must have shape ({logits_NV.shape[1]},), got {tuple(w_V.shape)}")
    return _ExpectedTokenRate.apply(logits_NV, w_V, mask_id, chunk_size)
