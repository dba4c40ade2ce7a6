"""The forward head's gradient signal-to-noise sums (`losses.grad_snr`, issue #16 B)."""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.diffusion.lomdm import LoMDMFamily
from megatron_lomdm.diffusion.subs import subs_logp_true
from megatron_lomdm.losses.grad_snr import corruption_grad_snr_sums
from megatron_lomdm.losses.objective import LossTerms, compute_loss_terms

F64 = torch.float64
V, MASK, C1, C2 = 9, 8, 0.7, 0.65


def _toy(K: int, B: int, L: int, seed: int = 0):
    """Leaves (forward logits, reverse logits, backbone logits) and one real objective evaluation."""
    g = torch.Generator().manual_seed(seed)
    x_BL = torch.randint(0, V - 1, (B, L), generator=g)
    t_B = torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05
    fwd_BL = torch.randn(B, L, generator=g, dtype=F64).requires_grad_(True)
    rev_KBL = torch.randn(K, B, L, generator=g, dtype=F64).requires_grad_(True)
    logits_KBLV = (2 * torch.randn(K, B, L, V, generator=g, dtype=F64)).requires_grad_(True)
    u_KBL = torch.rand(K, B, L, generator=g, dtype=F64)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[0, L - 3:] = False
    valid_BL[-1] = False  # an all-pad filler row: not counted
    return dict(x_BL=x_BL, t_B=t_B, fwd_BL=fwd_BL, rev_KBL=rev_KBL, logits_KBLV=logits_KBLV, u_KBL=u_KBL,
                valid_BL=valid_BL)


def _terms(b: dict) -> tuple[LossTerms, torch.Tensor]:
    K, B, L, _ = b["logits_KBLV"].shape
    family = LoMDMFamily(c1=C1, c2=C2, seq_length=L, mask_id=MASK)
    valid_BL = b["valid_BL"]
    sched = family.forward_schedule(x_BL=b["x_BL"], t_B=b["t_B"], fwd_logits_BL=b["fwd_BL"],
                                    valid_BL=valid_BL)
    mask_KBL = family.sample_masks(sched, b["u_KBL"]) & valid_BL
    x_KBL = b["x_BL"].expand(K, B, L)
    z_KBL = torch.where(mask_KBL, MASK, x_KBL)
    logp_KBL = subs_logp_true(b["logits_KBLV"].reshape(-1, V), z_KBL.reshape(-1), x_KBL.reshape(-1),
                              MASK).view(K, B, L)
    velocity_hat_KBL = family.reverse_velocity(t_KB=b["t_B"].expand(K, B), rev_logits_KBL=b["rev_KBL"],
                                               valid_BL=valid_BL)
    log_q_KB = family.log_q(sched, mask_KBL, valid_BL)
    terms = compute_loss_terms(family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=logp_KBL,
                               velocity_hat_KBL=velocity_hat_KBL, log_q_KB=log_q_KB, valid_BL=valid_BL)
    return terms, mask_KBL


