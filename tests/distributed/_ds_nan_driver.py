"""The training CLI with one poisoned step: the surrogate of step index `LOMDM_TEST_NAN_STEP` is NaN
on global rank `LOMDM_TEST_NAN_RANK` (every rank when unset), finite everywhere else.

Used by test_parity_deepspeed.py: the loop must skip that step on every rank (the data is consumed,
no update) and later steps must go on exactly as in a run that skipped it the same way.
"""

from __future__ import annotations

import os
import sys

from megatron_lomdm.models import diffusion_lm


def _poisoned_forward():
    real = diffusion_lm.DiffusionLM.forward
    step_to_poison = int(os.environ["LOMDM_TEST_NAN_STEP"])
    rank = os.environ.get("LOMDM_TEST_NAN_RANK")
    this_rank = os.environ.get("RANK", "0")

    def forward(self, tokens_BL, valid_BL, index_B, step, *args, **kwargs):
        out = real(self, tokens_BL, valid_BL, index_B, step, *args, **kwargs)
        if step == step_to_poison and rank in (None, this_rank) and isinstance(out, tuple):
            out[0].surrogate = out[0].surrogate * float("nan")
        return out

    return forward


if __name__ == "__main__":
    diffusion_lm.DiffusionLM.forward = _poisoned_forward()
    from megatron_lomdm.train import main

    sys.exit(main(sys.argv[1:]))
