"""Sample-quality and generation-order metrics.

- ``unigram_entropy``: entropy of each sample's token histogram (MDLM/BD3LM's "entropy",
  which flags repetitive samples).
- ``gen_ppl``: generative perplexity under a judge LM, exp(total NLL / total scored tokens).
- ``order_kendall_tau``: Kendall tau between the unmask step and the position (+1 for
  left-to-right, also block-by-block: pairs unmasked in the same step are left out).
- ``order_heatmap`` / ``save_order_heatmap``: how often position l is unmasked at step k
  (or at a relative-progress bin), and a PNG rendering with matplotlib when installed.
- ``velocity_confidence_corr``: Pearson correlation between e_R and a confidence score.

Shape legend:
    B  sequences
    L  sequence length
    S  steps (or progress bins)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from megatron_lomdm.utils.stats import row_pearson

_F64 = torch.float64

TokenSeq = Sequence[int] | Tensor
JudgeFn = Callable[[list[TokenSeq]], Sequence[Tensor | Sequence[float]]]


def unigram_entropy(token_ids: Tensor | Sequence[TokenSeq]) -> Tensor:
    """Entropy (nats) of each sample's unigram (token-frequency) distribution.

    Args:
        token_ids: A (B, L) tensor or a list of B token sequences (lengths may differ).

    Returns:
        Entropies, fp64, (B,); 0 for an empty sequence.
    """
    entropies = []
    for seq in token_ids:
        seq_t = torch.as_tensor(seq).reshape(-1)
        if seq_t.numel() == 0:
            entropies.append(torch.zeros((), dtype=_F64))
            continue
        counts = torch.unique(seq_t, return_counts=True)[1].to(_F64)
        p = counts / counts.sum()
        entropies.append(-(p * p.log()).sum())
    return torch.stack(entropies) if entropies else torch.zeros(0, dtype=_F64)


def gen_ppl(
    judge_logprob_fn: JudgeFn, token_ids_list: Sequence[TokenSeq], *, batch_size: int = 16
) -> float:
    """Generative perplexity of samples under a judge language model.

    Args:
        judge_logprob_fn: Called with a list of up to ``batch_size`` sequences (as given);
            returns, per sequence, the judge's log-probs of the tokens it scores (1-D; e.g.
            every token after the first, or all tokens after a prepended BOS). The caller
            wires an HF causal LM or our ARM model, including any re-tokenisation.
        token_ids_list: The samples.
        batch_size: Sequences per judge call, >= 1.

    Returns:
        exp(- sum of log-probs / number of scored tokens), pooled over all samples.

    Raises:
        ValueError: If nothing was scored or the judge returns the wrong number of rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total_logp, total_tokens = 0.0, 0
    for start in range(0, len(token_ids_list), batch_size):
        batch = list(token_ids_list[start : start + batch_size])
        rows = judge_logprob_fn(batch)
        if len(rows) != len(batch):
            raise ValueError(f"judge returned {len(rows)} rows for {len(batch)} sequences")
        for row in rows:
            row_t = torch.as_tensor(row, dtype=_F64).reshape(-1)
            total_logp += float(row_t.sum())
            total_tokens += row_t.numel()
    if total_tokens == 0:
        raise ValueError("the judge scored no tokens")
    return math.exp(-total_logp / total_tokens)


def order_kendall_tau(
    unmask_step_BL: Tensor, valid_BL: Tensor | None = None, *, ties: str = "ignore"
) -> Tensor:
    """Kendall tau between generation order (unmask step) and position, per sequence.

    Positions never tie, steps may (several tokens per step). With C / D the concordant /
    discordant pairs, n0 all pairs and n_u the pairs unmasked at different steps:

    - ``ties="ignore"`` (default): (C - D) / n_u, Kendall's tau over the pairs whose order
      is observed (Goodman-Kruskal gamma). +1 for left-to-right and for block-by-block
      left-to-right orders, whatever the number of tokens per step.
    - ``ties="b"``: tau-b = (C - D) / sqrt(n0 n_u) (scipy's default), which shrinks toward 0
      as more pairs share a step.

    Without ties (one token per step) both equal the plain Kendall tau.

    Args:
        unmask_step_BL: ``SampleResult.unmask_step_BL`` (-1 = fixed, excluded), (B, L).
        valid_BL: Extra bool mask of positions to include, (B, L); None = all.
        ties: ``ignore`` or ``b``.

    Returns:
        tau in [-1, 1], fp64, (B,): +1 left-to-right, -1 right-to-left; NaN when no pair
        of positions was unmasked at different steps.

    Raises:
        ValueError: For an unknown ``ties``.
    """
    if ties not in ("ignore", "b"):
        raise ValueError(f"ties must be 'ignore' or 'b', got {ties!r}")
    keep_BL = unmask_step_BL >= 0
    if valid_BL is not None:
        keep_BL &= valid_BL.bool()
    taus = [_kendall(steps_L[keep_L], ties) for steps_L, keep_L in zip(unmask_step_BL, keep_BL)]
    return torch.stack(taus) if taus else torch.zeros(0, dtype=_F64)


