"""The compiled loops behind `stats.fused` (issue 14): numba functions, nothing else.

`stats.fused` holds the wrapper, its checks and its documentation (exactness, the
algorithms); this module holds the loops, so that a process using the ahead-of-time
build (`pipeline.aot`, the same functions compiled into an extension module at install)
never imports numba. Importing this module imports numba; its functions then run
just-in-time (``@njit(cache=True)``: compiled once, loaded from numba's cache after).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stats.fused import _DYADIC, _UNIFORM

try:  # numba is a dependency; without it (or on a platform it lacks) numpy does the work
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

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



# ---------------------------------------------------------------- tumour components
# scipy.ndimage.label counts them too, but importing scipy.ndimage costs 0.05-0.25 s in a
# fresh process, more than the case's whole kernel; counting is one raster pass.


@_njit(inline="always")
def _find(parent: Any, i: int) -> int:
    while parent[i] != i:  # path halving
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@_njit()
def _components(codes: Any, lo: int) -> int:
    """Number of 26-connected components of the voxels with ``codes >= lo``.

    One raster pass with union-find: a voxel takes the root of its first labelled
    neighbour among the 13 already visited (the previous slice's 9, the previous row's 3,
    the previous voxel) and unites it with the others' roots; every union of two roots
    joins two components, so the count is labels created less unions made.
    """
    nz, ny, nx = codes.shape
    n_fg = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if codes[z, y, x] >= lo:
                    n_fg += 1
    if n_fg == 0:
        return 0
    labels = np.zeros((nz, ny, nx), dtype=np.int32)
    parent = np.empty(n_fg + 1, dtype=np.int32)
    n_labels = 0
    unions = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if codes[z, y, x] < lo:
                    continue
                cur = 0
                for dz in range(-1, 1):
                    zz = z + dz
                    if zz < 0:
                        continue
                    for dy in range(-1, 2):
                        if dz == 0 and dy == 1:
                            break
                        yy = y + dy
                        if yy < 0 or yy >= ny:
                            continue
                        for dx in range(-1, 2):
                            if dz == 0 and dy == 0 and dx == 0:
                                break
                            xx = x + dx
                            if xx < 0 or xx >= nx:
                                continue
                            near = labels[zz, yy, xx]
                            if near == 0:
                                continue
                            root = _find(parent, near)
                            if cur == 0:
                                cur = root
                            elif root != cur:
                                if root < cur:
                                    parent[cur] = root
                                    cur = root
                                else:
                                    parent[root] = cur
                                unions += 1
                if cur == 0:
                    n_labels += 1
                    parent[n_labels] = n_labels
                    cur = n_labels
                labels[z, y, x] = cur
    return n_labels - unions
