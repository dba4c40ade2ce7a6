"""A LoMDM-aware layout planner: bytes per GPU, step time and tokens/day of every parallel layout.

``tools/plan.py`` after its flags are parsed. For a config (model, family, K, sequence length,
micro/global batch, precision, recompute) and a cluster (GPUs per node, nodes, a GPU of
``GPUS``) it enumerates layouts (TP, PP, virtual stages, DP, backend, ZeRO stage, sequence
parallel, micro-batch, recompute) and predicts, per GPU:

* model state: parameters, gradients, optimizer state (fp32 master + Adam m, v) and the EMA's
  fp32 shadow, with the per-element sizes and sharding of this code's engines (megatron: fp32
  gradient buffers, master copies only for bf16 parameters; DeepSpeed: gradients in the parameter
  dtype, always an fp32 master partition; bench/zero_memory.py measures both);
* activations, per component of the two-phase step (``training.step``): phase one's clean
  no-grad pass (transient) and the forward head's graph, which megatron's schedule keeps for
  *every* micro-batch until phase two's backward; phase two's K·b corruptions through the
  backbone with the recompute policy; the reverse head on K·b sequences (fp32, replicated over
  TP); the vocab-parallel logits that SUBS saves for backward and its chunked backward;
* the pipeline bubble, the communication volume of one step (TP all-reduces in both phases, DP
  gradient reduction and parameter gathers, PP activations) and its exposed time;
* the step time at a stated MFU, tokens/s, tokens/day and days to a token budget.

The activation coefficients were measured, not borrowed from a GPT paper: saved-for-backward
bytes of the megatron-core 0.16.1 local layer spec and of ``SchedulerHead`` on CPU (saved-tensor
hooks, tests/unit/test_plan.py re-measures two shapes). FLOPs come from ``utils.flops`` and
parameter counts from ``models.param_count``; nothing here re-derives them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from megatron_lomdm.config import Config
from megatron_lomdm.models.backbone import pad_vocab_size
from megatron_lomdm.models.param_count import backbone_param_count, scheduler_head_param_count
from megatron_lomdm.utils.flops import (
    PEAK_FLOPS,
    Shape,
    forward_flops_per_token,
    head_forward_flops_per_token,
    step_flops,
)

GiB = 1024**3
GPT2_VOCAB_WITH_MASK = 50258  # a config whose model.vocab_size comes from the data manifest (0)
SUBS_CHUNK_ELEMENTS = 1 << 24  # models.vocab_parallel._DEFAULT_CHUNK_ELEMENTS (per chunk, fp32)
DS_BUCKET_NUMEL = 500_000_000  # distributed.deepspeed_engine.DEFAULT_BUCKET_NUMEL
NVME_SUB_GROUP_NUMEL = 50_000_000  # distributed.deepspeed_engine.NVME_SUB_GROUP_NUMEL
NVME_BUFFER_COUNT = 4  # distributed.deepspeed_engine.NVME_BUFFER_COUNT
LINK_EFFICIENCY = 0.8  # [I] share of a link's rate NCCL's ring collectives reach (bus bandwidth)
LOSS_BYTES_PER_TOKEN = 56  # masks, log p, velocities and RLOO terms per corrupted token (measured ~53)


# ---------------------------------------------------------------------------------------------
# the cluster


@dataclass(frozen=True)
class Gpu:
    """One accelerator model: usable memory, bf16 dense peak, link rates per GPU and direction."""

    name: str
    memory_bytes: int
    peak_flops: float
    nvlink_Bps: float
    ib_Bps: float


GPUS = {
    # memory: nvidia-smi memory.total of the SXM parts (81559 / 143771 / 81920 / 40960 MiB).
    # peak: utils.flops.PEAK_FLOPS (performance.md §A1: dense bf16 989.4 / 989 / 312 TFLOP/s).
    # NVLink: 900 GB/s (H100, H200, NVLink 4) and 600 GB/s (A100, NVLink 3) bidirectional per GPU
    #   (performance.md §A1) -> 450 / 300 GB/s each way.
    # IB: one NIC per GPU as in DGX H100/H200 (8 x ConnectX-7 NDR 400 Gb/s = 50 GB/s) and DGX A100
    #   (8 x ConnectX-6 HDR 200 Gb/s = 25 GB/s) [NVIDIA DGX H100 / A100 user guides, hardware
    #   overview]; a cluster with fewer NICs per node has proportionally less.
    "h100-80gb": Gpu("h100-80gb", 81559 * 2**20, PEAK_FLOPS["H100"], 450e9, 50e9),
    "h200-141gb": Gpu("h200-141gb", 143771 * 2**20, PEAK_FLOPS["H200"], 450e9, 50e9),
    "a100-80gb": Gpu("a100-80gb", 81920 * 2**20, PEAK_FLOPS["A100"], 300e9, 25e9),
    "a100-40gb": Gpu("a100-40gb", 40960 * 2**20, PEAK_FLOPS["A100"], 300e9, 25e9),
}


@dataclass(frozen=True)
class Cluster:
    """GPUs and the assumptions every layout is judged by.

    Attributes:
        mfu: fraction of peak the math sustains (recompute counted as work); communication that
            is not overlapped and the pipeline bubble come on top of it.
        headroom: share of memory kept free (allocator fragmentation, NCCL buffers).
        reserve_bytes: fixed per-GPU reserve (CUDA context, cuBLAS/NCCL workspaces).
    """

    gpu: Gpu
    gpus_per_node: int
    nodes: int
    mfu: float = 0.35
    headroom: float = 0.10
    reserve_bytes: int = 2 * GiB

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * (1.0 - self.headroom) - self.reserve_bytes


# ---------------------------------------------------------------------------------------------
# the model as the planner sees it


@dataclass(frozen=True)
class ModelPlan:
    """What the byte and time model reads from a config (family flags resolved)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    num_corruptions: int
    clean_pass: bool
    fwd_head: bool
    rev_head: bool
    head_heads: int
    bf16: bool
    ema: bool
    global_batch_size: int
    micro_batch_size: int
    recompute: str

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def padded_vocab(self) -> int:
        return pad_vocab_size(self.vocab_size)

    @property
    def shape(self) -> Shape:
        return Shape(self.num_layers, self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.seq_length)

    @property
    def head_params(self) -> int:
        return scheduler_head_param_count(self.hidden_size) * (int(self.fwd_head) + int(self.rev_head))