def _kendall(steps_n: Tensor, ties: str) -> Tensor:
    """tau of (position, step) for steps listed in position order (positions untied)."""
    n = steps_n.numel()
    steps_n = steps_n.to(_F64).cpu()
    # pair (i, j), i < j in position: +1 if j is unmasked later (concordant), 0 if tied.
    sign_P = torch.sign(steps_n[None, :] - steps_n[:, None])[torch.ones(n, n).triu(1).bool()]
    n_untied = float((sign_P != 0).sum())
    if n_untied == 0:
        return torch.tensor(math.nan, dtype=_F64)
    denom = n_untied if ties == "ignore" else math.sqrt(n * (n - 1) / 2 * n_untied)
    return sign_P.sum() / denom


def order_heatmap(
    unmask_step_BL: Tensor, *, num_steps: int | None = None, num_bins: int | None = None
) -> Tensor:
    """Frequency with which each position is unmasked at each step (position x step).

    Args:
        unmask_step_BL: ``SampleResult.unmask_step_BL``, (B, L); -1 (fixed) is skipped.
        num_steps: Number of step columns S (default: max step + 1).
        num_bins: If given, bin relative progress step / (last step of that sequence + 1)
            into this many columns instead (comparable across samplers with different
            step counts, e.g. ``entropy_bound``).

    Returns:
        Heat-map, fp64, (L, S): entry (l, k) = fraction of sequences that unmasked position
        l at step (bin) k.
    """
    steps_BL = unmask_step_BL.long().cpu()
    B, L = steps_BL.shape
    keep_BL = steps_BL >= 0
    if num_bins is not None:
        last_B1 = steps_BL.max(-1, keepdim=True).values.clamp_min(0) + 1
        cols_BL = torch.floor(steps_BL.to(_F64) / last_B1 * num_bins).long().clamp(0,
                                                                                  num_bins - 1)
        width = num_bins
    else:
        cols_BL = steps_BL
        width = num_steps if num_steps is not None else int(steps_BL.max().clamp_min(0)) + 1
        keep_BL &= cols_BL < width
    pos_BL = torch.arange(L).expand(B, L)
    flat = (pos_BL * width + cols_BL)[keep_BL]
    counts = torch.bincount(flat, minlength=L * width).to(_F64)
    return counts.view(L, width) / max(B, 1)


def save_order_heatmap(heatmap_LS: Tensor, path: str | Path, *, title: str | None = None) -> bool:
    """Render an ``order_heatmap`` to a PNG (position on y, step on x).

    Args:
        heatmap_LS: The heat-map, (L, S).
        path: Output file.
        title: Optional figure title.

    Returns:
        True if written; False if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    image = ax.imshow(heatmap_LS.cpu().numpy(), aspect="auto", origin="lower",
                      interpolation="nearest", cmap="viridis")
    ax.set_xlabel("step")
    ax.set_ylabel("position")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of samples")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
    return True


def velocity_confidence_corr(
    exponents_BL: Tensor,
    confidence_BL: Tensor,
    valid_BL: Tensor | None = None,
    *,
    per_sequence: bool = False,
) -> Tensor:
    """Pearson correlation between reverse exponents e_R and a confidence score.

    Typical use: e_R and the max-probability (or margin) of x_theta at the masked positions
    of one denoiser call; a positive value means confident positions are unmasked first.

    Args:
        exponents_BL: e_R, (B, L).
        confidence_BL: Confidence per position, (B, L).
        valid_BL: Bool positions to include (e.g. the masked ones), (B, L); None = all.
        per_sequence: Return one correlation per sequence instead of the pooled one.

    Returns:
        fp64 scalar (pooled) or (B,); NaN where a variance is 0 or < 2 points
        (``utils.stats.row_pearson``, the math shared with the training diagnostics).
    """
    w_BL = None if valid_BL is None else valid_BL.bool().expand_as(exponents_BL)
    if per_sequence:
        return row_pearson(exponents_BL, confidence_BL, w_BL)
    flat = None if w_BL is None else w_BL.reshape(1, -1)
    return row_pearson(exponents_BL.reshape(1, -1), confidence_BL.reshape(1, -1), flat)[0]


def order_agreement(unmask_step_BL: Tensor, first_P: Sequence[int], second_Q: Sequence[int]) -> Tensor:
    """Per sequence, the fraction of (first, second) position pairs generated in that order.

    A pair counts 1 when the ``first`` position was unmasked at an earlier step than the
    ``second`` one, 1/2 when both were unmasked in the same step, 0 otherwise; so 1 is a sample
    that generated the whole first group before the second, 1/2 what a random order gives.

    Args:
        unmask_step_BL: Step at which each position was unmasked, (B, L).
        first_P: Positions of the group that should come first.
        second_Q: Positions of the group that should come second.

    Returns:
        fp64 (B,) in [0, 1].
    """
    if not first_P or not second_Q:
        raise ValueError("order_agreement needs two non-empty position groups")
    steps_BL = unmask_step_BL.to(_F64)
    a_BP1 = steps_BL[:, list(first_P)].unsqueeze(-1)
    b_B1Q = steps_BL[:, list(second_Q)].unsqueeze(1)
    score_BPQ = (a_BP1 < b_B1Q).to(_F64) + 0.5 * (a_BP1 == b_B1Q).to(_F64)
    return score_BPQ.mean((1, 2))
