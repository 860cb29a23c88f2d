"""The compiled loop behind `pipeline.standardize.scan_channels` (issue 14, ingest): one
pass over a case's resampled channels instead of numpy's eight or more.

numba functions only, as `stats.fused_kernels`: `pipeline.aot` compiles them ahead of
time with the statistics kernels; importing this module imports numba (the JIT form).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # numba is a dependency; without it numpy does the work (pipeline.standardize)
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None


def _njit(**options: Any) -> Any:
    if numba is None:  # pragma: no cover
        return lambda f: f
    return numba.njit(cache=True, nogil=True, **options)


#: The bits of a float32's exponent: all set for inf and NaN only.
_EXP32 = 0x7F800000


@_njit(inline="always")
def _ordered(b: Any) -> Any:
    """A float32's bits (as int32) to an int32 ordered as the floats are (for non-NaN
    values; -0.0 just below 0.0); its own inverse."""
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@_njit()
def _scan_channels(out: Any, bits: Any, brain: Any, fields: Any) -> None:
    """``out`` (C, N) float32 and ``bits`` (the same memory as int32), ``brain`` (N,)
    bool, ``fields`` (C, 4) float64 set to (non-finite voxels, min, max, negative voxels)
    per channel, the last three over the brain: the voxels non-zero in any channel,
    written to ``brain``.

    One pass per channel with no branch and only integer reductions, which LLVM
    vectorises (numba's float ``min``/``max`` and a masked min or max do not; measured
    4-8 ms against under 1 ms a channel of 9 M voxels):

    - non-finite values are counted from their exponent bits;
    - min and max are taken over the bits mapped to integers in the floats' order;
    - outside the brain every channel is zero, so over the brain min and max are the
      channel's own, except that a zero counts only where some brain voxel is zero in
      this channel (the channel's zeros beyond those outside the brain);
    - without such a zero the brain's min is the smallest non-zero value: the channel's
      min when it has a negative value, else its smallest positive one, found as the
      least of ``bits - 1`` unsigned (0 wraps to the top; positive floats order as
      their bits do; negative ones and -0.0 lie above every positive);
    - the brain's max is the channel's when that is positive; a channel with no positive
      value and no zero in the brain (never seen in MRI) takes a second, plain loop;
    - negative values are non-zero, so all of them lie in the brain.

    With a non-finite value min and max are meaningless; the caller rejects the case on
    the count.
    """
    n_ch, n = out.shape
    zeros = np.zeros(n_ch, dtype=np.int64)
    smallest_positive = np.zeros(n_ch, dtype=np.uint32)
    ends = np.zeros((n_ch, 2), dtype=np.int32)
    brain[:] = False
    for c in range(n_ch):
        lo = np.int32(0x7FFFFFFF)
        hi = np.int32(-0x7FFFFFFF - 1)
        up = np.uint32(0xFFFFFFFF)
        bad = 0
        neg = 0
        nz_count = 0
        for i in range(n):
            v = out[c, i]
            b = bits[c, i]
            nz = v != 0
            bad += (b & _EXP32) == _EXP32
            neg += v < 0
            nz_count += nz
            brain[i] = brain[i] | nz
            k = _ordered(b)
            lo = min(lo, k)
            hi = max(hi, k)
            up = min(up, np.uint32(b) - np.uint32(1))
        zeros[c] = n - nz_count
        smallest_positive[c] = up
        ends[c, 0] = _ordered(lo)
        ends[c, 1] = _ordered(hi)
        fields[c, 0] = bad
        fields[c, 3] = neg
    as_float = ends.view(np.float32)
    positive = smallest_positive + np.uint32(1)
    least_positive = positive.view(np.float32)
    outside = 0
    for i in range(n):
        outside += not brain[i]
    for c in range(n_ch):
        lo_f = float(as_float[c, 0])
        hi_f = float(as_float[c, 1])
        if zeros[c] > outside:  # a brain voxel where this channel is zero
            fields[c, 1] = min(lo_f, 0.0)
            fields[c, 2] = max(hi_f, 0.0)
        elif zeros[c] == n:  # the channel is all zero, and the brain empty: no value
            fields[c, 1] = np.inf
            fields[c, 2] = -np.inf
        else:
            fields[c, 1] = lo_f if fields[c, 3] > 0 else float(least_positive[c])
            if hi_f > 0:
                fields[c, 2] = hi_f
            else:  # no positive value: the greatest non-zero one
                top = -np.inf
                for i in range(n):
                    v = out[c, i]
                    if v != 0 and v > top:
                        top = v
                fields[c, 2] = top
