"""Open a run at another layout (one rank of it) and write what this rank holds after the load.

    torchrun ... tests/distributed/_resume_worker.py RUN_DIR OUT_DIR [key=value ...]

Every rank writes OUT_DIR/rank_<global rank>.pt: for each model parameter and EMA shadow, its
sharded key, global offset and the local tensor, so the test can compare them with the tensors
of the checkpoint as written by the other layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_lomdm.apps.run import close_run, open_run  # noqa: E402
from megatron_lomdm.checkpoint.sharded import ema_sharded_state_dict, model_sharded_state_dict  # noqa: E402


def _records(sharded: dict) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    return [(e.key, tuple(e.global_offset), e.data.detach().cpu().clone()) for e in sharded.values()
            if isinstance(getattr(e, "data", None), torch.Tensor) and e.key.split(".")[-1] != "_extra_state"]


def main() -> None:
    run_dir, out_dir, *overrides = sys.argv[1:]
    run = open_run(run_dir, overrides=overrides)
    model_sd = model_sharded_state_dict(run.model)
    records = {"step": run.state.step, "model": _records(model_sd),
               "ema": _records(ema_sharded_state_dict(model_sd, run.model, run.ema.shadow))}
    torch.save(records, Path(out_dir) / f"rank_{torch.distributed.get_rank()}.pt")
    close_run()


if __name__ == "__main__":
    from megatron_lomdm.utils.proc import quick_exit_gc

    quick_exit_gc()  # as the commands do: no shutdown collections
    main()
