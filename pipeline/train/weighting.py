"""Weighting of the terms of a compound loss, ``L = sum_i w_i L_i`` (thesis eq. 5.2).

Every method is an object with ``update(values) -> weights``: ``values`` are the
current (detached) values of the M component losses at one training step, as floats;
the result is the tuple of M weights to use at that step. Call ``update`` exactly once
per training step (the ``manifest`` loss does this in its forward pass in training
mode). ``weights`` holds the last result, ``step`` the number of updates so far.

Methods (``build_weighting(method, n_terms, params)``)
------------------------------------------------------
``"static"``      fixed weights (``Static``)
``"rebalance"``   linear schedule of two weights (``Rebalance``, eq. 5.3)
``"softadapt"``   SoftAdapt, plain or loss-weighted (``SoftAdapt``, eq. 5.4-5.5)
``"cov"``         coefficient of variations with Welford updates (``CoVWeighting``, eq. 5.6-5.11)

Equation numbers refer to Hun, A. (2021), Loss functions for medical image segmentation
(thesis), chapter 5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

WEIGHTINGS: tuple[str, ...] = ("static", "rebalance", "softadapt", "cov")


class Weighting(Protocol):
    """What every weighting method provides."""

    n_terms: int
    step: int
    weights: tuple[float, ...]

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        """Take one step's component values, return that step's weights."""
        ...


def _check_values(
    values: Sequence[float], n_terms: int, *, nonnegative: bool = False
) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) != n_terms:
        raise ValueError(f"expected {n_terms} component values, got {len(vals)}: {vals!r}")
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"component value {i} is not finite: {v!r}")
        if nonnegative and v < 0:
            raise ValueError(f"component value {i} must be >= 0 for this weighting, got {v!r}")
    return vals


def _check_n_terms(n_terms: int) -> int:
    if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
        raise ValueError(f"n_terms must be a positive int, got {n_terms!r}")
    return n_terms


class Static:
    """Fixed weights.

    Parameters
    ----------
    n_terms : int
    weights : sequence of float or None, default None
        One weight >= 0 per term; None gives all ones.
    """

    def __init__(self, n_terms: int, *, weights: Sequence[float] | None = None) -> None:
        self.n_terms = _check_n_terms(n_terms)
        w = [1.0] * n_terms if weights is None else [float(v) for v in weights]
        if len(w) != n_terms or any(not (0 <= v < math.inf) for v in w):
            raise ValueError(f"weights must be {n_terms} finite numbers >= 0, got {weights!r}")
        self.weights: tuple[float, ...] = tuple(w)
        self.step = 0

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        _check_values(values, self.n_terms)
        self.step += 1
        return self.weights


class Rebalance:
    """Rebalance strategy: ``L = a_t L_x + (1 - a_t) L_y``, a_t linear in the step.

    Parameters
    ----------
    n_terms : int
        Must be 2.
    alpha_start, alpha_end : float in [0, 1], default 1.0, 0.0
        Weight of the first term at step 1 and from step ``steps`` on.
    steps : int >= 1, default 1000
        Steps over which alpha moves linearly from start to end.

    Notes
    -----
    Thesis eq. 5.3; at step t (1-based)
    ``a_t = start + (end - start) * min((t - 1) / max(steps - 1, 1), 1)``. Kervadec et al.
    start with the region term dominant (first term, a = 1) and move weight to the
    boundary term.

    References
    ----------
    .. [1] Kervadec, H. et al. (2021). Boundary loss for highly unbalanced segmentation.
       Medical Image Analysis 67, 101851. doi:10.1016/j.media.2020.101851
    """

    def __init__(
        self,
        n_terms: int = 2,
        *,
        alpha_start: float = 1.0,
        alpha_end: float = 0.0,
        steps: int = 1000,
    ) -> None:
        if n_terms != 2:
            raise ValueError(f"rebalance weighs exactly 2 terms, got n_terms={n_terms!r}")
        self.n_terms = 2
        for name, v in (("alpha_start", alpha_start), ("alpha_end", alpha_end)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.alpha_start, self.alpha_end, self.steps = float(alpha_start), float(alpha_end), steps
        self.step = 0
        self.weights: tuple[float, ...] = (self.alpha_start, 1 - self.alpha_start)

    def alpha_at(self, t: int) -> float:
        """The first term's weight at step ``t`` (1-based)."""
        frac = min((t - 1) / max(self.steps - 1, 1), 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * frac

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        _check_values(values, 2)
        self.step += 1
        a = self.alpha_at(self.step)
        self.weights = (a, 1 - a)
        return self.weights


class SoftAdapt:
    """SoftAdapt: softmax of the loss slopes.

    Parameters
    ----------
    n_terms : int
    beta : float, default 0.1
        beta > 0 favours the term that decreases slowest (or grows), beta < 0 the one
        that decreases fastest, beta = 0 gives equal weights.
    variant : {"plain", "loss_weighted"}, default "plain"
        ``"plain"``: eq. 5.4, ``w_i = exp(beta s_i) / sum_l exp(beta s_l)``;
        ``"loss_weighted"``: eq. 5.5, ``w_i = L_i exp(beta s_i) / sum_l L_l exp(beta s_l)``
        (values must be >= 0).

    Notes
    -----
    ``s_t^i = L_t^i - L_{t-1}^i`` (Heydari's first-order difference); at the first step
    ``s = 0``. The softmax is evaluated with the maximum subtracted. In the loss-weighted
    variant all-zero values give equal weights.

    References
    ----------
    .. [1] Heydari, A. A., Thompson, C. A., Mehmood, A. (2019). SoftAdapt: techniques for
       adaptive loss weighting of neural networks with multi-part loss functions.
       arXiv:1912.12355
    """

    def __init__(
        self,
        n_terms: int,
        *,
        beta: float = 0.1,
        variant: Literal["plain", "loss_weighted"] = "plain",
    ) -> None:
        self.n_terms = _check_n_terms(n_terms)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta!r}")
        if variant not in ("plain", "loss_weighted"):
            raise ValueError(f"variant must be 'plain' or 'loss_weighted', got {variant!r}")
        self.beta, self.variant = float(beta), variant
        self.previous: list[float] | None = None
        self.step = 0
        self.weights: tuple[float, ...] = (1.0 / n_terms,) * n_terms

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        vals = _check_values(values, self.n_terms, nonnegative=self.variant == "loss_weighted")
        slopes = (
            [0.0] * self.n_terms
            if self.previous is None
            else [v - p for v, p in zip(vals, self.previous, strict=True)]
        )
        top = max(self.beta * s for s in slopes)
        e = [math.exp(self.beta * s - top) for s in slopes]
        if self.variant == "loss_weighted":
            e = [v * x for v, x in zip(vals, e, strict=True)]
        total = sum(e)
        self.weights = (
            tuple(x / total for x in e) if total > 0 else (1.0 / self.n_terms,) * self.n_terms
        )
        self.previous = vals
        self.step += 1
        return self.weights


