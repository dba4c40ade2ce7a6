"""Compatibility names: the test-set evaluation and run opening moved to ``megatron_lomdm.apps``.

``apps/run.py`` (``open_run``, ``close_run``, ``weights``, ...), ``apps/fingerprint.py`` and
``apps/evaluate.py`` (``evaluate_run``, ``EVAL_NOISE_STEP``, ...) are the homes; import from there.
This module only re-exports their names for code written against the old place
(``sampling/generate.py``, ``tests/integration/test_eval_sample.py``). It is an upward import
(training -> apps) listed in ``tests/unit/test_import_graph.py``; delete it once
``sampling/generate.py``'s run code lives in ``apps/`` (issue 18, item 3).
"""

from __future__ import annotations

from megatron_lomdm.apps.evaluate import (  # noqa: F401
    _SUM_KEYS,
    EVAL_NOISE_STEP,
    EvalResult,
    eval_rows,
    evaluate_run,
    read_eval_sequences,
    resolve_eval_data,
)
from megatron_lomdm.apps.fingerprint import checkpoint_fingerprint, run_fingerprint  # noqa: F401
from megatron_lomdm.apps.run import (  # noqa: F401
    RunNotReady,
    available_checkpoints,
    broadcast_object,
    clean_launcher_env,
    close_run,
    is_rank0,
    load_run_config,
    open_run,
    resolve_checkpoint,
    weights,
)
