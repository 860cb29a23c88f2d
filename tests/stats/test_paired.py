"""Tests of stats.paired against scipy, a naive bootstrap loop and the normal interval."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats

import stats.paired as paired_module
from stats.paired import MIN_PAIRS, PairedComparison, paired_comparison, verdict


def naive_percentile_interval(d: np.ndarray, confidence: float, n_resamples: int,
                              seed: int) -> tuple[float, float]:
    """The percentile bootstrap written out: one resample per loop turn, quantiles by hand.

    Quantiles are Hyndman & Fan's type 7 (numpy's default ``linear``): with the sorted
    means s and h = (R - 1) q, the value s[⌊h⌋] + (h - ⌊h⌋)(s[⌊h⌋ + 1] - s[⌊h⌋]).
    """
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_resamples):
        idx = rng.integers(0, d.size, size=d.size)
        means.append(sum(d[i] for i in idx) / d.size)
    s = sorted(means)

    def quantile(q: float) -> float:
        h = (len(s) - 1) * q
        k = math.floor(h)
        return s[k] if k + 1 >= len(s) else s[k] + (h - k) * (s[k + 1] - s[k])

    alpha = 1 - confidence
    return quantile(alpha / 2), quantile(1 - alpha / 2)


def hd95_like(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances on a 1 mm grid: many ties and some zero differences."""
    a = np.round(rng.gamma(2.0, 2.0, n))
    b = np.round(a + rng.normal(0.5, 1.5, n)).clip(0)
    return a, b


class TestAgainstScipy:
    @pytest.mark.parametrize("n", [MIN_PAIRS, 12, 40, 200])
    def test_means_and_wilcoxon(self, n: int) -> None:
        rng = np.random.default_rng(11)
        a = rng.beta(8, 2, n)
        b = np.clip(a - rng.normal(0.02, 0.05, n), 0, 1)
        cmp = paired_comparison(a, b)
        assert cmp.n == n
        assert cmp.n_dropped == 0
        # oracle: numpy means, to rounding (1e-14 relative)
        assert cmp.mean_a == pytest.approx(np.mean(a), rel=1e-14)
        assert cmp.mean_b == pytest.approx(np.mean(b), rel=1e-14)
        assert cmp.mean_diff == pytest.approx(np.mean(a - b), rel=1e-12, abs=1e-15)
        # oracle: scipy's two-sided Wilcoxon signed-rank test with its defaults, exactly
        assert cmp.p_value == scipy.stats.wilcoxon(a, b).pvalue
        assert cmp.n_a_greater == int((a > b).sum())
        assert cmp.n_a_less == int((a < b).sum())
        assert cmp.n_equal == int((a == b).sum())

    @pytest.mark.parametrize("n", [10, 60])
    def test_wilcoxon_with_ties_and_zeros(self, n: int) -> None:
        # scipy switches to a permutation null (n <= 13) or the normal approximation
        a, b = hd95_like(np.random.default_rng(3), n)
        assert (a == b).any()
        cmp = paired_comparison(a, b)
        assert cmp.p_value == scipy.stats.wilcoxon(a, b).pvalue
        assert cmp.n_equal == int((a == b).sum())