def _share(b: dict, mask_KBL: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Corruption k's share of sequence n's surrogate, written from method.md §3.2-§3.4 (one sequence)."""
    K = mask_KBL.shape[0]
    keep_L = b["valid_BL"][n]
    L = int(keep_L.sum())
    v_L, t = b["fwd_BL"][n][keep_L], b["t_B"][n]
    sig_L = torch.sigmoid(v_L)
    e_L = C1 + C2 * (sig_L - sig_L.mean())
    A_L = e_L / t
    log_mask_L, log_keep_L = e_L * t.log(), torch.log(-torch.expm1(e_L * t.log()))
    ell, logq = [], []
    for j in range(K):
        m_L = mask_KBL[j, n][keep_L]
        logits_LV = b["logits_KBLV"][j, n][keep_L].clone()
        logits_LV[:, MASK] = float("-inf")
        logp_L = torch.log_softmax(logits_LV, -1).gather(-1, b["x_BL"][n][keep_L][:, None])[:, 0]
        sig_rev = torch.sigmoid(b["rev_KBL"][j, n][keep_L])
        Ah_L = (C1 + C2 * (sig_rev - sig_rev.mean())) / t
        per_L = -A_L * logp_L + A_L * (A_L.log() - Ah_L.log()) - A_L + Ah_L
        ell.append(torch.where(m_L, per_L, 0.0).sum() / L)
        logq.append(torch.where(m_L, log_mask_L, log_keep_L).sum())
    baseline = (sum(x.detach() for x in ell) - ell[k].detach()) / (K - 1)
    return L * (ell[k] + (ell[k].detach() - baseline) * logq[k]) / K


@pytest.mark.parametrize("K", [2, 3])
def test_sums_match_brute_force(K: int) -> None:
    """S and N equal the per-(corruption, sequence) reference from separate autograd.grad calls."""
    B, L = 5, 7
    b = _toy(K, B, L, seed=K)
    terms, mask_KBL = _terms(b)
    got = corruption_grad_snr_sums(terms.surrogate_KB, b["fwd_BL"], b["valid_BL"])
    torch.testing.assert_close(terms.surrogate_KB.sum(), terms.surrogate, rtol=1e-12, atol=1e-12)

    signal = noise = 0.0
    for n in range(B - 1):  # the last row is all pads
        g_KL = torch.stack([K * torch.autograd.grad(_share(b, mask_KBL, k, n), b["fwd_BL"])[0][n]
                            for k in range(K)])
        gbar_L = g_KL.mean(0)
        noise_n = sum(float((g_KL[k] - gbar_L).square().sum()) for k in range(K)) / (K * (K - 1))
        signal += float(gbar_L.square().sum()) - noise_n
        noise += noise_n
    assert float(got["snr_noise"]) == pytest.approx(noise, rel=1e-9)
    assert float(got["snr_signal"]) == pytest.approx(signal, rel=1e-9, abs=1e-9 * noise)
    assert float(got["snr_seqs"]) == B - 1
    # the mean of the per-corruption gradients is the gradient the step backpropagates
    (g_step,) = torch.autograd.grad(terms.surrogate, b["fwd_BL"], retain_graph=True)
    g_parts = [torch.autograd.grad(terms.surrogate_KB[k].sum(), b["fwd_BL"], retain_graph=True)[0]
               for k in range(K)]
    torch.testing.assert_close(sum(g_parts), g_step, rtol=1e-10, atol=1e-12)


def test_does_not_change_the_loss_or_the_gradients() -> None:
    """Bit-identical surrogate and leaf gradients with and without the SNR's autograd.grad calls."""
    grads = []
    for with_snr in (False, True):
        b = _toy(2, 4, 6, seed=7)
        terms, _ = _terms(b)
        if with_snr:
            corruption_grad_snr_sums(terms.surrogate_KB, b["fwd_BL"], b["valid_BL"])
        terms.surrogate.backward()
        grads.append([terms.surrogate.detach()] + [b[k].grad for k in ("fwd_BL", "rev_KBL", "logits_KBLV")])
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)


def _linear(K: int, B: int, L: int, signal: float, seed: int) -> dict[str, float]:
    """Known per-corruption gradients g_kb = mu_b + eps_kb (eps ~ N(0, 1) per entry): E S = B L signal^2,
    E N = B L / K, so the per-sequence SNR is signal^2 K."""
    g = torch.Generator().manual_seed(seed)
    logits_BL = torch.zeros(B, L, dtype=F64, requires_grad=True)
    g_KBL = signal + torch.randn(K, B, L, generator=g, dtype=F64)
    surrogate_KB = (logits_BL * g_KBL).sum(-1) / K
    return {k: float(v) for k, v in corruption_grad_snr_sums(surrogate_KB, logits_BL).items()}


def test_known_moments_and_scaling_with_batch_and_corruptions() -> None:
    """Unbiased S and N on a toy with known gradients. The SNR is per sequence: a 4x larger batch
    gives 4x the signal and the noise, not a 4x larger ratio (each sequence owns its logits); more
    corruptions per sequence raise it in proportion to K."""
    L, s = 16, 0.25
    runs = {(K, B): [_linear(K, B, L, s, seed) for seed in range(40)] for K in (2, 8) for B in (16, 64)}
    mean = {key: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for key, rs in runs.items()}
    for (K, B), m in mean.items():
        assert m["snr_noise"] == pytest.approx(B * L / K, rel=0.05)
        assert m["snr_signal"] == pytest.approx(B * L * s**2, rel=0.25)
    snr = {key: m["snr_signal"] / m["snr_noise"] for key, m in mean.items()}
    assert snr[(2, 64)] == pytest.approx(snr[(2, 16)], rel=0.3)
    assert mean[(2, 64)]["snr_signal"] / mean[(2, 16)]["snr_signal"] == pytest.approx(4, rel=0.3)
    assert snr[(8, 64)] / snr[(2, 64)] == pytest.approx(4, rel=0.3)


def test_argument_errors() -> None:
    logits_BL = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="K >= 2"):
        corruption_grad_snr_sums(logits_BL.sum(-1)[None], logits_BL)
