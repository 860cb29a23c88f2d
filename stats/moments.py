"""Mergeable central moments up to order 4, and scipy-compatible skewness and kurtosis.

A :class:`MomentPartial` holds the count, mean, central sums of powers 2-4, minimum and
maximum of a set of values.  Partials of disjoint sets merge exactly (:func:`merge`), so
the statistics of a dataset are computed once per block or case and combined; the
finalisers (:func:`mean`, :func:`variance`, :func:`skew_from_partial`,
:func:`kurtosis_from_partial`) follow ``scipy.stats``' conventions and degenerate cases.

:func:`skew` and :func:`kurtosis` are drop-in replacements of ``scipy.stats.skew`` /
``scipy.stats.kurtosis`` for numpy arrays, computed in one pass from partials; their lazy
counterparts for dask arrays are :func:`stats.dask_graph.skew` and
:func:`stats.dask_graph.kurtosis`. This module does not import dask: the dask adapters
depend on the partial functions here, never the reverse.

Accuracy: every accumulation is in float64 with a two-pass (mean, then centred powers)
scheme inside a block and a mean correction, so results agree with scipy within about
1e-12 relative to ``max(1, |value|)`` on well-conditioned data (the contract is 1e-9).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MomentPartial",
    "kurtosis",
    "kurtosis_from_partial",
    "mean",
    "merge",
    "merge_all",
    "scale_partial",
    "shift_partial",
    "skew",
    "skew_from_partial",
    "std",
    "variance",
]

NanPolicy = Literal["propagate", "omit", "raise"]
_NAN_POLICIES = ("propagate", "omit", "raise")
_EPS = float(np.finfo(np.float64).eps)
#: Elements per block in the blocked 1-D accumulation (2 MiB of float64: stays in cache).
BLOCK_SIZE = 1 << 18
_FIELDS = ("n", "mean", "m2", "m3", "m4", "minimum", "maximum")


# --------------------------------------------------------------------------- partials
@dataclass(frozen=True)
class MomentPartial:
    """Count, mean, central sums of powers 2-4, minimum and maximum of a set of values.

    Partials of disjoint sets merge exactly (:func:`merge`), so statistics of a dataset
    are computed once per block or case and combined in any order.

    Parameters
    ----------
    n : int
        Number of values (>= 0).
    mean : float
        Their mean (0.0 when ``n == 0``).
    m2, m3, m4 : float
        Central sums :math:`M_p = \\sum_i (x_i - \\bar x)^p` for p = 2, 3, 4 (not divided
        by ``n``).
    minimum, maximum : float
        Extremes; ``inf`` and ``-inf`` when ``n == 0``.

    Notes
    -----
    Within one array (:meth:`from_values`) the sums are accumulated in float64 blocks of
    :data:`BLOCK_SIZE` values with two passes (the block mean :math:`c`, then the sums
    :math:`S_p = \\sum (x - c)^p`), corrected for the rounding of :math:`c` with
    :math:`\\delta = S_1 / n`:
    :math:`M_2 = S_2 - n\\delta^2`, :math:`M_3 = S_3 - 3\\delta S_2 + 2n\\delta^3`,
    :math:`M_4 = S_4 - 4\\delta S_3 + 6\\delta^2 S_2 - 3n\\delta^4`; blocks are then
    combined with the exact shift formulas of [1]_.

    References
    ----------
    .. [1] Pébay, P. (2008). Formulas for robust, one-pass parallel computation of
       covariances and arbitrary-order statistical moments. Sandia Report
       SAND2008-6212. doi:10.2172/1028931
    .. [2] Chan, T. F., Golub, G. H., LeVeque, R. J. (1979). Updating formulae and a
       pairwise algorithm for computing sample variances. Stanford CS Tech. Report
       STAN-CS-79-773.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(10.0)
    >>> whole = MomentPartial.from_values(x)
    >>> parts = merge(MomentPartial.from_values(x[:3]), MomentPartial.from_values(x[3:]))
    >>> bool(np.isclose(parts.m4, whole.m4, rtol=1e-14)), parts.n, parts.maximum
    (True, 10, 9.0)
    """

    n: int
    mean: float
    m2: float
    m3: float
    m4: float
    minimum: float = math.inf
    maximum: float = -math.inf

    def __post_init__(self) -> None:
        # Exact int and float pass at once (a dataset's merge builds thousands of these;
        # the abstract-class checks below took most of its time); anything else is
        # checked and converted.
        if type(self.n) is not int:
            if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral):
                raise TypeError(f"MomentPartial.n must be an integer, got {self.n!r}")
            object.__setattr__(self, "n", int(self.n))
        if self.n < 0:
            raise ValueError(f"MomentPartial.n must be >= 0, got {self.n!r}")
        for name in _FIELDS[1:]:
            value = getattr(self, name)
            if type(value) is float:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"MomentPartial.{name} must be a real number, got {value!r}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def empty(cls) -> MomentPartial:
        """The partial of no values: ``n = 0``, zero sums, ``minimum = inf``, ``maximum = -inf``."""
        return cls(0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf)

    @classmethod
    def from_values(cls, values: ArrayLike) -> MomentPartial:
        """Partial of all values of an array (any shape), accumulated in float64.

        Parameters
        ----------
        values : array_like
            Real numbers (integers are converted exactly to float64). NaN propagates
            into every field except ``n``, as in ``scipy.stats`` with
            ``nan_policy="propagate"``.

        Returns
        -------
        MomentPartial
        """
        x = np.asarray(values)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"values must be a real numeric array, got dtype {x.dtype!r}")
        return _partial_from_fields(_blocked_fields(x.ravel()))

    def to_dict(self) -> dict[str, int | float | str]:
        """JSON-safe dict; non-finite floats are written as the strings ``"inf"``,
        ``"-inf"``, ``"nan"``. ``from_dict(p.to_dict()) == p`` exactly (for non-NaN fields)."""
        out: dict[str, int | float | str] = {"n": self.n}
        for name in _FIELDS[1:]:
            out[name] = _encode_float(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MomentPartial:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            If a field is missing or unknown, or a value is not a number.
        """
        missing = [k for k in _FIELDS if k not in d]
        extra = sorted(set(d) - set(_FIELDS))
        if missing or extra:
            raise ValueError(
                f"MomentPartial dict must have exactly the keys {list(_FIELDS)}; "
                f"missing {missing!r}, unknown {extra!r}"
            )
        n = d["n"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"MomentPartial dict field 'n' must be an integer, got {n!r}")
        return cls(int(n), *(_decode_float(name, d[name]) for name in _FIELDS[1:]))