class CoVWeighting:
    """Coefficient-of-variations weighting with Welford running statistics.

    Parameters
    ----------
    n_terms : int

    Notes
    -----
    Per term, at step t (1-based; thesis eq. 5.6-5.11):

    - ratio ``l_t = L_t / mu_L(t-1)`` (eq. 5.7), with ``l_1 = 1``;
    - ``mu_L(t) = (1 - 1/t) mu_L(t-1) + L_t / t`` (5.9);
    - ``mu_l(t) = (1 - 1/t) mu_l(t-1) + l_t / t`` (5.10);
    - ``M_l(t) = (1 - 1/t) M_l(t-1) + (l_t - mu_l(t-1)) (l_t - mu_l(t)) / t`` (5.11), so
      ``sigma_l = sqrt(M_l)`` is the population standard deviation of l_1..l_t;
    - ``w_i = c_i / sum_k c_k`` with ``c = sigma_l / mu_l`` (5.6, 5.8).

    The statistics include the current step before the weights are formed (as eq. 5.8
    reads). While every ``c`` is 0 (the first step, constant losses) the weights are
    equal. Values must be >= 0; a term whose running mean is 0 keeps ``l_t = 1``.

    References
    ----------
    .. [1] Groenendijk, R., Karaoglu, S., Gevers, T., Mensink, T. (2021). Multi-loss
       weighting with coefficient of variations. WACV 2021. arXiv:2009.01717
    .. [2] Welford, B. P. (1962). Note on a method for calculating corrected sums of
       squares and products. Technometrics 4(3), 419-420.
    """

    def __init__(self, n_terms: int) -> None:
        self.n_terms = _check_n_terms(n_terms)
        self.step = 0
        self.mean_loss = [0.0] * n_terms
        self.mean_ratio = [0.0] * n_terms
        self.m2_ratio = [0.0] * n_terms
        self.last_ratio = [1.0] * n_terms
        self.weights: tuple[float, ...] = (1.0 / n_terms,) * n_terms

    @property
    def std_ratio(self) -> list[float]:
        """Running population standard deviation of the ratios, ``sqrt(M_l)``."""
        return [math.sqrt(max(m, 0.0)) for m in self.m2_ratio]

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        vals = _check_values(values, self.n_terms, nonnegative=True)
        self.step += 1
        t = self.step
        covs = []
        for i, v in enumerate(vals):
            ratio = v / self.mean_loss[i] if t > 1 and self.mean_loss[i] > 0 else 1.0
            self.mean_loss[i] = (1 - 1 / t) * self.mean_loss[i] + v / t
            old_mean = self.mean_ratio[i]
            self.mean_ratio[i] = (1 - 1 / t) * old_mean + ratio / t
            self.m2_ratio[i] = (1 - 1 / t) * self.m2_ratio[i] + (ratio - old_mean) * (
                ratio - self.mean_ratio[i]
            ) / t
            self.last_ratio[i] = ratio
            covs.append(math.sqrt(max(self.m2_ratio[i], 0.0)) / self.mean_ratio[i])
        total = sum(covs)
        self.weights = (
            tuple(c / total for c in covs) if total > 0 else (1.0 / self.n_terms,) * self.n_terms
        )
        return self.weights


def build_weighting(
    method: str, n_terms: int, params: Mapping[str, Any] | None = None
) -> Weighting:
    """Build a weighting object by name (``WEIGHTINGS``) for ``n_terms`` terms.

    Raises
    ------
    ValueError
        Unknown method (the message lists the known ones) or bad parameters.
    """
    params = dict(params or {})
    classes: dict[str, Any] = {
        "static": Static,
        "rebalance": Rebalance,
        "softadapt": SoftAdapt,
        "cov": CoVWeighting,
    }
    if method not in classes:
        raise ValueError(f"unknown weighting method {method!r}; known: {list(WEIGHTINGS)}")
    try:
        return classes[method](n_terms, **params)
    except TypeError as err:
        raise ValueError(f"weighting {method!r}: bad parameters {params!r}: {err}") from err
