"""The backbone in one process (world 1, TP=1): bidirectional attention, padding, one pass.

Needs CPU shims 1 (RNG tracker: DotProductAttention forks it even without dropout) and 2
(``current_device``: RoPE frequencies and the attention score buffer), installed by
``megatron_cpu_session`` and removed afterwards.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lomdm.config import load_config
from megatron_lomdm.models.backbone import Backbone, build_backbone, pad_vocab_size, use_cpu_initialization
from megatron_lomdm.models.layer_specs import SDPACoreAttention, resolve_attention_backend
from tests.helpers.cpu_megatron import megatron_cpu_session

V, MASK_ID, L, D = 100, 99, 16, 64


@pytest.fixture(scope="module")
def session():
    with megatron_cpu_session(tp=1, pp=1, seed=0) as info:
        yield info


def tiny(seed: int = 0, **overrides) -> Backbone:
    torch.manual_seed(seed)
    kwargs = dict(num_layers=2, hidden_size=D, num_heads=4, ffn_hidden_size=4 * D, vocab_size=V,
                  seq_length=L, mask_id=MASK_ID, use_cpu_initialization=True)
    kwargs.update(overrides)
    return build_backbone(**kwargs).eval()


def tokens(B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(seed))


def test_backbone_bidirectional(session) -> None:
    model = tiny()
    tok = tokens()
    with torch.no_grad():
        logits, _ = model(tok)
        changed = tok.clone()
        changed[:, -1] = (changed[:, -1] + 1) % (V - 1)
        logits_changed, _ = model(changed)
    # a change at the LAST position reaches the FIRST: not causal
    assert (logits_changed[:, 0] - logits[:, 0]).abs().max() > 1e-4

    # padding: pads are invisible to valid positions
    valid = torch.ones_like(tok, dtype=torch.bool)
    valid[:, -4:] = False
    repadded = tok.clone()
    repadded[:, -4:] = torch.randint(0, V - 1, (tok.shape[0], 4))
    with torch.no_grad():
        a, _ = model(tok, valid)
        b, _ = model(repadded, valid)
        short, _ = model(tok[:, :-4])  # the same sequences without the pads
        all_valid, _ = model(tok, torch.ones_like(valid))
    assert torch.equal(a[:, :-4], b[:, :-4])
    assert (a[:, :-4] - short).abs().max() <= 1e-5
    assert (a[:, :-4] - logits[:, :-4]).abs().max() > 1e-4  # the pads did matter without the mask
    assert torch.equal(all_valid, logits)  # an all-valid mask is the unmasked computation


def test_backbone_one_pass(session) -> None:
    model = tiny()
    seen = {}
    hook = model.decoder.final_layernorm.register_forward_hook(
        lambda mod, inp, out: seen.setdefault("final_ln_calls", []).append(out)
    )
    try:
        logits, hidden = model(tokens())
    finally:
        hook.remove()
    assert len(seen["final_ln_calls"]) == 1  # one pass
    assert logits.shape == (2, L, pad_vocab_size(V)) and hidden.shape == (2, L, D)
    assert torch.equal(hidden, seen["final_ln_calls"][0].transpose(0, 1))  # after the final LN
    head_out, _ = model.output_layer(hidden.transpose(0, 1))
    assert torch.equal(logits, head_out.transpose(0, 1))  # logits = LM head(hidden)
    (logits.sum() + hidden.sum()).backward()  # both come from the same graph
    assert model.embedding.word_embeddings.weight.grad is not None

    no_logits, hidden_only = model(tokens(), compute_logits=False)
    assert no_logits is None and torch.equal(hidden_only, hidden.detach())


def test_sdpa_core_attention_matches_local(session) -> None:
    local, sdpa = tiny(attention_backend="local"), tiny(attention_backend="sdpa")
    core = sdpa.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, SDPACoreAttention)
    tok = tokens()
    valid = torch.ones_like(tok, dtype=torch.bool)
    valid[1, -5:] = False
    with torch.no_grad():
        for mask in (None, valid):
            a, ha = local(tok, mask)
            b, hb = sdpa(tok, mask)
            assert (a - b).abs().max() <= 1e-5 and (ha - hb).abs().max() <= 1e-5
    dropout_model = tiny(attention_backend="sdpa", dropout=0.1).train()
    dropout_model(tok)[0].sum().backward()  # the TP RNG fork path of SDPACoreAttention


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_matches_plain(session, recompute: str) -> None:
    results = []
    for mode in (None, recompute):
        model = tiny(recompute=mode).train()
        logits, _ = model(tokens())
        logits.square().mean().backward()
        grad = model.decoder.layers[0].self_attention.linear_qkv.weight.grad
        results.append((logits.detach(), grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert (results[0][1] - results[1][1]).abs().max() <= 1e-7


def test_bf16_build(session) -> None:
    model = tiny(bf16=True, params_dtype=torch.bfloat16)
    logits, hidden = model(tokens())
    assert logits.dtype == torch.bfloat16 and hidden.dtype == torch.bfloat16


def test_build_validation(session) -> None:
    with pytest.raises(ValueError, match="bf16"):
        tiny(bf16=True)
    with pytest.raises(ValueError, match="model.num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="mask_id"):
        tiny(mask_id=V)
    with pytest.raises(ValueError, match="recompute"):
        tiny(recompute="some")


def test_vocab_padding_and_backend_choice() -> None:
    assert pad_vocab_size(50258) == 50304
    assert pad_vocab_size(50258, tp=2) == 50304  # layout-independent for power-of-two TP
    assert pad_vocab_size(128) == 128 and pad_vocab_size(129) == 256
    assert pad_vocab_size(100, divisible_by=128, tp=3) == 384
    if not torch.cuda.is_available():
        assert resolve_attention_backend("auto") == "local"
    assert resolve_attention_backend("sdpa") == "sdpa"
    with pytest.raises(ValueError):
        resolve_attention_backend("flash")  # type: ignore[arg-type]


def test_init_device_resolution() -> None:
    """model.init_device: auto draws on the GPU only when there is one; cuda without CUDA and meta
    are refused naming the key (megatron-core 0.16.1 builds on the meta device only in TE layers
    under megatron FSDP)."""
    assert use_cpu_initialization("auto", cuda_available=False)
    assert not use_cpu_initialization("auto", cuda_available=True)
    assert use_cpu_initialization("cpu", cuda_available=True)
    assert not use_cpu_initialization("cuda", cuda_available=True)
    with pytest.raises(ValueError, match=r"model\.init_device=cuda needs a CUDA device"):
        use_cpu_initialization("cuda", cuda_available=False)
    with pytest.raises(ValueError, match=r"model\.init_device: meta is not supported"):
        use_cpu_initialization("meta", cuda_available=True)
    with pytest.raises(ValueError, match=r"model\.init_device: must be one of auto, cpu, cuda, meta"):
        load_config(None, ["model.init_device=disk"])


def test_accelerator_init_path_builds(session) -> None:
    """The init-on-the-accelerator branch (megatron's ``use_cpu_initialization=False``: each weight
    allocated on ``torch.cuda.current_device()``, TP-split ones drawn from megatron's model-parallel
    RNG), run here on the CPU through the shims. Not bitwise the CPU init (another RNG stream):
    the same parameters, shapes and dtypes, finite, weights drawn with init_method_std, norms at
    their init; and it computes."""
    on_host, on_device = tiny(seed=3), tiny(seed=3, use_cpu_initialization=False)
    assert not on_device.config.use_cpu_initialization
    host, device = dict(on_host.named_parameters()), dict(on_device.named_parameters())
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {k: (v.shape, v.dtype) for k, v in device.items()}
    drawn = 0
    for name, p in device.items():
        assert torch.isfinite(p).all(), name
        if p.dim() == 2:  # weight matrices and embeddings: N(0, 0.02) (output projections scaled down)
            assert 0.002 < float(p.detach().std()) < 0.025, name
            assert not torch.equal(p, host[name]), name
            drawn += 1
        elif "layernorm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert drawn >= 6
    with torch.no_grad():
        logits, hidden = on_device(tokens())
    assert logits.shape == (2, L, pad_vocab_size(V)) and torch.isfinite(logits).all()