def _encode_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode_float(name: str, value: Any) -> float:
    if type(value) is float:  # what JSON gives, at once
        return value
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"MomentPartial dict field {name!r} must be a number, got {value!r}")
    return float(value)


def merge(a: MomentPartial, b: MomentPartial) -> MomentPartial:
    """Partial of the union of two disjoint sets (pairwise update of Pébay 2008).

    Notes
    -----
    With :math:`n = n_a + n_b` and :math:`\\delta = \\bar x_b - \\bar x_a` ([1]_, eqs. 2.1-2.3):

    .. math::

        M_2 &= M_{2a} + M_{2b} + \\delta^2 n_a n_b / n \\\\
        M_3 &= M_{3a} + M_{3b} + \\delta^3 n_a n_b (n_a - n_b) / n^2
               + 3\\delta (n_a M_{2b} - n_b M_{2a}) / n \\\\
        M_4 &= M_{4a} + M_{4b} + \\delta^4 n_a n_b (n_a^2 - n_a n_b + n_b^2) / n^3
               + 6\\delta^2 (n_a^2 M_{2b} + n_b^2 M_{2a}) / n^2
               + 4\\delta (n_a M_{3b} - n_b M_{3a}) / n

    Merging is commutative and associative up to rounding.

    References
    ----------
    .. [1] Pébay, P. (2008). Formulas for robust, one-pass parallel computation of
       covariances and arbitrary-order statistical moments. SAND2008-6212.
    """
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    na, nb = float(a.n), float(b.n)
    n = na + nb
    delta = b.mean - a.mean
    d_n = delta / n
    m2 = a.m2 + b.m2 + delta * d_n * na * nb
    m3 = a.m3 + b.m3 + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * b.m2 - nb * a.m2)
    m4 = (
        a.m4
        + b.m4
        + delta * d_n * d_n * d_n * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * d_n * d_n * (na * na * b.m2 + nb * nb * a.m2)
        + 4.0 * d_n * (na * b.m3 - nb * a.m3)
    )
    # Weighted mean from the larger side: exact when one side dominates.
    new_mean = a.mean + d_n * nb if na >= nb else b.mean - d_n * na
    return MomentPartial(
        a.n + b.n,
        new_mean,
        max(m2, 0.0),
        m3,
        max(m4, 0.0),
        min(a.minimum, b.minimum),
        max(a.maximum, b.maximum),
    )


