"""Barron's general and adaptive robust loss on the residual ``p - g``.

``barron_rho`` is the plain loss function rho(x, alpha, c), stable at and near its
special shapes. ``barron`` applies it to the probability residual; with
``learnable=True`` the shape alpha is a trained parameter and the loss is the negative
log-likelihood of Barron's distribution, ``rho + log Z(alpha)``: minimising rho alone
over alpha is degenerate (rho decreases as alpha decreases for every residual, so alpha
would run to its lower bound), the log-partition term is what prices robustness.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import integrate
from torch import Tensor, nn

from ._common import (
    REDUCTIONS,
    Reduction,
    check_choice,
    check_inputs,
    reduce_voxels,
    select_channels,
)
from ._registry import register_loss


def barron_rho(x: Tensor, alpha: float | Tensor, scale: float | Tensor) -> Tensor:
    """Barron's general robust loss rho(x, alpha, c), element-wise.

    Parameters
    ----------
    x : Tensor
        Residuals.
    alpha : float or Tensor
        Shape, any real number or +-inf (broadcast against ``x``).
    scale : float or Tensor
        Scale c > 0 (width of the quadratic bowl).

    Returns
    -------
    Tensor
        ``rho = |a - 2|/a * (((x/c)^2/|a - 2| + 1)^(a/2) - 1)``, with its limits
        a = 2: ``(x/c)^2/2``; a = 0: ``log((x/c)^2/2 + 1)``;
        a = -inf: ``1 - exp(-(x/c)^2/2)``; a = +inf: ``exp((x/c)^2/2) - 1``.

    Notes
    -----
    Computed as ``|a - 2|/a * expm1(a/2 * log1p((x/c)^2/|a - 2|))`` with ``|a - 2|`` and
    ``|a|`` clamped below by the dtype's machine epsilon (Barron's own implementation
    does the same clamping), so values and gradients are finite and continuous at and
    near a = 0 and a = 2; the exact special values use the closed forms.

    References
    ----------
    .. [1] Barron, J. T. (2019). A general and adaptive robust loss function. CVPR 2019,
       pp. 4331-4339. arXiv:1701.03077, eq. 1-8.
    """
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    x = x.to(dtype)
    alpha = torch.as_tensor(alpha, dtype=dtype, device=x.device)
    scale = torch.as_tensor(scale, dtype=dtype, device=x.device)
    if bool((scale <= 0).any()):
        raise ValueError(f"scale must be > 0, got {scale.tolist()!r}")
    eps = torch.finfo(dtype).eps
    z2 = (x / scale) ** 2
    is_two, is_zero = alpha == 2, alpha == 0
    is_neginf, is_posinf = alpha == -math.inf, alpha == math.inf
    special = is_two | is_zero | is_neginf | is_posinf
    # the general branch never sees a special alpha (so its unused gradients stay finite)
    a = torch.where(special, torch.ones_like(alpha), alpha)
    beta_safe = torch.clamp(torch.abs(a - 2), min=eps)
    alpha_safe = torch.where(a >= 0, 1.0, -1.0).to(dtype) * torch.clamp(torch.abs(a), min=eps)
    general = beta_safe / alpha_safe * torch.expm1(0.5 * alpha_safe * torch.log1p(z2 / beta_safe))
    # +inf is evaluated only where selected, so exp() cannot overflow elsewhere
    posinf = torch.expm1(0.5 * torch.where(is_posinf, z2, torch.zeros_like(z2)))
    out = torch.where(is_two, 0.5 * z2, general)
    out = torch.where(is_zero, torch.log1p(0.5 * z2), out)
    out = torch.where(is_neginf, -torch.expm1(-0.5 * z2), out)
    return torch.where(is_posinf, posinf, out)


def _rho_numpy(x: float, alpha: float) -> float:
    """rho(x, alpha, 1) in float64 for the integrand of the partition function (alpha >= 0)."""
    z2 = x * x
    if alpha == 0:
        return math.log1p(0.5 * z2)
    if alpha == 2:
        return 0.5 * z2
    b = abs(alpha - 2)
    return b / alpha * math.expm1(0.5 * alpha * math.log1p(z2 / b))


@functools.lru_cache(maxsize=8)
def log_partition_table(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``log Z(alpha)`` on ``n`` equally spaced alphas in ``[lo, hi]`` (``lo >= 0``).

    ``Z(alpha) = integral over R of exp(-rho(x, alpha, 1)) dx``, by adaptive quadrature
    (``scipy.integrate.quad`` on [0, inf), doubled); cached per ``(lo, hi, n)``. Z is
    finite only for alpha >= 0. Checks: Z(2) = sqrt(2 pi), Z(0) = pi sqrt(2).
    """
    values = []
    for alpha in np.linspace(lo, hi, n):
        half, _ = integrate.quad(
            lambda x, a=float(alpha): math.exp(-_rho_numpy(x, a)),
            0.0,
            math.inf,
            limit=200,
            epsabs=1e-12,
            epsrel=1e-10,
        )
        values.append(math.log(2.0 * half))
    return tuple(values)


