"""ZeRO-3 builds the model partitioned (issue 21 §3): no rank holds the whole backbone while
`training.build.build_model` runs, and the weights are those of a plain build.

One torchrun launch (through the suite's fork server) of `_zero3_build_worker.py` (2 gloo processes, an 8-layer d=64 model, LoMDM
and MDLM, fp32 and bf16; CPU allocator peaks from the profiler's memory events).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import zygote
from tests.helpers.runs import ROOT


def test_zero3_build_is_partitioned_with_the_plain_weights(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    report = tmp_path / "report.json"
    proc = zygote.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(Path(__file__).with_name("_zero3_build_worker.py")), str(report)],
                      env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        got = json.loads(Path(f"{report}.{rank}").read_text())
        for case, r in got.items():
            where = f"rank {rank}, {case}: {r}"
            size = {"fp32": 4, "bf16": 2}[case.split()[1]]
            assert r["partitioned"] and r["heads_whole"] and r["names"], where
            assert r["same_weights"], where  # layout-independent init survives the partitioned build
            assert r["dtypes"] == [{4: "torch.float32", 2: "torch.bfloat16"}[size]], where
            assert r["partition"] == pytest.approx(r["backbone"] / 2, rel=0.01), where
            # while the backbone is built, a rank holds its partition of the modules built so far
            # and the whole parameters of one module, never the whole backbone
            one_module = r["largest_module_numel"] * size
            assert r["whole_peak"] <= one_module, where
            assert r["param_peak"] <= r["partition"] + one_module < r["backbone"], where
            if r["heads_numel"] == 0:  # the allocator agrees (noisy: other threads, DeepSpeed's buffers)
                assert r["zero3_peak"] < r["plain_peak"], where
