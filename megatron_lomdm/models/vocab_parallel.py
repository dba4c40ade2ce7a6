"""SUBS-parameterised quantities over a vocabulary split across tensor-parallel ranks.

Shape legend: B batch, L sequence, N = B*L tokens, V padded vocabulary, Vl = V/tp this rank's
slice (megatron's ``VocabUtility`` ranges: rank r holds ids [r*Vl, (r+1)*Vl)).

SUBS (MDLM): the [MASK] logit is -inf, so the denoiser never predicts [MASK]; ids at or above the
true vocabulary size (megatron's vocabulary padding) are excluded the same way. Carry-over:
unmasked positions keep their token, so the log-probability of the true token there is exactly 0.

Both functions are custom autograd functions that read the (possibly bf16) logits chunk by chunk
along tokens, do all math in fp32 (fp64 for fp64 input), keep only per-token statistics [N] for
backward, and recompute the softmax chunk-wise there: no full-size fp32 copy of the logits ever
exists. Communication: one MAX and one SUM all-reduce of [N]-sized vectors over the TP group in
forward, none in backward (except the [V] gradient of ``w`` in the expected rate). At TP=1 (or
without any process group) they are the plain single-process computations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.utils import VocabUtility

_DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per chunk


def _tp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to reduce over, or None when the vocabulary is not split."""
    if group is None:
        if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
            return None
        group = parallel_state.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def _vocab_start(v_local: int, group: dist.ProcessGroup | None) -> int:
    if group is None:
        return 0
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        v_local, dist.get_rank(group), dist.get_world_size(group)
    )
    return start


def _excluded_columns(v_local: int, start: int, mask_id: int, vocab_size: int | None,
                      device: torch.device) -> torch.Tensor:
    """bool [Vl]: True at [MASK] and at padding ids (>= vocab_size)."""
    ids = torch.arange(start, start + v_local, device=device)
    excluded = ids == mask_id
    if vocab_size is not None:
        excluded |= ids >= vocab_size
    return excluded


def _token_major(
    logits_BLV: torch.Tensor, *per_token_BL: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Flatten [B, L, V] to [N, V] without copying when either B-major or L-major is contiguous.

    Returns the flat logits, the per-token tensors flattened in the same order, and a function
    that maps an [N] result back to [B, L].
    """
    B, L, V = logits_BLV.shape
    if not logits_BLV.is_contiguous() and logits_BLV.transpose(0, 1).is_contiguous():
        flat = logits_BLV.transpose(0, 1).reshape(L * B, V)  # a view: megatron's [L, B, V]
        small = [t.transpose(0, 1).reshape(-1) for t in per_token_BL]
        return flat, small, lambda out_N: out_N.view(L, B).transpose(0, 1)
    flat = logits_BLV.reshape(B * L, V)
    return flat, [t.reshape(-1) for t in per_token_BL], lambda out_N: out_N.view(B, L)


def _chunk_size(v_local: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, _DEFAULT_CHUNK_ELEMENTS // v_local)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _global_logsumexp_parts(
    local_max_N: torch.Tensor, sums_KN: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank (max, sums relative to that max) into global (max, sums)."""
    global_max_N = local_max_N.clone()
    if group is not None:
        dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=group)
    sums_KN = sums_KN * torch.exp(local_max_N - global_max_N)  # exp(-inf) = 0 for empty slices
    if group is not None:
        dist.all_reduce(sums_KN, op=dist.ReduceOp.SUM, group=group)
    return global_max_N, sums_KN


