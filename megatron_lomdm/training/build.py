"""Build everything a run needs from its config: distributed state, data, model, optimizer,
checkpoints, tracking. `Run` holds it and offers the few verbs the loop uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from megatron.core import parallel_state

from megatron_lomdm.checkpoint.manager import CheckpointManager
from megatron_lomdm.config import Config, load_config, save_config, validate_for_world
from megatron_lomdm.config.load import config_to_dict, replace
from megatron_lomdm.data.blend import BlendLoader, build_train_loader, data_manifest, source_options, valid_source
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import Manifest, check_tokenizer_compat
from megatron_lomdm.diffusion.base import DiffusionFamily
from megatron_lomdm.diffusion.registry import build_family
from megatron_lomdm.distributed.init import ParallelInfo, destroy_distributed, init_distributed
from megatron_lomdm.distributed.deepspeed_engine import partitioned_build
from megatron_lomdm.distributed.engine import Engine, build_engine
from megatron_lomdm.models.backbone import build_backbone_chunks, use_cpu_initialization
from megatron_lomdm.models.diffusion_lm import DiffusionLM, ModelChunks
from megatron_lomdm.models.scheduler_head import SchedulerHead
from megatron_lomdm.tracking.base import MetricsFile, Tracker
from megatron_lomdm.tracking.mlflow_tracker import build_tracker
from megatron_lomdm.tracking.run_info import default_run_name, run_tags
from megatron_lomdm.training.checkpointing import TrainState, first_problem, load_checkpoint, resume, save_checkpoint
from megatron_lomdm.training.optim import EMA
from megatron_lomdm.training.ppots import PPOTSEstimator, build_ppots
from megatron_lomdm.training.preemption import PreemptionFlag
from megatron_lomdm.training.step import MicroBatchStep, forward_backward, reduce_reports
from megatron_lomdm.utils.flops import Shape, peak_flops_of_device, step_flops
from megatron_lomdm.utils.logging import get_logger
from megatron_lomdm.utils.run_lock import RunDirInUse, lock_run_dir

log = get_logger(__name__)
MAX_BAD_STEPS = 5


def resolve_data_fields(cfg: Config, manifest: Manifest) -> Config:
    """Fill model.vocab_size / mask_id / pad_id / seq_length from the manifest; a conflict is an error."""
    tok = manifest.tokenizer
    from_data = {"vocab_size": int(tok["model_vocab_size"]), "mask_id": int(tok["mask_id"]),
                 "pad_id": int(tok["pad_id"]), "seq_length": manifest.seq_length}
    unset = {"vocab_size": 0, "mask_id": -1, "pad_id": -1, "seq_length": 0}
    model = {}
    for key, value in from_data.items():
        current = getattr(cfg.model, key)
        if current == unset[key]:
            model[key] = value
    cfg = replace(cfg, model=model)
    try:
        check_tokenizer_compat(manifest, vocab_size=cfg.model.vocab_size, mask_id=cfg.model.mask_id,
                               pad_id=cfg.model.pad_id, seq_length=cfg.model.seq_length)
    except ValueError as err:
        raise ValueError(f"config model.* vs data.train: {err}") from err
    return cfg


def _install_cpu_backend_if_needed() -> Any:
    if torch.cuda.is_available():
        return None
    from megatron_lomdm.distributed.cpu_compat import install_cpu_shims

    return install_cpu_shims


def family_from_config(cfg: Config) -> DiffusionFamily:
    """The OeMDM family of a resolved config (`diffusion.*` plus the model's L, V and [MASK] id)."""
    m, d = cfg.model, cfg.diffusion
    return build_family(d.name, c1=d.c1, c2=d.c2, block_size=d.block_size, vocab_size=m.vocab_size,
                        seq_length=m.seq_length, mask_id=m.mask_id, num_corruptions=d.num_corruptions,
                        learn_order=d.learn_order, order_logits=d.order_logits)


def build_model(cfg: Config, info: ParallelInfo) -> DiffusionLM | ModelChunks:
    """Backbone (this rank's TP/PP slice), scheduler heads and family, on this rank's device.

    With `parallel.virtual_stages` > 1: the rank's `ModelChunks`, one `DiffusionLM` per virtual
    stage (the heads on the chunk that holds the LM head)."""
    m, d = cfg.model, cfg.diffusion
    vp = cfg.parallel.virtual_stages
    bf16 = cfg.train.precision == "bf16"
    on_cpu = use_cpu_initialization(m.init_device)
    ends = [(parallel_state.is_pipeline_first_stage(ignore_virtual=vp == 1, vp_stage=i),
             parallel_state.is_pipeline_last_stage(ignore_virtual=vp == 1, vp_stage=i)) for i in range(vp)]
    # ZeRO-3: each backbone module is partitioned as soon as it is built, so no rank holds the whole
    # backbone. The heads and the family are built whole (small; SchedulerHead zeroes its output
    # layer after building it, which a partitioned layer would ignore) and DeepSpeed partitions them.
    with partitioned_build(cfg):
        backbones = build_backbone_chunks(
            num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads, ffn_hidden_size=m.ffn_size,
            vocab_size=m.vocab_size, seq_length=m.seq_length, mask_id=m.mask_id, dropout=m.dropout,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
            recompute=None if m.recompute == "none" else m.recompute, use_cpu_initialization=on_cpu,
            stage_ends=ends, sequence_parallel=cfg.parallel.sequence_parallel, init_method_std=m.init_method_std,
        )
    # Heads are built with the default RNG, which init_distributed seeds identically on every rank,
    # so they start bit-identical across TP ranks (and DP ranks); with init on the accelerator they
    # are drawn there (the CUDA default RNG, seeded alike on every rank too).
    # Heads live on the chunk with the LM head (last pipeline stage), where the features they read are.
    with torch.device("cpu" if on_cpu else info.device):
        heads = tuple(SchedulerHead(m.hidden_size, m.head_num_heads or m.num_heads, m.head_dropout,
                                    center=m.head_center_logits) for _ in range(2))
    chunks = []
    for backbone in backbones:
        family = family_from_config(cfg)
        last = backbone.post_process
        fwd_head = heads[0] if family.needs_clean_features and last else None
        rev_head = heads[1] if family.needs_reverse_head and last else None
        if not last:
            # The family's learnable parameters (GenMD4, multivariate) train on the last stage; other stages
            # (and chunks) draw masks with copies that `training.step` refreshes from it every step.
            family.requires_grad_(False)
        chunks.append(DiffusionLM(backbone, family, fwd_head, rev_head, mask_id=m.mask_id, seed=cfg.train.seed,
                                  global_batch_size=cfg.train.global_batch_size, eps_t=d.eps_t,
                                  clean_pass_dropout=m.clean_pass_dropout))
    model = chunks[0] if vp == 1 else ModelChunks(chunks)
    if bf16:
        # One parameter dtype, as megatron's Float16Module would give (the local spec builds its
        # LayerNorms in fp32): the bf16 optimizer keeps fp32 masters for all of them, and its
        # checkpointing cannot map fp32 parameters beside bf16 ones. Scheduler and loss math still
        # runs in fp32 (inputs are upcast; the scheduler heads upcast their bf16 weights too).
        # ZeRO-3's partitioned backbone parameters are bf16 already (`partitioned_build`).
        model = model.to(torch.bfloat16)
    return model.to(info.device)


@dataclass
class Run:
    """Everything the loop touches."""

    cfg: Config
    info: ParallelInfo
    model: DiffusionLM | ModelChunks  # chunks: interleaved pipeline stages (parallel.virtual_stages > 1)
    engine: Engine
    ema: EMA
    loader: ShardLoader | BlendLoader
    valid_path: str
    valid_split: str
    ckpt: CheckpointManager
    tracker: Tracker
    metrics_file: MetricsFile | None
    preemption: PreemptionFlag
    state: TrainState = field(default_factory=TrainState)
    max_bad_steps: int = MAX_BAD_STEPS
    ppots: PPOTSEstimator | None = None  # diffusion.time_sampler=ppots: loss statistics and proposal
    lock: IO[str] | None = None  # rank 0 of a trainer: run.dir/train.lock, held until close

    def __post_init__(self) -> None:
        self.device = self.info.device
        self.train_iter = iter(self.loader)
        self.num_microbatches = self.loader.num_micro_batches
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        m, fam = self.cfg.model, self.model.family
        shape = Shape(m.num_layers, m.hidden_size, m.ffn_size, m.vocab_size, m.seq_length)
        self.flops_per_step = step_flops(shape, unique_sequences=self.cfg.train.global_batch_size,
                                         num_corruptions=fam.num_corruptions, clean_pass=fam.needs_clean_features,
                                         heads=fam.needs_clean_features) / self.info.world_size
        self.peak_flops = peak_flops_of_device(torch.cuda.get_device_name()) if self.device.type == "cuda" else 0.0

    # ---- logging --------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], kind: str = "train") -> None:
        step = self.state.step
        if kind == "train":  # skipped shards, fetches, blend shares (summed over the DP group)
            metrics = {**metrics, **self.loader.stats(group=parallel_state.get_data_parallel_group(),
                                                      device=self.device)}
        if self.metrics_file is not None:
            self.metrics_file.write({"step": step, "kind": kind, **{k: v for k, v in metrics.items() if k != "step"}})
        prefix = "" if kind == "train" else f"{kind}/"
        self.tracker.log_metrics({f"{prefix}{k}": v for k, v in metrics.items() if k != "step"}, step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "nelbo", "velocity", "grad_norm", "tokens_per_s"))
        log.info("%s step %d: %s", kind, step, shown)

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation NELBO (velocity term included) with EMA weights, fixed batches and noise."""
        cfg = self.cfg
        loader = ShardLoader(self.valid_path, split=self.valid_split, micro_batch_size=cfg.train.micro_batch_size,
                             global_batch_size=cfg.train.global_batch_size, dp_rank=self.info.dp_rank,
                             dp_size=self.info.dp, seed=cfg.train.seed, shuffle=False, drop_last=False, num_epochs=1,
                             source_options=source_options(cfg.data, cfg.run.dir))
        batches = min(cfg.train.eval_batches, loader.batches_per_epoch)
        it = iter(loader)
        self.model.eval()
        self.ema.swap()
        try:
            reports = []
            for b in range(batches):
                # eval noise lives on negative "steps" so it never coincides with a training step
                reports += forward_backward(
                    self.engine, it, step=-1 - b, num_microbatches=self.num_microbatches, seq_length=cfg.model.seq_length,
                    micro_batch_size=cfg.train.micro_batch_size, device=self.device, forward_only=True)
        finally:
            self.ema.swap()
            self.model.train()
        out = reduce_reports(reports, self.device)
        nelbo = out.values["nelbo"]
        return {"nelbo": nelbo, "ppl": float(torch.tensor(nelbo).exp()), "main": out.values["main"],
                "velocity": out.values["velocity"], "num_tokens": out.num_tokens}

    # ---- checkpoints (training/checkpointing.py) --------------------------------------------------
    def load_checkpoint(self, step: int, sd: dict[str, Any] | None = None) -> None:
        """Restore everything from checkpoint `step` (collective); non-finite weights are an error."""
        load_checkpoint(self, step, sd)

    def save_checkpoint(self) -> None:
        save_checkpoint(self)

    def close(self, teardown: bool = True) -> None:
        """Flush tracking, stop loader threads and, after a normal end (`teardown`), tear the
        process groups down in order: leaving them to interpreter exit lets gloo's threads race
        the shutdown and abort the process. After an error no collective is attempted."""
        self.tracker.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        close_loader = getattr(self.loader, "close", None)
        if close_loader is not None:
            close_loader()
        if self.lock is not None:
            self.lock.close()
        if teardown:
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            destroy_distributed()


def _family_keys(cfg: Config) -> list[str]:
    """The checkpoint keys a config's family adds to the backbone: scheduler heads, family tensors."""
    family = family_from_config(cfg)
    keys = ["fwd_head.*"] if family.needs_clean_features else []
    keys += ["rev_head.*"] if family.needs_reverse_head else []
    return keys + [f"family.{name}" for name, _ in family.named_parameters()]


