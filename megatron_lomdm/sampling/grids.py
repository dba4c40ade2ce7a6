"""Sampling time grids 1 = t_0 > t_1 >= ... >= t_T = t_min for T-step samplers.

- ``uniform``: ``linspace(1, t_min, T + 1)`` (MDLM uses t_min = 1e-5; the default here is 0).
- ``beta`` (Chen et al., "MDMs as Energy Minimization"; method.md §5.6): with progress
  u_k = k / T (noise -> data) the *unmasked fraction* after step k is

      a_k = sin^2(pi/2 * I_{u_k}(a, b))     (``sin2=True``; ``sin2=False``: a_k = I_{u_k}(a, b))

  where I is the regularised incomplete beta function (the Beta(a, b) CDF). The grid is the
  times at which the reference schedule alpha(t) = 1 - t^c (c = ``exponent``; 1 = MDLM)
  reaches that fraction, mapped affinely onto [t_min, 1]:

      t_k = t_min + (1 - t_min) * (1 - a_k)^(1 / c).

  So a model with the reference schedule unmasks on average the fraction a_k - a_{k-1} of
  its tokens at step k, for any sampler that runs on the grid. With a = b = 1, ``sin2=False``
  gives exactly the uniform grid; ``sin2=True`` gives t_k = cos^2(pi k / (2T)) (c = 1,
  t_min = 0), i.e. the uniform grid seen through the sin^2 map.

All grids are fp64 on the CPU.

Shape legend:
    T  grid steps (the grid has T + 1 points)
    N  evaluation points
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_lomdm.diffusion.time_sampling import sampling_time_grid

_F64 = torch.float64
GRID_KINDS = ("uniform", "beta")


def uniform_grid(num_steps: int, t_min: float = 0.0) -> Tensor:
    """The uniform grid ``linspace(1, t_min, T + 1)``, fp64.

    Args:
        num_steps: T >= 1.
        t_min: Last time in [0, 1).

    Returns:
        The grid, (T + 1,).
    """
    return sampling_time_grid(num_steps, t_min=t_min, dtype=_F64)


def beta_grid(
    num_steps: int,
    a: float,
    b: float,
    *,
    t_min: float = 0.0,
    sin2: bool = True,
    exponent: float = 1.0,
) -> Tensor:
    """The Beta-CDF grid of the module docstring, fp64.

    Args:
        num_steps: T >= 1.
        a: First Beta shape parameter, > 0.
        b: Second Beta shape parameter, > 0.
        t_min: Last time in [0, 1).
        sin2: Apply Chen et al.'s sin^2(pi/2 .) map to the Beta CDF.
        exponent: Exponent c of the reference schedule 1 - t^c, > 0.

    Returns:
        The grid, (T + 1,): t_0 = 1, t_T = t_min, non-increasing.

    Raises:
        ValueError: For T < 1, non-positive a, b, exponent or t_min outside [0, 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (a > 0 and b > 0 and exponent > 0):
        raise ValueError(f"beta grid needs a, b, exponent > 0, got {a}, {b}, {exponent}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    u_T1 = torch.arange(num_steps + 1, dtype=_F64) / num_steps
    gamma_T1 = betainc(u_T1, a, b)
    frac_T1 = torch.sin(0.5 * math.pi * gamma_T1) ** 2 if sin2 else gamma_T1
    t_T1 = t_min + (1.0 - t_min) * (1.0 - frac_T1).clamp(0.0, 1.0) ** (1.0 / exponent)
    t_T1[0], t_T1[-1] = 1.0, t_min
    return torch.cummin(t_T1, dim=0).values  # guards against rounding wiggles


@dataclass(frozen=True)
class GridSpec:
    """How a T-step sampler builds its grid (config-friendly).

    Attributes:
        kind: ``uniform`` or ``beta``.
        t_min: Last time of the grid.
        a: Beta shape a (``beta`` only).
        b: Beta shape b (``beta`` only).
        sin2: Apply the sin^2 map (``beta`` only).
        exponent: Reference schedule exponent c (``beta`` only).
    """

    kind: str = "uniform"
    t_min: float = 0.0
    a: float = 1.0
    b: float = 1.0
    sin2: bool = True
    exponent: float = 1.0

    def __post_init__(self) -> None:
        """Validate ``kind``."""
        if self.kind not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {self.kind!r}; valid: {', '.join(GRID_KINDS)}")

    def build(self, num_steps: int) -> Tensor:
        """The grid for T = ``num_steps`` steps, fp64 (T + 1,)."""
        if self.kind == "uniform":
            return uniform_grid(num_steps, self.t_min)
        return beta_grid(num_steps, self.a, self.b, t_min=self.t_min, sin2=self.sin2,
                         exponent=self.exponent)


GridLike = GridSpec | Mapping[str, Any] | Tensor | str | None


def resolve_grid(grid: GridLike, num_steps: int | None, default_t_min: float = 0.0) -> Tensor:
    """Turn a sampler's ``grid`` option into a validated fp64 grid.

    Args:
        grid: A ``GridSpec``, a mapping of its fields, a kind name, an explicit grid tensor
            (T + 1,), or None (uniform with ``default_t_min``).
        num_steps: T; may be None only for an explicit tensor (then T = len - 1).
        default_t_min: t_min when ``grid`` is None or a kind name.

    Returns:
        The grid, fp64 CPU, (T + 1,).

    Raises:
        ValueError: For an invalid grid or a T mismatch.
    """
    if isinstance(grid, Tensor):
        grid_T1 = grid.detach().to(device="cpu", dtype=_F64).flatten()
        if num_steps is not None and grid_T1.numel() != num_steps + 1:
            raise ValueError(f"grid has {grid_T1.numel()} points, expected num_steps + 1")
    else:
        if num_steps is None or num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if grid is None or isinstance(grid, str):
            spec = GridSpec(kind=grid or "uniform", t_min=default_t_min)
        elif isinstance(grid, Mapping):
            spec = GridSpec(**{"t_min": default_t_min, **grid})
        else:
            spec = grid
        grid_T1 = spec.build(num_steps)
    _check_grid(grid_T1)
    return grid_T1


def _check_grid(grid_T1: Tensor) -> None:
    """Raise ValueError unless the grid starts at 1, ends in [0, 1) and never increases."""
    if grid_T1.numel() < 2:
        raise ValueError("a grid needs at least 2 points")
    if grid_T1[0] != 1.0 or not 0.0 <= float(grid_T1[-1]) < 1.0:
        raise ValueError(f"grid must start at 1 and end in [0, 1), got {grid_T1[0]}, "
                         f"{grid_T1[-1]}")
    if bool((grid_T1[1:] > grid_T1[:-1]).any()):
        raise ValueError("grid must be non-increasing")


# --------------------------------------------------------------------------------------
# Regularised incomplete beta function.
# --------------------------------------------------------------------------------------


def betainc(x_N: Tensor, a: float, b: float, *, use_scipy: bool | None = None) -> Tensor:
    """Regularised incomplete beta I_x(a, b) (the Beta(a, b) CDF at x), fp64.

    Args:
        x_N: Points in [0, 1], any shape.
        a: Shape parameter, > 0.
        b: Shape parameter, > 0.
        use_scipy: Use ``scipy.special.betainc``; None = if scipy is importable. False uses
            the tanh-sinh quadrature below (accurate to ~1e-12).

    Returns:
        I_x(a, b), fp64, the shape of ``x_N``.
    """
    x_N = x_N.to(_F64)
    if use_scipy is None or use_scipy:
        try:
            from scipy.special import betainc as scipy_betainc
        except ImportError:
            if use_scipy:
                raise
        else:
            return torch.as_tensor(scipy_betainc(a, b, x_N.cpu().numpy()), dtype=_F64).to(
                x_N.device
            )
    return _betainc_quadrature(x_N, a, b)


def _betainc_quadrature(x_N: Tensor, a: float, b: float) -> Tensor:
    """I_x(a, b) by tanh-sinh quadrature; symmetric split so the integral stays on x <= 1/2.

    I_x(a, b) = 1 - I_{1-x}(b, a), and on [0, x] with x <= 1/2 only the u^{a-1} endpoint
    singularity remains, which tanh-sinh nodes (clustered double-exponentially at 0) absorb.
    """
    upper_N = x_N > 0.5
    y_N = torch.where(upper_N, 1.0 - x_N, x_N)
    lower_a = _lower_integral(y_N, a, b)
    lower_b = _lower_integral(y_N, b, a)
    return torch.where(upper_N, 1.0 - lower_b, lower_a).clamp(0.0, 1.0)


def _lower_integral(y_N: Tensor, a: float, b: float, step: float = 1 / 16,
                    half_width: float = 6.0) -> Tensor:
    """(1 / B(a, b)) * int_0^y u^{a-1} (1 - u)^{b-1} du for y in [0, 1/2], fp64."""
    tau_M = torch.arange(-half_width, half_width + step / 2, step, dtype=_F64)
    arg_M = 0.5 * math.pi * torch.sinh(tau_M)
    # Nodes u = y * s(tau) with s = (1 + tanh(arg)) / 2 = sigmoid(2 arg), computed stably;
    # weights y * s'(tau) = y * (pi/2) cosh(tau) / (2 cosh^2(arg)).
    log_s_M = torch.nn.functional.logsigmoid(2.0 * arg_M)
    log_w_M = (math.log(0.5 * math.pi) + torch.log(torch.cosh(tau_M)) - math.log(2.0)
               - 2.0 * _log_cosh(arg_M))
    y_N1 = y_N.reshape(-1, 1)
    log_u_NM = torch.log(y_N1) + log_s_M
    log_f_NM = (a - 1.0) * log_u_NM + (b - 1.0) * torch.log1p(-log_u_NM.exp())
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    total_N = torch.exp(log_f_NM + log_w_M + torch.log(y_N1) - log_beta).sum(-1) * step
    return torch.where(y_N.reshape(-1) > 0, total_N, 0.0).reshape(y_N.shape)


def _log_cosh(x_M: Tensor) -> Tensor:
    """log cosh(x) without overflow."""
    ax_M = x_M.abs()
    return ax_M + torch.log1p(torch.exp(-2.0 * ax_M)) - math.log(2.0)
