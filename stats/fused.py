"""The fused per-volume kernel (issue 14, item 1): one compiled pass over a volume.

:func:`region_partials` returns what :func:`stats.kernels.region_partials` returns for
the engine's candidates (identity; ln with an offset and arcsin-sqrt with a scale, of the
values clamped to ``[0, scale]``; log10 is derived from ln by the caller) and a histogram
of the raw values, but reads each voxel once: it classifies the voxel by its region code
and appends the value to that code's block buffer; a full buffer (:data:`BLOCK` values,
in cache) gets its histogram bins counted and its moment fields computed for the raw
values and every candidate, merged into the code's running partials. No per-region
gather, no array of the volume's size per transform, no second read of the codes.

The compiled code is numba's (``@njit(cache=True, nogil=True)``): numba is the
well-kept way to compiled loops from Python without a build step of our own, and the
kernel is plain loops over float64 scalars. :func:`available` says whether it can be
used; ``XRAI_STATS_KERNEL=numpy`` forces the numpy path (`stats.kernels.region_partials`),
which stays the reference the tests compare this kernel with. ``cache=True`` writes the
machine code next to this module (numba's ``__pycache__``; ``NUMBA_CACHE_DIR`` moves
it): the first process compiles (~3 s), every later one, Dask workers included, loads it
once (~0.3 s).

Exactness
---------
Every sum is in float64; the 1e-9 contract against scipy holds with margin:

- *one shift per (code, candidate)*: the first block's mean ``k``. Every value enters
  as ``y - k``, which is exact for values within a factor 2 of ``k`` (Sterbenz), so an
  offset (1e6 + noise, or its logarithm, 13.8 ± 5e-7) costs no digits: the block means
  and the merges see the spread only. (Means stored at the offset would carry
  ulp(1e6) ~ 1e-10, 2e-10 of such a spread, into every merge: the numpy path's
  kurtosis errs by 1e-11 to 3e-10 there, this kernel's by ~1e-15; tested against
  long-double sums.)
- *inside a block* two passes over the cached values: their mean ``c``, then
  :math:`S_p = \\sum (z - c)^p`, corrected for the rounding of ``c`` with
  :math:`\\delta = S_1/n` (:math:`M_2 = S_2 - n\\delta^2`, ... as `stats.moments`); the
  centre is the block's own mean, never a guess, so a far outlier costs nothing either.
  The sums run in vector lanes (8-32 interleaved partial sums), an error of at most
  ~4096 eps ~ 1e-12 relative to :math:`\\sum |z - c|^p`.
- *across blocks* Pébay's pairwise merge (as `stats.moments.merge`), in the compiled
  loop; its rounding grows with the number of blocks (~1e-14 per 100 blocks).

ln and arcsin-sqrt are fdlibm's algorithms written so that they vectorise (within 1 and
2 ulp of numpy's own results); histogram bins are found as `stats.histogram` finds them
(``numpy.histogram``'s convention), so the counts are equal exactly. A region that holds
a NaN or ±inf hands the volume back to the numpy path (:func:`region_partials` returns
None), which defines what non-finite values do (the engine's candidates reject them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from stats.histogram import HistogramPartial, _check_edges
from stats.kernels import IDENTITY, RegionPartials, _check_inputs
from stats.moments import MomentPartial

try:  # numba is a dependency; without it (or on a platform it lacks) numpy does the work
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

__all__ = ["BLOCK", "ENV_VAR", "SUPPORTED", "available", "region_codes", "region_partials",
           "selected", "slice_counts", "supports", "warm_up"]

#: Environment variable that selects the per-volume kernel: ``numba`` (default when numba
#: is importable) or ``numpy``.
ENV_VAR = "XRAI_STATS_KERNEL"
#: Values of one code per accumulation block: 32 KiB of float64, so the passes over a
#: block (histogram, then per candidate: values, mean, centred powers) run in L1/L2 cache.
BLOCK = 4096
#: Transform names the fused kernel evaluates itself (see `stats.transforms`).
SUPPORTED = ("ln", "arcsin_sqrt")
_KIND = {"identity": 0, "ln": 1, "arcsin_sqrt": 3}


def available() -> bool:
    """Whether the compiled kernel can run (numba importable)."""
    return numba is not None


def selected() -> str:
    """The kernel the engine uses now: ``"numba"`` or ``"numpy"``.

    ``XRAI_STATS_KERNEL`` (read at each call) may force ``"numpy"``; ``"numba"`` is the
    default when numba is importable, else ``"numpy"`` (same results within the
    contract, so the fallback changes speed, not statistics).

    Raises
    ------
    ValueError
        If the variable holds another value, or asks for numba where it is missing.
    """
    want = os.environ.get(ENV_VAR, "").strip().lower()
    if want not in ("", "numba", "numpy"):
        raise ValueError(f"{ENV_VAR} must be 'numba' or 'numpy', got {want!r}")
    if want == "numba" and numba is None:
        raise ValueError(f"{ENV_VAR}='numba' but numba cannot be imported")
    if want == "numpy" or numba is None:
        return "numpy"
    return "numba"


def _njit(**options: Any) -> Any:
    if numba is None:  # pragma: no cover
        return lambda f: f
    # error_model="numpy": x / 0 gives inf/NaN instead of a Python exception, which keeps
    # the loops free of branches (and vectorisable)
    return numba.njit(cache=True, nogil=True, error_model="numpy", **options)


# --------------------------------------------------------------------------- compiled
# Elementwise ln and arcsin-sqrt written out so that LLVM vectorises them (the C
# library's scalar log / asin are calls it cannot vectorise: 2.5 / 9 ns per value, more
# than the whole rest of the kernel). Both are fdlibm's algorithms and coefficients
# (Sun Microsystems, e_log.c and e_asin.c, error < 1 ulp), branch-free: both sides of
# fdlibm's branches are computed and one is selected. Measured against numpy on
# millions of values over their whole range: ln within 1 ulp, arcsin-sqrt within 2 ulp of numpy's
# own results (tests/stats/test_fused_kernel.py), far below what the 1e-9 contract on
# the moments can see.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT2 = 1.4142135623730951
_PIO2_HI = 1.57079632679489655800e00
_PIO2_LO = 6.12323399573676603587e-17
_PS0 = 1.66666666666666657415e-01
_PS1 = -3.25565818622400915405e-01
_PS2 = 2.01212532134862925881e-01
_PS3 = -4.00555345006794114027e-02
_PS4 = 7.91534994289814532176e-04
_PS5 = 3.47933107596021167570e-05
_QS1 = -2.40339491173441421878e00
_QS2 = 2.02094576023350569471e00
_QS3 = -6.88283971605453293030e-01
_QS4 = 7.70381505559019352791e-02
#: Smallest positive normal float64: ln's argument must be at least this (see `supports`).
_TINY = float(np.finfo(np.float64).tiny)


@_njit(inline="always")
def _ln(x: float) -> float:
    """ln(x) for a finite normal x > 0 (fdlibm e_log.c without its special cases)."""
    bits = np.float64(x).view(np.int64)
    k = (bits >> 52) - 1023
    m = np.int64((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)
    big = m > _SQRT2  # reduce to m in [sqrt(2)/2, sqrt(2))
    m = m * 0.5 if big else m
    k = k + 1 if big else k
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = w * (_LG2 + w * (_LG4 + w * _LG6)) + z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    dk = float(k)
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


@_njit(inline="always")
def _arcsin_sqrt(u: float) -> float:
    """arcsin(sqrt(u)) for u in [0, 1] (fdlibm e_asin.c: |x| < 0.5 and 0.5 <= |x| <= 1)."""
    x = np.sqrt(u)
    small = x < 0.5
    t = x * x if small else (1.0 - x) * 0.5
    p = t * (_PS0 + t * (_PS1 + t * (_PS2 + t * (_PS3 + t * (_PS4 + t * _PS5)))))
    q = 1.0 + t * (_QS1 + t * (_QS2 + t * (_QS3 + t * _QS4)))
    s = x if small else np.sqrt(t)
    y = s + s * (p / q)
    return y if small else _PIO2_HI - (2.0 * y - _PIO2_LO)


@_njit(inline="always")
def _value(kind: int, param: float, lo: float, hi: float, x: float) -> float:
    """The stream's value of raw value ``x``: x itself, or a candidate of clip(x, lo, hi)."""
    c = min(max(x, lo), hi)
    if kind == 1:
        return _ln(c + param)
    if kind == 3:
        return _arcsin_sqrt(c / param)
    return x


