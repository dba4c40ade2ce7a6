"""The layout planner (megatron_lomdm/apps/plan.py) against real models, engines and utils/flops.py.

* Model state: the planner's per-rank bytes of parameters, gradients and optimizer state equal
  the tensors bench/zero_memory.py enumerated in the real engines (megatron ZeRO-0/1, DeepSpeed
  ZeRO-1/2/3, fp32 and bf16, DP 2, LoMDM with both heads; `plan_zero_memory.json`) up to the
  engines' flat-buffer alignment padding; the parameter count equals a real model's, exactly.
* FLOPs: the planner's step FLOPs are `utils.flops.step_flops`, and its per-rank split adds up to it.
* Activations: bytes saved for backward, measured with `torch.autograd.graph.saved_tensors_hooks`
  (every tensor autograd keeps for the backward pass, parameters excluded, each storage once) on
  the real backbone, scheduler heads and DiffusionLM at two shapes, vs the planner, within
  `ACT_TOLERANCE`; and the activation peak of a whole megatron-schedule step (phase one for every
  micro-batch, then forward + backward of each), measured as the CPU allocator's live bytes from
  the profiler's memory events (`torch.profiler`, `profile_memory=True`), within `PEAK_BAND`.
* The CLI prints a table for owt_1b.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_lomdm.apps.plan import (
    GPUS,
    Cluster,
    Layout,
    ModelPlan,
    activation_bytes,
    backbone_saved_bytes,
    build_bytes,
    head_activation_bytes,
    phase_two_saved_bytes,
    partitions_at_build,
    plan_layout,
    stage_flops_per_microbatch,
    stage_params,
    state_bytes,
)
from megatron_lomdm.utils.flops import forward_flops_per_token, step_flops
from tests.helpers.cpu_megatron import megatron_cpu_session

ROOT = Path(__file__).resolve().parents[2]
MEASURED = json.loads((Path(__file__).parent / "plan_zero_memory.json").read_text())
PADDING = 1e-4  # flat buffers are padded to alignment: <= 512 bytes in 9M-parameter buffers here
ACT_TOLERANCE = 0.005  # measured saved-for-backward bytes vs predicted (observed: <= 0.07%)
PEAK_BAND = (0.97, 1.08)  # predicted / measured activation peak (observed: 0.998-1.046)
BUILD_TOLERANCE = 0.03  # predicted / measured allocator peak of a plain build (observed: 0.999-1.012)


def tiny_plan(*, layers: int, d: int, heads: int, T: int, V: int, b: int, bf16: bool = False,
              recompute: str = "none", K: int = 2) -> ModelPlan:
    return ModelPlan(num_layers=layers, hidden_size=d, num_heads=heads, ffn_hidden_size=4 * d, vocab_size=V,
                     seq_length=T, num_corruptions=K, clean_pass=True, fwd_head=True, rev_head=True,
                     head_heads=heads, bf16=bf16, ema=False, global_batch_size=b, micro_batch_size=b,
                     recompute=recompute)


# ---- model state --------------------------------------------------------------------------------
ZERO_MEMORY_MODEL = tiny_plan(layers=4, d=256, heads=4, T=128, V=8192, b=2)  # bench/zero_memory.py's shape


def test_parameter_count_of_the_measured_model() -> None:
    assert stage_params(ZERO_MEMORY_MODEL, 1, 1, 0) == MEASURED["num_params_per_rank"]


@pytest.mark.parametrize("row", MEASURED["rows"], ids=lambda r: f"{r['backend']}{r['zero']}_{r['precision']}")
def test_state_bytes_equal_the_engines_tensors(row: dict) -> None:
    predicted = state_bytes(MEASURED["num_params_per_rank"], row["backend"], row["zero"], MEASURED["dp"],
                            bf16=row["precision"] == "bf16", ema=False)
    for key in ("params", "grads", "optimizer"):
        assert getattr(predicted, key) == pytest.approx(row[key], rel=PADDING), key


def test_stage_and_tp_split_add_up() -> None:
    m = dataclasses.replace(ZERO_MEMORY_MODEL, num_layers=8)
    whole = stage_params(m, 1, 1, 0)
    assert sum(stage_params(m, 1, 4, s) for s in range(4)) == whole
    # TP: everything but LayerNorms and the row-parallel biases is split, so 2 ranks hold more than half
    replicated = 8 * (4 * 256 + 2 * 256) + 2 * 256 + 2 * (ZERO_MEMORY_MODEL.head_params // 2)
    assert 2 * stage_params(m, 2, 1, 0) == whole + replicated


def test_real_model_parameters_per_rank() -> None:
    """A real DiffusionLM (backbone + both heads) built on CPU: enumerated parameters == planner."""
    m = tiny_plan(layers=2, d=64, heads=4, T=16, V=200, b=1)
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True):
        model = _diffusion_lm(m)
        assert sum(p.numel() for p in model.parameters()) == stage_params(m, 1, 1, 0)


# ---- the build ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("layers", "d", "V"), [(2, 64, 200), (4, 128, 2000), (2, 256, 8192)])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_build_bytes_equal_the_allocator_peak_of_a_build(layers: int, d: int, V: int, bf16: bool) -> None:
    """`training.build.build_model` (CPU init, one process): the allocator's peak while it builds
    the model (heads first-heavy at V=200, LM-head-heavy at V=8192) against `build_bytes`."""
    from megatron_lomdm.config.schema import (
        Config,
        DiffusionConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        TrainConfig,
    )
    from megatron_lomdm.distributed.init import parallel_info
    from megatron_lomdm.training.build import build_model

    cfg = Config(model=ModelConfig(num_layers=layers, hidden_size=d, num_heads=4, seq_length=16, vocab_size=V,
                                   mask_id=V - 1, pad_id=V - 2, init_device="cpu"),
                 diffusion=DiffusionConfig(name="lomdm"), optim=OptimConfig(warmup_steps=0, ema_decay=0.0),
                 train=TrainConfig(precision="bf16" if bf16 else "fp32", micro_batch_size=1, global_batch_size=1),
                 parallel=ParallelConfig(overlap_grad_reduce=False))
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True):
        measured = _allocator_peak(lambda: build_model(cfg, parallel_info()))
    m = tiny_plan(layers=layers, d=d, heads=4, T=16, V=V, b=1, bf16=bf16)
    lay = Layout(tp=1, pp=1, dp=1, backend="megatron", zero=0, micro_batch_size=1)
    assert build_bytes(m, lay) == pytest.approx(measured, rel=BUILD_TOLERANCE)


def test_zero3_build_is_partitioned() -> None:
    """ZeRO-3 builds the backbone partitioned (tests/distributed/test_zero3_build.py): a rank holds
    its 1/dp of the backbone, the heads whole and the LM head's init transients; a plain build
    (the code before) holds the whole model and then DeepSpeed's partitions of it besides."""
    m = tiny_plan(layers=24, d=2048, heads=16, T=128, V=50258, b=1, bf16=True)  # owt_1b's shape
    z3 = Layout(tp=1, pp=1, dp=2, backend="deepspeed", zero=3, micro_batch_size=1)
    assert partitions_at_build(z3) and not partitions_at_build(dataclasses.replace(z3, zero=2))
    assert build_bytes(m, z3) == build_bytes(m, z3, partitioned=True)
    n = stage_params(m, 1, 1, 0)
    plain = build_bytes(m, z3, partitioned=False)
    assert plain == pytest.approx(2 * n * 1.5)  # bf16 whole model + its DP=2 partitions
    out = m.padded_vocab * m.hidden_size
    backbone = n - m.head_params
    drawing = (backbone - out) + 2 * out + (4 + 2 + 2) * out  # 1/2 of 2 B/param, the LM head whole + init
    end = backbone + 4 * m.head_params + 4 * m.hidden_size**2 * 2
    assert build_bytes(m, z3) == pytest.approx(max(drawing, end))
    assert build_bytes(m, z3) < 0.55 * plain  # 2.18 vs 4.26 GiB; the LM head's init draw is most of the rest
    # more DP ranks shrink the partition, not the heads or the LM head's transients
    wide = build_bytes(m, dataclasses.replace(z3, dp=8))
    assert 4 * m.head_params < wide < build_bytes(m, z3)
    # ZeRO 0-2 and megatron build plainly, partitioned or not
    z2 = dataclasses.replace(z3, zero=2)
    assert build_bytes(m, z2) == build_bytes(m, z2, partitioned=False) > 2 * n


