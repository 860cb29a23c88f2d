"""The per-volume kernel: moments (and histograms) of every region of one volume.

:func:`region_partials` is the numpy kernel the dataset engine calls once per (case,
channel) volume when the fused compiled kernel (`stats.fused`) is not used
(``XRAI_STATS_KERNEL=numpy``, numba missing, a region holding NaN or ±inf), and the
reference that kernel is tested against. It reads ``values`` and ``codes`` once, gathers
each region's values, and accumulates their float64 moments block by block in
cache-sized pieces (two-pass inside each block, exact shift-formula merge across
blocks), optionally for transformed values too (ln, log10, ...) and with fixed-edge
histograms.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from stats.histogram import HistogramPartial, _check_edges
from stats.histogram import merge as merge_histograms
from stats.moments import (
    BLOCK_SIZE,
    MomentPartial,
    _block_fields,
    _merge_fields,
    _partial_from_fields,
)

__all__ = ["IDENTITY", "RegionPartials", "region_partials"]

#: Name of the untransformed values in :class:`RegionPartials`.
IDENTITY = "identity"
#: Above this many region codes, regions are gathered with one stable sort of the codes
#: instead of one comparison pass per code.
_MAX_CODES_BY_MASK = 16

Transform = Callable[[NDArray[np.float64]], NDArray[np.floating]]


@dataclass(frozen=True)
class RegionPartials:
    """Per-region partials of one volume, for the raw values and each transform.

    Attributes
    ----------
    codes : tuple of int
        The region codes, ``1 .. n_codes - 1`` (every code is present; a code with no
        voxel has :meth:`MomentPartial.empty`).
    moments : Mapping[str, Mapping[int, MomentPartial]]
        ``moments[name][code]``; ``name`` is ``"identity"`` or a transform name. The
        partials carry count, mean, M2-M4, minimum and maximum.
    histograms : Mapping[str, Mapping[int, HistogramPartial]]
        ``histograms[name][code]`` for the names that were given edges (else empty).

    ``result[name]`` is ``result.moments[name]``, so ``result["identity"][1]`` works.
    """

    codes: tuple[int, ...]
    moments: Mapping[str, Mapping[int, MomentPartial]]
    histograms: Mapping[str, Mapping[int, HistogramPartial]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def __getitem__(self, name: str) -> Mapping[int, MomentPartial]:
        try:
            return self.moments[name]
        except KeyError:
            raise KeyError(
                f"no partials named {name!r}; available: {sorted(self.moments)!r}"
            ) from None


def _check_inputs(
    values: ArrayLike, codes: ArrayLike, n_codes: int, *, check_range: bool = True
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Flat views of values and codes, checked; ``check_range=False`` leaves the code range
    to the caller (the fused kernel checks it in its own pass, saving two reads)."""
    v = np.asarray(values)
    c = np.asarray(codes)
    if v.dtype.kind not in "biuf":
        raise TypeError(f"values must be a real numeric array, got dtype {v.dtype!r}")
    if c.dtype.kind == "b":
        c = c.view(np.uint8)
    if c.dtype.kind not in "iu":
        raise TypeError(f"codes must be an integer (or bool) array, got dtype {c.dtype!r}")
    if v.shape != c.shape:
        raise ValueError(f"values have shape {v.shape!r} but codes have shape {c.shape!r}")
    if isinstance(n_codes, bool) or not isinstance(n_codes, numbers.Integral) or n_codes < 1:
        raise ValueError(f"n_codes must be an integer >= 1, got {n_codes!r}")
    if check_range and c.size:
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= n_codes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"codes must lie in [0, {n_codes - 1}] (n_codes={n_codes}), found {bad!r}"
            )
    return v.ravel(), c.ravel()


def _check_transforms(transforms: Mapping[str, Transform] | None) -> dict[str, Transform | None]:
    out: dict[str, Transform | None] = {IDENTITY: None}
    for name, func in (transforms or {}).items():
        if name == IDENTITY:
            raise ValueError(f"transform name {IDENTITY!r} is reserved for the raw values")
        if not callable(func):
            raise TypeError(f"transform {name!r} must be callable, got {type(func).__name__!r}")
        out[name] = func
    return out


def _check_edge_map(
    edges: ArrayLike | Mapping[str, ArrayLike] | None, names: Mapping[str, Any]
) -> dict[str, NDArray[np.float64]]:
    if edges is None:
        return {}
    if not isinstance(edges, Mapping):
        return {IDENTITY: _check_edges(edges)}
    unknown = sorted(set(edges) - set(names))
    if unknown:
        raise ValueError(f"edges given for unknown names {unknown!r}; known: {sorted(names)!r}")
    return {name: _check_edges(e) for name, e in edges.items()}


