"""torchrun'd worker (2 processes, gloo, fp32): TP=2 backbone parity against TP=1.

Run by ``test_backbone_parity.py``; writes a JSON report (rank 0) to ``argv[1]``.

In one launch: phase 1 builds the TP=1 model (world 2 -> DP=2, both ranks compute the same
reference), phase 2 rebuilds megatron's groups with TP=2 over the same processes and builds the
model again from the same seed (CPU initialisation draws every weight in full, so the models are
the same). Compared: gathered logits, hidden states, the vocab-parallel SUBS log-probabilities and
expected rates (also against a plain single-process reference on the gathered logits), the
gradients of a loss built from them, the logits after one SGD step, and the scheduler head, which
must be bit-identical across the TP ranks after an Adam step. Phase 3 (PP=2, TP=1) checks that
each pipeline stage is built with the PP=1 weights (layout-independent init) and gives the PP=1
loss through megatron's pipeline schedule (forward only).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lomdm.distributed.init import (
    assert_replicated,
    broadcast_head_params,
    destroy_distributed,
    init_distributed,
)
from megatron_lomdm.models.backbone import build_backbone
from megatron_lomdm.models.scheduler_head import SchedulerHead
from megatron_lomdm.models.vocab_parallel import (
    expected_token_rate_vocab_parallel,
    subs_logp_true_vocab_parallel,
)
from tests.helpers.cpu_megatron import install_cpu_shims

SEED = 1234
B, L, D, HEADS, LAYERS, VOCAB = 2, 16, 64, 4, 2, 100
MASK_ID = VOCAB - 1


def make_batch() -> dict[str, torch.Tensor]:
    """The same batch on every rank (its own generator)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, VOCAB - 1, (B, L), generator=gen)
    masked = torch.rand(B, L, generator=gen) < 0.5
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, -3:] = False
    z = torch.where(masked & valid, torch.full_like(x, MASK_ID), x)
    w_raw = torch.randn(VOCAB, generator=gen)
    return {"x": x, "z": z, "valid": valid, "w_raw": w_raw}