def test_tp2_and_pp2_ranks(tmp_path: Path) -> None:
    """One torchrun launch of `_plan_worker.py` (2 gloo processes): a TP=2 rank's parameters and
    saved activations, and each PP=2 stage's parameters, against the planner."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    report = tmp_path / "report.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(Path(__file__).with_name(
        "_plan_worker.py")), str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(report.read_text())
    m = tiny_plan(layers=2, d=64, heads=4, T=32, V=200, b=2)
    lay = Layout(tp=2, pp=1, dp=1, backend="megatron", zero=0, micro_batch_size=2, attention="local")
    assert got["tp2"]["params"] == stage_params(m, 2, 1, 0)
    assert got["pp2"]["params"] == [stage_params(m, 1, 2, 0), stage_params(m, 1, 2, 1)]
    assert got["tp2"]["backbone"] == pytest.approx(backbone_saved_bytes(m, lay, 4), rel=ACT_TOLERANCE)
    assert got["tp2"]["phase_two"] == pytest.approx(phase_two_saved_bytes(m, lay), rel=ACT_TOLERANCE)


# ---- FLOPs --------------------------------------------------------------------------------------
def test_flops_are_utils_flops() -> None:
    m = tiny_plan(layers=24, d=2048, heads=16, T=1024, V=50258, b=8)
    m = dataclasses.replace(m, global_batch_size=512)
    cluster = Cluster(GPUS["h100-80gb"], 8, 4)
    lay = Layout(tp=1, pp=1, dp=32, backend="megatron", zero=1, micro_batch_size=8)
    p = plan_layout(m, lay, cluster)
    expected = step_flops(m.shape, unique_sequences=512, num_corruptions=2, clean_pass=True, heads=True)
    assert p.time.model_flops == expected
    per_rank = stage_flops_per_microbatch(m, lay) * (512 // (8 * 32))
    assert per_rank * 32 == pytest.approx(expected, rel=1e-12)
    # TP splits the backbone, not the replicated heads; full recompute adds one phase-two forward
    split = stage_flops_per_microbatch(m, dataclasses.replace(lay, tp=2, dp=16))
    heads = stage_flops_per_microbatch(dataclasses.replace(m, fwd_head=False, rev_head=False), lay)
    assert split == pytest.approx(heads / 2 + (stage_flops_per_microbatch(m, lay) - heads), rel=1e-12)
    full = stage_flops_per_microbatch(m, dataclasses.replace(lay, recompute="full"))
    assert full - stage_flops_per_microbatch(m, lay) == pytest.approx(
        forward_flops_per_token(m.shape, with_logits=False) * 2 * 8 * 1024)


# ---- activations --------------------------------------------------------------------------------
def _diffusion_lm(m: ModelPlan, attention: str = "local"):
    """The model of training.build.build_model for this rank's pipeline stage, from the models/
    layer (heads on the last stage only)."""
    from megatron.core import parallel_state

    from megatron_lomdm.diffusion.registry import build_family
    from megatron_lomdm.models.backbone import build_backbone
    from megatron_lomdm.models.diffusion_lm import DiffusionLM
    from megatron_lomdm.models.scheduler_head import SchedulerHead

    dtype = torch.bfloat16 if m.bf16 else torch.float32
    last = parallel_state.is_pipeline_last_stage()
    backbone = build_backbone(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                              ffn_hidden_size=m.ffn_hidden_size, vocab_size=m.vocab_size, seq_length=m.seq_length,
                              mask_id=m.vocab_size - 1, params_dtype=dtype, bf16=m.bf16,
                              recompute=None if m.recompute == "none" else m.recompute,
                              use_cpu_initialization=True, attention_backend=attention,
                              pre_process=parallel_state.is_pipeline_first_stage(), post_process=last)
    family = build_family("lomdm", vocab_size=m.vocab_size, seq_length=m.seq_length, mask_id=m.vocab_size - 1,
                          c1=0.7, c2=0.65, num_corruptions=m.num_corruptions)
    heads = [SchedulerHead(m.hidden_size, m.head_heads) if last else None for _ in range(2)]
    model = DiffusionLM(backbone, family, heads[0], heads[1], mask_id=m.vocab_size - 1, seed=0,
                        global_batch_size=m.global_batch_size, eps_t=1e-3)
    return model.to(dtype)


def _saved_bytes(fn, params) -> tuple[int, object]:
    """Bytes of the distinct non-parameter storages autograd saves for backward while `fn` runs."""
    owned = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _measure(m: ModelPlan, attention: str = "local") -> dict[str, int]:
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True):
        torch.manual_seed(0)
        model = _diffusion_lm(m, attention).train()
        params = list(model.parameters())
        b, T, V = m.micro_batch_size, m.seq_length, m.vocab_size
        tokens = torch.randint(0, V - 2, (b, T))
        valid = torch.ones(b, T, dtype=torch.bool)
        with torch.no_grad():
            hidden = model.clean_features(tokens, valid)
        fwd_head, fwd_logits = _saved_bytes(lambda: model.forward_head_logits(hidden, valid), params)
        z = torch.full((m.num_corruptions * b, T), V - 1)
        backbone, _ = _saved_bytes(lambda: model.backbone(z, valid.repeat(m.num_corruptions, 1)), params)
        phase_two, _ = _saved_bytes(lambda: model(tokens, valid, torch.arange(b), 0, fwd_logits_BL=fwd_logits), params)
    return {"fwd_head": fwd_head, "backbone": backbone, "phase_two": phase_two}


SHAPES = [dict(layers=2, d=64, heads=4, T=32, V=200, b=2), dict(layers=3, d=96, heads=6, T=48, V=300, b=3)]


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "larger"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_bytes_match_saved_tensors(shape: dict, bf16: bool, recompute: str) -> None:
    m = tiny_plan(**shape, bf16=bf16, recompute=recompute)
    lay = Layout(tp=1, pp=1, dp=1, backend="megatron", zero=0, micro_batch_size=m.micro_batch_size,
                 recompute=recompute, attention="local")  # the CPU backend: megatron's core attention
    got = _measure(m)
    backbone = backbone_saved_bytes(m, lay, 2 * m.micro_batch_size)
    assert got["fwd_head"] == pytest.approx(head_activation_bytes(m, m.micro_batch_size), rel=ACT_TOLERANCE)
    assert got["backbone"] == pytest.approx(backbone, rel=ACT_TOLERANCE)
    assert got["phase_two"] == pytest.approx(phase_two_saved_bytes(m, lay), rel=ACT_TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "larger"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_flash_attention_saves_no_scores(shape: dict, bf16: bool) -> None:
    """The GPU path's attention (SDPA here; TE alike): output + fp32 log-sum-exp, no T x T scores."""
    m = tiny_plan(**shape, bf16=bf16)
    lay = Layout(tp=1, pp=1, dp=1, backend="megatron", zero=0, micro_batch_size=m.micro_batch_size)
    assert lay.attention == "flash"
    got = _measure(m, attention="sdpa")
    assert got["backbone"] == pytest.approx(backbone_saved_bytes(m, lay, 2 * m.micro_batch_size), rel=ACT_TOLERANCE)