def model_plan(cfg: Config) -> ModelPlan:
    """The planner's view of a config; vocabulary / sequence length left to the manifest default
    to GPT-2 + [MASK] and 1024."""
    from megatron_lomdm.diffusion.registry import build_family

    m, d = cfg.model, cfg.diffusion
    vocab = m.vocab_size or GPT2_VOCAB_WITH_MASK
    seq = m.seq_length or 1024
    family = build_family(d.name, vocab_size=vocab, seq_length=seq, mask_id=vocab - 1, c1=d.c1, c2=d.c2,
                          block_size=d.block_size, num_corruptions=d.num_corruptions, learn_order=d.learn_order,
                          order_logits=d.order_logits)
    return ModelPlan(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads, ffn_hidden_size=m.ffn_size,
        vocab_size=vocab, seq_length=seq, num_corruptions=family.num_corruptions,
        clean_pass=family.needs_clean_features, fwd_head=family.needs_clean_features,
        rev_head=family.needs_reverse_head, head_heads=m.head_num_heads or m.num_heads,
        bf16=cfg.train.precision == "bf16", ema=cfg.optim.ema_decay > 0,
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
        recompute=m.recompute,
    )


@dataclass(frozen=True)
class Layout:
    """One candidate: model-parallel split, data-parallel engine and the per-rank batch."""

    tp: int
    pp: int
    dp: int
    backend: str
    zero: int
    vp: int = 1
    sp: bool = False
    micro_batch_size: int = 8
    recompute: str = "none"
    attention: str = "flash"  # flash (TE / SDPA on GPU: no T x T scores saved) or local (megatron's, CPU)

    def name(self) -> str:
        vp = f"x{self.vp}" if self.vp > 1 else ""
        sp = "+sp" if self.sp else ""
        return f"tp{self.tp}{sp} pp{self.pp}{vp} dp{self.dp} {self.backend[:2]}{self.zero}"