def gather_last_dim(t: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    if dist.get_world_size(group) == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t.contiguous()) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def full_param(p: torch.Tensor, tensor: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """A TP-split parameter's tensor (weight or grad) gathered to its TP=1 shape."""
    if not getattr(p, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def reference_subs(logits_full, z, x, w):  # noqa: ANN001, ANN201
    lg = logits_full.double()
    lg[..., MASK_ID] = float("-inf")
    lg[..., VOCAB:] = float("-inf")
    logp_all = torch.log_softmax(lg, dim=-1)
    logp = logp_all.gather(-1, x[..., None]).squeeze(-1)
    logp = torch.where(z == MASK_ID, logp, torch.zeros_like(logp))
    rate = (logp_all.exp()[..., :VOCAB] * w.double()).sum(-1)
    return logp.float(), rate.float()


def run_case(batch: dict[str, torch.Tensor]) -> dict[str, object]:
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    torch.manual_seed(SEED)
    model = build_backbone(
        num_layers=LAYERS, hidden_size=D, num_heads=HEADS, ffn_hidden_size=4 * D,
        vocab_size=VOCAB, seq_length=L, mask_id=MASK_ID, use_cpu_initialization=True,
    )
    initial = {n: full_param(p, p.detach(), tp_group) for n, p in model.named_parameters()}
    torch.manual_seed(SEED + 1)
    # uncentred: with centring the last bias gets only rounding-noise gradients, which Adam
    # normalises into lr-sized steps that differ between layouts (harmless: the bias cancels)
    head = SchedulerHead(D, HEADS, dropout=0.0, center=False)
    broadcast_head_params(head, tp_group)
    w_raw = torch.nn.Parameter(batch["w_raw"].clone())
    x, z, valid = batch["x"], batch["z"], batch["valid"]

    logits, hidden = model(z, valid)
    w = F.softplus(w_raw)
    logp = subs_logp_true_vocab_parallel(logits, z, x, MASK_ID, vocab_size=VOCAB)
    rate = expected_token_rate_vocab_parallel(logits, w, MASK_ID)
    head_logits = head(hidden.detach(), valid)  # stop-grad: f(z_t) features
    masked = (z == MASK_ID) & valid
    loss = (
        -(logp * valid).sum() / valid.sum()
        + 0.1 * (rate * masked).sum() / masked.sum()
        + (head_logits * logp.detach() * valid).mean()
    )
    loss.backward()

    out: dict[str, object] = {
        "initial_params": initial,
        "nll": (-(logp * valid).sum() / valid.sum()).detach().clone(),
        "logits": gather_last_dim(logits, tp_group),
        "hidden": hidden.detach().clone(),
        "logp": logp.detach().clone(),
        "rate": rate.detach().clone(),
        "loss": loss.detach().clone(),
        "w_grad": w_raw.grad.clone(),
        "grads": {n: full_param(p, p.grad, tp_group) for n, p in model.named_parameters()},
        "head_grads": {n: p.grad.clone() for n, p in head.named_parameters()},
        "vocab_local": logits.shape[-1],
    }
    out["ref_logp"], out["ref_rate"] = reference_subs(out["logits"], z, x, w.detach())

    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.Adam(head.parameters(), lr=1e-2).step()
    assert_replicated(head, tp_group)  # raises on every rank if a head parameter differs
    with torch.no_grad():
        logits2, hidden2 = model(z, valid)
        out["logits_after_step"] = gather_last_dim(logits2, tp_group)
        out["head_after_step"] = head(hidden2, valid)
    out["head_params"] = {n: p.detach().clone() for n, p in head.named_parameters()}
    return out


def run_pp2(batch: dict[str, torch.Tensor], tp1: dict) -> dict[str, float]:
    """PP=2 (TP=1): each stage's initial weights equal the PP=1 model's, and so does the loss."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.manual_seed(SEED)
    model = build_backbone(
        num_layers=LAYERS, hidden_size=D, num_heads=HEADS, ffn_hidden_size=4 * D,
        vocab_size=VOCAB, seq_length=L, mask_id=MASK_ID, use_cpu_initialization=True,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    offset = ps.get_pipeline_model_parallel_rank() * (LAYERS // 2)
    diffs = []
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            index = int(name.split(".")[2])
            name = name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index + offset}.", 1)
        diffs.append(max_abs(p.detach(), tp1["initial_params"][name]))
    x, z, valid = batch["x"], batch["z"], batch["valid"]

    def loss_func(logits_and_hidden):  # noqa: ANN001, ANN202
        logp = subs_logp_true_vocab_parallel(logits_and_hidden[0], z, x, MASK_ID, vocab_size=VOCAB)
        nll = -(logp * valid).sum() / valid.sum()
        return nll, {"nll": nll.detach().clone()}

    def forward_step(data_iterator, stage_model):  # noqa: ANN001, ANN202
        next(data_iterator)
        return stage_model(z, valid), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=L, micro_batch_size=B, forward_only=True,
    )
    nll = torch.tensor(losses[0]["nll"].item() if losses else 0.0)
    dist.broadcast(nll, src=dist.get_world_size() - 1)  # from the last stage
    return {"pp2_initial_params_abs": max(diffs), "pp2_nll_abs": max_abs(nll, tp1["nll"])}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_abs(a, b) / max(float(b.double().abs().max()), 1e-30)


def compare(tp1: dict, tp2: dict, z: torch.Tensor) -> dict[str, float]:
    grads = [max_rel(tp2["grads"][n], g) for n, g in tp1["grads"].items()]
    head_grads = [max_abs(tp2["head_grads"][n], g) for n, g in tp1["head_grads"].items()]
    head_params = [max_abs(tp2["head_params"][n], p) for n, p in tp1["head_params"].items()]
    return {
        "logits_abs": max_abs(tp2["logits"], tp1["logits"]),
        "hidden_abs": max_abs(tp2["hidden"], tp1["hidden"]),
        "logp_abs": max_abs(tp2["logp"], tp1["logp"]),
        "rate_abs": max_abs(tp2["rate"], tp1["rate"]),
        "loss_abs": max_abs(tp2["loss"], tp1["loss"]),
        "w_grad_abs": max_abs(tp2["w_grad"], tp1["w_grad"]),
        "grads_max_rel": max(grads),
        "head_grads_abs": max(head_grads),
        "logits_after_step_abs": max_abs(tp2["logits_after_step"], tp1["logits_after_step"]),
        "head_after_step_abs": max_abs(tp2["head_after_step"], tp1["head_after_step"]),
        "head_params_after_step_abs": max(head_params),
        "tp1_logp_vs_reference_abs": max_abs(tp1["logp"], tp1["ref_logp"]),
        "tp1_rate_vs_reference_abs": max_abs(tp1["rate"], tp1["ref_rate"]),
        "tp2_logp_vs_reference_abs": max_abs(tp2["logp"], tp2["ref_logp"]),
        "tp2_rate_vs_reference_abs": max_abs(tp2["rate"], tp2["ref_rate"]),
        "carry_over_exact_zero": bool((tp2["logp"][z != MASK_ID] == 0).all()),
    }


def main(report_path: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batch = make_batch()
    init_distributed(tp=1, pp=1, seed=SEED, backend="gloo", before_rng_seed=install_cpu_shims)
    tp1 = run_case(batch)
    info = init_distributed(
        tp=2, pp=1, seed=SEED, backend="gloo", before_rng_seed=install_cpu_shims
    )
    tp2 = run_case(batch)
    report = compare(tp1, tp2, batch["z"])
    init_distributed(tp=1, pp=2, seed=SEED, backend="gloo", before_rng_seed=install_cpu_shims)
    report.update(run_pp2(batch, tp1))
    report.update(
        world_size=info.world_size, tp=info.tp, dp=info.dp, tp_rank=info.tp_rank,
        vocab_local_tp1=tp1["vocab_local"], vocab_local_tp2=tp2["vocab_local"],
    )
    reports = [None] * info.world_size
    dist.all_gather_object(reports, report)
    if info.rank == 0:
        with open(report_path, "w") as f:
            json.dump(reports, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    from megatron_lomdm.utils.proc import quick_exit_gc

    quick_exit_gc()  # as the commands do: no shutdown collections
    main(sys.argv[1])
