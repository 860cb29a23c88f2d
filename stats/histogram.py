"""Mergeable fixed-edge histograms and percentiles read from them.

A :class:`HistogramPartial` counts values in fixed bins (numpy's convention: half-open
``[e_i, e_{i+1})`` bins, the last one closed), plus the values below the first edge
(``underflow``), above the last (``overflow``) and NaNs (``n_nan``). Histograms with the
same edges merge by adding counts, exactly and in any order. :func:`percentile` reads
percentiles from the counts with a proven error bound against ``numpy.percentile``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["HistogramPartial", "fixed_edges", "merge", "percentile"]

_KEYS = ("edges", "counts", "underflow", "overflow", "n_nan")


def fixed_edges(low: float, high: float, bins: int) -> NDArray[np.float64]:
    """``bins + 1`` equally spaced edges from ``low`` to ``high`` (``numpy.linspace``).

    Raises
    ------
    ValueError
        If ``low``/``high`` are not finite with ``low < high``, or ``bins < 1``.
    """
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"fixed_edges: bins must be an integer >= 1, got {bins!r}")
    lo, hi = float(low), float(high)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"fixed_edges: need finite low < high, got low={low!r}, high={high!r}")
    return np.linspace(lo, hi, int(bins) + 1)


def _readonly(a: NDArray[Any]) -> NDArray[Any]:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _check_edges(edges: ArrayLike) -> NDArray[np.float64]:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ValueError(
            f"histogram edges must be a 1-D array of >= 2 values, got shape {e.shape!r}"
        )
    if not np.all(np.isfinite(e)):
        raise ValueError(f"histogram edges must be finite, got {e[~np.isfinite(e)][:3]!r}")
    if not np.all(np.diff(e) > 0):
        i = int(np.argmin(np.diff(e)))
        raise ValueError(
            f"histogram edges must increase strictly, got edges[{i}]={e[i]!r} >= edges[{i + 1}]={e[i + 1]!r}"
        )
    return e


@dataclass(frozen=True, eq=False)
class HistogramPartial:
    """Counts of values in fixed bins, mergeable by addition.

    Parameters
    ----------
    edges : array_like of float, shape (bins + 1,)
        Strictly increasing finite edges; bin ``i`` is ``[edges[i], edges[i+1])``, the
        last bin includes ``edges[-1]`` (numpy.histogram's convention).
    counts : array_like of int, shape (bins,)
    underflow, overflow : int
        Number of values below ``edges[0]`` / above ``edges[-1]``.
    n_nan : int
        Number of NaN values (ignored by :func:`percentile`, like ``numpy.nanpercentile``).

    Stored arrays are read-only copies (float64 edges, int64 counts); equality compares
    them exactly.
    """

    edges: NDArray[np.float64]
    counts: NDArray[np.int64]
    underflow: int = 0
    overflow: int = 0
    n_nan: int = 0

    def __post_init__(self) -> None:
        e = _check_edges(self.edges)
        c = np.asarray(self.counts)
        if c.shape != (e.size - 1,):
            raise ValueError(
                f"histogram counts must have shape ({e.size - 1},) for {e.size} edges, got {c.shape!r}"
            )
        if c.size and (c.dtype.kind not in "iu" or c.min() < 0):
            raise ValueError(
                f"histogram counts must be non-negative integers, got dtype {c.dtype!r}"
            )
        object.__setattr__(self, "edges", _readonly(e))
        object.__setattr__(self, "counts", _readonly(c.astype(np.int64)))
        for name in ("underflow", "overflow", "n_nan"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"HistogramPartial.{name} must be an integer >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))

    @classmethod
    def _unchecked(cls, edges: NDArray[np.float64], counts: NDArray[np.int64], underflow: int,
                   overflow: int, n_nan: int) -> HistogramPartial:
        """A histogram from parts that are already valid (`merge`: the edges of a
        checked histogram, a new array of the sums of two checked counts), without the
        checks and copies of the constructor: a dataset's merge makes thousands."""
        h = object.__new__(cls)
        counts.setflags(write=False)
        for name, value in (("edges", edges), ("counts", counts), ("underflow", underflow),
                            ("overflow", overflow), ("n_nan", n_nan)):
            object.__setattr__(h, name, value)
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistogramPartial):
            return NotImplemented
        return (
            np.array_equal(self.edges, other.edges)
            and np.array_equal(self.counts, other.counts)
            and (self.underflow, self.overflow, self.n_nan)
            == (other.underflow, other.overflow, other.n_nan)
        )

    def __hash__(self) -> int:
        return hash(
            (self.edges.tobytes(), self.counts.tobytes(), self.underflow, self.overflow, self.n_nan)
        )

    @property
    def total(self) -> int:
        """Number of non-NaN values counted (including under- and overflow)."""
        return int(self.counts.sum()) + self.underflow + self.overflow

    @classmethod
    def empty(cls, edges: ArrayLike) -> HistogramPartial:
        """Histogram of no values over ``edges``."""
        e = _check_edges(edges)
        return cls(e, np.zeros(e.size - 1, dtype=np.int64))

    @classmethod
    def from_values(cls, values: ArrayLike, edges: ArrayLike) -> HistogramPartial:
        """Histogram of all values of an array (any shape) over ``edges``.

        Counts equal ``numpy.histogram(values, edges)`` for the values within the edges.
        Equally spaced edges use an O(1) bin computation per value (then corrected
        against the edges exactly); others use a binary search.
        """
        e = _check_edges(edges)
        x = np.asarray(values)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"values must be a real numeric array, got dtype {x.dtype!r}")
        x = x.ravel()
        bins = e.size - 1
        with np.errstate(invalid="ignore"):
            nan = np.isnan(x) if x.dtype.kind == "f" else np.zeros(x.shape, dtype=bool)
            under = x < e[0]
            over = x > e[-1]
        inside = ~(nan | under | over)
        y = np.asarray(x[inside] if not inside.all() else x, dtype=np.float64)
        counts = np.bincount(_bin_index(y, e), minlength=bins).astype(np.int64)
        return cls(e, counts, int(under.sum()), int(over.sum()), int(nan.sum()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of floats and ints); :meth:`from_dict` restores it exactly."""
        return {
            "edges": [float(v) for v in self.edges],
            "counts": [int(v) for v in self.counts],
            "underflow": self.underflow,
            "overflow": self.overflow,
            "n_nan": self.n_nan,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HistogramPartial:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            If keys are missing or unknown, or a value is invalid.
        """
        missing = [k for k in _KEYS if k not in d]
        extra = sorted(set(d) - set(_KEYS))
        if missing or extra:
            raise ValueError(
                f"HistogramPartial dict must have exactly the keys {list(_KEYS)}; "
                f"missing {missing!r}, unknown {extra!r}"
            )
        return cls(
            np.asarray(d["edges"], dtype=np.float64),
            np.asarray(d["counts"], dtype=np.int64),
            d["underflow"],
            d["overflow"],
            d["n_nan"],
        )


def _dyadic_from_zero(e: NDArray[np.float64]) -> bool:
    """Whether the edges are exactly ``i * w`` for a power of two ``w`` (the engine's)."""
    w = float(e[1]) if e.size > 1 else 0.0
    return (e[0] == 0.0 and w > 0.0 and math.frexp(w)[0] == 0.5
            and bool(np.array_equal(e, np.arange(e.size, dtype=np.float64) * w)))


def _bin_index(y: NDArray[np.float64], e: NDArray[np.float64]) -> NDArray[np.intp]:
    """Bin of each value in ``[e[0], e[-1]]`` (numpy.histogram's convention)."""
    bins = e.size - 1
    if _dyadic_from_zero(e):
        # edges i * 2**k: y * 2**-k is exact, so its floor is the bin with no correction
        idx = (y * (1.0 / e[1])).astype(np.intp)
        np.minimum(idx, bins - 1, out=idx)  # values equal to the last edge
        return idx
    width = np.diff(e)
    if np.allclose(width, (e[-1] - e[0]) / bins, rtol=1e-9, atol=0.0):
        # estimate is off by at most one bin; the two comparisons make it exact
        idx = ((y - e[0]) * (bins / (e[-1] - e[0]))).astype(np.intp)
        np.clip(idx, 0, bins - 1, out=idx)
        idx -= y < e[idx]
        idx += (y >= e[idx + 1]) & (idx < bins - 1)
        return idx
    idx = np.searchsorted(e, y, side="right") - 1
    idx[idx == bins] = bins - 1  # values equal to the last edge
    return idx


def merge(a: HistogramPartial, b: HistogramPartial) -> HistogramPartial:
    """Histogram of the union of two sets: counts add (exact, commutative, associative).

    Raises
    ------
    ValueError
        If the two histograms do not have identical edges.
    """
    if not np.array_equal(a.edges, b.edges):
        raise ValueError(
            f"cannot merge histograms with different edges: {a.edges.size} edges "
            f"[{a.edges[0]!r} .. {a.edges[-1]!r}] vs {b.edges.size} edges [{b.edges[0]!r} .. {b.edges[-1]!r}]"
        )
    return HistogramPartial._unchecked(
        a.edges,
        a.counts + b.counts,
        a.underflow + b.underflow,
        a.overflow + b.overflow,
        a.n_nan + b.n_nan,
    )


def percentile(
    h: HistogramPartial,
    q: ArrayLike,
    *,
    outside: Literal["nan", "raise", "clip"] = "nan",
) -> float | NDArray[np.float64]:
    """Percentiles read from a histogram, consistent with ``numpy.percentile`` ('linear').

    Parameters
    ----------
    h : HistogramPartial
    q : float or array_like of float
        Percentiles in [0, 100].
    outside : {"nan", "raise", "clip"}, default "nan"
        What to return when a needed order statistic lies in the under- or overflow
        (its value is unknown): NaN, a ``ValueError``, or the nearest edge (then the
        error bound below does not hold).

    Returns
    -------
    float or ndarray
        NaN for an empty histogram.

    Notes
    -----
    numpy's 'linear' percentile of ``N`` sorted values is
    :math:`x_{(a)} + f\\,(x_{(a+1)} - x_{(a)})` with :math:`h = (N-1)q/100`,
    :math:`a = \\lfloor h \\rfloor`, :math:`f = h - a`. Here each order statistic
    :math:`x_{(k)}` is replaced by its estimate inside the bin ``j`` that holds it,
    :math:`\\hat x_{(k)} = e_j + w_j (k - C_j + 1/2)/c_j` (``C_j`` values lie below
    bin ``j``, ``c_j`` in it, width ``w_j``), then interpolated the same way.

    **Error bound.** :math:`x_{(k)}` and :math:`\\hat x_{(k)}` lie in the same closed
    bin, so :math:`|\\hat x_{(k)} - x_{(k)}| \\le w_j (1 - 1/(2c_j)) < w_j`, and the
    result differs from ``numpy.percentile`` by at most
    :math:`(1-f) w_{j_a} + f w_{j_b} \\le \\max(w_{j_a}, w_{j_b})`: less than one bin
    width for equal bins (plus float rounding), whatever the data, including empty bins
    between the two order statistics. It holds whenever the needed order statistics are
    inside the edges (always when ``underflow == overflow == 0``).
    """
    if outside not in ("nan", "raise", "clip"):
        raise ValueError(f"outside must be 'nan', 'raise' or 'clip', got {outside!r}")
    qa = np.asarray(q, dtype=np.float64)
    if np.any(~np.isfinite(qa)) or np.any((qa < 0) | (qa > 100)):
        raise ValueError(f"percentiles must be in [0, 100], got {q!r}")
    n = h.total
    if n == 0:
        res = np.full(qa.shape, np.nan)
        return float(res) if res.ndim == 0 else res
    below = np.concatenate([[h.underflow], h.underflow + np.cumsum(h.counts)])  # C_j
    pos = (n - 1) * qa / 100.0
    a = np.floor(pos).astype(np.int64)
    f = pos - a
    b = np.minimum(a + 1, n - 1)
    xa, out_a = _order_statistic(h, below, a, outside)
    xb, out_b = _order_statistic(h, below, b, outside)
    with np.errstate(invalid="ignore"):
        res = np.where(f > 0, xa + f * (xb - xa), xa)
    bad = out_a | ((f > 0) & out_b)
    if outside == "raise" and bad.any():
        raise ValueError(
            f"percentile(s) {qa[bad].tolist()!r} fall outside the histogram edges "
            f"[{h.edges[0]!r}, {h.edges[-1]!r}] (underflow={h.underflow}, overflow={h.overflow})"
        )
    if outside == "nan":
        res = np.where(bad, np.nan, res)
    return float(res) if res.ndim == 0 else res


def _order_statistic(
    h: HistogramPartial, below: NDArray[np.int64], k: NDArray[np.int64], outside: str
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Estimate of the k-th (0-based) smallest value, and whether it is out of the edges."""
    low = k < h.underflow
    high = k >= below[-1]
    j = np.clip(np.searchsorted(below, k, side="right") - 1, 0, h.counts.size - 1)
    c = h.counts[j]
    w = h.edges[j + 1] - h.edges[j]
    with np.errstate(invalid="ignore", divide="ignore"):
        est = h.edges[j] + w * (k - below[j] + 0.5) / c
    est = np.where(low, h.edges[0], np.where(high, h.edges[-1], est))
    return est, low | high