@_njit()
def _ln_into(x: Any, n: int, lo: float, hi: float, offset: float, out: Any) -> None:
    for i in range(n):
        out[i] = _ln(min(max(x[i], lo), hi) + offset)


@_njit()
def _arcsin_sqrt_into(x: Any, n: int, lo: float, hi: float, scale: float, out: Any) -> None:
    for i in range(n):
        out[i] = _arcsin_sqrt(min(max(x[i], lo), hi) / scale)


@_njit()
def _shifted_into(kind: int, param: float, lo: float, hi: float, x: Any, n: int, k: float,
                  out: Any) -> None:
    """``out[:n]`` = the stream's values minus ``k``. Plain IEEE arithmetic (no fastmath):
    the subtraction stays where it is written, so ``y - k`` is exact whenever y is within
    a factor 2 of k (Sterbenz), however the sums below are reordered."""
    if kind == 1:
        for i in range(n):
            out[i] = _ln(min(max(x[i], lo), hi) + param) - k
    elif kind == 3:
        for i in range(n):
            out[i] = _arcsin_sqrt(min(max(x[i], lo), hi) / param) - k
    else:
        for i in range(n):
            out[i] = x[i] - k


# The sums below let LLVM reorder the additions ("reassoc"), i.e. keep 8-32 partial sums
# in vector lanes and add them at the end: the loops run at the speed of the cache and
# the rounding error is that of 8-32 interleaved sums, no larger than the sequential
# sum's. Their inputs are finite (a non-finite value stops the kernel first), so
# "nnan"/"ninf"/"nsz" change nothing either; min and max are exact in any order. Only
# sums are reordered: each input is computed outside (`_shifted_into`).
_SUM_FLAGS = {"reassoc", "nnan", "ninf", "nsz"}


