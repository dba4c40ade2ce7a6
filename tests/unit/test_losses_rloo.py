"""RLOO: the K=2 leave-one-out estimator and unbiasedness of its gradient (§3.8 test 5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t
from megatron_lomdm.losses.nelbo import main_term, velocity_term
from megatron_lomdm.losses.objective import compute_loss_terms
from megatron_lomdm.losses.rloo import rloo_surrogate

F64 = torch.float64
L = 4


def test_rloo_k2_formula() -> None:
    """K=2: value 0.5 sg(l1 - l2)(log q1 - log q2); no gradient flows into the losses."""
    loss_KB = torch.tensor([[1.0, 3.0], [2.5, 0.5]], dtype=F64, requires_grad=True)
    log_q_KB = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], dtype=F64, requires_grad=True)
    out_B = rloo_surrogate(loss_KB, log_q_KB)
    expected = 0.5 * (loss_KB[0] - loss_KB[1]) * (log_q_KB[0] - log_q_KB[1])
    torch.testing.assert_close(out_B, expected.detach())
    out_B.sum().backward()
    assert loss_KB.grad is None
    torch.testing.assert_close(
        log_q_KB.grad,
        0.5 * torch.stack([loss_KB[0] - loss_KB[1], loss_KB[1] - loss_KB[0]]).detach(),
    )
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_surrogate(loss_KB[:1], log_q_KB[:1])


def test_rloo_leave_one_out_general_k() -> None:
    """K=4: grad of the surrogate w.r.t. log q_k is (1/K) (l_k - mean_{j != k} l_j), written out
    with loops, and ``compute_loss_terms`` applies it to per-token sequence losses."""
    K, B = 4, 3
    g = torch.Generator().manual_seed(11)
    loss_KB = torch.rand(K, B, generator=g, dtype=F64)
    log_q_KB = (-5 * torch.rand(K, B, generator=g, dtype=F64)).requires_grad_(True)
    (grad_KB,) = torch.autograd.grad(rloo_surrogate(loss_KB, log_q_KB).sum(), log_q_KB)
    for k in range(K):
        for b in range(B):
            others = [float(loss_KB[j, b]) for j in range(K) if j != k]
            expected = (float(loss_KB[k, b]) - sum(others) / (K - 1)) / K
            assert abs(float(grad_KB[k, b]) - expected) < 1e-14

    # Through compute_loss_terms: per-sequence losses l_kb = S_kb / n_b, surrogate scaled by n_b.
    Lx = 5
    family = build_family(
        "lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=3, seq_length=Lx, mask_id=2,
        num_corruptions=K,
    )
    assert family.num_corruptions == K
    valid_BL = torch.ones(B, Lx, dtype=torch.bool)
    valid_BL[1, 3:] = False
    sched = family.forward_schedule(
        x_BL=torch.zeros(B, Lx, dtype=torch.long),
        t_B=torch.tensor([0.2, 0.5, 0.9], dtype=F64),
        fwd_logits_BL=torch.randn(B, Lx, generator=g, dtype=F64),
        valid_BL=valid_BL,
    )
    mask_KBL = family.sample_masks(sched, torch.rand(K, B, Lx, generator=g, dtype=F64)) & valid_BL
    logp_KBL = torch.where(mask_KBL, -torch.rand(K, B, Lx, generator=g, dtype=F64), 0.0)
    velocity_hat_KBL = torch.rand(K, B, Lx, generator=g, dtype=F64) + 0.5
    log_q_KB = family.log_q(sched, mask_KBL, valid_BL).detach().requires_grad_(True)
    terms = compute_loss_terms(
        family, sched=sched, mask_KBL=mask_KBL, logp_true_KBL=logp_KBL,
        velocity_hat_KBL=velocity_hat_KBL, log_q_KB=log_q_KB, valid_BL=valid_BL,
    )
    (g_log_q_KB,) = torch.autograd.grad(terms.surrogate, log_q_KB)
    per_pos_KBL = main_term(sched.velocity_BL, logp_KBL) + velocity_term(
        sched.velocity_BL, velocity_hat_KBL
    )
    n_B = valid_BL.sum(-1).to(F64)
    ell_KB = torch.where(mask_KBL, per_pos_KBL, 0.0).sum(-1).detach() / n_B
    for k in range(K):
        for b in range(B):
            baseline = (ell_KB[:, b].sum() - ell_KB[k, b]) / (K - 1)
            expected = float(n_B[b] * (ell_KB[k, b] - baseline) / K)
            assert abs(float(g_log_q_KB[k, b]) - expected) < 1e-12
    torch.testing.assert_close(terms.nelbo, (ell_KB * n_B).sum() / K)


class _Toy:
    """L=4 toy: context-dependent denoiser log-probs and reverse logits per mask pattern.

    ``name`` picks the family (lomdm by default; multivariate reads its own order logits and
    ignores the scheduler logits phi), ``num_corruptions`` its K.
    """

    def __init__(self, name: str = "lomdm", num_corruptions: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        self.num_corruptions = num_corruptions
        self.family = build_family(
            name, c1=0.7, c2=0.65, block_size=1, vocab_size=3, seq_length=L, mask_id=2,
            num_corruptions=num_corruptions,
        )
        num_patterns = 2**L
        self.logp_PL = -torch.nn.functional.softplus(
            2 * torch.randn(num_patterns, L, generator=g, dtype=F64)
        )
        self.rev_logits_PL = 2 * torch.randn(num_patterns, L, generator=g, dtype=F64)
        self.phi_L = torch.tensor([0.8, -1.2, 0.1, 2.0], dtype=F64)
        self.num_t = 32
        # Stratified midpoint nodes in [eps, 1]: the same t law for the exact and MC objectives.
        self.t_J = low_discrepancy_t(
            torch.full((self.num_t,), 0.5, dtype=F64), torch.arange(self.num_t), self.num_t
        )

    def pattern(self, mask_KBL: torch.Tensor) -> torch.Tensor:
        return (mask_KBL.long() * (2 ** torch.arange(L))).sum(-1)

    def inputs(self, mask_KBL: torch.Tensor, t_B: torch.Tensor):
        pattern_KB = self.pattern(mask_KBL)
        logp_KBL = torch.where(mask_KBL, self.logp_PL[pattern_KB], 0.0)
        velocity_hat_KBL = self.family.reverse_velocity(
            t_KB=t_B.expand(mask_KBL.shape[0], -1), rev_logits_KBL=self.rev_logits_PL[pattern_KB]
        )
        return logp_KBL, velocity_hat_KBL

    def exact_objective(self, phi_L: torch.Tensor) -> torch.Tensor:
        """E_t E_z [l(z)] with l = (1/L) sum_i M_i (main + velocity), z enumerated exactly."""
        J = self.num_t
        x_BL = torch.zeros(J, L, dtype=torch.long)
        sched = self.family.forward_schedule(
            x_BL=x_BL, t_B=self.t_J, fwd_logits_BL=phi_L.expand(J, L)
        )
        masks_KBL = (
            torch.tensor(list(itertools.product([False, True], repeat=L)))
            .unsqueeze(1)
            .expand(-1, J, L)
        )
        q_KB = torch.exp(self.family.log_q(sched, masks_KBL))
        logp_KBL, velocity_hat_KBL = self.inputs(masks_KBL, self.t_J)
        per_pos_KBL = main_term(sched.velocity_BL, logp_KBL) + velocity_term(
            sched.velocity_BL, velocity_hat_KBL
        )
        loss_KB = torch.where(masks_KBL, per_pos_KBL, 0.0).sum(-1) / L
        return (q_KB * loss_KB).sum(0).mean()


def _mc_gradients(
    toy: _Toy, replicates: int, per_node: int, with_score: bool, seed: int = 123
) -> torch.Tensor:
    """One surrogate gradient estimate per replicate, (R, L), all from a single backward.

    Each replicate r owns its own copy of the scheduler logits, so the gradient w.r.t. the
    (R, L) leaf splits the estimate by replicate.
    """
    J = toy.num_t
    phi_RL = toy.phi_L.expand(replicates, L).clone().requires_grad_(True)
    B = replicates * J * per_node
    replicate_B = torch.arange(replicates).repeat_interleave(J * per_node)
    t_B = toy.t_J.repeat_interleave(per_node).repeat(replicates)
    sched = toy.family.forward_schedule(
        x_BL=torch.zeros(B, L, dtype=torch.long), t_B=t_B, fwd_logits_BL=phi_RL[replicate_B]
    )
    g = torch.Generator().manual_seed(seed)
    u_KBL = torch.rand(toy.num_corruptions, B, L, generator=g, dtype=F64)
    mask_KBL = toy.family.sample_masks(sched, u_KBL)
    logp_KBL, velocity_hat_KBL = toy.inputs(mask_KBL, t_B)
    log_q_KB = toy.family.log_q(sched, mask_KBL)
    terms = compute_loss_terms(
        toy.family,
        sched=sched,
        mask_KBL=mask_KBL,
        logp_true_KBL=logp_KBL,
        velocity_hat_KBL=velocity_hat_KBL,
        log_q_KB=log_q_KB if with_score else log_q_KB.detach(),
        valid_BL=torch.ones(B, L, dtype=torch.bool),
    )
    (grad_RL,) = torch.autograd.grad(terms.surrogate, phi_RL)
    return grad_RL / (J * per_node * L)  # surrogate / num_tokens per replicate


@pytest.mark.parametrize("num_corruptions", [2, 4])
def test_rloo_unbiased(num_corruptions: int) -> None:
    """Mean surrogate gradient w.r.t. the forward-scheduler logits = exact gradient (FD)."""
    toy = _Toy(num_corruptions=num_corruptions)
    phi_L = toy.phi_L.clone().requires_grad_(True)
    (exact_grad_L,) = torch.autograd.grad(toy.exact_objective(phi_L), phi_L)
    h = 1e-5
    fd_grad_L = torch.stack(
        [
            (toy.exact_objective(toy.phi_L + h * e) - toy.exact_objective(toy.phi_L - h * e))
            / (2 * h)
            for e in torch.eye(L, dtype=F64)
        ]
    )
    torch.testing.assert_close(exact_grad_L, fd_grad_L, rtol=1e-6, atol=1e-8)

    grads_RL = _mc_gradients(toy, replicates=64, per_node=16, with_score=True)
    mean_L = grads_RL.mean(0)
    se_L = grads_RL.std(0) / grads_RL.shape[0] ** 0.5
    assert torch.all((mean_L - fd_grad_L).abs() <= 4.5 * se_L), (mean_L, fd_grad_L, se_L)
    # Power: the SE is small against the gradient, and the pathwise part alone is biased.
    assert torch.all(se_L < 0.2 * fd_grad_L.abs().max())
    path_RL = _mc_gradients(toy, replicates=64, per_node=16, with_score=False)
    path_se_L = path_RL.std(0) / path_RL.shape[0] ** 0.5
    assert torch.any((path_RL.mean(0) - fd_grad_L).abs() > 6 * path_se_L)
