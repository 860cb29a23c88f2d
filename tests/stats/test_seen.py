"""Tests of stats.seen: the moments of the intensities as the normalization plan leaves
them (transform, then percentile clip), read from the engine's fixed-edge histogram,
against scipy on the clipped samples themselves (issue 10)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import scipy.stats

from stats.seen import CLIP_LEVELS, SeenMoments, clamped_partial, seen_moments
from stats.summary import Histogram
from stats.transforms import Transform, arcsin_sqrt, identity, ln, log10

BINS = 4096


def histogram_of(x: np.ndarray, *, bins: int = BINS) -> Histogram:
    """The engine's brain histogram of ``x``: ``bins`` bins over [0, power of two above
    the maximum], negative values in the underflow (numpy.histogram is the oracle)."""
    upper = 2.0 ** math.ceil(math.log2(float(x.max()) * (1 + 1e-12)))
    counts, _ = np.histogram(x, bins=bins, range=(0.0, upper))
    return Histogram(low=0.0, high=upper, counts=counts.tolist(),
                     underflow=int(np.count_nonzero(x < 0)),
                     overflow=int(np.count_nonzero(x > upper)))


def output_bound(t: Transform, low: float, high: float, width: float, top: float) -> float:
    """How far one value of the plan's output can move when the raw value and the clip
    points each move by at most one histogram bin ``width`` (bin centres: half a bin; the
    histogram's percentile: under one bin, stats.histogram.percentile). Clip is
    1-Lipschitz in each argument, so the clipped raw value moves by at most ``width``
    inside ``[low - width, high + width]``; for a monotone ``f`` the change is at most
    ``max_k f(g_k + 2 width) - f(g_k)`` over a grid of step ``width`` there. The mean and
    the population std of the outputs move by at most the same (triangle inequality in
    the root-mean-square norm)."""
    end = min(high + 2 * width, top)
    g = np.append(np.arange(max(low - width, 0.0), end, width), end)
    f = t.forward(g)
    return float(np.max(f[2:] - f[:-2])) if f.size > 2 else float(f[-1] - f[0])


def oracle(x: np.ndarray, t: Transform, percentiles: Sequence[float]) -> dict[str, float]:
    """scipy's moments of f(clip(max(x, 0), p_low, p_high)), numpy's percentiles of the
    samples (negative values counted as 0, the engine's rule)."""
    x0 = np.maximum(x, 0.0)
    lo, hi = np.percentile(x0, percentiles)
    y = t.forward(np.clip(x0, lo, hi))
    return {"raw_lo": float(lo), "raw_hi": float(hi), "mean": float(y.mean()),
            "std": float(y.std()), "skewness": float(scipy.stats.skew(y)),
            "kurtosis": float(scipy.stats.kurtosis(y))}


def samples(name: str) -> np.ndarray:
    rng = np.random.default_rng(20261124)
    if name == "normal":
        return rng.normal(1000, 100, 100_000)
    if name == "t2":   # Student-t(2), truncated at ±19 scales so the range stays [0, 4096]
        t = scipy.stats.t.rvs(df=2, size=100_000, random_state=rng)
        return 2000.0 + 100.0 * np.clip(t, -19, 19)
    if name == "lognormal":
        return rng.lognormal(6.0, 0.5, 100_000)
    if name == "outliers":   # 0.3 % of the voxels 25 SDs out
        return np.concatenate([rng.normal(1000, 100, 99_700), np.full(300, 3500.0)])
    if name == "negatives":  # 1 % slightly negative (resampling overshoot)
        return np.concatenate([rng.normal(800, 60, 99_000), -rng.uniform(0.5, 5, 1_000)])
    raise ValueError(name)


def transforms_for(x: np.ndarray) -> list[Transform]:
    """The engine's intensity candidates for x (offset max·2^-10, arcsin scale max)."""
    top = float(x.max())
    return [identity(), ln(top * 2.0**-10), log10(top * 2.0**-10), arcsin_sqrt(top)]


class TestAgainstScipy:
    @pytest.mark.parametrize("name", ["normal", "t2", "lognormal", "outliers", "negatives"])
    @pytest.mark.parametrize("level", CLIP_LEVELS)
    def test_equals_scipy_on_the_clipped_samples(self, name: str,
                                                 level: tuple[float, float]) -> None:
        x = samples(name)
        hist = histogram_of(x)
        width = (hist.high - hist.low) / BINS
        for t in transforms_for(x):
            s = seen_moments(hist, t, level)
            o = oracle(x, t, level)
            assert s.percentiles == level
            assert s.n == x.size
            # raw clip points: within one bin of numpy's (stats.histogram.percentile bound)
            assert s.raw_clip_low == pytest.approx(o["raw_lo"], abs=width)
            assert s.raw_clip_high == pytest.approx(o["raw_hi"], abs=width)
            assert (s.clip_low, s.clip_high) == tuple(
                float(v) for v in t.forward(np.array([s.raw_clip_low, s.raw_clip_high])))
            # mean and std: every value within output_bound (rigorous, see there)
            tol = output_bound(t, o["raw_lo"], o["raw_hi"], width, float(x.max()))
            assert s.mean == pytest.approx(o["mean"], abs=tol)
            assert s.std == pytest.approx(o["std"], abs=tol)
            # shape: no rigorous bound (the per-value bound above is loose for ln near 0,
            # and the errors of single values average out over the bins); observed at
            # most 0.01 on these samples; stated tolerance 0.02 on skewness and excess
            # kurtosis, far below R3's threshold 3
            assert s.skewness == pytest.approx(o["skewness"], abs=0.02), t.name
            assert s.kurtosis == pytest.approx(o["kurtosis"], abs=0.02), t.name

    def test_issue10_outliers_dominate_only_the_unclipped_kurtosis(self) -> None:
        # Mixture (1 - p) N(0, 1) + p δ_d (closed form from its raw moments
        # E X = p d, E X² = 1 - p + p d², E X³ = p d³, E X⁴ = 3(1 - p) + p d⁴):
        # p = 0.3 %, d = 25 -> excess kurtosis about 138 (d = 10 would give about 16).
        def mixture_kurtosis(p: float, d: float) -> float:
            m1, m2, m3, m4 = p * d, 1 - p + p * d**2, p * d**3, 3 * (1 - p) + p * d**4
            var = m2 - m1**2
            c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
            return c4 / var**2 - 3

        assert mixture_kurtosis(0.003, 25) == pytest.approx(138, abs=2)
        assert mixture_kurtosis(0.003, 10) == pytest.approx(16.4, abs=0.5)
        x = samples("outliers")
        assert scipy.stats.kurtosis(x) == pytest.approx(mixture_kurtosis(0.003, 25), rel=0.05)
        s = seen_moments(histogram_of(x), identity())
        # the clip removes them: a normal clipped at about 2.6 SDs, about -0.1 (scipy)
        assert s.kurtosis == pytest.approx(oracle(x, identity(), (0.5, 99.5))["kurtosis"],
                                           abs=0.02)
        assert -0.3 < s.kurtosis < 0.1


class TestNegativeValues:
    def test_clamped_partial_moves_underflow_and_overflow_to_the_end_bins(self) -> None:
        h = Histogram(low=0.0, high=4.0, counts=[1, 2, 3, 4], underflow=5, overflow=6)
        p = clamped_partial(h)
        assert p.counts.tolist() == [6, 2, 3, 10]
        np.testing.assert_array_equal(p.edges, [0.0, 1.0, 2.0, 3.0, 4.0])
        assert (p.underflow, p.overflow) == (0, 0)

    def test_issue10_negative_values_count_as_zero(self) -> None:
        x = samples("negatives")
        assert np.percentile(x, 0.5) < 0
        hist = histogram_of(x)
        assert hist.underflow == 1_000
        width = (hist.high - hist.low) / BINS
        for t in transforms_for(x):
            s = seen_moments(hist, t)   # ln of a negative value would raise
            assert 0.0 <= s.raw_clip_low <= width
            assert math.isfinite(s.kurtosis)


class TestEdgeCases:
    @pytest.mark.parametrize("bad", [(5.0, 5.0), (99.5, 0.5), (-1.0, 50.0), (1.0, 101.0)])
    def test_bad_percentiles_raise(self, bad: tuple[float, float]) -> None:
        h = Histogram(low=0.0, high=1.0, counts=[1, 1])
        with pytest.raises(ValueError, match=r"clip percentiles must satisfy 0 <= low < high "
                                             r"<= 100, got \("):
            seen_moments(h, identity(), bad)

    def test_no_bins_raises(self) -> None:
        with pytest.raises(ValueError, match=r"histogram over \[0\.0, 1\.0\] has no bins"):
            clamped_partial(Histogram(low=0.0, high=1.0, counts=[]))

    def test_empty_histogram_is_nan(self) -> None:
        s = seen_moments(Histogram(low=0.0, high=8.0, counts=[0] * 8), identity())
        assert isinstance(s, SeenMoments)
        assert s.n == 0
        assert all(math.isnan(v) for v in (s.raw_clip_low, s.mean, s.std, s.kurtosis))

    def test_constant_after_the_clip_has_undefined_shape(self) -> None:
        # every value in one bin: std 0, skewness and kurtosis NaN (scipy's constant rule)
        s = seen_moments(Histogram(low=0.0, high=8.0, counts=[0, 0, 0, 50, 0, 0, 0, 0]),
                         identity())
        assert (s.n, s.mean, s.std) == (50, 3.5, 0.0)
        assert math.isnan(s.skewness)
        assert math.isnan(s.kurtosis)

    def test_transform_then_clip_equals_clip_then_transform(self) -> None:
        # f strictly increasing: clip(f(x), f(lo), f(hi)) == f(clip(x, lo, hi)), so the
        # moments are those of the transformed, clipped bin centres (hand computation).
        h = Histogram(low=0.0, high=4.0, counts=[100, 0, 0, 100])
        s = seen_moments(h, ln(1.0), (0.0, 100.0))
        y = np.log(np.array([0.5, 3.5]) + 1.0)
        assert s.mean == pytest.approx(y.mean(), rel=1e-12)
        assert s.std == pytest.approx(y.std(), rel=1e-12)
