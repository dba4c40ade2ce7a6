"""Small pure statistics shared by the training diagnostics, evaluation and the samplers.

Shape legend:
    N  rows (e.g. sequences, or corruptions x sequences)
    L  entries per row (positions)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A row whose variance is below this fraction of its mean square is treated as constant: values
# that are equal up to rounding (e.g. one exponent for every position) have no defined correlation.
_REL_VAR_FLOOR = 1e-12


def row_pearson(x_NL: Tensor, y_NL: Tensor, weight_NL: Tensor | None = None, *, min_count: int = 2) -> Tensor:
    """Pearson correlation of x and y within each row, over the positions where ``weight_NL`` is set.

    Two-pass (centred) in fp64. A row is undefined (NaN) when it has fewer than ``min_count``
    selected positions, or when x or y is constant on them (variance <= 1e-12 x mean square).

    Args:
        x_NL, y_NL: Values, (N, L).
        weight_NL: Bool or 0/1 selection of positions, (N, L); None = all.
        min_count: Fewest selected positions for a defined correlation (>= 2).

    Returns:
        Correlations in [-1, 1], fp64, (N,); NaN where undefined.
    """
    x_NL, y_NL = x_NL.to(torch.float64), y_NL.to(torch.float64)
    w_NL = torch.ones_like(x_NL) if weight_NL is None else weight_NL.to(torch.float64)
    n_N = w_NL.sum(-1)
    safe_N1 = n_N.clamp_min(1.0).unsqueeze(-1)
    dx_NL = x_NL - (w_NL * x_NL).sum(-1, keepdim=True) / safe_N1
    dy_NL = y_NL - (w_NL * y_NL).sum(-1, keepdim=True) / safe_N1
    var_x_N, var_y_N = (w_NL * dx_NL**2).sum(-1), (w_NL * dy_NL**2).sum(-1)
    cov_N = (w_NL * dx_NL * dy_NL).sum(-1)
    defined_N = ((n_N >= max(min_count, 2))
                 & (var_x_N > _REL_VAR_FLOOR * (w_NL * x_NL**2).sum(-1))
                 & (var_y_N > _REL_VAR_FLOOR * (w_NL * y_NL**2).sum(-1)))
    corr_N = cov_N / torch.sqrt(torch.where(defined_N, var_x_N * var_y_N, 1.0))
    return torch.where(defined_N, corr_N, math.nan)
