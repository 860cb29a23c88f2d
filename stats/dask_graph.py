"""Thin dask adapters: map partial functions over blocks and merge them in a tree.

The dependency goes one way: this module imports :mod:`stats.moments` and
:mod:`stats.histogram`, which do not import dask. :func:`skew` and :func:`kurtosis` are
the lazy, dask-array counterparts of :func:`stats.moments.skew` and
:func:`stats.moments.kurtosis`.

The partial functions themselves (:meth:`stats.moments.MomentPartial.from_values`,
:func:`stats.moments.merge`, :meth:`stats.histogram.HistogramPartial.from_values`,
:func:`stats.histogram.merge`) are plain numpy code tested on numpy; this module only
builds graphs. Every function here is lazy: it returns a ``dask.delayed.Delayed`` or a
``dask.array.Array`` and reads the data once when computed, on whatever scheduler is
active (threads, processes or a distributed cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from numpy.typing import ArrayLike, NDArray

from stats.histogram import HistogramPartial
from stats.histogram import merge as merge_histograms
from stats.moments import (
    MomentPartial,
    NanPolicy,
    _check_nan_policy,
    _fields_along_axis,
    _kurtosis_of_fields,
    _merge_fields,
    _normalize_axis,
    _skew_of_fields,
    merge,
)

__all__ = [
    "histogram_partial",
    "kurtosis",
    "moment_partial",
    "moment_reduction",
    "skew",
    "tree_reduce",
]

T = TypeVar("T")
_DEFAULT_SPLIT = 8


def _check_dask_array(x: object, where: str) -> da.Array:
    if not isinstance(x, da.Array):
        raise TypeError(f"{where}: expected a dask.array.Array, got {type(x).__name__!r}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{where}: expected a real numeric dask array, got dtype {x.dtype!r}")
    return x


def _check_split(split_every: int) -> int:
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    return split_every


def _fold(combine: Callable[[T, T], T], items: Sequence[T]) -> T:
    out = items[0]
    for item in items[1:]:
        out = combine(out, item)
    return out


def tree_reduce(
    parts: Sequence[Delayed],
    combine: Callable[[T, T], T],
    *,
    split_every: int = _DEFAULT_SPLIT,
) -> Delayed:
    """Reduce delayed partials with ``combine`` in a tree of fan-in ``split_every``.

    Parameters
    ----------
    parts : sequence of Delayed
        At least one delayed partial.
    combine : callable
        Associative binary merge, e.g. :func:`stats.moments.merge`.
    split_every : int, default 8
        Number of partials folded per task.

    Returns
    -------
    Delayed
        The merged partial.
    """
    split_every = _check_split(split_every)
    level = list(parts)
    if not level:
        raise ValueError("tree_reduce: got no partials to reduce")
    while len(level) > 1:
        level = [
            dask.delayed(_fold, pure=True)(combine, level[i : i + split_every])
            for i in range(0, len(level), split_every)
        ]
    return level[0]


def moment_partial(x: da.Array, *, split_every: int = _DEFAULT_SPLIT) -> Delayed:
    """Lazy :class:`~stats.moments.MomentPartial` of all values of a dask array.

    One ``MomentPartial.from_values`` task per block, then a merge tree; call
    ``.compute()`` (or pass many of these to one ``dask.compute``) to get the partial.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> moment_partial(da.arange(10.0, chunks=3)).compute(scheduler="sync").n
    10
    """
    x = _check_dask_array(x, "moment_partial")
    blocks = x.to_delayed().ravel()
    parts = [dask.delayed(MomentPartial.from_values, pure=True)(b) for b in blocks]
    if len(parts) == 1:
        return parts[0]
    return tree_reduce(parts, merge, split_every=split_every)


def histogram_partial(
    x: da.Array, edges: ArrayLike, *, split_every: int = _DEFAULT_SPLIT
) -> Delayed:
    """Lazy :class:`~stats.histogram.HistogramPartial` of all values of a dask array."""
    x = _check_dask_array(x, "histogram_partial")
    e = np.asarray(edges, dtype=np.float64)
    blocks = x.to_delayed().ravel()
    parts = [dask.delayed(HistogramPartial.from_values, pure=True)(b, e) for b in blocks]
    if len(parts) == 1:
        return parts[0]
    return tree_reduce(parts, merge_histograms, split_every=split_every)


# ----------------------------------------------------------------- vectorised reduction
def _flatten(parts: Any) -> list[NDArray[np.float64]]:
    if isinstance(parts, list):
        return [leaf for p in parts for leaf in _flatten(p)]
    return [parts]


def _chunk(
    x: NDArray[Any], axis: tuple[int, ...], keepdims: bool, *, nan_policy: str
) -> NDArray[np.float64]:
    """Fields (7, *block shape with 1 on the reduced axes*) of one block."""
    y = np.asarray(x, dtype=np.float64)
    if nan_policy == "raise" and np.isnan(y).any():
        raise ValueError("The input contains nan values")
    kept = [i for i in range(y.ndim) if i not in axis]
    moved = np.moveaxis(y, list(axis), list(range(y.ndim - len(axis), y.ndim)))
    flat = np.ascontiguousarray(moved).reshape(*(y.shape[i] for i in kept), -1)
    f = _fields_along_axis(flat, -1, omit_nan=nan_policy == "omit")[..., 0]
    return np.expand_dims(f, tuple(a + 1 for a in axis))


def _combine(parts: Any, axis: tuple[int, ...], keepdims: bool) -> NDArray[np.float64]:
    # every leaf belongs to the same output block, so they merge elementwise
    leaves = _flatten(parts)
    if len(leaves) == 1:
        return leaves[0]
    return _merge_fields(np.stack(leaves, axis=-1), axis=-1)


def _aggregate(
    parts: Any,
    axis: tuple[int, ...],
    keepdims: bool,
    *,
    finalize: Callable[[NDArray[np.float64]], NDArray[np.float64]],
) -> NDArray[np.float64]:
    f = _combine(parts, axis, keepdims)
    out = np.asarray(finalize(f), dtype=np.float64)
    return out if keepdims else np.squeeze(out, axis=axis)


def moment_reduction(
    x: da.Array,
    finalize: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    *,
    axis: int | None = None,
    nan_policy: str = "propagate",
    split_every: int | None = None,
) -> da.Array:
    """Lazy reduction of a dask array to a statistic of its moments along ``axis``.

    Parameters
    ----------
    x : dask.array.Array
        Real values; each block is converted to float64.
    finalize : callable
        Maps the merged fields, a float64 array of shape ``(7, ...)`` holding
        ``n, mean, M2, M3, M4, min, max``, to the statistic (e.g. scipy's skewness).
    axis : int or None
        Reduced axis; None reduces all axes (0-d result).
    nan_policy : {"propagate", "omit", "raise"}
        "raise" raises ``ValueError`` at compute time when a block holds NaN.
    split_every : int, optional
        Fan-in of dask's reduction tree.

    Returns
    -------
    dask.array.Array
        float64, with the reduced axis removed. One pass over the data: one task per
        block computes its partial, a tree merges them with the shift formulas of
        Pébay (2008), and the root finalises.
    """
    x = _check_dask_array(x, "moment_reduction")
    if x.ndim == 0:
        x = x.reshape(1)
    axes = tuple(range(x.ndim)) if axis is None else (_normalize_axis(axis, x.ndim),)
    meta = np.empty((0,) * (x.ndim - len(axes)), dtype=np.float64)
    return da.reduction(
        x,
        chunk=_bind(_chunk, nan_policy=nan_policy),
        aggregate=_bind(_aggregate, finalize=finalize),
        combine=_combine,
        axis=axes,
        keepdims=False,
        dtype=np.float64,
        split_every=split_every,
        concatenate=False,
        meta=meta,
        name="moment-reduction",
    )


def skew(
    a: da.Array, axis: int | None = 0, bias: bool = True, nan_policy: NanPolicy = "propagate"
) -> da.Array:
    """Lazy sample skewness of a dask array, with ``scipy.stats.skew``'s arguments and
    results (:func:`stats.moments.skew` for numpy arrays).

    Parameters
    ----------
    a : dask.array.Array
        Real values (each block is converted to float64).
    axis : int or None, default 0
        Axis along which to compute; None uses all values.
    bias : bool, default True
        If False, the adjusted Fisher-Pearson coefficient (scipy's meaning).
    nan_policy : {"propagate", "omit", "raise"}, default "propagate"
        As in scipy: NaN result, NaNs ignored, or ``ValueError`` (raised at compute time).

    Returns
    -------
    dask.array.Array
        Lazy float64 (0-d for ``axis=None`` or 1-D input) built from per-block partials
        merged in a tree (one pass over the data, `moment_reduction`); call ``.compute()``.

    Raises
    ------
    ValueError
        Unknown ``nan_policy``.
    TypeError
        ``a`` is not a real numeric dask array.

    Notes
    -----
    :math:`g_1 = m_3/m_2^{3/2}`; see :func:`stats.moments.skew_from_partial`. Constant
    input gives NaN like scipy (not 0 like ``dask.array.stats.skew``).
    """
    _check_nan_policy(nan_policy)
    return moment_reduction(_check_dask_array(a, "skew"),
                            lambda f: _skew_of_fields(f, bias=bias),
                            axis=axis, nan_policy=nan_policy)


def kurtosis(
    a: da.Array,
    axis: int | None = 0,
    fisher: bool = True,
    bias: bool = True,
    nan_policy: NanPolicy = "propagate",
) -> da.Array:
    """Lazy sample kurtosis of a dask array, with ``scipy.stats.kurtosis``'s arguments
    and results (:func:`stats.moments.kurtosis` for numpy arrays).

    Parameters
    ----------
    a : dask.array.Array
    axis : int or None, default 0
    fisher : bool, default True
        Excess kurtosis (minus 3), 0 for a normal distribution.
    bias : bool, default True
        If False, the k-statistic based estimator (scipy's meaning).
    nan_policy : {"propagate", "omit", "raise"}, default "propagate"

    Returns
    -------
    dask.array.Array
        As :func:`skew`.

    Raises
    ------
    ValueError
        Unknown ``nan_policy``.
    TypeError
        ``a`` is not a real numeric dask array.

    Notes
    -----
    :math:`g_2 = m_4/m_2^2 - 3`; see :func:`stats.moments.kurtosis_from_partial`.
    """
    _check_nan_policy(nan_policy)
    return moment_reduction(_check_dask_array(a, "kurtosis"),
                            lambda f: _kurtosis_of_fields(f, fisher=fisher, bias=bias),
                            axis=axis, nan_policy=nan_policy)


def _bind(func: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    def bound(*args: Any, **kw: Any) -> Any:
        kw.pop("computing_meta", None)
        return func(*args, **kwargs, **kw)

    bound.__name__ = func.__name__
    return bound