def interpolate_log_partition(alpha: Tensor, lo: float, hi: float, table: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``log Z`` at ``alpha`` (differentiable in alpha)."""
    n = table.numel()
    u = (alpha - lo) / (hi - lo) * (n - 1)
    i = torch.clamp(torch.floor(u.detach()), 0, n - 2).long()
    frac = u - i.to(u.dtype)
    return table[i] * (1 - frac) + table[i + 1] * frac


@register_loss("barron")
class BarronLoss(nn.Module):
    """Barron's robust loss on the probability residual ``p - g``.

    Parameters
    ----------
    alpha : float, default 1.0
        Shape (fixed), or the initial shape when ``learnable``. Any real or +-inf when
        fixed; strictly inside ``alpha_range`` when learnable. 2: L2, 1: smoothed L1
        (pseudo-Huber), 0: Cauchy, -2: Geman-McClure, -inf: Welsch.
    scale : float > 0, default 0.1
        Scale c; the residuals of probabilities lie in [-1, 1], so c < 1 is needed for
        the shape to matter.
    learnable : bool, default False
        Learn alpha (one scalar) by the negative log-likelihood; the scale stays fixed.
        The module then has a parameter: give ``loss.parameters()`` to the optimizer.
    alpha_range : (float, float), default (0.0, 2.0)
        Bounds of the learnable alpha, ``0 <= lo < hi`` (Z is infinite for alpha < 0):
        ``alpha = lo + (hi - lo) sigmoid(theta)`` as in Barron's ``AdaptiveLossFunction``.
    table_size : int, default 257
        Points of the log-partition table.
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"
        Voxel-wise convention (sum over channels, mean over voxels).

    Notes
    -----
    Fixed: ``L = mean_voxels sum_c rho(p_c - g_c, alpha, c)``.
    Learnable: ``L = mean_voxels sum_c [rho(p_c - g_c, alpha, c) + log Z(alpha)]``, the NLL
    of ``p(x) = exp(-rho(x, alpha, c)) / (c Z(alpha))`` without the constant ``log c``
    (so L >= 0). ``log Z`` is integrated numerically once (``log_partition_table``) and
    interpolated, instead of Barron's spline approximation.

    References
    ----------
    .. [1] Barron, J. T. (2019). A general and adaptive robust loss function. CVPR 2019,
       pp. 4331-4339. arXiv:1701.03077
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        scale: float = 0.1,
        learnable: bool = False,
        alpha_range: tuple[float, float] = (0.0, 2.0),
        table_size: int = 257,
        include_background: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha):
            raise ValueError(f"alpha must be a real number or +-inf, got {alpha!r}")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 < scale < math.inf
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.learnable = bool(learnable)
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if not self.learnable:
            self.alpha = float(alpha)
            return
        lo, hi = (float(v) for v in alpha_range)
        if not 0 <= lo < hi < math.inf:
            raise ValueError(
                f"alpha_range must be (lo, hi) with 0 <= lo < hi < inf, got {alpha_range!r}"
            )
        if not lo < alpha < hi:
            raise ValueError(
                f"learnable alpha must start strictly inside {alpha_range!r}, got {alpha!r}"
            )
        if isinstance(table_size, bool) or not isinstance(table_size, int) or table_size < 2:
            raise ValueError(f"table_size must be an int >= 2, got {table_size!r}")
        self.alpha_range = (lo, hi)
        u = (alpha - lo) / (hi - lo)
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(u / (1 - u))))
        table = torch.tensor(log_partition_table(lo, hi, table_size), dtype=torch.float64)
        self.register_buffer("log_z_table", table.float(), persistent=False)

    def current_alpha(self) -> Tensor:
        """The shape in use: the fixed alpha, or ``lo + (hi - lo) sigmoid(theta)``."""
        if not self.learnable:
            return torch.tensor(self.alpha)
        lo, hi = self.alpha_range
        return lo + (hi - lo) * torch.sigmoid(self.alpha_logit)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_inputs(logits, target)
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        residual = select_channels(probs - target, self.include_background)
        alpha = self.current_alpha().to(residual)
        terms = barron_rho(residual, alpha, self.scale)
        if self.learnable:
            lo, hi = self.alpha_range
            terms = terms + interpolate_log_partition(alpha, lo, hi, self.log_z_table.to(residual))
        return reduce_voxels(terms, self.reduction)