def _apply(name: str, func: Transform, y: NDArray[np.float64]) -> NDArray[np.float64]:
    z = np.asarray(func(y), dtype=np.float64)
    if z.shape != y.shape:
        raise ValueError(
            f"transform {name!r} must be elementwise: input shape {y.shape!r}, output {z.shape!r}"
        )
    return z


def _region(
    sel: NDArray[Any],
    names: Mapping[str, Transform | None],
    edge_map: Mapping[str, NDArray[np.float64]],
    block_size: int,
) -> tuple[dict[str, MomentPartial], dict[str, HistogramPartial]]:
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    hists = {name: HistogramPartial.empty(e) for name, e in edge_map.items()}
    for start in range(0, sel.size, block_size):
        y = np.asarray(sel[start : start + block_size], dtype=np.float64)
        for name, func in names.items():
            z = y if func is None else _apply(name, func, y)
            rows[name].append(_block_fields(z))
            if name in hists:
                hists[name] = merge_histograms(
                    hists[name], HistogramPartial.from_values(z, edge_map[name])
                )
    moments = {}
    for name, r in rows.items():
        if not r:
            moments[name] = MomentPartial.empty()
            continue
        f = np.array(r, dtype=np.float64).T
        moments[name] = _partial_from_fields(_merge_fields(f, axis=-1) if len(r) > 1 else f[:, 0])
    return moments, hists


def region_partials(
    values: ArrayLike,
    codes: ArrayLike,
    n_codes: int,
    transforms: Mapping[str, Transform] | None = None,
    *,
    edges: ArrayLike | Mapping[str, ArrayLike] | None = None,
    block_size: int = BLOCK_SIZE,
) -> RegionPartials:
    """Moment (and histogram) partials of every region of one volume, in one read.

    Parameters
    ----------
    values : array_like of real numbers
        One volume (e.g. 155×240×240 float32); converted to float64 block by block.
    codes : array_like of int or bool, same shape
        Region of each voxel: 0 = ignored, ``1 .. n_codes - 1`` = region codes.
    n_codes : int
        One more than the largest region code.
    transforms : Mapping[str, callable], optional
        ``name -> elementwise function`` on float64 arrays (e.g.
        ``{"ln": lambda x: np.log(x + 1.0)}``); partials of the transformed values are
        computed from the same in-memory gather. ``"identity"`` is reserved.
    edges : array_like or Mapping[str, array_like], optional
        Histogram edges: one array for the raw values, or a mapping from
        ``"identity"``/transform names to edges.
    block_size : int, default 262144
        Values per accumulation block (2 MiB of float64).

    Returns
    -------
    RegionPartials
        ``result.moments[name][code]`` (also ``result[name][code]``) and
        ``result.histograms[name][code]``.

    Raises
    ------
    TypeError
        Non-numeric values, non-integer codes, non-callable transform.
    ValueError
        Shape mismatch, a code outside ``[0, n_codes - 1]``, reserved or unknown names,
        invalid edges, a transform that changes the shape.

    Notes
    -----
    NaN values propagate into their region's partial (scipy's 'propagate'). Each
    region's partial equals :meth:`MomentPartial.from_values` of its values, so it agrees
    with scipy.stats on them within the module's 1e-9 contract.
    """
    v, c = _check_inputs(values, codes, n_codes)
    names = _check_transforms(transforms)
    edge_map = _check_edge_map(edges, names)
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    region_codes = tuple(range(1, int(n_codes)))
    moments: dict[str, dict[int, MomentPartial]] = {name: {} for name in names}
    hists: dict[str, dict[int, HistogramPartial]] = {name: {} for name in edge_map}

    def gathered() -> Any:
        if len(region_codes) <= _MAX_CODES_BY_MASK:
            for code in region_codes:
                yield code, v[c == code]
            return
        order = np.argsort(c, kind="stable")  # radix sort for small integer dtypes
        bounds = np.concatenate([[0], np.cumsum(np.bincount(c, minlength=n_codes))])
        for code in region_codes:
            yield code, v[order[bounds[code] : bounds[code + 1]]]

    for code, sel in gathered():
        m, h = _region(sel, names, edge_map, int(block_size))
        for name in names:
            moments[name][code] = m[name]
        for name in edge_map:
            hists[name][code] = h[name]
    return RegionPartials(
        region_codes,
        MappingProxyType({k: MappingProxyType(d) for k, d in moments.items()}),
        MappingProxyType({k: MappingProxyType(d) for k, d in hists.items()}),
    )
