"""Refuse non-finite weights wherever a checkpoint or an export is loaded.

A NaN weight does not always show as a NaN result: a NaN mask probability masks nothing, and the
NELBO of nothing masked is 0 (a "perfect" score). So resume, evaluation, sampling, export and
import all check what they loaded with ``check_finite``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteWeightsError(ValueError):
    """Loaded weights hold NaN or infinite values."""


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """The first floating-point tensor with NaN/inf values and how many it has, or None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            bad = tensor.numel() - int(torch.isfinite(tensor.detach()).sum())
            if bad:
                return name, bad
    return None


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], *, source: str, kind: str) -> None:
    """Raise if any tensor is non-finite, naming the source, the tensor and the count.

    Args:
        named_tensors: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
        source: where they were loaded from, e.g. ``checkpoint runs/x/checkpoints/step_0000010``.
        kind: what they are, e.g. ``ema weight``.

    Raises:
        NonFiniteWeightsError: ``"<source>: <kind> '<name>' has <n> non-finite values"``.
    """
    found = first_non_finite(named_tensors)
    if found is not None:
        name, count = found
        raise NonFiniteWeightsError(f"{source}: {kind} '{name}' has {count} non-finite values (NaN or inf)")