def merge_all(partials: Iterable[MomentPartial]) -> MomentPartial:
    """Merge any number of partials with a balanced pairwise tree (rounding grows as log n).

    Returns :meth:`MomentPartial.empty` for an empty iterable.
    """
    level = list(partials)
    for i, p in enumerate(level):
        if not isinstance(p, MomentPartial):
            raise TypeError(f"merge_all: item {i} is {type(p).__name__!r}, not a MomentPartial")
    if not level:
        return MomentPartial.empty()
    while len(level) > 1:
        nxt = [merge(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def scale_partial(p: MomentPartial, factor: float) -> MomentPartial:
    """Exact partial of ``factor * x`` from the partial of ``x``.

    :math:`\\bar x \\to a\\bar x`, :math:`M_p \\to a^p M_p`; minimum and maximum swap
    when ``a < 0``. Used e.g. for log10 moments from ln moments (``a = 1/ln 10``).

    Raises
    ------
    ValueError
        If ``factor`` is not finite.
    """
    a = float(factor)
    if not math.isfinite(a):
        raise ValueError(f"scale_partial: factor must be finite, got {factor!r}")
    if p.n == 0:
        return p
    lo, hi = a * p.minimum, a * p.maximum
    if a < 0:
        lo, hi = hi, lo
    elif a == 0:
        lo = hi = 0.0
    return MomentPartial(p.n, a * p.mean, a * a * p.m2, a**3 * p.m3, a**4 * p.m4, lo, hi)


def shift_partial(p: MomentPartial, offset: float) -> MomentPartial:
    """Exact partial of ``x + offset``: the mean and extremes move, central sums do not.

    Raises
    ------
    ValueError
        If ``offset`` is not finite.
    """
    c = float(offset)
    if not math.isfinite(c):
        raise ValueError(f"shift_partial: offset must be finite, got {offset!r}")
    if p.n == 0:
        return p
    return MomentPartial(p.n, p.mean + c, p.m2, p.m3, p.m4, p.minimum + c, p.maximum + c)


# --------------------------------------------------------------------------- finalisers
def mean(p: MomentPartial) -> float:
    """Mean of the values; NaN when there are none (numpy warns there, we do not)."""
    return p.mean if p.n > 0 else math.nan


def variance(p: MomentPartial, ddof: int = 0) -> float:
    """Variance :math:`M_2 / (n - \\mathrm{ddof})` as ``numpy.var(x, ddof=ddof)``.

    Returns NaN when ``n - ddof <= 0`` (numpy returns NaN or inf with a warning).
    """
    if ddof < 0:
        raise ValueError(f"variance: ddof must be >= 0, got {ddof!r}")
    dof = p.n - ddof
    return p.m2 / dof if dof > 0 else math.nan


def std(p: MomentPartial, ddof: int = 0) -> float:
    """Standard deviation, ``sqrt(variance(p, ddof))``."""
    v = variance(p, ddof)
    return math.sqrt(v) if not math.isnan(v) else math.nan


def skew_from_partial(p: MomentPartial, *, bias: bool = True) -> float:
    """Sample skewness with ``scipy.stats.skew`` conventions.

    Parameters
    ----------
    p : MomentPartial
        Merged partial of the values.
    bias : bool, default True
        If False, return the adjusted Fisher-Pearson coefficient
        :math:`G_1 = g_1 \\sqrt{n(n-1)}/(n-2)`; like scipy, only when ``n > 2``.

    Returns
    -------
    float
        :math:`g_1 = m_3 / m_2^{3/2}` with :math:`m_p = M_p / n`; NaN for no values and
        for (numerically) constant values, by scipy's rule
        :math:`m_2 \\le (\\varepsilon \\bar x)^2`.

    References
    ----------
    .. [1] Joanes, D. N., Gill, C. A. (1998). Comparing measures of sample skewness and
       kurtosis. J. R. Stat. Soc. D 47(1), 183-189. doi:10.1111/1467-9884.00122
    """
    return float(_skew_arrays(*_arrays_of(p)[:4], bias=bias))


def kurtosis_from_partial(p: MomentPartial, *, fisher: bool = True, bias: bool = True) -> float:
    """Sample kurtosis with ``scipy.stats.kurtosis`` conventions.

    Parameters
    ----------
    p : MomentPartial
    fisher : bool, default True
        Subtract 3 (excess kurtosis, 0 for a normal distribution).
    bias : bool, default True
        If False, use the k-statistic estimator
        :math:`\\frac{(n^2-1) m_4/m_2^2 - 3(n-1)^2}{(n-2)(n-3)} + 3`; like scipy, only
        when ``n > 3``.

    Returns
    -------
    float
        :math:`m_4 / m_2^2` (minus 3 if ``fisher``), NaN for no values or constant values
        (scipy's rule :math:`m_2 \\le (\\varepsilon \\bar x)^2`).

    References
    ----------
    .. [1] Joanes, D. N., Gill, C. A. (1998). Comparing measures of sample skewness and
       kurtosis. J. R. Stat. Soc. D 47(1), 183-189. doi:10.1111/1467-9884.00122
    """
    n, mu, m2, _, m4 = _arrays_of(p)
    return float(_kurtosis_arrays(n, mu, m2, m4, fisher=fisher, bias=bias))


def _arrays_of(p: MomentPartial) -> tuple[NDArray[np.float64], ...]:
    return tuple(np.asarray(v, dtype=np.float64) for v in (p.n, p.mean, p.m2, p.m3, p.m4))


def _skew_arrays(
    n: NDArray[np.float64],
    mu: NDArray[np.float64],
    m2: NDArray[np.float64],
    m3: NDArray[np.float64],
    *,
    bias: bool,
) -> NDArray[np.float64]:
    """Vectorised scipy.stats.skew from sums (``n`` as float)."""
    with np.errstate(all="ignore"):
        v2 = m2 / n
        v3 = m3 / n
        zero = (n == 0) | (v2 <= (_EPS * mu) ** 2)
        vals = np.where(zero, np.nan, v3 / v2**1.5)
        if not bias:
            corr = np.sqrt((n - 1.0) * n) / (n - 2.0)
            vals = np.where(~zero & (n > 2), corr * vals, vals)
    return vals


def _kurtosis_arrays(
    n: NDArray[np.float64],
    mu: NDArray[np.float64],
    m2: NDArray[np.float64],
    m4: NDArray[np.float64],
    *,
    fisher: bool,
    bias: bool,
) -> NDArray[np.float64]:
    """Vectorised scipy.stats.kurtosis from sums (``n`` as float)."""
    with np.errstate(all="ignore"):
        v2 = m2 / n
        v4 = m4 / n
        zero = (n == 0) | (v2 <= (_EPS * mu) ** 2)
        vals = np.where(zero, np.nan, v4 / v2**2)
        if not bias:
            adj = (1.0 / (n - 2.0) / (n - 3.0)) * ((n * n - 1.0) * vals - 3.0 * (n - 1.0) ** 2)
            vals = np.where(~zero & (n > 3), adj + 3.0, vals)
    return vals - 3.0 if fisher else vals


# --------------------------------------------------------------------------- array kernels
def _block_fields(y: NDArray[np.float64]) -> tuple[float, ...]:
    """(n, mean, M2, M3, M4, min, max) of one 1-D float64 block, two-pass + correction."""
    n = y.size
    if n == 0:
        return (0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf)
    with np.errstate(all="ignore"):
        c = float(y.sum()) / n
        d = y - c
        d2 = d * d
        s1 = float(d.sum())
        s2 = float(d2.sum())
        # elementwise products + pairwise np.sum, not BLAS dot: as fast in cache, more
        # accurate, and free of BLAS thread wake-ups (which cost ms per call)
        s3 = float(np.multiply(d2, d, out=d).sum())
        s4 = float(np.multiply(d2, d2, out=d2).sum())
        delta = s1 / n
        m2 = max(s2 - s1 * delta, 0.0)
        m3 = s3 - 3.0 * delta * s2 + 2.0 * n * delta**3
        m4 = max(s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * n * delta**4, 0.0)
        return (float(n), c + delta, m2, m3, m4, float(y.min()), float(y.max()))


def _blocked_fields(
    x: NDArray[Any],
    transform: Callable[[NDArray[np.float64]], NDArray[np.floating]] | None = None,
    block_size: int = BLOCK_SIZE,
) -> NDArray[np.float64]:
    """Fields of a 1-D array (any real dtype), block by block, merged exactly.

    Returns a float64 array of shape (7,): n, mean, M2, M3, M4, min, max.
    """
    rows = []
    for start in range(0, max(x.size, 1), block_size):
        y = np.asarray(x[start : start + block_size], dtype=np.float64)
        if transform is not None:
            y = np.asarray(transform(y), dtype=np.float64)
        rows.append(_block_fields(y))
    fields = np.array(rows, dtype=np.float64).T
    return _merge_fields(fields, axis=-1) if fields.shape[1] > 1 else fields[:, 0]


def _partial_from_fields(f: NDArray[np.float64]) -> MomentPartial:
    n = int(f[0])
    if n == 0:
        return MomentPartial.empty()
    return MomentPartial(n, *(float(v) for v in f[1:]))


def _merge_fields(f: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    """Merge k partials stored along ``axis`` of ``f`` (leading dimension = the 7 fields).

    Multi-way form of the shift formulas (Pébay 2008, eq. 3.1): with
    :math:`d_i = \\bar x_i - \\bar x`,
    :math:`M_3 = \\sum_i M_{3,i} + 3 d_i M_{2,i} + n_i d_i^3`,
    :math:`M_4 = \\sum_i M_{4,i} + 4 d_i M_{3,i} + 6 d_i^2 M_{2,i} + n_i d_i^4`.
    """
    n_i, mu_i, m2_i, m3_i, m4_i, lo_i, hi_i = f
    with np.errstate(all="ignore"):
        n = n_i.sum(axis=axis, keepdims=True)
        # centre on the mean of the largest part, so a large offset cancels exactly
        ref = np.take_along_axis(mu_i, np.argmax(n_i, axis=axis, keepdims=True), axis=axis)
        mu = ref + np.where(n > 0, (n_i * (mu_i - ref)).sum(axis=axis, keepdims=True) / n, 0.0)
        d = np.where(n_i > 0, mu_i - mu, 0.0)
        d2 = d * d
        m2 = (m2_i + n_i * d2).sum(axis=axis, keepdims=True)
        m3 = (m3_i + 3.0 * d * m2_i + n_i * d2 * d).sum(axis=axis, keepdims=True)
        m4 = (m4_i + 4.0 * d * m3_i + 6.0 * d2 * m2_i + n_i * d2 * d2).sum(axis=axis, keepdims=True)
        mu = np.where(n > 0, mu, 0.0)
    out = np.stack(
        [n, mu, m2, m3, m4, lo_i.min(axis=axis, keepdims=True), hi_i.max(axis=axis, keepdims=True)]
    )
    return np.squeeze(out, axis=axis if axis < 0 else axis + 1)


def _fields_along_axis(x: NDArray[np.float64], axis: int, *, omit_nan: bool) -> NDArray[np.float64]:
    """Fields (7, *reduced shape with keepdims*) of a float64 array along one axis."""
    with np.errstate(all="ignore"):
        if omit_nan:
            valid = ~np.isnan(x)
            n = valid.sum(axis=axis, keepdims=True).astype(np.float64)
            c = np.where(valid, x, 0.0).sum(axis=axis, keepdims=True) / n
            c = np.where(n > 0, c, 0.0)
            d = np.where(valid, x - c, 0.0)
            lo = np.where(valid, x, np.inf).min(axis=axis, keepdims=True, initial=np.inf)
            hi = np.where(valid, x, -np.inf).max(axis=axis, keepdims=True, initial=-np.inf)
        else:
            n = np.full_like(x.sum(axis=axis, keepdims=True), x.shape[axis], dtype=np.float64)
            c = x.sum(axis=axis, keepdims=True) / n if x.shape[axis] else np.zeros_like(n)
            d = x - c
            lo = x.min(axis=axis, keepdims=True, initial=np.inf)
            hi = x.max(axis=axis, keepdims=True, initial=-np.inf)
            # numpy's min/max propagate NaN; keep that (scipy's 'propagate')
        d2 = d * d
        s1 = d.sum(axis=axis, keepdims=True)
        s2 = d2.sum(axis=axis, keepdims=True)
        s3 = (d2 * d).sum(axis=axis, keepdims=True)
        s4 = (d2 * d2).sum(axis=axis, keepdims=True)
        delta = np.where(n > 0, s1 / n, 0.0)
        m2 = np.maximum(s2 - s1 * delta, 0.0)
        m3 = s3 - 3.0 * delta * s2 + 2.0 * n * delta**3
        m4 = np.maximum(s4 - 4.0 * delta * s3 + 6.0 * delta**2 * s2 - 3.0 * n * delta**4, 0.0)
        # NaN must survive np.maximum's clamp (np.maximum propagates NaN already)
        return np.stack([n, c + delta, m2, m3, m4, lo, hi])


# --------------------------------------------------------------------------- scipy-like API
def _check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {set(_NAN_POLICIES)!r}, got {nan_policy!r}")


def _normalize_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(int(axis), ndim)
    return int(axis) % ndim


def _reject_dask(a: object, name: str) -> None:
    """A dask array would be computed into memory by ``np.asarray``; point to the lazy
    adapter instead (checked by module name: this module does not import dask)."""
    if type(a).__module__.partition(".")[0] == "dask":
        raise TypeError(f"{name}: got a {type(a).__name__!r} from dask; use "
                        f"stats.dask_graph.{name}, the lazy version for dask arrays")


def _skew_of_fields(f: NDArray[np.float64], *, bias: bool) -> NDArray[np.float64]:
    """Skewness of merged fields ``(n, mean, M2, M3, M4, min, max, ...)`` (axis 0)."""
    return _skew_arrays(f[0], f[1], f[2], f[3], bias=bias)


def _kurtosis_of_fields(f: NDArray[np.float64], *, fisher: bool,
                        bias: bool) -> NDArray[np.float64]:
    """Kurtosis of merged fields ``(n, mean, M2, M3, M4, min, max, ...)`` (axis 0)."""
    return _kurtosis_arrays(f[0], f[1], f[2], f[4], fisher=fisher, bias=bias)


def _numpy_stat(
    a: ArrayLike,
    axis: int | None,
    nan_policy: str,
    finalize: Callable[[NDArray[np.float64]], NDArray[np.float64]],
) -> float | NDArray[np.float64]:
    x = np.asarray(a)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"input must be a real numeric array, got dtype {x.dtype!r}")
    x = x.astype(np.float64, copy=False)
    if axis is None:
        x = x.ravel()
        axis = 0
    elif x.ndim == 0:
        x = np.atleast_1d(x)
    axis = _normalize_axis(axis, x.ndim)
    has_nan = nan_policy != "propagate" and bool(np.isnan(x).any())
    if has_nan and nan_policy == "raise":
        raise ValueError("The input contains nan values")
    if x.ndim == 1 and not has_nan:
        fields = _blocked_fields(x)
    elif x.ndim == 1:
        fields = _blocked_fields(x[~np.isnan(x)])
    else:
        moved = np.ascontiguousarray(np.moveaxis(x, axis, -1))
        fields = _fields_along_axis(moved, -1, omit_nan=has_nan)[..., 0]
    out = finalize(fields)
    return float(out) if np.ndim(out) == 0 else out


def skew(
    a: ArrayLike, axis: int | None = 0, bias: bool = True, nan_policy: NanPolicy = "propagate"
) -> Any:
    """Sample skewness, ``scipy.stats.skew`` for numpy arrays, from partials.

    For dask arrays use :func:`stats.dask_graph.skew` (lazy, same arguments).

    Parameters
    ----------
    a : array_like
        Real values (integers are converted to float64).
    axis : int or None, default 0
        Axis along which to compute; None uses all values.
    bias : bool, default True
        If False, the adjusted Fisher-Pearson coefficient (scipy's meaning).
    nan_policy : {"propagate", "omit", "raise"}, default "propagate"
        As in scipy: NaN result, NaNs ignored, or ``ValueError``.

    Returns
    -------
    float or numpy.ndarray
        A float (1-D input or ``axis=None``) or a float64 array.
        Unlike scipy, float32 input is accumulated (and answered) in float64.

    Raises
    ------
    ValueError
        Unknown ``nan_policy``, or NaN in the input with ``nan_policy="raise"``.
    TypeError
        A dask array (use :func:`stats.dask_graph.skew`), or non-numeric input.

    Notes
    -----
    :math:`g_1 = m_3/m_2^{3/2}`; see :func:`skew_from_partial`. Constant input gives NaN
    like scipy (not 0 like ``dask.array.stats.skew``); no warning is emitted.
    """
    _check_nan_policy(nan_policy)
    _reject_dask(a, "skew")
    return _numpy_stat(a, axis, nan_policy, lambda f: _skew_of_fields(f, bias=bias))


def kurtosis(
    a: ArrayLike,
    axis: int | None = 0,
    fisher: bool = True,
    bias: bool = True,
    nan_policy: NanPolicy = "propagate",
) -> Any:
    """Sample kurtosis, ``scipy.stats.kurtosis`` for numpy arrays, from partials.

    For dask arrays use :func:`stats.dask_graph.kurtosis` (lazy, same arguments).

    Parameters
    ----------
    a : array_like
    axis : int or None, default 0
    fisher : bool, default True
        Excess kurtosis (minus 3), 0 for a normal distribution.
    bias : bool, default True
        If False, the k-statistic based estimator (scipy's meaning).
    nan_policy : {"propagate", "omit", "raise"}, default "propagate"

    Returns
    -------
    float or numpy.ndarray
        As :func:`skew`.

    Raises
    ------
    ValueError
        Unknown ``nan_policy``, or NaN in the input with ``nan_policy="raise"``.
    TypeError
        A dask array (use :func:`stats.dask_graph.kurtosis`), or non-numeric input.

    Notes
    -----
    :math:`g_2 = m_4/m_2^2 - 3`; see :func:`kurtosis_from_partial`.
    """
    _check_nan_policy(nan_policy)
    _reject_dask(a, "kurtosis")
    return _numpy_stat(a, axis, nan_policy,
                       lambda f: _kurtosis_of_fields(f, fisher=fisher, bias=bias))
