"""utils/progress.py: every item passes through, in order; no bar where stderr is not a terminal."""

from __future__ import annotations

import subprocess
import sys

from megatron_lomdm.utils.progress import progress


def test_progress_yields_every_item_in_order() -> None:
    assert list(progress(iter(range(5)), total=5, desc="x")) == [0, 1, 2, 3, 4]


def test_no_bar_when_stderr_is_not_a_terminal() -> None:
    code = "from megatron_lomdm.utils.progress import progress\nfor _ in progress(range(3), total=3, desc='bar'): pass"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bar" not in out.stderr, out.stderr