@_njit(fastmath=_SUM_FLAGS)
def _sum(z: Any, n: int) -> float:
    s = 0.0
    for i in range(n):
        s += z[i]
    return s


@_njit(fastmath=_SUM_FLAGS)
def _min_max(x: Any, n: int) -> tuple[float, float]:
    lo = x[0]
    hi = x[0]
    for i in range(n):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
    return lo, hi


@_njit(fastmath=_SUM_FLAGS)
def _centred_sums(z: Any, n: int, c: float) -> tuple[float, float, float, float]:
    """Sums of ``d**p`` (p = 1..4) with ``d = z - c``."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    for i in range(n):
        d = z[i] - c
        d2 = d * d
        s1 += d
        s2 += d2
        s3 += d2 * d
        s4 += d2 * d2
    return s1, s2, s3, s4


@_njit()
def _flush(buf: Any, n: int, kinds: Any, params: Any, lo: float, hi: float,
           scratch: Any, acc: Any) -> None:
    """Fields of one block (``buf[:n]``, raw values) per stream, merged into ``acc``.

    ``acc[t]`` = (n, mean - k, M2, M3, M4, min, max, k) of stream ``t`` so far, with the
    shift ``k`` fixed by its first block.
    """
    nb = float(n)
    xmin, xmax = _min_max(buf, n)
    for t in range(kinds.size):
        kind = kinds[t]
        param = params[t]
        # extremes: the candidates increase strictly, so they are those of the raw values
        # (the same function, so the same bits as the values summed below)
        ymin = _value(kind, param, lo, hi, xmin)
        ymax = _value(kind, param, lo, hi, xmax)
        # Every block of a stream is taken relative to one shift k (the first block's
        # mean), and so are the merged mean and the merge's mean differences: at an
        # offset (1e6 + noise, or its logarithm, 13.8 +- 5e-7) a mean stored as a float
        # carries a rounding of ulp(1e6) ~ 1e-10, i.e. 2e-10 of the spread, which each
        # merge would pass on to M2-M4; y - k is exact there (Sterbenz) and the shifted
        # means are small, so the merges see the spread, not the offset.
        first = acc[t, 0] == 0.0
        if first:
            _shifted_into(kind, param, lo, hi, buf, n, 0.0, scratch)
            k = _sum(scratch, n) / nb
            acc[t, 7] = k
            _shifted_into(kind, param, lo, hi, buf, n, k, scratch)
        else:
            k = acc[t, 7]
            _shifted_into(kind, param, lo, hi, buf, n, k, scratch)
        # two passes over z = y - k: its mean c, then sums of (z - c)**p, corrected for
        # the rounding of c with delta = S1 / n (stats.moments)
        c = _sum(scratch, n) / nb
        s1, s2, s3, s4 = _centred_sums(scratch, n, c)
        delta = s1 / nb
        m2b = max(s2 - s1 * delta, 0.0)
        m3b = s3 - 3.0 * delta * s2 + 2.0 * nb * delta**3
        m4b = max(s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * nb * delta**4, 0.0)
        meanb = c + delta  # relative to k
        # merge with the running partial (Pébay 2008, as stats.moments.merge)
        na = acc[t, 0]
        if na == 0.0:
            acc[t, 0] = nb
            acc[t, 1] = meanb
            acc[t, 2] = m2b
            acc[t, 3] = m3b
            acc[t, 4] = m4b
            acc[t, 5] = ymin
            acc[t, 6] = ymax
            continue
        mean_a = acc[t, 1]
        m2a = acc[t, 2]
        m3a = acc[t, 3]
        m4a = acc[t, 4]
        ntot = na + nb
        dl = meanb - mean_a
        d_n = dl / ntot
        m2 = m2a + m2b + dl * d_n * na * nb
        m3 = (m3a + m3b + dl * d_n * d_n * na * nb * (na - nb)
              + 3.0 * d_n * (na * m2b - nb * m2a))
        m4 = (m4a + m4b + dl * d_n * d_n * d_n * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * m2a)
              + 4.0 * d_n * (na * m3b - nb * m3a))
        acc[t, 0] = ntot
        acc[t, 1] = mean_a + d_n * nb if na >= nb else meanb - d_n * na
        acc[t, 2] = max(m2, 0.0)
        acc[t, 3] = m3
        acc[t, 4] = max(m4, 0.0)
        acc[t, 5] = min(acc[t, 5], ymin)
        acc[t, 6] = max(acc[t, 6], ymax)


#: How `_bin_block` finds bins (chosen by `_edge_mode` as `stats.histogram._bin_index`
#: does, so the counts are the numpy path's): edges ``i * 2**k`` from 0 (the engine's),
#: equally spaced edges, any increasing edges.
_DYADIC, _UNIFORM, _GENERAL = 0, 1, 2


@_njit()
def _bin_block(x: Any, n: int, edges: Any, mode: int, idx: Any, counts: Any) -> None:
    """Add the bins of ``x[:n]`` to ``counts`` (``bins`` = underflow, ``bins + 1`` =
    overflow), with numpy.histogram's convention; the index loop vectorises."""
    bins = edges.size - 1
    e0 = edges[0]
    e1 = edges[bins]
    if mode == _DYADIC:  # x * 2**-k is exact: its floor is the bin (stats.histogram)
        inv_w = 1.0 / edges[1]
        for i in range(n):
            v = x[i]
            j = min(np.int64(v * inv_w), bins - 1)
            idx[i] = bins if v < e0 else (bins + 1 if v > e1 else j)
    elif mode == _UNIFORM:  # estimate, off by at most one bin, made exact by the edges
        to_bin = bins / (e1 - e0)
        for i in range(n):
            v = x[i]
            if v < e0:
                idx[i] = bins
            elif v > e1:
                idx[i] = bins + 1
            else:
                j = min(max(np.int64((v - e0) * to_bin), 0), bins - 1)
                if v < edges[j]:
                    j -= 1
                if j < bins - 1 and v >= edges[j + 1]:
                    j += 1
                idx[i] = j
    else:
        for i in range(n):
            v = x[i]
            if v < e0:
                idx[i] = bins
            elif v > e1:
                idx[i] = bins + 1
            else:
                idx[i] = min(np.searchsorted(edges, v, side="right") - 1, bins - 1)
    for i in range(n):
        counts[idx[i]] += 1


