"""Signal-to-noise of the forward scheduler's gradient, from the K corruptions of each sequence.

Estimator (logit space). Let v_b be the forward-head logits g_phi(f(x_b)) of sequence b, (L,),
and let corruption k's share of the micro-batch surrogate be s_kb = (S_kb + n_b A_kb log q_kb)/K
(its main + velocity sum, plus its RLOO term with the stop-gradient leave-one-out advantage A_kb;
``LossTerms.surrogate_KB``). Then g_kb = K d s_kb / d v_b is corruption k's estimate of the whole
gradient of sequence b, and their mean gbar_b = sum_k d s_kb / d v_b is exactly the gradient the
step backpropagates into v_b. Per sequence, with n_b the number of valid positions (K >= 2):

    N_b = sum_k ||g_kb - gbar_b||^2 / (K (K - 1))      noise: unbiased estimate of tr Cov(gbar_b)
    S_b = ||gbar_b||^2 - N_b                           signal: unbiased estimate of ||E gbar_b||^2

(E over the masks given x_b and t_b). The sums S = sum_b S_b and N = sum_b N_b add over
micro-batches and data-parallel ranks, and S / N is the SNR of the step's gradient in the space of
all its sequences' forward logits. It is a per-sequence quantity: each sequence owns its logits, so
S and N both grow like the number of sequences and S / N does not; more corruptions per sequence
raise it (N ~ 1/K). The SNR of the update in parameter space is roughly S / N times the number of
sequences per step whose signals the head maps to one direction: from 1 up to all of them. A common
scale of the gradients (the global token count) cancels in S / N; P-POTS weights weigh sequences as
the step does.

Biases. (1) RLOO couples the K shares through the baseline: the g_kb are exchangeable but not
independent. With m_b the score-function part of E gbar_b, Cov(g_1b, g_2b) has trace
||m_b||^2 / (K - 1)^2 >= 0 (the pathwise parts and the pathwise/score cross terms are uncorrelated),
so E N_b = tr Cov(gbar_b) - ||m_b||^2 / (K - 1)^2 and E S_b = ||E gbar_b||^2 + ||m_b||^2 / (K - 1)^2:
the SNR is overestimated (checked by Monte Carlo: K = 2, 4e5 draws, tr Cov 0.0503 against
||m||^2 0.0491). The noise bias is relatively small when the SNR is (it is second order in the
signal); the signal gains ||m_b||^2 / (K - 1)^2: a doubling for K = 2 when the score part is the
whole signal, more when the pathwise part cancels it. (2) S sums each sequence's own
||E gbar_b||^2, so it includes the between-sequence variation of the true gradient (over x_b and
t_b) that a sum over sequences in parameter space would partly cancel. Apart from (1) S is
unbiased, hence it can be negative when the signal is below the estimator's resolution.

Cost: K backward passes through the schedule and loss math only (the gradient is taken with
respect to the logits, which stops before the head and the backbone); no parameter gradient, no
RNG draw and no change to the loss or to the gradients backpropagated afterwards.

Shape legend:
    K  corruption samples per sequence
    B  sequences in the micro-batch
    L  sequence length
"""

from __future__ import annotations

import torch
from torch import Tensor

SNR_KEYS = ("snr_signal", "snr_noise", "snr_seqs")


def corruption_grad_snr_sums(surrogate_KB: Tensor, logits_BL: Tensor,
                             valid_BL: Tensor | None = None) -> dict[str, Tensor]:
    """Signal and noise sums of the gradient of the surrogate w.r.t. the forward logits.

    Args:
        surrogate_KB: The surrogate split by corruption, (K, B), K >= 2, with its graph to
            ``logits_BL`` (which must be kept: the caller backpropagates the surrogate later).
        logits_BL: Forward scheduler logits, (B, L), requiring grad.
        valid_BL: Bool non-pad positions, (B, L); sequences without one are not counted.

    Returns:
        fp64 scalars: ``snr_signal`` (S), ``snr_noise`` (N), ``snr_seqs`` (sequences counted).

    Raises:
        ValueError: If K < 2 or the shapes disagree.
    """
    K, B = surrogate_KB.shape
    if K < 2 or logits_BL.shape[0] != B:
        raise ValueError(f"need surrogate_KB (K >= 2, B) and logits_BL (B, L), got "
                         f"{tuple(surrogate_KB.shape)} and {tuple(logits_BL.shape)}")
    grads = []
    for k in range(K):  # retain_graph: the step's own backward comes later
        (g_BL,) = torch.autograd.grad(surrogate_KB[k].sum(), logits_BL, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(logits_BL) if g_BL is None else g_BL)
    g_KBL = torch.stack(grads).double() * K  # each row estimates the whole gradient of its sequence
    gbar_BL = g_KBL.mean(0)
    noise_B = (g_KBL - gbar_BL).square().sum((0, 2)) / (K * (K - 1))
    signal_B = gbar_BL.square().sum(-1) - noise_B
    if valid_BL is None:
        seqs_B = torch.ones(B, dtype=torch.bool, device=g_KBL.device)
    else:
        seqs_B = valid_BL.bool().any(-1)
    return {"snr_signal": signal_B[seqs_B].sum(), "snr_noise": noise_B[seqs_B].sum(),
            "snr_seqs": seqs_B.sum().double()}
