"""Layer 6 (docs/design.md §10b): what opens a run for a user.

``run`` opens a trained run read-only for inference (``open_run``/``close_run``), ``fingerprint``
says what made a number, ``evaluate`` is the test-set NELBO/PPL, ``generate`` binds the pure
samplers of ``sampling/`` to an opened run, ``judges`` scores samples (exact AR likelihood,
generative perplexity), ``sample`` writes fingerprinted samples and ``submit`` sends a training run
to Slurm (or submitit's local executor). The entry points under ``tools/`` and ``slurm/`` parse their flags and call these; nothing below this layer
imports it. Import the submodules directly: this file imports nothing, so ``import
megatron_lomdm.apps.run`` does not pull in submitit or the samplers.
"""
