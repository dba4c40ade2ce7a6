"""The real tiny DiffusionLM (LoMDM) in one process: where each loss term's gradient goes
(method.md §3.4's table) and the clean pass's dropout choice (`model.clean_pass_dropout`).

Phase one runs through both backends' code: `training.step.phase_one` (megatron-core's schedule;
CPU shims 1-4) and the DeepSpeed engine's module `training.step.MicroBatchStep` (plain torch, no DeepSpeed).
"""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.config import Config
from megatron_lomdm.config.schema import DiffusionConfig, ModelConfig, TrainConfig
from megatron_lomdm.training.step import MicroBatchStep
from megatron_lomdm.losses.nelbo import main_term, velocity_term
from megatron_lomdm.losses.rloo import rloo_surrogate
from megatron_lomdm.models import diffusion_lm
from megatron_lomdm.training.build import build_model
from megatron_lomdm.training.step import phase_one
from tests.helpers.cpu_megatron import megatron_cpu_session

B, L, V, MASK, PAD = 2, 8, 20, 19, 18
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True) as info:
        yield info


def tiny_config(**model: object) -> Config:
    return Config(
        model=ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_length=L, vocab_size=V, mask_id=MASK,
                          pad_id=PAD, **model),
        diffusion=DiffusionConfig(name="lomdm"),
        train=TrainConfig(precision="fp32", micro_batch_size=B, global_batch_size=B),
    )


def tiny_model(cfg: Config, info) -> diffusion_lm.DiffusionLM:
    """The model of `training.build`, heads' zero-initialised output layers made non-zero (so that
    gradients and dropout noise pass through the heads)."""
    model = build_model(cfg, info)
    with torch.no_grad():
        for head in (model.fwd_head, model.rev_head):
            head.out[-1].weight.normal_(std=0.5)
    return model


def micro_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, PAD, (B, L), generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, -2:] = False  # a padded sequence
    return {"tokens": tokens.masked_fill(~valid, PAD), "valid": valid, "sample_index": torch.arange(B)}


def separate_terms(family, kw: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Main, velocity and RLOO sums of `losses.objective.compute_loss_terms`' inputs, each with
    its graph (the library returns only their detached values and their sum)."""
    mask_KBL, valid_BL, sched = kw["mask_KBL"], kw["valid_BL"].bool(), kw["sched"]
    K = mask_KBL.shape[0]
    counted_KBL = mask_KBL & valid_BL
    velocity_1BL = sched.velocity_BL.float().unsqueeze(0)
    velocity_hat_KBL = kw["velocity_hat_KBL"].float()
    logp_KBL = family.adjust_logp_true(logp_true_KBL=kw["logp_true_KBL"].float(), sched=sched,
                                       velocity_hat_KBL=velocity_hat_KBL)
    main_KBL = torch.where(counted_KBL, main_term(velocity_1BL, logp_KBL), 0.0)
    vel_KBL = torch.where(counted_KBL, velocity_term(velocity_1BL, velocity_hat_KBL), 0.0)
    n_B = valid_BL.sum(-1).float()
    rloo_B = rloo_surrogate((main_KBL + vel_KBL).sum(-1) / n_B, kw["log_q_KB"].float())
    return main_KBL.sum() / K, vel_KBL.sum() / K, (rloo_B * n_B).sum()


def grad_size(term: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("backend", ["megatron", "deepspeed"])
def test_gradient_routing_of_the_loss_terms(session, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One step's loss on the real model, autograd on each term: the backbone learns from the main
    term only; the reverse head from the velocity term only; the forward head from main, velocity
    and the RLOO score-function term. The clean pass records no graph, and g_phi's features are
    stop-grad even when handed a tensor that requires grad."""
    model = tiny_model(tiny_config(), session)
    b = micro_batch()
    captured: dict = {}
    real = diffusion_lm.compute_loss_terms

    def spy(family, **kw):
        captured.update(kw)
        return real(family, **kw)

    monkeypatch.setattr(diffusion_lm, "compute_loss_terms", spy)
    grad_modes: list[bool] = []  # torch.is_grad_enabled() at each backbone call: clean pass, then phase two
    hook = model.backbone.register_forward_pre_hook(lambda mod, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        if backend == "megatron":
            fwd_logits_BL = phase_one(model, [b], seq_length=L, micro_batch_size=B, device=CPU)[0]
            terms, _ = model(b["tokens"], b["valid"], b["sample_index"], 0, fwd_logits_BL=fwd_logits_BL)
        else:
            _, terms, _ = MicroBatchStep(model)(b["tokens"], b["valid"], b["sample_index"], 0)
    finally:
        hook.remove()
    assert grad_modes == [False, True], grad_modes  # phase one under no_grad, phase two with grad
    assert captured.get("weight_B") is None
    main, velocity, rloo = separate_terms(model.family, captured)
    torch.testing.assert_close(main + velocity + rloo, terms.surrogate.float(), rtol=1e-5, atol=1e-5)
    assert float(rloo.detach().abs()) > 0  # K = 2 corruptions with different losses

    groups = {"backbone": list(model.backbone.parameters()), "rev_head": list(model.rev_head.parameters()),
              "fwd_head": list(model.fwd_head.parameters())}
    sizes = {(g, t): grad_size(term, params) for g, params in groups.items()
             for t, term in (("main", main), ("velocity", velocity), ("rloo", rloo))}
    feeds = {"backbone": {"main"}, "rev_head": {"velocity"}, "fwd_head": {"main", "velocity", "rloo"}}
    for (group, term), size in sizes.items():
        if term in feeds[group]:
            assert size > 0, f"{group} gets no gradient from the {term} term"
        else:
            assert size == 0, f"{group} gets a gradient from the {term} term ({size:.3g})"

    features_BLD = torch.randn(B, L, 32, requires_grad=True)  # g_phi cuts the graph to f(x) itself
    model.forward_head_logits(features_BLD, b["valid"]).sum().backward()
    assert features_BLD.grad is None


@pytest.mark.parametrize("clean_pass_dropout", [False, True])
def test_clean_pass_dropout_choice(session, clean_pass_dropout: bool) -> None:
    """model.dropout > 0 in training: by default f(x) (phase one) runs without dropout, so the
    forward-head logits are deterministic and equal to evaluation's; with
    model.clean_pass_dropout=true they carry dropout noise. Phase two keeps its dropout."""
    model = tiny_model(tiny_config(dropout=0.3, clean_pass_dropout=clean_pass_dropout), session)
    b = micro_batch()

    def forward_head_logits() -> torch.Tensor:
        return phase_one(model, [b], seq_length=L, micro_batch_size=B, device=CPU)[0].detach()

    first, second = forward_head_logits(), forward_head_logits()
    assert model.training and model.backbone.training  # the mode is restored after the clean pass
    if clean_pass_dropout:
        assert not torch.equal(first, second)
    else:
        assert torch.equal(first, second)
        model.eval()
        assert torch.equal(first, forward_head_logits())
        model.train()
    with torch.no_grad():  # phase two: the corruptions still see dropout
        a, _ = model(b["tokens"], b["valid"], b["sample_index"], 0, fwd_logits_BL=first)
        c, _ = model(b["tokens"], b["valid"], b["sample_index"], 0, fwd_logits_BL=first)
    assert not torch.equal(a.nelbo, c.nelbo)