@_njit()
def _scan(values: Any, codes: Any, start: int, stop: int, n_codes: int, kinds: Any,
          params: Any, lo: float, hi: float, edges: Any, mode: int, buf: Any, fill: Any,
          scratch: Any, idx: Any, acc: Any, counts: Any) -> tuple[int, int]:
    """Voxels ``start:stop``: each region value into its code's buffer, full buffers
    into the partials. Returns (status, code) as `_fused`."""
    block = buf.shape[1]
    for i in range(start, stop):
        code = np.int64(codes[i])
        if code == 0:
            continue
        if code < 0 or code >= n_codes:
            return 1, code
        x = np.float64(values[i])
        if not math.isfinite(x):
            return 2, code
        k = fill[code]
        buf[code, k] = x
        k += 1
        if k == block:
            _bin_block(buf[code], k, edges, mode, idx, counts[code])
            _flush(buf[code], k, kinds, params, lo, hi, scratch, acc[code])
            k = 0
        fill[code] = k
    return 0, 0


@_njit()
def _fused(values: Any, codes: Any, words: Any, n_codes: int, kinds: Any, params: Any,
           lo: float, hi: float, edges: Any, mode: int, block: int) -> Any:
    """One pass over a volume: moment fields per (code, stream), histogram per code.

    ``words`` is the first ``8 * words.size`` codes read as uint64 (uint8 codes; else
    empty): a zero word is eight ignored voxels, skipped at once (most of a volume lies
    outside the brain or the annotated slices).

    Returns (acc (n_codes, n_streams, 8: see `_flush`), counts (n_codes, bins + 2: the
    last two are under- and overflow), status, bad_code); status 0 = done, 1 = a code
    outside [0, n_codes), 2 = a non-finite value in a region.
    """
    n_streams = kinds.size
    bins = edges.size - 1
    acc = np.zeros((n_codes, n_streams, 8))
    counts = np.zeros((n_codes, bins + 2), dtype=np.int64)
    buf = np.empty((n_codes, block))
    fill = np.zeros(n_codes, dtype=np.int64)
    scratch = np.empty(block)
    idx = np.empty(block, dtype=np.int64)
    nw = words.size
    w = 0
    while w < nw:
        if words[w] == 0:
            w += 1
            continue
        first = w
        while w < nw and words[w] != 0:
            w += 1
        status, bad = _scan(values, codes, 8 * first, 8 * w, n_codes, kinds, params, lo, hi,
                            edges, mode, buf, fill, scratch, idx, acc, counts)
        if status != 0:
            return acc, counts, status, bad
    status, bad = _scan(values, codes, 8 * nw, values.size, n_codes, kinds, params, lo, hi,
                        edges, mode, buf, fill, scratch, idx, acc, counts)
    if status != 0:
        return acc, counts, status, bad
    for code in range(1, n_codes):
        if fill[code] > 0:
            _bin_block(buf[code], fill[code], edges, mode, idx, counts[code])
            _flush(buf[code], fill[code], kinds, params, lo, hi, scratch, acc[code])
    return acc, counts, 0, 0


