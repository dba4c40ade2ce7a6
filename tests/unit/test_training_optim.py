"""Optimizer plumbing: weight-decay groups on both backends, optim.head_lr, clipping, the LR
schedule and the EMA (issue 16 §5).

The megatron engine is the real `MegatronEngine` in one process on CPU (gloo; shims 1-4). The
DeepSpeed backend is checked through what it hands DeepSpeed: `param_groups` and the torch AdamW
of `DeepSpeedEngine._optimizer` (building a DeepSpeed engine needs a process group per test and a
JIT-compiled extension; the distributed parity tests cover the engine itself).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lomdm.config import Config
from megatron_lomdm.config.schema import DiffusionConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_lomdm.distributed.deepspeed_engine import DeepSpeedEngine, deepspeed_config, param_groups
from megatron_lomdm.distributed.megatron_engine import MegatronEngine
from megatron_lomdm.distributed.params import decays, is_head_param
from megatron_lomdm.training.build import build_model
from megatron_lomdm.training.optim import EMA, lr_multiplier
from tests.helpers.cpu_megatron import megatron_cpu_session

LR = 0.01


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True) as info:
        yield info


def tiny_config(family: str = "lomdm", **optim: float) -> Config:
    return Config(
        model=ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_length=8, vocab_size=20, mask_id=19,
                          pad_id=18),
        diffusion=DiffusionConfig(name=family),
        optim=OptimConfig(warmup_steps=0, ema_decay=0.0, **optim),
        train=TrainConfig(lr=LR, precision="fp32", micro_batch_size=2, global_batch_size=2),
        parallel=ParallelConfig(overlap_grad_reduce=False),
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adam_state(engine: MegatronEngine, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    for opt in engine.optimizer.chained_optimizers:
        if param in opt.optimizer.state:
            return opt.optimizer.state[param]
    raise KeyError("parameter has no Adam state")


# ---- weight decay -------------------------------------------------------------------------------
EXEMPT = {  # one of each kind the rule exempts
    "lomdm": ("backbone.decoder.final_layernorm.weight", "backbone.decoder.layers.0.mlp.linear_fc1.bias",
              "fwd_head.norm_attn.weight", "fwd_head.out.0.weight", "rev_head.attn.qkv.bias"),
    "genmd4": ("backbone.decoder.final_layernorm.weight", "family.raw_exponent_V"),
}
DECAYED = {
    "lomdm": ("backbone.embedding.word_embeddings.weight", "backbone.output_layer.weight",
              "backbone.decoder.layers.0.self_attention.linear_qkv.weight", "fwd_head.attn.qkv.weight",
              "rev_head.mlp.0.weight"),
    "genmd4": ("backbone.embedding.word_embeddings.weight", "backbone.decoder.layers.0.mlp.linear_fc2.weight"),
}


def check_decay_step(backend: str, model: torch.nn.Module, before: dict[str, torch.Tensor],
                     lr_of: dict[str, float], wd: float) -> None:
    """After one AdamW step with zero gradient: decayed w -> w - lr wd w, exempt ones unchanged."""
    for name, p in model.named_parameters():
        if decays(name, p):
            torch.testing.assert_close(p.detach(), before[name] - lr_of[name] * wd * before[name], rtol=1e-6,
                                       atol=1e-12, msg=lambda m, n=name: f"{backend}: {n} (decayed): {m}")
        else:
            assert torch.equal(p.detach(), before[name]), f"{backend}: {name} is exempt from weight decay but moved"


@pytest.mark.parametrize("family", ["lomdm", "genmd4"])
def test_weight_decay_rule_is_the_same_on_both_backends(session, family: str) -> None:
    """optim.weight_decay=0.1, zero gradient, one step: matrices and embeddings shrink by exactly
    lr*wd*w on the megatron engine and in DeepSpeed's optimizer; biases, LayerNorm weights (heads
    included) and GenMD4's exponents do not move on either."""
    wd = 0.1
    cfg = tiny_config(family, weight_decay=wd, head_lr=2 * LR)
    model = build_model(cfg, session)
    params = dict(model.named_parameters())
    assert all(not decays(n, params[n]) for n in EXEMPT[family])
    assert all(decays(n, params[n]) for n in DECAYED[family])
    lr_of = {n: 2 * LR if is_head_param(n) else LR for n in params}
    torch.nn.init.normal_(params[EXEMPT[family][0]], mean=1.0, std=0.1)  # a LayerNorm weight != 1
    before = snapshot(model)
    engine = MegatronEngine(model, cfg)
    engine.zero_grad()
    engine.set_lr(1.0)
    applied, norm = engine.step()
    assert applied and norm == 0.0
    check_decay_step("megatron", model, before, lr_of, wd)

    model = build_model(cfg, session)  # DeepSpeed: its parameter groups and optimizer, one step
    before = snapshot(model)
    optimizer = DeepSpeedEngine._optimizer(param_groups(model, cfg), cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    check_decay_step("deepspeed", model, before, lr_of, wd)


# ---- optim.head_lr ------------------------------------------------------------------------------
def test_head_lr_reaches_the_engine(session) -> None:
    """optim.head_lr: after set_lr(m) every head and family parameter's group has lr head_lr*m,
    every backbone parameter's train.lr*m, and the first Adam step (|update| = lr) moves them so."""
    head_lr, mult = 4 * LR, 0.5
    cfg = tiny_config("lomdm", head_lr=head_lr)
    model = build_model(cfg, session)
    name_of = {id(p): n for n, p in model.named_parameters()}
    expected = {n: (head_lr if is_head_param(n) else LR) * mult for n in name_of.values()}
    assert any(is_head_param(n) for n in expected) and not all(is_head_param(n) for n in expected)
    engine = MegatronEngine(model, cfg)
    engine.zero_grad()
    assert engine.set_lr(mult) == pytest.approx(LR * mult)
    seen = set()
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(expected[name_of[id(p)]]), name_of[id(p)]
            seen.add(name_of[id(p)])
    assert seen == set(expected)
    before = snapshot(model)
    for p in model.parameters():
        p.main_grad.fill_(1.0)  # Adam's first step moves every parameter by lr * g/|g| = lr
    engine.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), torch.full_like(p, expected[name]), rtol=1e-4, atol=0)
    # DeepSpeed's groups carry the same learning rates (its set_lr scales them by the multiplier)
    for group in param_groups(model, cfg):
        for p in group["params"]:
            assert group["lr"] * mult == pytest.approx(expected[name_of[id(p)]]), (group["name"], name_of[id(p)])


