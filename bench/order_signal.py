#!/usr/bin/env python
"""Is there an order signal, and how noisy is it? Two measurements on a trained order-task run.

1. Preference: the run's backbone evaluated (full NELBO, `evaluate_run`) under three fixed orders
   of a frozen multivariate schedule: flat, part A first (+6/-6 order logits) and part B first.
2. Gradient: at the flat order, the per-step gradient of the per-token LoMDM surrogate along the
   A-first direction of the forward logits (+1 on part A, -1 on part B), over independent batches
   of --batch validation rows with fresh noise, for K = 2, 4, 8 corruptions; its mean, std and the
   per-step SNR mean^2/std^2. (At the flat order the reverse head sees A_hat = A, so the velocity
   term adds no pathwise gradient: this is also the multivariate family's gradient.)

    python bench/order_signal.py --run-dir bench/_work/order_task/runs/poly_s1 \
        --task-json bench/_work/order_task/data/pairs_ab/task.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_lomdm.apps.evaluate import evaluate_run, read_eval_sequences  # noqa: E402
from megatron_lomdm.apps.run import close_run, open_run  # noqa: E402
from megatron_lomdm.diffusion.lomdm import LoMDMFamily  # noqa: E402
from megatron_lomdm.diffusion.multivariate import MultivariateFamily  # noqa: E402
from megatron_lomdm.models.scheduler_head import SchedulerHead  # noqa: E402

from common import Progress  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--task-json", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--draws", type=int, default=150)
    args = p.parse_args()
    task = json.loads(Path(args.task_json).read_text())
    run = open_run(args.run_dir)
    m, cfg = run.model, run.cfg
    L, mask_id = cfg.model.seq_length, cfg.model.mask_id
    d_L = torch.zeros(L)
    d_L[task["positions_a"]], d_L[task["positions_b"]] = 1.0, -1.0
    out: dict = {"run": args.run_dir, "preference": {}, "gradient": {}}
    family = m.family
    progress = Progress("order_signal", 6)
    for name, sign in (("flat", 0.0), ("a_first", 1.0), ("b_first", -1.0)):
        progress.step(f"NELBO under the fixed {name} order")
        m.family = MultivariateFamily(c1=0.7, c2=0.65, seq_length=L, mask_id=mask_id, learn_order=False,
                                      order_logits=(6.0 * sign * d_L).tolist())
        out["preference"][name] = evaluate_run(run, t_draws=2).nelbo
    m.family = family
    if m.rev_head is None:  # a context-free run: a flat (zero-initialised) reverse head
        m.rev_head = SchedulerHead(cfg.model.hidden_size, cfg.model.head_num_heads or cfg.model.num_heads)
    rows = torch.tensor(read_eval_sequences(run, split="valid"))
    m.eval()
    m.global_batch_size = args.batch
    for K in (2, 4, 8):
        progress.step(f"forward-head gradient at K={K}, {args.draws} draws of {args.batch}")
        m.family = LoMDMFamily(c1=0.7, c2=0.65, seq_length=L, mask_id=mask_id, num_corruptions=K)
        g = []
        for s in range(args.draws):
            idx = torch.randint(0, rows.shape[0], (args.batch,), generator=torch.Generator().manual_seed(s))
            x_BL = rows[idx]
            logits_BL = torch.zeros(args.batch, L, requires_grad=True)
            terms, _ = m(x_BL, torch.ones_like(x_BL, dtype=torch.bool), torch.arange(args.batch), 10_000 + s,
                         fwd_logits_BL=logits_BL)
            (grad_BL,) = torch.autograd.grad(terms.surrogate / terms.num_tokens, logits_BL)
            g.append(float((grad_BL * d_L).sum()))
        mu, sd = statistics.mean(g), statistics.stdev(g)
        out["gradient"][f"K{K}"] = {"mean": mu, "std": sd, "se_mean": sd / len(g) ** 0.5,
                                    "snr_per_step": mu * mu / (sd * sd)}
    print(json.dumps(out))
    close_run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