def _edge_mode(e: NDArray[np.float64]) -> int:
    """`_bin_block`'s method for these edges: the one `stats.histogram._bin_index` uses."""
    bins = e.size - 1
    w = float(e[1])
    if (e[0] == 0.0 and w > 0.0 and math.frexp(w)[0] == 0.5
            and np.array_equal(e, np.arange(e.size, dtype=np.float64) * w)):
        return _DYADIC
    if np.allclose(np.diff(e), (e[-1] - e[0]) / bins, rtol=1e-9, atol=0.0):
        return _UNIFORM
    return _GENERAL


# --------------------------------------------------------------------------- wrapper
def supports(transforms: Mapping[str, Any], clamp: tuple[float, float]) -> bool:
    """Whether the fused kernel computes these transforms of values clamped to ``clamp``.

    It does for `stats.transforms.Transform` objects named ``ln`` (offset at least the
    smallest normal float64, so every argument ``x + offset`` is positive and normal)
    and ``arcsin_sqrt`` (``clamp`` within ``[0, scale]``), with ``0 <= clamp[0] <=
    clamp[1]`` finite: exactly the engine's candidates (`stats.dataset.case_partials`),
    whose arguments then always lie in the transforms' domains.
    """
    lo, hi = (float(v) for v in clamp)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
        return False
    for name, t in transforms.items():
        kind = getattr(t, "name", None)
        params = getattr(t, "params", {})
        if name == IDENTITY or kind not in SUPPORTED:
            return False
        if kind == "ln" and not params["offset"] >= _TINY:
            return False
        if kind == "arcsin_sqrt" and not hi <= params["scale"]:
            return False
    return True