# ---------------------------------------------------------------------------------------------
# parameters and model state


def stage_params(m: ModelPlan, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (its TP slice; heads whole).

    Column-parallel QKV / fc1 split weight and bias; row-parallel proj / fc2 split the weight and
    keep the bias whole; LayerNorms are replicated; the vocabulary splits over TP.
    """
    per_layer = backbone_param_count(num_layers=1, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                                     padded_vocab_size=m.padded_vocab, num_heads=m.num_heads)
    replicated_bias = 2 * m.hidden_size  # proj and fc2 biases
    final_norm = 2 * m.hidden_size
    layer = (per_layer.attention + per_layer.mlp - replicated_bias) // tp + replicated_bias
    layer += per_layer.layernorms - final_norm
    n = layer * (m.num_layers // pp)
    if stage == 0:
        n += per_layer.embedding // tp
    if stage == pp - 1:
        n += final_norm + per_layer.output_layer // tp + m.head_params
    return n


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of one rank."""

    params: float
    grads: float
    optimizer: float
    ema: float
    nvme: float = 0.0  # optimizer state in files (parallel.nvme_offload_dir); not memory, not in total

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema


def element_sizes(backend: str, bf16: bool) -> tuple[int, int, int]:
    """Bytes per element of (parameters, gradients, optimizer state) in this code's engines.

    megatron: gradients in fp32 buffers (``grad_reduce_in_fp32``); Adam m, v plus an fp32 master
    only for bf16 parameters. DeepSpeed: gradients in the parameter dtype; its ZeRO optimizers
    always keep an fp32 master partition (bench/RESULTS.md, zero_memory).
    """
    p = 2 if bf16 else 4
    if backend == "megatron":
        return p, 4, (12 if bf16 else 8)
    return p, p, 12


def state_bytes(num_params: int, backend: str, zero: int, dp: int, *, bf16: bool, ema: bool,
                offload: str = "none") -> StateBytes:
    """ZeRO accounting of one rank's ``num_params`` parameters (performance.md §A2).

    ``offload``: where DeepSpeed keeps the fp32 master + Adam state. ``none`` and ``cpu``
    (``parallel.cpu_offload``) hold it in (device or host) memory; ``nvme``
    (``parallel.nvme_offload_dir``, ZeRO-3) holds it in files and only the swapper's
    ``NVME_BUFFER_COUNT`` fp32 buffers of one sub-group (``NVME_SUB_GROUP_NUMEL`` elements, or the
    whole partition when smaller) in memory; the files' bytes are ``nvme``.
    """
    if offload not in ("none", "cpu", "nvme"):
        raise ValueError(f"offload must be none, cpu or nvme, got {offload!r}")
    if offload == "nvme" and not (backend == "deepspeed" and zero == 3):
        raise ValueError(f"NVMe offload needs DeepSpeed ZeRO-3, got {backend} ZeRO-{zero}")
    p, g, k = element_sizes(backend, bf16)
    optimizer = num_params * k / (dp if zero >= 1 else 1)
    nvme = 0.0
    if offload == "nvme":
        nvme = optimizer
        optimizer = NVME_BUFFER_COUNT * min(NVME_SUB_GROUP_NUMEL, math.ceil(num_params / dp)) * 4
    return StateBytes(
        params=num_params * p / (dp if zero >= 3 else 1),
        grads=num_params * g / (dp if zero >= 2 else 1),
        optimizer=optimizer,
        ema=4 * num_params if ema else 0,  # training.optim.EMA: an fp32 shadow of the rank's parameters
        nvme=nvme,
    )


def partitions_at_build(lay: Layout) -> bool:
    """Whether ``training.build`` builds this layout's backbone already partitioned (DeepSpeed
    ZeRO-3: ``deepspeed_engine.partitioned_build``)."""
    return lay.backend == "deepspeed" and lay.zero == 3


def _weight_init_bytes(full: int, local: int, p: int) -> int:
    """Bytes megatron's ``_initialize_affine_weight_cpu`` holds for one weight of ``full`` elements
    (this rank's slice: ``local``) besides the parameter: the full fp32 draw, its cast to ``p``
    bytes and the concatenated slice, all alive at once (measured: the allocator peak of a build)."""
    return 4 * full + (full * p if p != 4 else 0) + local * p


def build_bytes(m: ModelPlan, lay: Layout, *, partitioned: bool | None = None) -> float:
    """Host bytes a rank holds at the peak of building its model (``training.build.build_model``
    with ``model.init_device=cpu``) and handing it to its engine; the busiest rank (last stage).

    Two moments, the larger counts:
      * the last backbone weight (the LM head, padded V x D) being drawn: the modules built before
        it, plus its full fp32 draw, its cast and its slice (``_weight_init_bytes``);
      * the end: the backbone, plus the scheduler heads built whole in fp32 and, in bf16, cast
        one parameter at a time (one 4D x D MLP matrix's copy besides).
    ``partitioned`` (default: ``partitions_at_build``): each backbone module is partitioned over
    DP as soon as it is built, so the modules built so far count ``1/dp``; the heads stay whole
    until the engine partitions them. ``partitioned=False`` under ZeRO-3 is a plain build (this
    code before its partitioned build): the whole model and, at ``deepspeed.initialize``, DeepSpeed's
    partitions of it besides.
    ZeRO 0-2 engines' flat-buffer copies are not modelled here.
    """
    if partitioned is None:
        partitioned = partitions_at_build(lay)
    p = 2 if m.bf16 else 4
    params = stage_params(m, lay.tp, lay.pp, lay.pp - 1)
    heads = m.head_params  # on the last stage
    backbone = params - heads
    out_full = m.padded_vocab * m.hidden_size
    out_local = out_full // lay.tp
    share = 1 / lay.dp if partitioned else 1.0
    drawing = (backbone - out_local) * p * share + out_local * p + _weight_init_bytes(out_full, out_local, p)
    end = backbone * p * share + heads * 4 + (4 * m.hidden_size**2 * p if heads and p != 4 else 0)
    if lay.backend == "deepspeed" and lay.zero == 3 and not partitioned:
        end = max(end, params * p * (1 + 1 / lay.dp))  # deepspeed.initialize: whole model + partitions
    return max(drawing, end)


# ---------------------------------------------------------------------------------------------
# activations


def layer_activation_bytes(m: ModelPlan, lay: Layout, seqs: int, recompute: str) -> float:
    """Saved-for-backward bytes of one transformer layer over ``seqs`` sequences on one TP rank.

    Measured coefficients (local spec, no dropout), per token, s = activation bytes: 4 d·s
    replicated over TP (LayerNorm inputs and outputs), 6 d·s + 2 f·s split (Q, K, V, context,
    fc1 and GeLU outputs), 4 s LayerNorm statistics, 4·T·Q·s RoPE tables per layer; attention
    scores (local core attention: fp32 softmax, plus its bf16 copy under bf16) or the fp32
    log-sum-exp of flash attention. Full recompute keeps the layer input only (the fp32 RoPE table
    its checkpoints share is counted once, in ``backbone_saved_bytes``).
    """
    s, t, T = m.act_bytes, lay.tp, m.seq_length
    n, d, a = seqs * T, m.hidden_size, m.num_heads
    sp = t if lay.sp else 1
    if recompute == "full":
        return n * d * s / sp
    dense = (4 * d * s + 4 * s) * n / sp + (6 * d + 2 * m.ffn_hidden_size) * s * n / t + 4 * T * (d // a) * s
    if recompute == "selective":
        return dense
    if lay.attention == "local":
        return dense + seqs * (a // t) * T * T * (s + (4 if s == 2 else 0))
    return dense + seqs * (a // t) * T * 4


def head_activation_bytes(m: ModelPlan, seqs: int) -> float:
    """Saved bytes of one ``SchedulerHead`` call over ``seqs`` sequences: fp32 math (20 d + H + 8
    floats per token, flash/SDPA attention), plus the fp32 copies of its bf16 weights that the
    fp32 Linears and LayerNorms save (all but the Linear biases)."""
    n, d = seqs * m.seq_length, m.hidden_size
    acts = 4 * n * (20 * d + m.head_heads + 8)
    if m.bf16:
        acts += 4 * (scheduler_head_param_count(d) - 10 * d - 1)
    return acts


@dataclass(frozen=True)
class ActivationBytes:
    """Peak activation bytes of the busiest rank, by component of the two-phase step.

    Attributes:
        clean: phase one's no-grad pass, transient (one layer's intermediates at b sequences).
        fwd_head: forward-head graphs held from phase one to phase two (all micro-batches on the
            megatron schedule, one on DeepSpeed's per-micro-batch step).
        corruptions: phase two's K·b sequences through this stage's layers, times the micro-batches
            in flight (1F1B), including embedding / final-LayerNorm inputs.
        rev_head: the reverse head on K·b sequences, plus its backward working set.
        logits: the vocab-parallel logits SUBS saves, plus its backward (gradient + fp32 chunks).
        backward: one layer's gradient working set during backward (recompute re-materialises it).
        The components are not additive: backward frees the head, then the logits, then layers.
        peak: the larger of the phase-one and phase-two peaks on the worse of first/last stage.
    """

    clean: float
    fwd_head: float
    corruptions: float
    rev_head: float
    logits: float
    backward: float
    peak: float


def microbatches(m: ModelPlan, lay: Layout) -> int:
    return m.global_batch_size // (lay.micro_batch_size * lay.dp)


def backbone_saved_bytes(m: ModelPlan, lay: Layout, seqs: int) -> float:
    """Saved bytes of one backbone pass over ``seqs`` sequences on a single-stage rank: this
    stage's layers, token ids and pad mask (9 B/token), final LayerNorm and LM-head inputs."""
    s, n = m.act_bytes, seqs * m.seq_length
    layers = (m.num_layers // lay.pp) * layer_activation_bytes(m, lay, seqs, lay.recompute)
    rope = m.seq_length * (m.hidden_size // m.num_heads) * 4 if lay.recompute == "full" else 0
    return layers + rope + (2 * m.hidden_size * s + 2 * s + 9) * n


def phase_two_saved_bytes(m: ModelPlan, lay: Layout) -> float:
    """Saved-for-backward bytes of one micro-batch's phase two on a single-stage rank: the K·b
    corruptions through the backbone, the logits SUBS keeps, the reverse head and the loss terms
    (what tests/unit/test_plan.py measures with saved-tensor hooks)."""
    seqs = m.num_corruptions * lay.micro_batch_size
    n2 = seqs * m.seq_length
    rev_head = head_activation_bytes(m, seqs) if m.rev_head else 0.0
    shared = n2 * m.hidden_size * 4 if (m.rev_head and not m.bf16) else 0  # fp32: head input = LM-head input
    logits = n2 * (m.padded_vocab // lay.tp) * m.act_bytes
    return backbone_saved_bytes(m, lay, seqs) + rev_head - shared + logits + LOSS_BYTES_PER_TOKEN * n2


def activation_bytes(m: ModelPlan, lay: Layout) -> ActivationBytes:
    """The activation peak of ``lay`` (see ``ActivationBytes``).

    Phase two's backward runs the reverse head first, then SUBS, then the layers, freeing what
    each saved; its peak is the largest of (everything saved + the head's backward working set),
    (without the head + the logits' gradient and SUBS' fp32 chunks), (without head and logits +
    one layer's backward). The working-set factors (2.5 N·d fp32 for the head, three fp32 chunks in
    SUBS' backward, 1.2 layers, 5 N·d fp32 not itemised) are fitted to the CPU allocator's peaks
    over whole steps (tests/unit/test_plan.py): predicted / measured 0.998-1.046 there.
    """
    b, K, s, d = lay.micro_batch_size, m.num_corruptions, m.act_bytes, m.hidden_size
    n1, n2 = b * m.seq_length, K * b * m.seq_length
    mb = microbatches(m, lay)
    in_flight = min(lay.pp, mb) * (1 + (lay.pp - 1) / (lay.pp * lay.vp) if lay.vp > 1 else 1)
    per_mb = (m.num_layers // lay.pp) * layer_activation_bytes(m, lay, K * b, lay.recompute) + 9 * n2
    held = (mb if lay.backend == "megatron" else 1) if m.fwd_head else 0
    fwd_head = held * head_activation_bytes(m, b)
    rev_head = head_activation_bytes(m, K * b) if m.rev_head else 0.0
    logits = n2 * (m.padded_vocab // lay.tp) * s
    subs_backward = logits + 3 * min(SUBS_CHUNK_ELEMENTS, n2 * m.padded_vocab // lay.tp) * 4
    head_backward = 2.5 * n2 * d * 4 if m.rev_head else 0.0
    backward = 1.2 * layer_activation_bytes(m, lay, K * b, "none")
    clean = layer_activation_bytes(m, dataclasses.replace(lay, sp=False), b, "none") + n1 * d * s
    clean = clean if m.clean_pass else 0.0
    saved = phase_two_saved_bytes(m, lay)
    unlisted = 5 * n2 * d * 4  # alive at the peak but not itemised: measured 1.0-5.1 N·d fp32 per corrupted token
    last = fwd_head + unlisted + max(saved + head_backward, saved - rev_head + subs_backward,
                                     saved - rev_head - logits + backward)
    first = in_flight * per_mb + backward if lay.pp > 1 else 0.0
    return ActivationBytes(clean=clean, fwd_head=fwd_head, corruptions=max(saved - rev_head - logits, first - backward),
                           rev_head=rev_head + head_backward, logits=logits + subs_backward, backward=backward,
                           peak=max(last, first, fwd_head + clean))


# ---------------------------------------------------------------------------------------------
# time and communication


@dataclass(frozen=True)
class StepTime:
    """One optimizer step: compute on the critical (last) stage, bubble, communication."""

    model_flops: float
    compute_s: float
    bubble: float
    comm_bytes: float
    exposed_comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s * (1 + self.bubble) + self.exposed_comm_s


def stage_flops_per_microbatch(m: ModelPlan, lay: Layout) -> float:
    """FLOPs of one micro-batch on one rank of the last stage (heads are replicated over TP)."""
    sh = m.shape
    n1, n2 = lay.micro_batch_size * m.seq_length, m.num_corruptions * lay.micro_batch_size * m.seq_length
    layers = forward_flops_per_token(sh, with_logits=False)
    logits = forward_flops_per_token(sh) - layers
    attention = layers - forward_flops_per_token(dataclasses.replace(sh, seq_length=0), with_logits=False)
    recompute = {"full": layers * n2, "selective": attention * n2}.get(lay.recompute, 0.0)
    backbone = (layers * (n1 * m.clean_pass + 3 * n2) + recompute) / lay.pp + logits * 3 * n2
    heads = 3 * head_forward_flops_per_token(sh) * (n1 * m.fwd_head + n2 * m.rev_head)
    return backbone / lay.tp + heads


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def comm_bytes(m: ModelPlan, lay: Layout, local_params: int) -> tuple[float, float, float]:
    """Bytes each GPU sends per step over (TP, DP, PP) links, ring collectives."""
    s, d, mb = m.act_bytes, m.hidden_size, microbatches(m, lay)
    n1, n2 = lay.micro_batch_size * m.seq_length, m.num_corruptions * lay.micro_batch_size * m.seq_length
    layers = m.num_layers // lay.pp
    # two all-reduces (or all-gather + reduce-scatter with SP) per layer and pass
    passes = n1 * m.clean_pass + n2 * (2 + (lay.recompute == "full"))
    tp = 2 * _ring(lay.tp) * 2 * layers * passes * d * s * mb
    p, g, _ = element_sizes(lay.backend, m.bf16)
    r = _ring(lay.dp) * local_params
    if lay.backend == "megatron":
        dp = 2 * r * g if lay.zero == 0 else r * (g + p)
    elif lay.zero <= 1:
        dp = r * (g + p)
    else:  # gradients reduce-scattered every micro-batch; ZeRO-3 gathers parameters for every pass
        gathers = (1 + 1 + m.clean_pass) if lay.zero == 3 else 0
        dp = mb * r * g + (mb * gathers * r * p if lay.zero == 3 else r * p)
    pp = (n1 * m.clean_pass + 2 * n2) * d * s * mb if lay.pp > 1 else 0.0
    return tp, dp, pp


def step_time(m: ModelPlan, lay: Layout, cluster: Cluster, local_params: int) -> StepTime:
    """Step time at ``cluster.mfu``: compute of the last stage (its micro-batches and bubble) plus
    the communication not hidden: TP and PP fully exposed, the DP reduce overlapped with the last
    micro-batch's backward on megatron with ``overlap_grad_reduce``, DeepSpeed's exposed."""
    gpu, per_node = cluster.gpu, cluster.gpus_per_node
    mb = microbatches(m, lay)
    flops_mb = stage_flops_per_microbatch(m, lay)
    rate = gpu.peak_flops * cluster.mfu
    compute = mb * flops_mb / rate
    bubble = (lay.pp - 1) / (lay.vp * mb) if lay.pp > 1 else 0.0
    tp, dp, pp = comm_bytes(m, lay, local_params)
    link = gpu.nvlink_Bps * LINK_EFFICIENCY
    ib = gpu.ib_Bps * LINK_EFFICIENCY
    dp_bw = link if lay.tp * lay.pp * lay.dp <= per_node else ib
    tp_s = tp / (link if lay.tp <= per_node else ib)
    pp_s = pp / (link if lay.tp * lay.pp <= per_node else ib)
    dp_s = dp / dp_bw
    if lay.backend == "megatron":
        p, g, _ = element_sizes(lay.backend, m.bf16)
        reduce_s = dp_s * g / (g + p) if lay.zero == 1 else dp_s
        hidden = min(reduce_s, (flops_mb * 2 / 3) / rate)  # behind the last backward
        dp_s -= hidden
    return StepTime(model_flops=step_flops(m.shape, unique_sequences=m.global_batch_size,
                                           num_corruptions=m.num_corruptions, clean_pass=m.clean_pass,
                                           heads=m.fwd_head or m.rev_head),
                    compute_s=compute, bubble=bubble, comm_bytes=tp + dp + pp, exposed_comm_s=tp_s + pp_s + dp_s)


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class LayoutPlan:
    """Everything predicted for one layout on one cluster."""

    layout: Layout
    params: int
    state: StateBytes
    acts: ActivationBytes
    time: StepTime
    tokens_per_s: float
    fits: bool
    supported: str  # "" when this code runs the layout, else why not (yet)

    @property
    def total_bytes(self) -> float:
        return self.state.total + self.acts.peak

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * 86400

    def days_for(self, tokens: float) -> float:
        return tokens / self.tokens_per_day if self.tokens_per_s > 0 else math.inf

    def mfu(self, cluster: Cluster) -> float:
        return self.time.model_flops / (cluster.world * cluster.gpu.peak_flops * self.time.step_s)


def unsupported(m: ModelPlan, lay: Layout) -> str:
    """Why this code cannot run ``lay`` today ("" if it can): the config's and deepspeed_engine.py's
    rules (``config.schema.ParallelConfig``)."""
    if lay.backend == "deepspeed" and lay.pp > 1:
        return "deepspeed needs pp=1"
    if lay.backend == "deepspeed" and lay.zero == 3 and m.ema:
        return "zero-3 needs optim.ema_decay=0"
    if lay.sp and lay.backend != "megatron":
        return "sequence parallel needs the megatron backend"
    if lay.vp > 1 and lay.backend != "megatron":
        return "virtual stages need the megatron backend"
    return ""


def plan_layout(m: ModelPlan, lay: Layout, cluster: Cluster) -> LayoutPlan:
    """Bytes, time and fit of one layout (the busiest rank: the last pipeline stage)."""
    params = max(stage_params(m, lay.tp, lay.pp, 0), stage_params(m, lay.tp, lay.pp, lay.pp - 1))
    ema = m.ema and not (lay.backend == "deepspeed" and lay.zero == 3)
    state = state_bytes(params, lay.backend, lay.zero, lay.dp, bf16=m.bf16, ema=ema)
    acts = activation_bytes(m, lay)
    t = step_time(m, lay, cluster, params)
    tokens = m.global_batch_size * m.seq_length / t.step_s
    fits = state.total + acts.peak <= cluster.usable_bytes
    return LayoutPlan(lay, params, state, acts, t, tokens, fits, unsupported(m, lay))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(m: ModelPlan, cluster: Cluster, *, micro_batches: list[int] | None = None,
                      recomputes: list[str] | None = None) -> list[Layout]:
    """Every layout the world size, head count, layer count and global batch allow."""
    micro_batches = micro_batches or [m.micro_batch_size]
    recomputes = recomputes or [m.recompute]
    engines = [("megatron", 0), ("megatron", 1), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]
    out = []
    for tp, pp in itertools.product(_divisors(cluster.world), _divisors(m.num_layers)):
        if tp > cluster.gpus_per_node or m.num_heads % tp or cluster.world % (tp * pp):
            continue
        dp = cluster.world // (tp * pp)
        for b, rc, (backend, zero) in itertools.product(micro_batches, recomputes, engines):
            if m.global_batch_size % (b * dp):
                continue
            mb = m.global_batch_size // (b * dp)
            for vp, sp in itertools.product((1, 2), (False, True)):
                if (sp and tp == 1) or (vp > 1 and (pp == 1 or (m.num_layers // pp) % vp or mb % pp)):
                    continue
                if backend == "deepspeed" and pp > 1:
                    continue
                out.append(Layout(tp=tp, pp=pp, dp=dp, backend=backend, zero=zero, vp=vp, sp=sp,
                                  micro_batch_size=b, recompute=rc))
    return out


def plan(m: ModelPlan, cluster: Cluster, **choices: list) -> list[LayoutPlan]:
    """All candidate layouts: fitting ones this code runs first, then fitting ones it does not run
    yet, then the rest; each group by tokens/s."""
    plans = [plan_layout(m, lay, cluster) for lay in candidate_layouts(m, cluster, **choices)]

    def key(p: LayoutPlan) -> tuple:
        # within 0.5% of each other, prefer the larger micro-batch (bigger GEMMs, which this model
        # does not credit), then fewer bytes
        speed = round(math.log(p.tokens_per_s) / math.log(1.005))
        return (not p.fits, bool(p.supported), -speed, -p.layout.micro_batch_size, p.total_bytes)

    return sorted(plans, key=key)


def shipped_layout(cfg: Config, cluster: Cluster) -> Layout:
    """The layout the config itself asks for on ``cluster``."""
    par = cfg.parallel
    return Layout(tp=par.tp, pp=par.pp, dp=cluster.world // (par.tp * par.pp), backend=par.backend, zero=par.zero,
                  vp=par.virtual_stages, sp=par.sequence_parallel,
                  micro_batch_size=cfg.train.micro_batch_size, recompute=cfg.model.recompute)


# ---------------------------------------------------------------------------------------------
# the table


COLUMNS = ("layout", "mb", "rc", "params", "grads", "optim", "ema", "clean", "fwdhd", "corr", "revhd",
           "logits", "bwd", "act", "total", "fit", "bubble", "comm", "step_s", "tok/s", "Btok/d", "days", "mfu", "note")


def table_rows(plans: list[LayoutPlan], cluster: Cluster, tokens: float) -> list[list[str]]:
    """One row of strings per plan (GiB for bytes, GB for communication)."""

    def gib(x: float) -> str:
        return f"{x / GiB:.1f}"

    rows = []
    for p in plans:
        lay, st, a, t = p.layout, p.state, p.acts, p.time
        rows.append([lay.name(), str(lay.micro_batch_size), lay.recompute[:3], gib(st.params), gib(st.grads),
                     gib(st.optimizer), gib(st.ema), gib(a.clean), gib(a.fwd_head), gib(a.corruptions),
                     gib(a.rev_head), gib(a.logits), gib(a.backward), gib(a.peak), gib(p.total_bytes),
                     "yes" if p.fits else "no", f"{t.bubble:.0%}", f"{t.comm_bytes / 1e9:.1f}", f"{t.step_s:.2f}",
                     f"{p.tokens_per_s:,.0f}", f"{p.tokens_per_day / 1e9:.2f}", f"{p.days_for(tokens):.1f}",
                     f"{p.mfu(cluster):.0%}", p.supported])
    return rows


def format_table(plans: list[LayoutPlan], cluster: Cluster, tokens: float) -> str:
    """The plans as an aligned text table."""
    rows = [list(COLUMNS), *table_rows(plans, cluster, tokens)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)