def check_trained_family(trained: Config, cfg: Config, folder: Path) -> None:
    """Refuse to load a checkpoint into a family whose scheduler keys differ from the trained one's.

    Raises:
        ValueError: naming both families and the keys each has (e.g. an MDLM checkpoint read with
            ``diffusion.name=lomdm``, which needs scheduler heads the checkpoint does not hold).
    """
    old, new = trained.diffusion.name, cfg.diffusion.name
    have, need = _family_keys(trained), _family_keys(cfg)
    if old != new and have != need:
        raise ValueError(f"checkpoint {folder} was trained with diffusion.name={old}, which has "
                         f"{'keys ' + ', '.join(have) if have else 'no scheduler heads or family tensors'}; "
                         f"diffusion.name={new} needs {', '.join(need) or 'none of them'}: "
                         f"keep diffusion.name={old} (a new family needs its own run directory)")


def _check_resumed_family(cfg: Config, run_dir: Path) -> None:
    """A trainer resuming a run with another family's checkpoint keys stops before anything is written."""
    saved, ckpt = run_dir / "config.yaml", CheckpointManager.reader(run_dir / "checkpoints")
    try:
        step, trained = ckpt.latest_step(), load_config(saved) if saved.is_file() else None
    except (ValueError, TypeError, OSError):  # a garbage `latest`, an older schema: resume() reports it
        return
    if step is not None and trained is not None:
        check_trained_family(trained, cfg, ckpt.folder(step))