def region_partials(
    values: ArrayLike,
    codes: ArrayLike,
    n_codes: int,
    transforms: Mapping[str, Any],
    *,
    edges: ArrayLike,
    clamp: tuple[float, float],
    block: int = BLOCK,
) -> RegionPartials | None:
    """Moments of the raw values and of each transform, and histograms, per region code.

    Parameters
    ----------
    values : array_like of real numbers
        One volume (any real dtype; read once, each value converted to float64).
    codes : array_like of int or bool, same shape
        0 = ignored, ``1 .. n_codes - 1`` = region codes.
    n_codes : int
    transforms : Mapping[str, stats.transforms.Transform]
        Name → transform, as accepted by :func:`supports`.
    edges : array_like
        Histogram edges of the raw values.
    clamp : (float, float)
        The transforms see ``clip(x, *clamp)`` (the engine's rule, `stats.dataset.clamped`);
        the raw moments and the histogram see ``x``.
    block : int, default :data:`BLOCK`
        Values of one code per accumulation block.

    Returns
    -------
    RegionPartials or None
        What `stats.kernels.region_partials` returns for the clamped forwards of the
        transforms and ``edges={"identity": edges}``, within the 1e-9 contract (the
        histograms equal exactly); None when a region holds a NaN or ±inf value: the
        numpy path then gives the engine's answer for them.

    Raises
    ------
    RuntimeError
        numba is not importable (check :func:`available` first).
    TypeError
        Non-numeric values, non-integer codes.
    ValueError
        Shape mismatch, a code outside ``[0, n_codes - 1]``, invalid edges, transforms
        or clamp that :func:`supports` rejects.
    """
    if numba is None:
        raise RuntimeError("the fused kernel needs numba, which cannot be imported")
    v, c = _check_inputs(values, codes, n_codes, check_range=False)
    e = _check_edges(edges)
    if not supports(transforms, clamp):
        raise ValueError(
            f"the fused kernel computes ln (offset > 0) and arcsin_sqrt (clamp within "
            f"[0, scale]) of values clamped to a finite range >= 0; got transforms "
            f"{ {k: (getattr(t, 'name', t), dict(getattr(t, 'params', {}))) for k, t in transforms.items()}!r} "
            f"and clamp {clamp!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    names = [IDENTITY, *transforms]
    kinds = [0] + [_KIND[t.name] for t in transforms.values()]
    params = [0.0] + [float(t.params["scale" if t.name == "arcsin_sqrt" else "offset"])
                      for t in transforms.values()]
    if v.dtype.kind == "b":
        v = v.view(np.uint8)
    c = np.ascontiguousarray(c)
    n8 = c.size - c.size % 8 if c.dtype == np.uint8 else 0
    words = c[:n8].view(np.uint64)
    acc, counts, status, bad = _fused(
        v, c, words, int(n_codes), np.array(kinds, dtype=np.int64),
        np.array(params, dtype=np.float64), float(clamp[0]), float(clamp[1]), e,
        _edge_mode(e), int(block))
    if status == 1:
        raise ValueError(f"codes must lie in [0, {n_codes - 1}] (n_codes={n_codes}), "
                         f"found {int(bad)!r}")
    if status == 2:
        return None
    region_codes = tuple(range(1, int(n_codes)))
    moments = {
        name: MappingProxyType({code: _partial(acc[code, t]) for code in region_codes})
        for t, name in enumerate(names)
    }
    bins = e.size - 1
    hists = {code: HistogramPartial(e, counts[code, :bins], int(counts[code, bins]),
                                    int(counts[code, bins + 1]), 0)
             for code in region_codes}
    return RegionPartials(
        region_codes,
        MappingProxyType(moments),
        MappingProxyType({IDENTITY: MappingProxyType(hists)}),
    )


def _partial(f: NDArray[np.float64]) -> MomentPartial:
    """MomentPartial of one row of `_fused`'s fields (mean stored relative to f[7])."""
    if f[0] == 0:
        return MomentPartial.empty()
    return MomentPartial(int(f[0]), float(f[7] + f[1]), *(float(x) for x in f[2:7]))


def warm_up() -> None:
    """Load (or compile) the kernel's machine code now, for the engine's volumes.

    numba's first call in a process costs about 0.4 s (setting up its compiler's target,
    then loading the cached code); a caller can overlap it with I/O, such as reading the
    first case. Does nothing without numba.
    """
    if numba is None:
        return
    from stats.transforms import arcsin_sqrt, ln

    values = np.ones((2, 2, 2), np.float32)  # the store's image dtype and rank
    codes = np.ones((2, 2, 2), np.uint8)
    region_partials(values, codes, 2, {"ln": ln(1.0), "arcsin_sqrt": arcsin_sqrt(2.0)},
                    edges=np.linspace(0.0, 2.0, 9), clamp=(0.0, 2.0))
    slice_counts(region_codes(codes, values > 0, np.ones(2, np.bool_)))


# ---------------------------------------------------------------- region codes, slices
# The case's region codes and its per-slice counts are two more passes over the volume
# (6.7 and 9.8 ms of a 4 x 240x240x155 case with numpy's temporaries: a keep mask, a
# tumour mask, two counts per slice); written out, each is one pass with no temporary.


@_njit()
def _codes(label: Any, brain: Any, annotated: Any, out: Any) -> None:
    nz, ny, nx = label.shape
    for z in range(nz):
        keep_slice = annotated[z]
        for y in range(ny):
            for x in range(nx):
                out[z, y, x] = (label[z, y, x] + 1) if (keep_slice and brain[z, y, x]) else 0


@_njit()
def _slices(codes: Any, brain: Any, tumour: Any, box: Any) -> None:
    nz, ny, nx = codes.shape
    for z in range(nz):
        nb = 0
        nt = 0
        for y in range(ny):
            for x in range(nx):
                c = codes[z, y, x]
                if c > 0:
                    nb += 1
                    if c >= 2:
                        nt += 1
                        if z < box[0]:
                            box[0] = z
                        if z > box[1]:
                            box[1] = z
                        if y < box[2]:
                            box[2] = y
                        if y > box[3]:
                            box[3] = y
                        if x < box[4]:
                            box[4] = x
                        if x > box[5]:
                            box[5] = x
        brain[z] = nb
        tumour[z] = nt


def region_codes(label: np.ndarray, brain: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """`stats.dataset.region_codes` in one compiled pass (same array: 0 outside the brain
    or the annotated slices, else 1 + label, in uint8)."""
    lab = np.ascontiguousarray(label, dtype=np.uint8)
    out = np.empty(lab.shape, dtype=np.uint8)
    _codes(lab, np.ascontiguousarray(brain, dtype=np.bool_),
           np.ascontiguousarray(annotated, dtype=np.bool_), out)
    return out


def slice_counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                             tuple[slice, slice, slice] | None]:
    """Per axial slice, the voxels with code >= 1 (annotated brain) and >= 2 (tumour), and
    the bounding box (z, y, x) of the tumour voxels (None without any), in one pass."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    nz = c.shape[0]
    brain = np.zeros(nz, dtype=np.int64)
    tumour = np.zeros(nz, dtype=np.int64)
    big = np.iinfo(np.int64).max
    box = np.array([big, -1, big, -1, big, -1], dtype=np.int64)
    _slices(c, brain, tumour, box)
    if box[1] < 0:
        return brain, tumour, None
    return brain, tumour, (slice(int(box[0]), int(box[1]) + 1),
                           slice(int(box[2]), int(box[3]) + 1),
                           slice(int(box[4]), int(box[5]) + 1))