class _SubsTrueLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, target_N, masked_N, excluded_V, start, group, chunk):  # noqa
        N, v_local = logits_NV.shape
        dtype = _compute_dtype(logits_NV.dtype)
        in_range_N = (target_N >= start) & (target_N < start + v_local)
        local_idx_N = (target_N - start).clamp(0, v_local - 1)
        local_max_N = torch.empty(N, dtype=dtype, device=logits_NV.device)
        sum_1N = torch.zeros(1, N, dtype=dtype, device=logits_NV.device)
        true_logit_N = torch.zeros(N, dtype=dtype, device=logits_NV.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            lg = logits_NV[s:e].to(dtype).masked_fill(excluded_V, float("-inf"))
            m = lg.max(dim=-1).values  # -inf when this rank's slice is all excluded
            local_max_N[s:e] = m
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            sum_1N[0, s:e] = torch.exp(lg - m_safe[:, None]).sum(-1)
            true_logit = lg.gather(1, local_idx_N[s:e, None]).squeeze(1)
            true_logit_N[s:e] = torch.where(in_range_N[s:e], true_logit, torch.zeros_like(m))
        if group is not None:  # exactly one rank holds each true id; the others add 0
            dist.all_reduce(true_logit_N, op=dist.ReduceOp.SUM, group=group)
        global_max_N, sum_1N = _global_logsumexp_parts(local_max_N, sum_1N, group)
        lse_N = global_max_N + torch.log(sum_1N[0])
        logp_N = torch.where(masked_N, true_logit_N - lse_N, torch.zeros_like(lse_N))
        ctx.save_for_backward(logits_NV, local_idx_N, in_range_N, masked_N, excluded_V, lse_N)
        ctx.chunk = chunk
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):  # noqa: ANN001
        logits_NV, local_idx_N, in_range_N, masked_N, excluded_V, lse_N = ctx.saved_tensors
        dtype = lse_N.dtype
        g_N = torch.where(masked_N, grad_N.to(dtype), torch.zeros_like(lse_N))
        grad_NV = torch.empty_like(logits_NV)
        N = logits_NV.shape[0]
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            lg = logits_NV[s:e].to(dtype).masked_fill(excluded_V, float("-inf"))
            g = g_N[s:e]
            grad = -g[:, None] * torch.exp(lg - lse_N[s:e, None])  # d logp / d logit = 1[v=x] - p
            grad.scatter_add_(1, local_idx_N[s:e, None], (g * in_range_N[s:e])[:, None])
            grad_NV[s:e] = grad.to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None, None