def _lock_run_dir(run_dir: Path, is_rank0: bool) -> IO[str] | None:
    """Rank 0 takes the run directory's lock; every rank refuses if another trainer holds it."""
    lock, problem = None, None
    if is_rank0:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirInUse as err:
            problem = str(err)
    problem = first_problem(problem)
    if problem is not None:
        raise RunDirInUse(problem)
    return lock


def build_run(cfg: Config, *, read_only: bool = False) -> Run:
    """Initialise distributed state and build every part of the run; resumes from `latest`.

    A trainer (not `read_only`) first takes the run directory's lock, removes the leftovers of
    unfinished saves, writes `config.yaml` and opens `metrics.jsonl` (dropping lines after the
    resumed step). Readers (evaluate, sample, export) do none of that: the run may still be
    training, and their overrides (e.g. `parallel.tp`) are not the run's config.
    """
    cpu_hook = _install_cpu_backend_if_needed()
    # before any process group: bad data fails fast (a blend: one tokenizer across its sources)
    manifest = data_manifest(cfg.data.train, source_options(cfg.data, cfg.run.dir))
    cfg = resolve_data_fields(cfg, manifest)
    info = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vp=cfg.parallel.virtual_stages,
                            seed=cfg.train.seed, before_rng_seed=cpu_hook)
    validate_for_world(cfg, info.world_size)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(cfg.run.dir)
    is_rank0 = info.rank == 0
    lock = None if read_only else _lock_run_dir(run_dir, is_rank0)
    if not read_only:
        _check_resumed_family(cfg, run_dir)
    if is_rank0 and not read_only:
        save_config(cfg, run_dir / "config.yaml")
    model = build_model(cfg, info)
    ema = EMA(list(model.named_parameters()), cfg.optim.ema_decay)
    engine = build_engine(model if cfg.parallel.backend == "megatron" else MicroBatchStep(model), cfg)
    loader = build_train_loader(cfg.data, micro_batch_size=cfg.train.micro_batch_size,
                                global_batch_size=cfg.train.global_batch_size, dp_rank=info.dp_rank, dp_size=info.dp,
                                seed=cfg.train.seed, run_dir=run_dir)
    valid_path, valid_split = valid_source(cfg.data, run_dir)
    ckpt = CheckpointManager(run_dir / "checkpoints", tp_rank=info.tp_rank, pp_rank=info.pp_rank, dp_rank=info.dp_rank,
                             tp=info.tp, pp=info.pp, dp=info.dp, is_rank0=is_rank0, keep_last=cfg.checkpoint.keep_last)
    if is_rank0 and not read_only:
        ckpt.remove_stale_tmp()
    d = cfg.diffusion
    layout, k = {"tp": info.tp, "pp": info.pp, "dp": info.dp}, model.family.num_corruptions
    tags = run_tags(cfg, **layout, num_corruptions=k, data_fingerprint=manifest.fingerprint("train"))
    tracker = build_tracker(enabled=cfg.tracking.enabled, is_rank0=is_rank0, uri=cfg.tracking.uri,
                            experiment=cfg.tracking.experiment, run_dir=run_dir,
                            run_name=cfg.run.name or default_run_name(cfg, **layout, num_corruptions=k), tags=tags,
                            system_metrics=cfg.tracking.system_metrics)
    run = Run(cfg=cfg, info=info, model=model, engine=engine, ema=ema, loader=loader, valid_path=valid_path,
              valid_split=valid_split, ckpt=ckpt, tracker=tracker, metrics_file=None, preemption=PreemptionFlag(),
              ppots=build_ppots(d, model, info.device), lock=lock)
    latest = resume(run)
    if latest is not None:
        log.info("resumed from %s at step %d", ckpt.root / f"step_{latest:07d}", run.state.step)
    elif not read_only:
        tracker.log_params(config_to_dict(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
    if is_rank0 and not read_only:
        run.metrics_file = MetricsFile(run_dir / "metrics.jsonl", resume_step=run.state.step + 1)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: the full size
    log.info("model: %.2fM parameters on this rank (%s), family=%s, corruptions/sequence K=%d, micro-batches/step=%d",
             n_params / 1e6, info.device, d.name, model.family.num_corruptions, run.num_microbatches)
    return run
