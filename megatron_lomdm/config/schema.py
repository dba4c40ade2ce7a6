"""The typed configuration schema: one frozen-in-shape dataclass per component.

Every field has a docstring (the string literal under it), which `--print-config` keeps next to
the value and the docs render. Checks that need only one section live in that section's
`__post_init__`; checks that need the world size live in `validate_for_world`.
Values that come from the data manifest (vocab size, special ids, seq length) use sentinels
(0 / -1) meaning "take it from `data.train`'s manifest".
Family-specific rules (`diffusion.name`, c1/c2, K, order logits, block size) are not written here:
they are each family's `FamilySpec` in `families.py`, which the family constructors check too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lomdm.config.families import FAMILY_SPECS

TIME_SAMPLERS = ("low_discrepancy", "ppots")
INIT_DEVICES = ("auto", "cpu", "cuda", "meta")
META_INIT_UNSUPPORTED = (
    "meta is not supported: megatron-core builds on the meta device (TransformerConfig."
    "init_model_with_meta_device) only in Transformer Engine layers under megatron FSDP, which "
    "materialises them; this code's layers and mcore DDP allocate at construction. Use auto "
    "(on the GPU when there is one: no host copy of the model)")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"config: {key}: {msg}")


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/. Re-running with it resumes."""
    name: str = ""
    """Stable MLflow run name; empty = a name that says what the run is
    (family, c1, c2, K and layout, e.g. `lomdm-c1=0.7-c2=0.65-K2-tp1pp1dp2`: tracking/run_info.py)."""

    def __post_init__(self) -> None:
        if not self.dir:
            _fail("run.dir", "must be a non-empty path")


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = 12
    """Transformer layers of the backbone."""
    hidden_size: int = 768
    """Model width D."""
    num_heads: int = 12
    """Attention heads; must divide hidden_size (and be divisible by parallel.tp)."""
    ffn_hidden_size: int = 0
    """MLP width; 0 means 4 * hidden_size."""
    seq_length: int = 0
    """Sequence length L; 0 means take it from the data manifest."""
    vocab_size: int = 0
    """Vocabulary size including [MASK]; 0 means take it from the data manifest."""
    mask_id: int = -1
    """Id of the [MASK] token; -1 means take it from the data manifest."""
    pad_id: int = -1
    """Id of the pad token (padded layout); -1 means take it from the data manifest."""
    dropout: float = 0.0
    """Hidden and attention dropout of the backbone (MDLM uses 0.1)."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    head_num_heads: int = 0
    """Heads of the scheduler heads' transformer block; 0 means model.num_heads."""
    head_dropout: float = 0.0
    """Dropout inside the scheduler heads."""
    head_center_logits: bool = True
    """Centre each scheduler head's logits over the row's valid positions before NormSig (LoMDM).
    NormSig is not shift-invariant: an uncentred head can drift all logits into sigmoid saturation,
    a flat order with ~0 gradient that training does not leave. false = the literal paper head."""
    clean_pass_dropout: bool = False
    """Backbone dropout in LoMDM's clean pass f(x) (phase one). False: the clean pass runs the backbone
    in eval mode, so f(x) is the deterministic feature extractor it is in evaluation; True: it
    carries the training dropout noise (model.dropout)."""
    recompute: str = "none"
    """Activation recompute: none, selective or full."""
    init_device: str = "auto"
    """Where the weights are first drawn. auto: on the GPU when CUDA is available, else on the CPU;
    cpu: on the host, each TP-split weight drawn whole and sliced (layout-independent: the same model
    for every TP x PP layout, then moved to the GPU if there is one; costs host memory and time at
    billions of parameters); cuda: on the GPU, each rank drawing only its own slice (megatron's
    use_cpu_initialization=False; values depend on the TP layout; refused without CUDA). meta is
    refused: megatron-core builds on the meta device only in Transformer Engine layers under
    megatron FSDP, not with this code's layers and DDP."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads"):
            if getattr(self, key) <= 0:
                _fail(f"model.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            _fail("model.num_heads", f"{self.num_heads} does not divide model.hidden_size={self.hidden_size}")
        if self.ffn_hidden_size < 0 or self.seq_length < 0 or self.vocab_size < 0:
            _fail("model", "ffn_hidden_size, seq_length and vocab_size must be >= 0 (0 = derived)")
        if not 0.0 <= self.dropout < 1.0:
            _fail("model.dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.head_dropout < 1.0:
            _fail("model.head_dropout", f"must be in [0, 1), got {self.head_dropout}")
        if self.recompute not in ("none", "selective", "full"):
            _fail("model.recompute", f"must be none, selective or full, got {self.recompute!r}")
        if self.head_num_heads and self.hidden_size % self.head_num_heads:
            _fail("model.head_num_heads", f"{self.head_num_heads} does not divide {self.hidden_size}")
        if self.init_device not in INIT_DEVICES:
            _fail("model.init_device", f"must be one of {', '.join(INIT_DEVICES)}, got {self.init_device!r}")
        if self.init_device == "meta":
            _fail("model.init_device", META_INIT_UNSUPPORTED)

    @property
    def ffn_size(self) -> int:
        """The MLP width actually used."""
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass(kw_only=True)
class DiffusionConfig:
    name: str = "lomdm"
    """OeMDM family member: mdlm, poly, arm, bd3lm, genmd4, lomdm or multivariate."""
    c1: float = 0.7
    """Mean exponent of the power schedule 1 - t^e (poly, lomdm, multivariate). (1, 0) reduces LoMDM
    to MDLM."""
    c2: float = 0.65
    """Spread of the learned exponents (lomdm, multivariate): e in (c1 - c2, c1 + c2). Requires
    c1 > c2 >= 0."""
    num_corruptions: int = 2
    """K, corruptions of each sequence at its t, for the families that learn their forward schedule
    (lomdm, genmd4, multivariate with learn_order): RLOO's baseline leaves one out over the K, so
    K >= 2 (2 is the paper's). The backbone batch is K x train.micro_batch_size. Context-free
    families (mdlm, poly, arm, bd3lm, multivariate with learn_order: false) have no score-function
    term and always use K = 1: for them the key is ignored (so one config can switch diffusion.name)."""
    learn_order: bool = True
    """multivariate only: train the per-position order logits v (RLOO over K + pathwise); false
    freezes them at diffusion.order_logits (a fixed multivariate schedule, K = 1, no RLOO)."""
    order_logits: list[float] = field(default_factory=list)
    """multivariate only: initial order logits v, one per position (model.seq_length values);
    empty = zeros, i.e. exactly poly(c1). Exponents w = c1 + c2 NormSig(v), NormSig(v) =
    sigmoid(v) - its mean; e.g. +6 on the first half and -6 on the second give w ~ c1 +- c2/2
    (first half generated first in reverse), fixed-order references with learn_order: false."""
    block_size: int = 16
    """Block size L' of bd3lm (arm is block size 1)."""
    eps_t: float = 1e-3
    """Smallest diffusion time of the antithetic sampler: t in [eps_t, 1]."""
    time_sampler: str = "low_discrepancy"
    """Training-time sampler: low_discrepancy (MDLM's antithetic uniform t) or ppots (P-POTS,
    method.md §5.8: t from a proposal p(t) ~ the per-t loss scale sqrt(Var + mean^2), each
    sequence weighted by u(t)/p(t): an unbiased, lower-variance NELBO estimate). Evaluation
    always uses low_discrepancy."""
    ppots_bins: int = 32
    """ppots: equal-width bins of [eps_t, 1] on which the loss scale and the proposal live."""
    ppots_refresh: int = 100
    """ppots: steps between refreshes of the proposal from the accumulated loss statistics."""
    ppots_warmup: int = 200
    """ppots: steps before the first refresh (t stays uniform, statistics accumulate); the
    proposal is refreshed after every step count that is >= this and a multiple of ppots_refresh."""
    ppots_uniform_mix: float = 0.1
    """ppots: share lambda of the uniform in p = (1 - lambda) w/Z + lambda u; bounds every
    importance weight by 1/lambda without clamping (so no bias). In (0, 1]; 1 = uniform."""
    ppots_decay: float = 0.5
    """ppots: weight of the previous statistics at each refresh (exponential average over
    refreshes of the per-bin sums); 0 uses only the last ppots_refresh steps. In [0, 1)."""

    def __post_init__(self) -> None:
        self.check_family()
        for i, v in enumerate(self.order_logits):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                _fail(f"diffusion.order_logits[{i}]", f"expected a finite number, got {v!r}")
        self.order_logits = [float(v) for v in self.order_logits]
        if self.block_size <= 0:
            _fail("diffusion.block_size", f"must be > 0, got {self.block_size}")
        if not 0.0 < self.eps_t < 1.0:
            _fail("diffusion.eps_t", f"must be in (0, 1), got {self.eps_t}")
        if self.time_sampler not in TIME_SAMPLERS:
            _fail("diffusion.time_sampler", f"must be one of {', '.join(TIME_SAMPLERS)}, got {self.time_sampler!r}")
        for key in ("ppots_bins", "ppots_refresh"):
            if getattr(self, key) < 1:
                _fail(f"diffusion.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.ppots_warmup < 0:
            _fail("diffusion.ppots_warmup", f"must be >= 0, got {self.ppots_warmup}")
        if not 0.0 < self.ppots_uniform_mix <= 1.0:
            _fail("diffusion.ppots_uniform_mix", f"must be in (0, 1], got {self.ppots_uniform_mix}")
        if not 0.0 <= self.ppots_decay < 1.0:
            _fail("diffusion.ppots_decay", f"must be in [0, 1), got {self.ppots_decay}")

    def check_family(self, seq_length: int = 0) -> None:
        """The family's own rules (``families.FamilySpec``): c1/c2, K, order logits, and with a
        known ``seq_length`` (> 0) the ones that read it (bd3lm's block size)."""
        spec = FAMILY_SPECS.get(self.name)
        if spec is None:
            _fail("diffusion.name", f"{self.name!r} is not one of {', '.join(FAMILY_SPECS)}")
        settings = {**vars(self), **({"seq_length": seq_length} if seq_length else {})}
        found = spec.problem(settings)
        if found is not None:
            _fail(*found)


@dataclass(kw_only=True)
class DataConfig:
    train: str | list[dict] = ""
    """Shards written by tools/preprocess_data.py: a folder (or its manifest.json), a file://,
    http(s):// or pipe: source of its manifest, or a brace pattern of shard locations
    (e.g. pipe:aws s3 cp s3://b/owt/train-{000000..000141}.tar -); or a weighted blend: a list of
    {source: SPEC, weight: W, name: NAME (optional)} with one tokenizer."""
    valid: str = ""
    """Validation shards (any single source spec); empty means the valid split of data.train
    (of its first source for a blend)."""
    shuffle: bool = True
    """Shuffle the global sample order each epoch (seeded by train.seed)."""
    cache_dir: str = ""
    """Where http(s):// and pipe: shards are downloaded (verified against the manifest's sha256);
    empty means RUN_DIR/data_cache. A node-local disk downloads once per node, a shared file
    system once per job."""
    cache_max_gb: float = 0.0
    """Bound on the shard cache of each source (least recently used shards evicted); 0 = none."""
    retries: int = 3
    """Retries of a failing shard read (pipe: exit status, HTTP error, bad checksum) before the
    run stops naming the shard (or skips it, see skip_bad_shards)."""
    retry_wait_s: float = 2.0
    """Back-off before the first retry; doubles each retry (at most 60 s)."""
    timeout_s: float = 300.0
    """An HTTP read or a pipe: command that stalls this long fails the attempt."""
    skip_bad_shards: bool = False
    """Skip a shard that is still unreadable after the retries (its rows become empty rows, the
    skip is logged and counted in data/skipped_shards) instead of stopping the run."""
    prefetch_shards: int = 4
    """Remote shards downloaded ahead of use in background threads; 0 disables."""

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            if not self.train:
                _fail("data.train", "a blend must list at least one {source, weight}")
            for i, entry in enumerate(self.train):
                key = f"data.train[{i}]"
                if not isinstance(entry, dict):
                    _fail(key, f"expected a mapping {{source, weight}}, got {entry!r}")
                unknown = set(entry) - {"source", "weight", "name"}
                if unknown:
                    _fail(key, f"unknown key(s) {sorted(unknown)}; allowed: name, source, weight")
                source, weight = entry.get("source"), entry.get("weight")
                if not isinstance(source, str) or not source.strip():
                    _fail(f"{key}.source", f"expected a non-empty string, got {source!r}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                    _fail(f"{key}.weight", f"expected a number > 0, got {weight!r}")
                if not isinstance(entry.get("name", ""), str):
                    _fail(f"{key}.name", f"expected a string, got {entry['name']!r}")
        for name in ("retries", "prefetch_shards"):
            if getattr(self, name) < 0:
                _fail(f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.retry_wait_s < 0 or self.cache_max_gb < 0:
            _fail("data", "retry_wait_s and cache_max_gb must be >= 0")
        if self.timeout_s <= 0:
            _fail("data.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass(kw_only=True)
class OptimConfig:
    weight_decay: float = 0.0
    """AdamW (decoupled) weight decay (MDLM: 0), the same rule on both backends: weight matrices and
    embeddings of the backbone and the scheduler heads are decayed; biases, LayerNorm weights
    (backbone and heads) and the family's parameters (GenMD4 exponents) never are."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    warmup_steps: int = 2500
    """Linear LR warmup steps."""
    schedule: str = "constant"
    """LR schedule after warmup: constant or cosine."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of train.lr."""
    head_lr: float = 0.0
    """LR of the scheduler heads (and GenMD4 exponents); 0 means train.lr."""
    ema_decay: float = 0.9999
    """EMA of the weights used for evaluation; 0 disables."""

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            _fail("optim.schedule", f"must be constant or cosine, got {self.schedule!r}")
        if self.clip_grad < 0:
            _fail("optim.clip_grad", f"must be >= 0, got {self.clip_grad}")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("optim.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed of weights, data order and diffusion noise (noise is f(seed, step, sample index))."""
    micro_batch_size: int = 8
    """Unique sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 512
    """Unique sequences per optimizer step (= micro batch x DP x gradient-accumulation steps)."""
    lr: float = 3e-4
    """Peak learning rate of the backbone."""
    precision: str = "bf16"
    """fp32 or bf16 (scheduler math always runs in fp32)."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 1000
    """Steps between validation NELBO evaluations; 0 disables."""
    eval_batches: int = 8
    """Global batches per validation."""
    deterministic: bool = False
    """Deterministic algorithms (bit-exact resume tests)."""

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, key) <= 0:
                _fail(f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            _fail(
                "train.global_batch_size",
                f"{self.global_batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}",
            )
        if self.lr <= 0:
            _fail("train.lr", f"must be > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            _fail("train.precision", f"must be fp32 or bf16, got {self.precision!r}")
        if self.eval_interval < 0 or self.eval_batches <= 0:
            _fail("train.eval_interval", "eval_interval must be >= 0 and eval_batches > 0")


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (splits attention heads and the vocabulary)."""
    pp: int = 1
    """Pipeline-parallel size (splits layers); scheduler heads live on the last stage."""
    backend: str = "megatron"
    """Data-parallel engine: megatron (mcore DDP + distributed optimizer) or deepspeed (ZeRO)."""
    zero: int = 0
    """ZeRO stage: megatron supports 0 and 1 (distributed optimizer); deepspeed 0-3."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass (megatron backend)."""
    cpu_offload: bool = False
    """Offload optimizer state to CPU (deepspeed, zero >= 2)."""
    nvme_offload_dir: str = ""
    """ZeRO-Infinity: keep the fp32 master weights and Adam state in files under this directory
    (an NVMe or other fast local disk; one subfolder per rank) and stream them through the CPU
    at each step. Empty = off. Needs parallel.backend=deepspeed, parallel.zero=3, not
    parallel.cpu_offload, and DeepSpeed's async_io op (libaio: `apt-get install libaio-dev`);
    the engine checks the directory and the op when it starts. Resume needs the same layout."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: LayerNorms, dropout and residuals run on 1/tp of the sequence
    (the activations between TP regions shrink by tp). Needs parallel.tp > 1, the megatron backend
    and model.seq_length divisible by tp. The scheduler heads and the loss see the whole sequence."""
    virtual_stages: int = 1
    """Interleaved pipeline: model chunks per pipeline rank (megatron's
    virtual_pipeline_model_parallel_size); 1 = the plain 1F1B schedule. Needs parallel.pp > 1, the
    megatron backend, model.num_layers divisible by pp x virtual_stages and micro-batches per step
    (global batch / (micro batch x DP)) a multiple of pp. Cuts the bubble by this factor."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            _fail("parallel.tp", f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.backend not in ("megatron", "deepspeed"):
            _fail("parallel.backend", f"must be megatron or deepspeed, got {self.backend!r}")
        if not 0 <= self.zero <= 3:
            _fail("parallel.zero", f"must be in 0..3, got {self.zero}")
        if self.backend == "megatron" and self.zero > 1:
            _fail("parallel.zero", f"the megatron backend supports zero 0 or 1, got {self.zero}; use parallel.backend=deepspeed")
        if self.backend == "deepspeed" and self.pp > 1 and self.zero > 1:
            _fail("parallel.pp", f"pipeline parallel with DeepSpeed ZeRO-{self.zero} is not supported (use zero <= 1)")
        if self.cpu_offload and not (self.backend == "deepspeed" and self.zero >= 2):
            _fail("parallel.cpu_offload", "needs parallel.backend=deepspeed and parallel.zero >= 2")
        if self.nvme_offload_dir and not (self.backend == "deepspeed" and self.zero == 3):
            _fail("parallel.nvme_offload_dir", "NVMe offload (ZeRO-Infinity) needs parallel.backend=deepspeed and "
                  f"parallel.zero=3, got backend={self.backend}, zero={self.zero}")
        if self.nvme_offload_dir and self.cpu_offload:
            _fail("parallel.nvme_offload_dir", "the optimizer state goes either to the CPU (parallel.cpu_offload) or "
                  "to NVMe (parallel.nvme_offload_dir), not both: set parallel.cpu_offload=false")
        if self.sequence_parallel and self.tp == 1:
            _fail("parallel.sequence_parallel", "needs parallel.tp > 1 (it splits the sequence over the TP ranks)")
        if self.sequence_parallel and self.backend != "megatron":
            _fail("parallel.sequence_parallel", "is wired for parallel.backend=megatron only (its gradient "
                  "all-reduce of the sequence-split LayerNorms is megatron's finalize_model_grads)")
        if self.virtual_stages < 1:
            _fail("parallel.virtual_stages", f"must be >= 1, got {self.virtual_stages}")
        if self.virtual_stages > 1 and self.pp == 1:
            _fail("parallel.virtual_stages", f"{self.virtual_stages} needs parallel.pp > 1 (interleaving splits "
                  "each pipeline rank's layers into chunks)")
        if self.virtual_stages > 1 and self.backend != "megatron":
            _fail("parallel.virtual_stages", "interleaved pipeline stages need parallel.backend=megatron "
                  "(megatron-core's interleaved schedule)")


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 1000
    """Steps between checkpoints; 0 saves only at the end and on preemption."""
    keep_last: int = 3
    """Number of most recent checkpoints kept; older ones are deleted after a save completes."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            _fail("checkpoint.interval", f"must be >= 0, got {self.interval}")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (metrics.jsonl is written regardless)."""
    uri: str = ""
    """MLflow tracking URI; empty means a sqlite database inside run.dir."""
    experiment: str = "megatron_lomdm"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Let MLflow sample CPU/GPU utilisation and memory."""
    artifacts: bool = True
    """At each evaluation, draw a few samples and write them, the order picture, the exponent
    histograms and the evaluation record to run.dir/artifacts/step_XXXXXXX/ (logged to MLflow)."""
    artifact_samples: int = 4
    """Samples drawn for the artifacts (ancestral sampler, EMA weights, one batch)."""
    artifact_steps: int = 0
    """Reverse steps of those samples; 0 = one per position (model.seq_length)."""

    def __post_init__(self) -> None:
        if self.artifact_samples < 1 or self.artifact_steps < 0:
            raise ValueError(f"tracking.artifact_samples must be >= 1 and tracking.artifact_steps >= 0, got "
                             f"{self.artifact_samples}, {self.artifact_steps}")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and scheduler-head shapes."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Which OeMDM family member and its schedule constants."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shard folders."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, LR schedule, clipping, EMA."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, seed, precision."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP x PP x DP layout and the ZeRO engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""

    def __post_init__(self) -> None:
        if self.parallel.tp > 1 and self.model.num_heads % self.parallel.tp:
            _fail("parallel.tp", f"{self.parallel.tp} does not divide model.num_heads={self.model.num_heads}")
        if self.parallel.pp > 1 and self.model.num_layers % self.parallel.pp:
            _fail("parallel.pp", f"{self.parallel.pp} does not divide model.num_layers={self.model.num_layers}")
        chunks = self.parallel.pp * self.parallel.virtual_stages
        if self.parallel.virtual_stages > 1 and self.model.num_layers % chunks:
            _fail("parallel.virtual_stages", f"parallel.pp x parallel.virtual_stages = {self.parallel.pp} x "
                  f"{self.parallel.virtual_stages} = {chunks} does not divide model.num_layers={self.model.num_layers}")
        if self.parallel.sequence_parallel and self.model.seq_length % self.parallel.tp:
            _fail("parallel.sequence_parallel", f"model.seq_length={self.model.seq_length} is not divisible by "
                  f"parallel.tp={self.parallel.tp}")
        d = self.diffusion
        if d.order_logits and self.model.seq_length and len(d.order_logits) != self.model.seq_length:
            _fail("diffusion.order_logits",
                  f"has {len(d.order_logits)} values, expected one per position (model.seq_length={self.model.seq_length})")
        d.check_family(self.model.seq_length)


def validate_for_world(cfg: Config, world_size: int) -> int:
    """Check the layout against the number of processes; returns the data-parallel size.

    Raises:
        ValueError: naming the field when tp * pp does not divide the world size or the global
            batch is not a multiple of micro batch x DP.
    """
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size % model_parallel:
        _fail(
            "parallel.tp",
            f"parallel.tp * parallel.pp = {cfg.parallel.tp} * {cfg.parallel.pp} = {model_parallel} "
            f"does not divide the world size {world_size}",
        )
    dp = world_size // model_parallel
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        _fail(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} is not a multiple of train.micro_batch_size x DP = "
            f"{cfg.train.micro_batch_size} x {dp} = {per_step}",
        )
    micro_batches = cfg.train.global_batch_size // per_step
    if cfg.parallel.virtual_stages > 1 and micro_batches % cfg.parallel.pp:
        _fail(
            "parallel.virtual_stages",
            f"megatron's interleaved schedule needs the micro-batches per step ({micro_batches} = "
            f"train.global_batch_size / (micro batch x DP)) to be a multiple of parallel.pp={cfg.parallel.pp}",
        )
    return dp

