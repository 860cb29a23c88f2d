"""What the network sees: moments of intensities after the normalization plan.

The trainer transforms each channel, clips it at two percentiles of the brain
intensities and z-scores it (`stats.manifest.ChannelNormalization`). Rules about the
shape of the intensities (R3) and the z-score itself must therefore be measured *after*
the clip: a few bright voxels dominate the kurtosis of the raw values (normal data with
0.3 % of the voxels 25 standard deviations out: excess kurtosis about 138; at 10 standard
deviations about 16) and vanish under the clip (about -0.1). The engine keeps a fixed-edge histogram of each channel's brain
intensities (`stats.summary.Histogram`); this module reads the plan's moments from it.

Negative intensities (linear-resampling overshoot, scanner offsets) count as 0, the rule
the engine applies for the candidate transforms (`stats.dataset.clamped`): the
histogram's underflow counts as values exactly at its lower edge, 0 (for percentiles and
moments alike), not at the centre of its first bin: for ln or arcsin-sqrt the distance
between 0 and half a bin is large on the transformed scale. Overflow counts as the upper
edge.

Accuracy: every value is represented by the centre of its bin (width ``w``), so the
mean is within ``w / 2`` of the exact one and the higher moments carry Sheppard's
grouping error (relative ``O(w² / σ²)``); with the engine's 4096 bins over at most twice
the channel's maximum this is far below the thresholds the rules use (tests state the
tolerance against scipy on the clipped samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stats.histogram import HistogramPartial, fixed_edges, percentile
from stats.summary import Histogram
from stats.transforms import Transform

__all__ = ["CLIP_LEVELS", "SeenMoments", "clamped_partial", "seen_moments"]

#: Percentile clips the plan may use, from the thesis' default (0.5 / 99.5, section 6.3)
#: to progressively tighter ones (R3 chooses among them).
CLIP_LEVELS: tuple[tuple[float, float], ...] = ((0.5, 99.5), (1.0, 99.0), (2.0, 98.0),
                                                (5.0, 95.0))


@dataclass(frozen=True)
class SeenMoments:
    """Moments of ``clip(f(x), f(p_low), f(p_high))`` over the brain voxels.

    Attributes
    ----------
    percentiles : tuple of float
        The clip percentiles (low, high).
    raw_clip_low, raw_clip_high : float
        The percentile values on the raw scale (negative values counted as 0).
    clip_low, clip_high : float
        The same on the transformed scale.
    n : int
    mean, std, skewness, kurtosis : float
        Population moments (scipy's ``bias=True``; Fisher excess kurtosis); NaN when
        undefined (no values, or constant after the clip).
    """

    percentiles: tuple[float, float]
    raw_clip_low: float
    raw_clip_high: float
    clip_low: float
    clip_high: float
    n: int
    mean: float
    std: float
    skewness: float
    kurtosis: float


def clamped_partial(hist: Histogram) -> HistogramPartial:
    """The histogram with negative values (underflow) counted in the first bin and values
    above the top edge in the last: the engine's clamping rule at the resolution of the
    bins. `seen_moments` places them more exactly, at the edges themselves."""
    counts = np.asarray(hist.counts, dtype=np.int64).copy()
    if counts.size == 0:
        raise ValueError(f"histogram over [{hist.low!r}, {hist.high!r}] has no bins")
    counts[0] += hist.underflow
    counts[-1] += hist.overflow
    return HistogramPartial(fixed_edges(hist.low, hist.high, counts.size), counts)


def seen_moments(hist: Histogram, transform: Transform,
                 percentiles: Sequence[float] = CLIP_LEVELS[0]) -> SeenMoments:
    """Moments of the brain intensities as the normalization plan leaves them.

    Parameters
    ----------
    hist : Histogram
        Fixed-edge histogram of the raw brain intensities of one channel.
    transform : Transform
        The plan's transform for the channel (strictly increasing).
    percentiles : (float, float), default (0.5, 99.5)
        The clip.

    Returns
    -------
    SeenMoments

    Raises
    ------
    ValueError
        If the percentiles are not ``0 <= low < high <= 100``.

    Notes
    -----
    With bin centres :math:`c_k` (the lower edge for the underflow, the upper edge for the
    overflow), counts :math:`n_k` and
    :math:`y_k = \\min(\\max(f(c_k), f(q_l)), f(q_h))`, the moments are those of the
    weighted values: :math:`\\bar y = \\sum n_k y_k / N`, :math:`m_r = \\sum n_k
    (y_k - \\bar y)^r / N`, skewness :math:`m_3 / m_2^{3/2}`, excess kurtosis
    :math:`m_4 / m_2^2 - 3`. Clipping before or after ``f`` is the same for a strictly
    increasing ``f``; it is done on the raw scale so every value is in ``f``'s domain.
    """
    lo_q, hi_q = (float(q) for q in percentiles)
    if not 0 <= lo_q < hi_q <= 100:
        raise ValueError(f"clip percentiles must satisfy 0 <= low < high <= 100, got "
                         f"{tuple(percentiles)!r}")
    counts = np.asarray(hist.counts, dtype=np.int64)
    if counts.size == 0:
        raise ValueError(f"histogram over [{hist.low!r}, {hist.high!r}] has no bins")
    edges = fixed_edges(hist.low, hist.high, counts.size)
    # under-/overflow stay outside the bins: percentile(outside="clip") reads their order
    # statistics as the edges, i.e. negative values as exactly 0
    part = HistogramPartial(edges, counts, hist.underflow, hist.overflow)
    n = part.total
    if n == 0:
        nan = math.nan
        return SeenMoments((lo_q, hi_q), nan, nan, nan, nan, 0, nan, nan, nan, nan)
    raw_lo, raw_hi = (float(v) for v in percentile(part, [lo_q, hi_q], outside="clip"))
    points = np.concatenate([[edges[0]], 0.5 * (edges[:-1] + edges[1:]), [edges[-1]]])
    weights = np.concatenate([[hist.underflow], counts, [hist.overflow]])
    keep = weights > 0
    w = weights[keep].astype(np.float64)
    y = transform.forward(np.clip(points[keep], raw_lo, raw_hi))
    mean = float(np.dot(w, y) / n)
    d = y - mean
    d2 = d * d
    m2 = float(np.dot(w, d2) / n)
    m3 = float(np.dot(w, d2 * d) / n)
    m4 = float(np.dot(w, d2 * d2) / n)
    scale = max(abs(mean), float(np.max(np.abs(y))), 1.0)
    if m2 <= (np.finfo(np.float64).eps * scale) ** 2:  # constant after the clip
        skew = kurt = math.nan
    else:
        skew = m3 / m2**1.5
        kurt = m4 / m2**2 - 3.0
    lo_t, hi_t = (float(v) for v in transform.forward(np.array([raw_lo, raw_hi])))
    return SeenMoments((lo_q, hi_q), raw_lo, raw_hi, lo_t, hi_t, n, mean, math.sqrt(m2),
                       skew, kurt)
