"""utils/proc.py: the commands end without the shutdown's heap traversal (`quick_exit_gc`)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.runs import ROOT, TINY, clean_env

# an exit handler registered before `main` runs after the command's own: it sees the heap frozen
_PROBE = ("import atexit, gc, sys; "
          "atexit.register(lambda: sys.stderr.write('frozen=%s\\n' % (gc.get_freeze_count() > 0))); "
          "from megatron_lomdm.apps.train import main; "
          "sys.exit(main(['--config', CONFIG, '--print-config']))")


def test_quick_exit_gc_freezes_the_heap_at_exit_only() -> None:
    out = subprocess.run([sys.executable, "-c", "import gc, megatron_lomdm.utils.proc as p; p.quick_exit_gc(); "
                          "p.quick_exit_gc(); print(gc.get_freeze_count())"], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=clean_env())
    assert out.stdout.split() == ["0"]  # nothing is frozen before exit (and a second call is harmless)


def test_training_command_freezes_the_heap_at_exit() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.replace('CONFIG', repr(TINY))], capture_output=True, text=True,
                         cwd=ROOT, env=clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "frozen=True" in out.stderr