def _allocator_peak(fn) -> int:
    """Peak live bytes of torch's CPU allocator while `fn` runs (above what was live before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _step_peak(m: ModelPlan, num_microbatches: int) -> int:
    """The activation peak of one step in megatron's order: phase one (clean pass + forward head)
    for every micro-batch, then each micro-batch's phase two forward and backward. Gradients are
    allocated beforehand, so the peak holds activations and working sets only."""
    with megatron_cpu_session(tp=1, pp=1, seed=0, cuda_to_cpu=True, fake_cuda_types=True):
        torch.manual_seed(0)
        model = _diffusion_lm(m).train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        b, T, V = m.micro_batch_size, m.seq_length, m.vocab_size
        batches = [(torch.randint(0, V - 2, (b, T)), torch.ones(b, T, dtype=torch.bool))
                   for _ in range(num_microbatches)]

        def step() -> None:
            fwd_logits = []
            for tokens, valid in batches:
                with torch.no_grad():
                    hidden = model.clean_features(tokens, valid)
                fwd_logits.append(model.forward_head_logits(hidden, valid))
                del hidden
            for j, (tokens, valid) in enumerate(batches):
                terms, _ = model(tokens, valid, torch.arange(b) + j * b, 0, fwd_logits_BL=fwd_logits[j])
                terms.surrogate.backward()
                del terms

        return _allocator_peak(step)


PEAK_SHAPES = [SHAPES[0], dict(layers=2, d=128, heads=4, T=128, V=1000, b=2)]


@pytest.mark.parametrize("shape", PEAK_SHAPES, ids=["small", "T128"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activation_peak_of_a_step(shape: dict, bf16: bool, recompute: str) -> None:
    m = dataclasses.replace(tiny_plan(**shape, bf16=bf16, recompute=recompute), global_batch_size=2 * shape["b"])
    lay = Layout(tp=1, pp=1, dp=1, backend="megatron", zero=0, micro_batch_size=m.micro_batch_size,
                 recompute=recompute, attention="local")
    ratio = activation_bytes(m, lay).peak / _step_peak(m, num_microbatches=2)
    assert PEAK_BAND[0] <= ratio <= PEAK_BAND[1]


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_prints_the_owt_1b_table(capsys: pytest.CaptureFixture[str]) -> None:
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["plan.py", "--config", str(ROOT / "configs/experiments/owt_1b.yaml"), "--top", "5"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "tools/plan.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "24L d2048 T1024 V50258 K2" in out and "32 x h100-80gb" in out
    header = next(line for line in out.splitlines() if line.startswith("layout"))
    for column in ("params", "grads", "optim", "clean", "fwdhd", "corr", "revhd", "logits", "bubble", "comm",
                   "tok/s", "days", "fit"):
        assert column in header
    assert "shipped layout" in out


def test_state_bytes_with_nvme_offload() -> None:
    """parallel.nvme_offload_dir: the fp32 master + Adam state (12 B/param / DP) goes to files; memory
    keeps the bf16 parameter and gradient partitions and the swapper's 4 fp32 sub-group buffers."""
    from megatron_lomdm.apps.plan import NVME_BUFFER_COUNT, NVME_SUB_GROUP_NUMEL
    from megatron_lomdm.distributed import deepspeed_engine

    assert (NVME_BUFFER_COUNT, NVME_SUB_GROUP_NUMEL) == (deepspeed_engine.NVME_BUFFER_COUNT,
                                                         deepspeed_engine.NVME_SUB_GROUP_NUMEL)
    n = 1_516_000_000
    base = state_bytes(n, "deepspeed", 3, 2, bf16=True, ema=False)
    nvme = state_bytes(n, "deepspeed", 3, 2, bf16=True, ema=False, offload="nvme")
    assert (nvme.params, nvme.grads) == (base.params, base.grads) == (n, n)  # 2 B / 2 ranks each
    assert nvme.nvme == base.optimizer == 6 * n and base.nvme == 0
    assert nvme.optimizer == 4 * NVME_SUB_GROUP_NUMEL * 4
    assert nvme.total == 2 * n + 4 * NVME_SUB_GROUP_NUMEL * 4
    small = state_bytes(1000, "deepspeed", 3, 2, bf16=True, ema=False, offload="nvme")
    assert small.optimizer == 4 * 500 * 4  # a partition smaller than a sub-group
    assert state_bytes(n, "deepspeed", 3, 2, bf16=True, ema=False, offload="cpu") == base
    with pytest.raises(ValueError, match="ZeRO-3"):
        state_bytes(n, "deepspeed", 2, 2, bf16=True, ema=False, offload="nvme")
    with pytest.raises(ValueError, match="none, cpu or nvme"):
        state_bytes(n, "deepspeed", 3, 2, bf16=True, ema=False, offload="disk")