def subs_logp_true_vocab_parallel(
    logits_BLV_local: torch.Tensor,
    z_BL: torch.Tensor,
    x_BL: torch.Tensor,
    mask_id: int,
    *,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log <x_theta(z), x> under SUBS, for a vocabulary split over tensor-parallel ranks.

    Args:
        logits_BLV_local: this rank's vocabulary slice of the logits [B, L, V/tp], any float dtype
            (batch-first view of megatron's [L, B, V/tp] is fine: no copy is made).
        z_BL: the corrupted tokens [B, L].
        x_BL: the clean (true) tokens [B, L].
        mask_id: the [MASK] id; its logit is treated as -inf.
        vocab_size: the true vocabulary size; ids >= it (megatron's vocabulary padding) are
            treated as -inf too. Pass ``backbone.true_vocab_size``; None keeps the padding ids in
            the softmax (untrained padding rows then take probability mass).
        group: the tensor-parallel group; defaults to megatron's, single-process if none.
        chunk_tokens: tokens per chunk (default: 2^24 / (V/tp)).

    Returns:
        [B, L] in fp32 (fp64 for fp64 logits): log p(x | z) at masked positions (z == mask_id),
        exactly 0 elsewhere (carry-over); differentiable w.r.t. the logits, with zero gradient at
        unmasked positions.
    """
    group = _tp_group(group)
    masked_BL = z_BL == mask_id
    flat_NV, (x_N, masked_N), restore = _token_major(logits_BLV_local, x_BL, masked_BL)
    v_local = flat_NV.shape[1]
    start = _vocab_start(v_local, group)
    excluded_V = _excluded_columns(v_local, start, mask_id, vocab_size, flat_NV.device)
    logp_N = _SubsTrueLogProb.apply(
        flat_NV, x_N, masked_N, excluded_V, start, group, _chunk_size(v_local, chunk_tokens)
    )
    return restore(logp_N)


class _ExpectedRate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, w_V, excluded_V, group, chunk):  # noqa: ANN001
        N, _ = logits_NV.shape
        dtype = _compute_dtype(logits_NV.dtype)
        w = w_V.to(dtype).masked_fill(excluded_V, 0.0)
        local_max_N = torch.empty(N, dtype=dtype, device=logits_NV.device)
        sums_2N = torch.zeros(2, N, dtype=dtype, device=logits_NV.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            lg = logits_NV[s:e].to(dtype).masked_fill(excluded_V, float("-inf"))
            m = lg.max(dim=-1).values
            local_max_N[s:e] = m
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p_unnorm = torch.exp(lg - m_safe[:, None])  # 0 at excluded ids
            sums_2N[0, s:e] = p_unnorm.sum(-1)
            sums_2N[1, s:e] = p_unnorm @ w
        global_max_N, sums_2N = _global_logsumexp_parts(local_max_N, sums_2N, group)
        lse_N = global_max_N + torch.log(sums_2N[0])
        rate_N = sums_2N[1] / sums_2N[0]
        ctx.save_for_backward(logits_NV, w, excluded_V, lse_N, rate_N)
        ctx.chunk = chunk
        ctx.w_dtype = w_V.dtype
        return rate_N

    @staticmethod
    def backward(ctx, grad_N):  # noqa: ANN001
        logits_NV, w, excluded_V, lse_N, rate_N = ctx.saved_tensors
        g_N = grad_N.to(lse_N.dtype)
        grad_NV = torch.empty_like(logits_NV)
        grad_w = torch.zeros_like(w)
        N = logits_NV.shape[0]
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            lg = logits_NV[s:e].to(lse_N.dtype).masked_fill(excluded_V, float("-inf"))
            p = torch.exp(lg - lse_N[s:e, None])
            g = g_N[s:e]
            # d rate / d logit_v = p_v (w_v - rate);  d rate / d w_v = p_v
            grad_NV[s:e] = (g[:, None] * p * (w[None, :] - rate_N[s:e, None])).to(grad_NV.dtype)
            grad_w += g @ p
        return grad_NV, grad_w.to(ctx.w_dtype), None, None, None


def expected_token_rate_vocab_parallel(
    logits_local: torch.Tensor,
    w_V_full: torch.Tensor,
    mask_id: int,
    *,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """sum_v softmax_SUBS(logits)_v * w_v over a vocabulary split over tensor-parallel ranks.

    The GenMD4 reverse-rate term. No carry-over is applied: the caller keeps masked positions.

    Args:
        logits_local: this rank's vocabulary slice of the logits [B, L, V/tp].
        w_V_full: the full per-token-id vector (replicated on every rank), length the true
            vocabulary or the padded one; differentiable. Its gradient is all-reduced over the TP
            group, so every rank holds the full, identical gradient.
        mask_id: the [MASK] id (probability 0).
        vocab_size: the true vocabulary size (default ``len(w_V_full)``); ids >= it get
            probability 0.
        group: the tensor-parallel group; defaults to megatron's, single-process if none.
        chunk_tokens: tokens per chunk (default: 2^24 / (V/tp)).

    Returns:
        [B, L] in fp32 (fp64 for fp64 logits).
    """
    group = _tp_group(group)
    flat_NV, _, restore = _token_major(logits_local)
    v_local = flat_NV.shape[1]
    tp = 1 if group is None else dist.get_world_size(group)
    v_padded = v_local * tp
    if w_V_full.shape[0] > v_padded:
        raise ValueError(f"w has {w_V_full.shape[0]} entries, more than the vocabulary {v_padded}")
    vocab_size = w_V_full.shape[0] if vocab_size is None else vocab_size
    w_padded = F.pad(w_V_full, (0, v_padded - w_V_full.shape[0]))
    if group is not None:
        # identity forward, all-reduce of the (slice-local) gradient backward
        w_padded = tensor_parallel.copy_to_tensor_model_parallel_region(w_padded, group=group)
    start = _vocab_start(v_local, group)
    excluded_V = _excluded_columns(v_local, start, mask_id, vocab_size, flat_NV.device)
    w_local = w_padded[start : start + v_local]
    rate_N = _ExpectedRate.apply(
        flat_NV, w_local, excluded_V, group, _chunk_size(v_local, chunk_tokens)
    )
    return restore(rate_N)