# ---- gradient clipping ----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_engine_clips_to_clip_grad(session, clip: float) -> None:
    """A known gradient of norm G >> clip: step() reports G and Adam sees g * clip / G
    (first moment (1 - beta1) g_clipped); optim.clip_grad=0 leaves the gradient alone."""
    cfg = tiny_config("lomdm", clip_grad=clip)
    model = build_model(cfg, session)
    engine = MegatronEngine(model, cfg)
    engine.zero_grad()
    engine.set_lr(1.0)
    gen = torch.Generator().manual_seed(0)
    grads = {n: 3.0 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.main_grad.copy_(grads[name])
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert norm > 100 * clip
    applied, reported = engine.step()
    assert applied and reported == pytest.approx(norm, rel=1e-6)
    scale = clip / (norm + 1e-6) if clip else 1.0  # megatron: max_norm / (total_norm + 1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(adam_state(engine, p)["exp_avg"], (1 - cfg.optim.beta1) * scale * grads[name],
                                   rtol=1e-5, atol=1e-12)
    # the DeepSpeed backend hands the same threshold to DeepSpeed (or clips itself, ZeRO-0 fp32)
    assert deepspeed_config(cfg, dp=1, num_microbatches=1, bucket_numel=1, engine_clips=False)["gradient_clipping"] == clip


def test_engine_skips_a_non_finite_gradient(session) -> None:
    """A NaN in one gradient with a finite loss: step() must not apply the update (the loop counts a
    skipped step). The pre-check used to read the norm before megatron copied the DDP buffers into
    .grad, saw 0.0 and applied NaN to every weight."""
    cfg = tiny_config("lomdm")
    model = build_model(cfg, session)
    engine = MegatronEngine(model, cfg)
    engine.zero_grad()
    before = snapshot(model)
    for i, (_, p) in enumerate(model.named_parameters()):
        p.main_grad.fill_(float("nan") if i == 3 else 0.01)
    applied, norm = engine.step()
    assert not applied and not math.isfinite(norm)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    engine.zero_grad()  # and the next finite step applies normally
    for p in model.parameters():
        p.main_grad.fill_(0.01)
    applied, norm = engine.step()
    assert applied and math.isfinite(norm)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- LR schedule ----------------------------------------------------------------------------------
def test_lr_multiplier_warmup_constant_cosine() -> None:
    constant = dict(warmup_steps=4, total_steps=14, schedule="constant", min_lr_ratio=0.1)
    assert [lr_multiplier(s, **constant) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(10_000, **constant) == 1.0
    cosine = dict(warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, **cosine) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **cosine) == 1.0  # cosine starts at the peak right after warmup
    assert lr_multiplier(9, **cosine) == pytest.approx(0.55)  # half-way: (1 + min) / 2
    assert lr_multiplier(6, **cosine) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)))
    assert lr_multiplier(14, **cosine) == pytest.approx(0.1)  # the floor at the last step ...
    assert lr_multiplier(50, **cosine) == pytest.approx(0.1)  # ... and beyond
    no_warmup = dict(warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_multiplier(0, **no_warmup) == 1.0
    assert lr_multiplier(5, **no_warmup) == pytest.approx(0.5)
    assert lr_multiplier(10, **no_warmup) == pytest.approx(0.0, abs=1e-15)


# ---- EMA ------------------------------------------------------------------------------------------
def test_ema_update_and_swap() -> None:
    """shadow <- decay*shadow + (1-decay)*w, kept in fp32 for bf16 weights; swap exchanges live and
    EMA weights and a second swap restores both exactly; decay 0 is no EMA at all."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    h = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.bfloat16))
    ema = EMA([("w", w), ("h", h)], decay=0.9)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 6.0]))
        h.copy_(torch.tensor([1.0 + 2**-7, -1.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.2, 2.4]), rtol=1e-6, atol=0)
    ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.38, 2.76]), rtol=1e-6, atol=0)
    # bf16 weight: the shadow moves by 0.19 * 2^-7 (below bf16's resolution at 1), in fp32
    assert ema.shadow["h"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["h"], torch.tensor([1.0 + 0.19 * 2**-7, -1.0]), rtol=1e-6, atol=0)
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    live_w, live_h = w.detach().clone(), h.detach().clone()
    ema.swap()  # EMA weights in (rounded to the parameter's dtype)
    assert torch.equal(w.detach(), shadow["w"]) and torch.equal(h.detach(), shadow["h"].bfloat16())
    ema.swap()  # live weights back, and the fp32 shadow intact (not rounded to bf16 on the way)
    assert torch.equal(w.detach(), live_w) and torch.equal(h.detach(), live_h) and h.dtype == torch.bfloat16
    assert all(torch.equal(ema.shadow[k], shadow[k]) for k in shadow)
    off = EMA([("w", w)], decay=0.0)
    off.update()
    off.swap()
    assert off.shadow == {} and torch.equal(w.detach(), live_w)
