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
``"softadapt"``   SoftAdapt on windowed, normalized slopes (``SoftAdapt``, eq. 5.4-5.5)
``"cov"``         coefficient of variations, Welford updates, a floor (``CoVWeighting``, eq. 5.6-5.11)

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
    """SoftAdapt: softmax of the (normalized) loss slopes over a recent window.

    Parameters
    ----------
    n_terms : int
    beta : float, default 3.0
        beta > 0 favours the term that decreases slowest (or grows), beta < 0 the one
        that decreases fastest, beta = 0 gives equal weights (plain variant). With
        normalized slopes (``|ns_i| <= 1`` and ``sum_i |ns_i| = 1``) any two normalized
        slopes differ by at most 1, so beta bounds the ratio of two weights of the plain
        variant: ``w_i / w_j <= exp(beta)``. The default 3 lets that ratio reach
        ``e^3 ~ 20``: with two terms the weights range over ``[0.047, 0.953]``, so a
        stalled term next to a decreasing one gets about 0.95 of the total (the weights
        move), yet the other term keeps about 0.05 of it. Heydari's reference code
        defaults to 0.1, which on normalized slopes confines two weights to
        ``[0.475, 0.525]``, i.e. does not adapt; values of 5-10 let the weights reach
        0.993-0.99995 and, with noisy mini-batch slopes, flip a term on and off from one
        step to the next.
    window : int >= 2, default 5
        Number of most recent values (this step's included) the slope is fitted to.
        ``window=2`` gives Heydari's first-order difference ``L_t - L_{t-1}``.
    variant : {"plain", "loss_weighted"}, default "plain"
        ``"plain"``: eq. 5.4, ``w_i = exp(beta s_i) / sum_l exp(beta s_l)``;
        ``"loss_weighted"``: eq. 5.5, ``w_i = L_i exp(beta s_i) / sum_l L_l exp(beta s_l)``
        with ``L_i`` this step's value (values must be >= 0).
    normalize : bool, default True
        Use Heydari's normalized slopes ``ns_i = s_i / sum_j |s_j|`` (``ns = 0`` when every
        slope is 0) in place of ``s_i``, so that the softmax sees values in [-1, 1] and
        beta means the same whatever the losses' scale.

    Raises
    ------
    ValueError
        For a non-finite beta, a window that is not an int >= 2, or an unknown variant.

    Notes
    -----
    The slope ``s_i`` of term i at step t is the least-squares slope of the line through
    the last ``k = min(t, window)`` values ``L_{t-k+1}, ..., L_t`` against their step
    indices ``0, ..., k-1``:

    ``s = sum_j (j - jbar) L_j / sum_j (j - jbar)^2``, ``jbar = (k - 1) / 2``,

    the first-order difference for k = 2 (Heydari's ``s_t = L_t - L_{t-1}``) and a
    smoother estimate than a single difference or the paper's higher-order forward
    differences when mini-batch losses are noisy (the fitted line averages the noise of
    all k points; a higher-order finite difference amplifies it). At the first step
    ``s = 0`` (equal weights in the plain variant). The softmax is evaluated with the
    maximum subtracted. In the loss-weighted variant all-zero values give equal weights.

    Invariances (plain variant, ``normalize=True``): multiplying every term's values by
    one factor c > 0 leaves the weights unchanged (the slopes scale by c, the normalized
    slopes do not); adding a constant to one term's values leaves them unchanged (slopes
    do not see offsets). Multiplying *one* term's values by c does change them (that
    term's share of ``sum_j |s_j|`` changes), unless the other slopes are all 0. The
    loss-weighted variant keeps the common-scale invariance only.

    References
    ----------
    .. [1] Heydari, A. A., Thompson, C. A., Mehmood, A. (2019). SoftAdapt: techniques for
       adaptive loss weighting of neural networks with multi-part loss functions.
       arXiv:1912.12355 (section 3: normalized slopes, loss-weighted variant).
    .. [2] Hun, A. (2021). Loss functions for medical image segmentation (thesis),
       eq. 5.4-5.5.

    Examples
    --------
    A term that stalls next to one that keeps decreasing gets most of the weight:

    >>> sa = SoftAdapt(2)
    >>> for t in range(5):
    ...     w = sa.update([0.98, 1.0 - 0.05 * t])
    >>> round(w[0], 3)
    0.953
    """

    def __init__(
        self,
        n_terms: int,
        *,
        beta: float = 3.0,
        window: int = 5,
        variant: Literal["plain", "loss_weighted"] = "plain",
        normalize: bool = True,
    ) -> None:
        self.n_terms = _check_n_terms(n_terms)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if variant not in ("plain", "loss_weighted"):
            raise ValueError(f"variant must be 'plain' or 'loss_weighted', got {variant!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.beta, self.window, self.variant = float(beta), window, variant
        self.normalize = normalize
        #: The last ``window`` value vectors, oldest first (plain lists: checkpointable).
        self.history: list[list[float]] = []
        self.slopes: list[float] = [0.0] * n_terms
        self.step = 0
        self.weights: tuple[float, ...] = (1.0 / n_terms,) * n_terms

    def _fit_slopes(self) -> list[float]:
        k = len(self.history)
        if k < 2:
            return [0.0] * self.n_terms
        centre = (k - 1) / 2
        sxx = sum((j - centre) ** 2 for j in range(k))
        return [
            sum((j - centre) * row[i] for j, row in enumerate(self.history)) / sxx
            for i in range(self.n_terms)
        ]

    def update(self, values: Sequence[float]) -> tuple[float, ...]:
        vals = _check_values(values, self.n_terms, nonnegative=self.variant == "loss_weighted")
        self.history = [*self.history, vals][-self.window :]
        self.slopes = self._fit_slopes()
        s = self.slopes
        if self.normalize:
            scale = sum(abs(x) for x in s)
            s = [x / scale for x in s] if scale > 0 else [0.0] * self.n_terms
        top = max(self.beta * x for x in s)
        e = [math.exp(self.beta * x - top) for x in s]
        if self.variant == "loss_weighted":
            e = [v * x for v, x in zip(vals, e, strict=True)]
        total = sum(e)
        self.weights = (
            tuple(x / total for x in e) if total > 0 else (1.0 / self.n_terms,) * self.n_terms
        )
        self.step += 1
        return self.weights


class CoVWeighting:
    """Coefficient-of-variations weighting with Welford running statistics and a floor.

    Parameters
    ----------
    n_terms : int
    min_weight : float in [0, 1 / n_terms] or None, default None
        The floor ``f``: every weight is at least ``f`` (a share of the total, the weights
        summing to 1). None gives ``0.5 / n_terms``: no term's weight falls below half its
        static share ``1 / n_terms``, so a term a rule chose can never be switched off (a
        stalled term, whose ratio barely varies, otherwise gets ``c ~ 0`` and a weight
        near 0; measured: a Tversky term stalled near 0.98 on tiny tumours got 0.02-0.03).
        ``0`` is Groenendijk et al.'s plain weighting; ``1 / n_terms`` gives equal weights.

    Raises
    ------
    ValueError
        If ``min_weight`` is not a number in ``[0, 1 / n_terms]``.

    Notes
    -----
    Per term, at step t (1-based; thesis eq. 5.6-5.11):

    - ratio ``l_t = L_t / mu_L(t-1)`` (eq. 5.7), with ``l_1 = 1``;
    - ``mu_L(t) = (1 - 1/t) mu_L(t-1) + L_t / t`` (5.9);
    - ``mu_l(t) = (1 - 1/t) mu_l(t-1) + l_t / t`` (5.10);
    - ``M_l(t) = (1 - 1/t) M_l(t-1) + (l_t - mu_l(t-1)) (l_t - mu_l(t)) / t`` (5.11), so
      ``sigma_l = sqrt(M_l)`` is the population standard deviation of l_1..l_t;
    - ``c_i = sigma_l / mu_l`` (5.6) and, with M terms and the floor f,

      ``w_i = f + (1 - M f) c_i / sum_k c_k``,

      a mixture of the uniform floor and eq. 5.8's ``c_i / sum_k c_k``: the weights sum to
      1, each is >= f, and their order is that of the ``c_i`` (f = 0 gives eq. 5.8).

    The statistics include the current step before the weights are formed (as eq. 5.8
    reads). While every ``c`` is 0 (the first step, constant losses) the weights are
    equal. Values must be >= 0; a term whose running mean is 0 keeps ``l_t = 1``.

    References
    ----------
    .. [1] Groenendijk, R., Karaoglu, S., Gevers, T., Mensink, T. (2021). Multi-loss
       weighting with coefficient of variations. WACV 2021. arXiv:2009.01717
    .. [2] Welford, B. P. (1962). Note on a method for calculating corrected sums of
       squares and products. Technometrics 4(3), 419-420.
    .. [3] Hun, A. (2021). Loss functions for medical image segmentation (thesis),
       eq. 5.6-5.11.

    Examples
    --------
    A constant (stalled) term keeps the floor, 0.5 / 2 = 0.25, while the other varies:

    >>> cov = CoVWeighting(2)
    >>> for v in (1.0, 2.0, 0.5, 1.5):
    ...     w = cov.update([0.98, v])
    >>> [round(x, 12) for x in w]
    [0.25, 0.75]
    """

    def __init__(self, n_terms: int, *, min_weight: float | None = None) -> None:
        self.n_terms = _check_n_terms(n_terms)
        floor = 0.5 / n_terms if min_weight is None else min_weight
        if (
            isinstance(floor, bool)
            or not isinstance(floor, (int, float))
            or not 0 <= floor <= 1 / n_terms
        ):
            raise ValueError(
                f"min_weight must be a number in [0, 1/n_terms] = [0, {1 / n_terms:g}], "
                f"got {min_weight!r}"
            )
        self.min_weight = float(floor)
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
        f, m = self.min_weight, self.n_terms
        self.weights = (
            tuple(f + (1 - m * f) * c / total for c in covs)
            if total > 0
            else (1.0 / m,) * m
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
