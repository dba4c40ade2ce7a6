#!/usr/bin/env python
"""How long a command's process takes to end, with and without `utils.proc.quick_exit_gc`.

Each side is a fresh interpreter that does what every training, evaluation or sampling process does
before it ends: imports torch and megatron-core (through megatron_lomdm, as the commands do), builds
the tiny CPU model of configs/model/tiny.yaml and a torch AdamW over it (the optimizer loads
torch._dynamo), runs one forward/backward, then returns. Side B calls `quick_exit_gc()` first, as
the commands' `main` does; side A does not. The figure is the process's wall time from the moment
the work is done (a line on stdout) to its exit, interleaved pairs (bench/common.py), and B/A.

    python bench/exit_time.py [--pairs 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, interleaved_ratio, record  # noqa: E402

_WORK = """
import sys
import torch
import megatron_lomdm
from megatron_lomdm.utils.proc import quick_exit_gc
if sys.argv[1] == "quick":
    quick_exit_gc()
from megatron.core.transformer import TransformerConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron_lomdm.distributed.init import init_distributed
from megatron_lomdm.distributed.cpu_compat import install_cpu_shims
init_distributed(tp=1, pp=1, seed=0, before_rng_seed=install_cpu_shims)
cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=512, max_sequence_length=32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 512, (2, 32))
model(ids, torch.arange(32)[None], None, labels=ids).float().mean().backward()
opt.step()
sys.stdout.write("done\\n")
sys.stdout.flush()
"""


def exit_seconds(mode: str) -> float:
    """Seconds from the child's "done" line to its exit."""
    proc = subprocess.Popen([sys.executable, "-c", _WORK, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    done = time.perf_counter()
    proc.wait()
    assert line.strip() == "done" and proc.returncode == 0, (mode, line, proc.returncode)
    return time.perf_counter() - done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=7)
    args = p.parse_args()
    times: dict[str, list[float]] = {"plain": [], "quick": []}

    def side(mode: str):
        return lambda: times[mode].append(exit_seconds(mode))

    # the timed unit is a whole process; what differs is only its end, so time the end directly
    interleaved_ratio(side("plain"), side("quick"), pairs=args.pairs, warmup=1)
    plain, quick = times["plain"][1:], times["quick"][1:]  # drop the warm-ups
    ratios = sorted(q / p for p, q in zip(plain, quick))
    result = {"n": len(ratios), "plain_exit_s_median": sorted(plain)[len(plain) // 2],
              "quick_exit_s_median": sorted(quick)[len(quick) // 2], "ratio_median": ratios[len(ratios) // 2],
              "ratio_min": ratios[0], "ratio_max": ratios[-1]}
    record("exit_time", result, band=(0.0, 0.5))
    print(f"exit after the work: plain {result['plain_exit_s_median']:.2f} s, quick_exit_gc "
          f"{result['quick_exit_s_median']:.2f} s (median of {len(ratios)}); quick/plain median "
          f"{result['ratio_median']:.3f} [{result['ratio_min']:.3f}-{result['ratio_max']:.3f}]")


if __name__ == "__main__":
    main()