class TestBootstrap:
    @pytest.mark.parametrize(("n", "confidence"), [(7, 0.95), (25, 0.9), (60, 0.99)])
    def test_equals_naive_loop(self, n: int, confidence: float) -> None:
        rng = np.random.default_rng(5)
        a, b = rng.normal(0.8, 0.1, n), rng.normal(0.78, 0.1, n)
        cmp = paired_comparison(a, b, confidence=confidence, n_resamples=2000, seed=42)
        lo, hi = naive_percentile_interval(a - b, confidence, 2000, 42)
        # same draws; only the order of summation inside a mean may differ
        assert cmp.ci_low == pytest.approx(lo, rel=1e-12, abs=1e-15)
        assert cmp.ci_high == pytest.approx(hi, rel=1e-12, abs=1e-15)
        assert cmp.confidence == confidence
        assert cmp.n_resamples == 2000

    def test_blocks_do_not_change_the_draws(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rng = np.random.default_rng(6)
        a, b = rng.normal(size=33), rng.normal(size=33)
        whole = paired_comparison(a, b, n_resamples=500, seed=1)
        monkeypatch.setattr(paired_module, "_BLOCK_INDICES", 100)  # 3 resamples a block
        assert paired_comparison(a, b, n_resamples=500, seed=1) == whole

    def test_normal_approximation_at_n200(self) -> None:
        rng = np.random.default_rng(7)
        d = rng.normal(0.05, 0.1, 200)
        b = rng.uniform(0.5, 0.9, 200)
        cmp = paired_comparison(b + d, b)
        se = d.std(ddof=1) / math.sqrt(d.size)
        z = scipy.stats.norm.ppf(0.975)
        # Tolerance 0.1 SE: the Monte Carlo SE of a 2.5 % quantile of 10,000 resampled
        # means is sqrt(0.025 * 0.975 / 1e4) / phi(1.96) ~ 0.027 SE, the bootstrap's
        # ddof=0 scale is 0.25 % narrower, and the sample skewness adds ~ 0.01 SE.
        assert cmp.ci_low == pytest.approx(d.mean() - z * se, abs=0.1 * se)
        assert cmp.ci_high == pytest.approx(d.mean() + z * se, abs=0.1 * se)

    def test_seed_reproducible(self) -> None:
        rng = np.random.default_rng(8)
        a, b = rng.normal(size=20), rng.normal(size=20)
        assert paired_comparison(a, b, seed=3) == paired_comparison(a, b, seed=3)
        assert paired_comparison(a, b, seed=3).ci_low != paired_comparison(a, b, seed=4).ci_low


class TestSanity:
    def test_clear_shift_is_separated(self) -> None:
        rng = np.random.default_rng(9)
        b = rng.uniform(0.6, 0.8, 20)
        a = b + 0.1 + rng.normal(0, 0.02, 20)
        cmp = paired_comparison(a, b)
        assert cmp.ci_low > 0
        assert cmp.ci_low < 0.1 < cmp.ci_high
        assert cmp.p_value < 1e-4  # all 20 differences positive: exact p = 2 / 2**20
        assert verdict(cmp, margin=0.01) == "better"
        assert verdict(cmp, margin=0.01, higher_is_better=False) == "worse"

    def test_coverage(self) -> None:
        # 200 data sets of n = 50 normal differences with mean 0.03: the 95 % percentile
        # interval should cover 0.03 about 94 % of the time (slightly below nominal at
        # finite n); binomial SE at 200 draws is 0.016, so [0.89, 0.99] is ~3 SE wide.
        rng = np.random.default_rng(10)
        covered = 0
        for i in range(200):
            d = rng.normal(0.03, 0.1, 50)
            cmp = paired_comparison(d, np.zeros(50), n_resamples=1000, seed=i)
            covered += cmp.ci_low <= 0.03 <= cmp.ci_high
        assert 0.89 <= covered / 200 <= 0.99


class TestNaN:
    def test_pairs_with_nan_are_dropped(self) -> None:
        rng = np.random.default_rng(12)
        a, b = rng.normal(5, 2, 30), rng.normal(5.5, 2, 30)
        a[[2, 7]] = np.nan
        b[[7, 19, 25]] = np.nan
        cmp = paired_comparison(a, b, seed=2)
        keep = ~(np.isnan(a) | np.isnan(b))
        assert (cmp.n, cmp.n_dropped) == (26, 4)
        # oracle: the same comparison on the pairs kept by hand
        expected = paired_comparison(a[keep], b[keep], seed=2)
        assert dataclasses.replace(cmp, n_dropped=0) == expected

    def test_all_nan(self) -> None:
        cmp = paired_comparison([np.nan, 1.0, np.nan], [2.0, np.nan, np.nan])
        assert (cmp.n, cmp.n_dropped) == (0, 3)
        assert all(math.isnan(v) for v in (cmp.mean_a, cmp.mean_diff, cmp.ci_low,
                                           cmp.ci_high, cmp.p_value))
        assert "no pair left" in cmp.note
        assert verdict(cmp, margin=0.01) == "cannot separate at n=0"


class TestEdgeCases:
    def test_all_equal(self) -> None:
        a = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.75, 0.8])
        cmp = paired_comparison(a, a.copy())
        assert cmp.p_value == 1.0
        assert (cmp.ci_low, cmp.ci_high, cmp.mean_diff) == (0.0, 0.0, 0.0)
        assert (cmp.n_equal, cmp.n_a_greater, cmp.n_a_less) == (8, 0, 0)
        assert cmp.note == "all differences are zero"
        assert verdict(cmp, margin=0.01) == "not worse than by more than 0.01"
        assert verdict(cmp, margin=0.0) == "cannot separate at n=8"

    def test_below_minimum_n(self) -> None:
        n = MIN_PAIRS - 1
        a = np.linspace(0.8, 0.9, n)
        cmp = paired_comparison(a, a - 0.1)  # every difference positive
        assert math.isnan(cmp.p_value)
        assert cmp.ci_low > 0  # the bootstrap alone would call this separated...
        assert verdict(cmp, margin=0.01) == f"cannot separate at n={n}"  # ...verdict won't
        assert f"{n} pairs < {MIN_PAIRS}" in cmp.note

    def test_minimum_n_is_where_wilcoxon_can_reject(self) -> None:
        # exact two-sided p with every difference positive is 2 / 2**n (scipy as oracle)
        d = np.arange(1.0, MIN_PAIRS + 1)
        assert scipy.stats.wilcoxon(d).pvalue < 0.05
        assert scipy.stats.wilcoxon(d[:-1]).pvalue > 0.05

    @pytest.mark.parametrize(
        ("a", "b", "match"),
        [
            ([1.0, 2.0, 3.0], [1.0, 2.0], r"shapes \(3,\) and \(2,\) differ"),
            ([[1.0, 2.0]], [[1.0, 2.0]], r"a must be one value per case .* \(1, 2\)"),
            (1.0, 2.0, r"a must be one value per case .* \(\)"),
            ([1.0, np.inf], [1.0, 2.0], r"a\[1\] is inf; per-case values must be finite"),
            ([1.0, 2.0], [-np.inf, 2.0], r"b\[0\] is -inf"),
        ],
    )
    def test_bad_shapes_and_values(self, a, b, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            paired_comparison(a, b)

    def test_not_numeric(self) -> None:
        with pytest.raises(TypeError, match="a must be numeric per-case values"):
            paired_comparison(["x", "y"], [1.0, 2.0])

    @pytest.mark.parametrize(("kw", "match"), [
        ({"confidence": 1.0}, r"confidence must be in \(0, 1\), got 1\.0"),
        ({"confidence": 0}, r"confidence must be in \(0, 1\), got 0"),
        ({"n_resamples": 0}, r"n_resamples must be an integer >= 1, got 0"),
        ({"n_resamples": 10.5}, r"n_resamples must be an integer >= 1, got 10\.5"),
    ])
    def test_bad_options(self, kw, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            paired_comparison([1.0, 2.0], [1.0, 2.0], **kw)


class TestVerdict:
    BASE = PairedComparison(n=20, n_dropped=0, mean_a=0.8, mean_b=0.8, mean_diff=0.0,
                            ci_low=0.0, ci_high=0.0, confidence=0.95, p_value=0.5,
                            n_a_greater=10, n_a_less=10, n_equal=0, n_resamples=10_000)

    @pytest.mark.parametrize(("low", "high", "higher_is_better", "expected"), [
        (0.01, 0.05, True, "better"),
        (-0.05, -0.01, True, "worse"),
        (-0.005, 0.03, True, "not worse than by more than 0.01"),
        (-0.02, 0.03, True, "cannot separate at n=20"),
        (-0.05, -0.01, False, "better"),        # lower is better: A - B < 0 is good
        (0.01, 0.05, False, "worse"),
        (-0.03, 0.005, False, "not worse than by more than 0.01"),
        (-0.03, 0.02, False, "cannot separate at n=20"),
        (-0.01, -0.005, True, "worse"),         # "worse" is said before "not worse by..."
    ])
    def test_cases(self, low: float, high: float, higher_is_better: bool,
                   expected: str) -> None:
        cmp = dataclasses.replace(self.BASE, ci_low=low, ci_high=high)
        assert verdict(cmp, margin=0.01, higher_is_better=higher_is_better) == expected

    def test_small_n_is_never_separated(self) -> None:
        cmp = dataclasses.replace(self.BASE, n=MIN_PAIRS - 1, ci_low=0.1, ci_high=0.2)
        assert verdict(cmp, margin=0.01) == f"cannot separate at n={MIN_PAIRS - 1}"

    @pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf])
    def test_bad_margin(self, margin: float) -> None:
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            verdict(self.BASE, margin=margin)
