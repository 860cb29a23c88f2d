"""Tests of stats.rules: each rule fires on the statistics that should trigger it, and only
then (both sides of every threshold), and decide_loss assembles the terms (issue 4); the
rules measure what the network sees, per case, and guard against noise (issue 10).

Synthetic `DatasetStats` are built from samples (moments from scipy, the oracle; brain
intensities also get the engine's fixed-edge histogram, from numpy), or with moments set
exactly where a threshold is probed. Per-case slice profiles (`CaseLabelStats`) are
written by hand: ellipsoids, several bodies with gaps, uniform slabs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from stats import rules
from stats.rules import (
    ADAPT_CV_THRESHOLD,
    FOCAL_SKEW_THRESHOLD,
    IMBALANCE_MILD,
    KURTOSIS_THRESHOLD,
    RULES,
    SKEW_MIN_N,
    SKEW_Z,
    adaptation_rule,
    decide_loss,
    imbalance_rule,
    intensity_tail_rule,
    skewness_lower_bound,
    skewness_standard_error,
    slice_burden_cv,
    volume_tail_rule,
    weighting_rule,
)
from stats.seen import CLIP_LEVELS
from stats.summary import (
    PERCENTILES,
    CaseLabelStats,
    DatasetStats,
    Distribution,
    Histogram,
    Moments,
)
from stats.transforms import candidates_for, select

REPO = Path(__file__).resolve().parents[2]
#: The engine's histogram resolution (stats.dataset.DEFAULT_BINS).
HIST_BINS = 4096
#: The CV of one ellipsoid's cross-section profile (area ∝ 1 - t² over t in [-1, 1]):
#: mean 2/3, E[(1 - t²)²] = 8/15, so CV² = (8/15) / (4/9) - 1 = 1/5 (closed form).
ELLIPSOID_CV = 1.0 / math.sqrt(5.0)


# ----------------------------------------------------------------------- factory
def moments_of(x: np.ndarray) -> Moments:
    """Moments with scipy's conventions (scipy is the oracle); NaN where undefined."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return make_moments(0, math.nan, math.nan, math.nan, math.nan)
    const = np.ptp(x) == 0
    undefined = const or n < 4
    return Moments(
        n=n, mean=float(x.mean()), std=float(x.std()),
        skewness=math.nan if undefined else float(scipy.stats.skew(x)),
        kurtosis=math.nan if undefined else float(scipy.stats.kurtosis(x)),
        skewness_unbiased=math.nan if undefined else float(scipy.stats.skew(x, bias=False)),
        kurtosis_unbiased=math.nan if undefined else float(scipy.stats.kurtosis(x, bias=False)),
        minimum=float(x.min()), maximum=float(x.max()),
    )


def make_moments(n: int, mean: float, std: float, skewness: float, kurtosis: float) -> Moments:
    """Moments set by hand (for probing thresholds exactly)."""
    return Moments(n=n, mean=mean, std=std, skewness=skewness, kurtosis=kurtosis,
                   skewness_unbiased=skewness, kurtosis_unbiased=kurtosis,
                   minimum=mean - 3 * std if n else math.nan,
                   maximum=mean + 3 * std if n else math.nan)


def distribution(name: str, kind: str, x: Sequence[float] | np.ndarray, *,
                 scale: float | None = None, unit_offset: float | None = None) -> Distribution:
    """A Distribution of samples with every candidate applied as the engine does."""
    x = np.asarray(x, dtype=np.float64)
    cands, params = {}, {}
    for cand, t in candidates_for(kind, scale=scale, unit_offset=unit_offset).items():  # type: ignore[arg-type]
        try:
            y = t.forward(x)
        except ValueError:
            continue
        cands[cand] = moments_of(y)
        params[cand] = dict(t.params)
    pct = {f"{q:g}": (float(np.percentile(x, q)) if x.size else math.nan) for q in PERCENTILES}
    return Distribution(name=name, kind=kind, unit="", moments=cands["identity"],  # type: ignore[arg-type]
                        percentiles=pct, candidates=cands, transforms=params)


def power_of_two_above(maximum: float) -> float:
    """The engine's histogram upper edge (stats.dataset.nice_upper), written out."""
    return 2.0 ** math.ceil(math.log2(maximum * (1 + 1e-12)))


def intensity_distribution(name: str, x: Sequence[float] | np.ndarray, *,
                           bins: int = HIST_BINS) -> Distribution:
    """Brain intensities summarised as the engine summarises them (issue 10), from oracles.

    Candidates use the channel's maximum M: ln/log10 offset ``M * 2**-10``, arcsin-sqrt
    scale ``M``, and a negative value counts as 0 for them; moments from scipy;
    percentiles from numpy; the histogram from ``numpy.histogram`` over
    ``[0, power of two above M]`` with ``bins`` bins, negative values in its underflow.
    """
    x = np.asarray(x, dtype=np.float64)
    top = float(x.max())
    upper = power_of_two_above(top)
    cands, params = {}, {}
    for cand, t in candidates_for("intensity", scale=top, unit_offset=top * 2.0**-10).items():
        cands[cand] = moments_of(x if cand == "identity" else t.forward(np.clip(x, 0.0, top)))
        params[cand] = dict(t.params)
    counts, _ = np.histogram(x, bins=bins, range=(0.0, upper))
    hist = Histogram(low=0.0, high=upper, counts=counts.tolist(),
                     underflow=int(np.count_nonzero(x < 0)),
                     overflow=int(np.count_nonzero(x > upper)))
    pct = {f"{q:g}": float(np.percentile(x, q)) for q in PERCENTILES}
    return Distribution(name=name, kind="intensity", unit="a.u.", moments=cands["identity"],
                        percentiles=pct, candidates=cands, transforms=params, histogram=hist)


def explicit_distribution(name: str, kind: str, candidates: Mapping[str, Moments],
                          params: Mapping[str, Mapping[str, float]] | None = None,
                          percentiles: Mapping[str, float] | None = None) -> Distribution:
    """A Distribution whose candidate moments are given directly."""
    default = {"identity": {}, "ln": {"offset": 1.0}, "log10": {"offset": 1.0},
               "arcsin_sqrt": {"scale": 4096.0}}
    p = dict(params or {k: default[k] for k in candidates})
    return Distribution(name=name, kind=kind, moments=candidates["identity"],  # type: ignore[arg-type]
                        percentiles=dict(percentiles or {}), candidates=dict(candidates),
                        transforms=p)


def symmetric_intensity(kurtosis: float, *, n: int = 100_000) -> Distribution:
    """Brain intensities with skewness 0 and the given excess kurtosis, and *no histogram*
    (statistics written before issue 10); every transform scores worse than identity, so
    identity is chosen and its (unclipped) kurtosis is the one measured."""
    ident = make_moments(n, 500.0, 100.0, 0.0, kurtosis)
    worse = make_moments(n, 6.0, 0.2, -1.0, kurtosis + 2)
    pct = {"0.5": 250.0, "99.5": 750.0, "50": 500.0}
    return explicit_distribution("intensity/t1/brain", "intensity",
                                 {"identity": ident, "ln": worse, "log10": worse}, None, pct)


def three_point_intensity(outer: int, *, centre: int = 10_000) -> np.ndarray:
    """``outer`` voxels at each of 1000.5 and 3000.5 and ``centre`` at 2000.5: bin centres
    of the engine's histogram over [0, 4096] (width 1). Symmetric, excess kurtosis
    ``N / (2 outer) - 3`` with ``N = centre + 2 outer`` (hand formula: m2 = 2 outer a²/N,
    m4 = 2 outer a⁴/N)."""
    return np.concatenate([np.full(outer, 1000.5), np.full(centre, 2000.5),
                           np.full(outer, 3000.5)])


def t2_intensity(rng: np.random.Generator, n: int = 50_000) -> np.ndarray:
    """Student-t(2) intensities around 2000 (scale 100), truncated at ±19 scales so the
    histogram's range stays [0, 4096] (bin width 1): a tail the 0.5/99.5 clip keeps."""
    t = scipy.stats.t.rvs(df=2, size=n, random_state=rng)
    return 2000.0 + 100.0 * np.clip(t, -19.0, 19.0)


def ellipsoid_profile(semi: float, *, n_slices: int = 155, centre: float | None = None,
                      peak: float = 0.05) -> list[float]:
    """Per-slice tumour fraction of one ellipsoid with semi-axis ``semi`` slices along z,
    sampled at slice centres (its cross-section is ∝ 1 - t², the brain slice constant)."""
    z = np.arange(n_slices) + 0.5
    c = n_slices / 2 + 0.3 if centre is None else centre
    return (peak * np.clip(1.0 - ((z - c) / semi) ** 2, 0.0, None)).tolist()


def multifocal_profile(semis: Sequence[float], gaps: Sequence[float], *, n_slices: int = 155,
                       start: float = 20.0, peak: float = 0.05) -> list[float]:
    """Several ellipsoids one after the other along z with ``gaps`` tumour-free slices
    between them (``len(gaps) == len(semis) - 1``)."""
    z = np.arange(n_slices) + 0.5
    f = np.zeros(n_slices)
    c = start
    for i, s in enumerate(semis):
        c += s
        f = np.maximum(f, peak * np.clip(1.0 - ((z - c) / s) ** 2, 0.0, None))
        c += s + (gaps[i] if i < len(gaps) else 0.0)
    return f.tolist()


def uniform_profile(share: float, *, n_slices: int = 155, level: float = 0.04) -> list[float]:
    """A slab: the same tumour fraction on ``share`` of the brain slices, 0 elsewhere."""
    k = round(share * n_slices)
    start = (n_slices - k) // 2
    f = np.zeros(n_slices)
    f[start:start + k] = level
    return f.tolist()


def cv_profile(cv: float) -> list[float]:
    """A profile whose CV within the tumour's extent is ``cv``, by hand: two slices
    ``(1 ± cv)·0.02`` (mean 0.02, population std 0.02·cv) for cv < 1; for cv >= 1 two
    tumour slices with ``k = 2 cv²`` empty slices between them (mean 2/(k+2), E[f²] the
    same up to the level, CV² = (k + 2)/2 - 1 = k/2)."""
    if cv < 1:
        return [0.0, 0.02 * (1 + cv), 0.02 * (1 - cv), 0.0]
    k = round(2 * cv * cv)
    if not math.isclose(k / 2, cv * cv):
        raise ValueError(f"cv_profile needs 2 cv² to be an integer for cv >= 1, got {cv!r}")
    return [0.0, 0.03, *([0.0] * k), 0.03, 0.0]


def make_stats(*, fractions: Sequence[float] | np.ndarray,
               volumes: Sequence[float] | np.ndarray,
               intensities: Mapping[str, Distribution | np.ndarray],
               profiles: Sequence[Sequence[float]] | None = None,
               components: Sequence[float] | None = None,
               voxel_ml: float = 0.001) -> DatasetStats:
    """DatasetStats from per-case samples, per-case slice profiles and per-channel brain
    intensities (arrays become `intensity_distribution`s, with histograms).

    ``profiles`` (one per case, the per-slice tumour fraction over the brain slices)
    default to one compact ellipsoid per case (semi-axes 4 to 15 slices).
    """
    n = len(fractions)
    if profiles is None:
        profiles = [ellipsoid_profile(4 + i % 12) for i in range(n)]
    if len(profiles) != n or len(volumes) != n:
        raise ValueError(f"need one profile and one volume per case: {n} cases, "
                         f"{len(profiles)} profiles, {len(volumes)} volumes")
    comps = list(components) if components is not None else [1] * n
    channels = list(intensities)
    intensity = {}
    for ch, v in intensities.items():
        d = v if isinstance(v, Distribution) else intensity_distribution(
            f"intensity/{ch}/brain", v)
        intensity[ch] = {"brain": d}
    all_slices = [f for p in profiles for f in p]
    labels = {
        "tumour_fraction_case": distribution("label/tumour_fraction_case", "fraction",
                                             fractions, unit_offset=1e-6),
        "tumour_fraction_slice": distribution("label/tumour_fraction_slice", "fraction",
                                              all_slices, unit_offset=1e-6),
        "tumour_volume_ml": distribution("label/tumour_volume_ml", "volume", volumes,
                                         unit_offset=voxel_ml),
        "components": distribution("label/components", "count", comps, unit_offset=1.0),
    }
    cases = [f"case-{i:03d}" for i in range(n)]
    brain = 1_000_000
    per_case = {}
    for cid, f, v, c, p in zip(cases, fractions, volumes, comps, profiles, strict=True):
        tum = round(float(f) * brain)
        per_case[cid] = CaseLabelStats(
            brain_voxels=brain, tumour_voxels=tum, tumour_fraction=float(f),
            tumour_volume_ml=max(float(v), 0.0), components=int(c),
            class_voxels={"background": brain - tum, "NCR": 0, "ED": tum, "ET": 0},
            slice_fractions=[float(x) for x in p])
    return DatasetStats(
        dataset="synthetic", store="memory://synthetic", content_hash="ab" * 32, n_cases=n,
        cases=cases, channels=channels, spacing_mm=[1.0, 1.0, 1.0], voxel_ml=voxel_ml,
        label_scheme={"0": "background", "1": "NCR", "2": "ED", "3": "ET"},
        intensity=intensity, labels=labels,
        class_frequencies={"background": 0.97, "NCR": 0.01, "ED": 0.015, "ET": 0.005},
        per_case=per_case, created_at="2026-01-01T00:00:00+00:00", code_version="0.1.0",
        histogram_bins=HIST_BINS,
    )


def replace_label_moments(stats: DatasetStats, key: str, m: Moments) -> DatasetStats:
    """Copy of ``stats`` with the raw moments of one label distribution replaced."""
    d = stats.labels[key]
    new = d.model_copy(update={"moments": m, "candidates": {**d.candidates, "identity": m}})
    return stats.model_copy(update={"labels": {**stats.labels, key: new}})


def with_median_fraction(stats: DatasetStats, f: float) -> DatasetStats:
    d = stats.labels["tumour_fraction_case"]
    new = d.model_copy(update={"percentiles": {**d.percentiles, "50": f}})
    return stats.model_copy(update={"labels": {**stats.labels, "tumour_fraction_case": new}})


def with_profiles(stats: DatasetStats, profiles: Sequence[Sequence[float]]) -> DatasetStats:
    """Copy of ``stats`` whose cases have the given slice profiles (as many as given)."""
    items = list(stats.per_case.items())[: len(profiles)]
    per_case = {cid: c.model_copy(update={"slice_fractions": list(p)})
                for (cid, c), p in zip(items, profiles, strict=True)}
    return stats.model_copy(update={"per_case": per_case})


def with_intensities(stats: DatasetStats, **channels: Distribution | np.ndarray) -> DatasetStats:
    """Copy of ``stats`` with only the given channels' brain intensities."""
    intensity = {ch: {"brain": d if isinstance(d, Distribution)
                      else intensity_distribution(f"intensity/{ch}/brain", d)}
                 for ch, d in channels.items()}
    return stats.model_copy(update={"channels": list(channels), "intensity": intensity})


def multifocal_profiles(rng: np.random.Generator, n: int) -> list[list[float]]:
    """Three foci per case (semi-axes 3-6 slices) separated by gaps of at least twice the
    largest semi-axis: the empty share of the extent is >= 0.4, CV >= 1 (see TestAdaptation)."""
    out = []
    for _ in range(n):
        semis = rng.integers(3, 7, size=3).astype(float)
        gaps = 2 * semis.max() + rng.integers(0, 4, size=2)
        out.append(multifocal_profile(semis, gaps))
    return out


def small_tumour_stats(rng: np.random.Generator, *, n: int = 60) -> DatasetStats:
    """Strong imbalance, log-normal volumes, multifocal tumours, a channel (t1) whose tail
    survives the 0.5/99.5 clip and a normal one (t2)."""
    volumes = rng.lognormal(mean=2.5, sigma=1.0, size=n)           # mL, right-skewed
    fractions = np.clip(volumes / 1400.0, 0, 1)                     # ~1 % median
    return make_stats(fractions=fractions, volumes=volumes,
                      profiles=multifocal_profiles(rng, n),
                      intensities={"t1": t2_intensity(rng, 20_000),
                                   "t2": rng.normal(800, 50, size=20_000)})


def balanced_stats(rng: np.random.Generator, *, n: int = 60) -> DatasetStats:
    """Tumour fraction ~30 %, symmetric volumes, normal intensities, compact tumours."""
    fractions = rng.uniform(0.25, 0.35, size=n)
    return make_stats(fractions=fractions, volumes=rng.normal(300, 20, size=n),
                      intensities={"t1": rng.normal(600, 40, size=20_000)})


def clipped_kurtosis(x: np.ndarray, transform, percentiles: Sequence[float]) -> float:
    """Oracle for R3: scipy's excess kurtosis of f(clip(x, p_low, p_high)), numpy's
    percentiles of the samples themselves."""
    lo, hi = np.percentile(x, percentiles)
    return float(scipy.stats.kurtosis(transform.forward(np.clip(x, lo, hi))))


@pytest.fixture
def base(rng: np.random.Generator) -> DatasetStats:
    return small_tumour_stats(rng)


# ----------------------------------------------------------------------- R1
class TestImbalance:
    @pytest.mark.parametrize(("f", "outcome"), [
        (0.001, "dice"),    # issue 10 calibration: Dice at every imbalance below 20 %
        (0.006, "dice"),
        (0.05, "dice"),
        (0.12, "dice"),
        (IMBALANCE_MILD - 1e-9, "dice"),
        (IMBALANCE_MILD, "none"),
        (0.9, "none"),
    ])
    def test_both_sides_of_each_threshold(self, base: DatasetStats, f: float,
                                          outcome: str) -> None:
        d = imbalance_rule(with_median_fraction(base, f))
        assert d.outcome == outcome
        assert d.rule == "R1"
        assert d.measured == f
        assert d.fired is (outcome != "none")

    def test_issue10_calibration_strong_imbalance_gets_dice_not_tversky(
            self, base: DatasetStats) -> None:
        # docs/evidence-calibration.md: Tversky 0.3/0.7 + BCE trailed Dice + CE in 7 of 8
        # arms; the rule now adds Dice, without Tversky weights
        d = imbalance_rule(with_median_fraction(base, 0.006))
        assert d.params == {}
        assert d.text == "median tumour fraction per case 0.6% < 20%: Dice region term added"

    def test_median_comes_from_the_samples(self, rng: np.random.Generator) -> None:
        fr = np.array([0.01, 0.02, 0.03, 0.2, 0.4])   # numpy median: 0.03
        s = make_stats(fractions=fr, volumes=[1, 2, 3, 4, 5],
                       intensities={"t1": rng.normal(100, 5, 1000)})
        assert imbalance_rule(s).measured == pytest.approx(0.03, rel=1e-12)

    @pytest.mark.parametrize("f", [math.nan, -0.1, 1.5])
    def test_undefined_or_impossible_median_raises(self, base: DatasetStats, f: float) -> None:
        with pytest.raises(ValueError, match=r"median tumour fraction must be in \[0, 1\]"):
            imbalance_rule(with_median_fraction(base, f))

    def test_missing_distribution_names_the_field(self, base: DatasetStats) -> None:
        labels = {k: v for k, v in base.labels.items() if k != "tumour_fraction_case"}
        with pytest.raises(ValueError, match=r"field labels\.tumour_fraction_case is missing"):
            imbalance_rule(base.model_copy(update={"labels": labels}))


# ----------------------------------------------------------------------- R2
class TestVolumeTail:
    @pytest.mark.parametrize(("skew", "outcome", "gamma"), [
        (FOCAL_SKEW_THRESHOLD + 1e-6, "focal", 1.0),   # enters at gamma = 1
        (2.0, "focal", 2.0),                           # exponential tail -> Lin's gamma = 2
        (2.5, "focal", 2.5),
        (7.0, "focal", 3.0),                           # capped
        (FOCAL_SKEW_THRESHOLD, "bce", None),
        (0.2, "bce", None),
        (-3.0, "bce", None),                           # a left tail is not a small-lesion tail
        (math.nan, "bce", None),
    ])
    def test_both_sides_of_the_threshold(self, base: DatasetStats, skew: float, outcome: str,
                                         gamma: float | None) -> None:
        # n = 5000: SES = sqrt(6n(n-1)/((n-2)(n+1)(n+3))) = 0.0346, so the lower bound is
        # within 0.06 of G1 (= g1 here: make_moments sets both) and the threshold decides,
        # except within 0.06 above it (see TestSkewnessGuard)
        n = 5000
        shift = SKEW_Z * skewness_standard_error(n)
        g1 = skew + shift if skew > FOCAL_SKEW_THRESHOLD else skew
        s = replace_label_moments(base, "tumour_volume_ml", make_moments(n, 10, 5, g1, 3.0))
        d = volume_tail_rule(s)
        assert d.outcome == outcome
        assert d.fired is (outcome == "focal")
        if gamma is None:
            assert "gamma" not in d.params
        else:
            assert d.params["gamma"] == pytest.approx(min(max(g1, 1.0), 3.0), abs=1e-4)
        if math.isnan(skew):
            assert d.params == {}
        else:
            assert d.params["lower_bound"] == pytest.approx(g1 - shift, abs=1e-4)

    def test_lognormal_volumes_fire(self, base: DatasetStats) -> None:
        # Log-normal(sigma=1): population skewness (e+2)sqrt(e-1) = 6.18 (closed form).
        d = volume_tail_rule(base)
        assert d.outcome == "focal"
        assert d.measured == pytest.approx(base.labels["tumour_volume_ml"].moments.skewness)
        assert d.params["lower_bound"] > FOCAL_SKEW_THRESHOLD

    def test_undefined_skewness_says_so(self, base: DatasetStats) -> None:
        s = replace_label_moments(base, "tumour_volume_ml",
                                  make_moments(2, 10, 5, math.nan, math.nan))
        assert "undefined: BCE" in volume_tail_rule(s).text


class TestSkewnessGuard:
    """Issue 10, R2: the tail must be shown at the dataset's n, not read off a point
    estimate (8 cases from a population of skewness 1.8 gave 0.89)."""

    @pytest.mark.parametrize("n", [8, 20])
    def test_standard_error_matches_simulation(self, n: int) -> None:
        # Independent oracle: the spread of scipy's adjusted skewness G1 over 20 000 normal
        # samples of size n; its standard error is about SES / sqrt(2 * 20000) relative,
        # and the Monte-Carlo std is within 3 % of the closed form here.
        rng = np.random.default_rng(n)
        g = scipy.stats.skew(rng.normal(size=(20_000, n)), axis=1, bias=False)
        assert float(np.std(g)) == pytest.approx(skewness_standard_error(n), rel=0.03)

    def test_standard_error_closed_form(self) -> None:
        # n = 10: sqrt(6*10*9 / (8*11*13)) = sqrt(540/1144) = 0.68704 (by hand)
        assert skewness_standard_error(10) == pytest.approx(math.sqrt(540 / 1144), rel=1e-12)
        assert math.isnan(skewness_standard_error(2))

    @pytest.mark.parametrize("n", [0, 3, SKEW_MIN_N - 1])
    def test_undefined_below_eight_cases(self, n: int) -> None:
        assert math.isnan(skewness_lower_bound(1.5, n))
        assert math.isnan(skewness_lower_bound(math.nan, 50))

    def test_issue10_r2_too_few_cases_keep_bce(self, base: DatasetStats) -> None:
        # Before issue 10, g1 = 1.5 from 5 cases chose focal.
        s = replace_label_moments(base, "tumour_volume_ml", make_moments(5, 10, 5, 1.5, 1.0))
        d = volume_tail_rule(s)
        assert (d.outcome, d.fired) == ("bce", False)
        assert "too few cases" in d.text

    @pytest.mark.parametrize("n", [8, 9, 20, 200])
    def test_issue10_r2_fires_exactly_when_the_lower_bound_exceeds_the_threshold(
            self, base: DatasetStats, n: int) -> None:
        for g1 in np.linspace(0.5, 4.0, 36):
            s = replace_label_moments(base, "tumour_volume_ml",
                                      make_moments(n, 10, 5, float(g1), 1.0))
            d = volume_tail_rule(s)
            bound = float(g1) - 1.6448536269514722 * skewness_standard_error(n)  # z of 95 %
            assert d.fired is bool(bound > FOCAL_SKEW_THRESHOLD), (n, g1)

    def test_n8_needs_a_much_heavier_tail(self, base: DatasetStats) -> None:
        # SES(8) = sqrt(6*8*7/(6*9*11)) = 0.7521; bound = G1 - 1.2371: G1 = 1.5 does not
        # fire (bound 0.263), G1 = 2.5 does (bound 1.263).
        for g1, fired in ((1.5, False), (2.5, True)):
            s = replace_label_moments(base, "tumour_volume_ml", make_moments(8, 10, 5, g1, 1.0))
            assert volume_tail_rule(s).fired is fired

    def test_issue10_r2_noise_and_power_over_300_seeds(self, base: DatasetStats) -> None:
        # The defect: with 8 cases from a log-normal population of skewness 1.8 (sigma
        # 0.5106: (e^s² + 2) sqrt(e^s² - 1) = 1.8, closed form) the point-estimate rule
        # g1 > 1 fired on a coin weighted by n. The guarded rule fires rarely at n = 8 and
        # more often as n grows; on normal volumes (true skewness 0) it never fires where
        # the old rule did in a few percent (all computed here, not hard-coded).
        def rates(draw, n: int) -> tuple[float, float]:
            new = old = 0
            for seed in range(300):
                x = draw(np.random.default_rng(seed), n)
                g1 = float(scipy.stats.skew(x))
                s = replace_label_moments(base, "tumour_volume_ml", moments_of(x))
                new += volume_tail_rule(s).fired
                old += g1 > FOCAL_SKEW_THRESHOLD
            return new / 300, old / 300

        def normal(r: np.random.Generator, n: int) -> np.ndarray:
            return r.normal(300, 50, n)

        def lognormal(r: np.random.Generator, n: int) -> np.ndarray:
            return r.lognormal(0, 0.5106, n)

        for n in (5, 8, 20):
            new, old = rates(normal, n)
            assert new <= 0.01
            assert old > new
        new8, old8 = rates(lognormal, 8)
        new30, _ = rates(lognormal, 30)
        new200, _ = rates(lognormal, 200)
        # measured when written: old 0.26 at n = 8; new 0.04, 0.18, 0.70 at n = 8, 30, 200
        assert old8 > 0.2            # the coin: the point estimate fires in a quarter of them
        assert new8 < old8 / 3       # the guard: far fewer at n = 8
        assert new8 < new30 < new200
        assert new200 > 0.5          # the tail is found when the data can show it


# ----------------------------------------------------------------------- R3
class TestIntensityTail:
    @pytest.mark.parametrize(("outer", "fired"), [
        (400, True),     # k = 10800/800 - 3 = 10.5
        (999, True),     # k = 11998/1998 - 3 = 3.005
        (1000, False),   # k = 12000/2000 - 3 = 3 exactly: not above
        (1001, False),   # k = 12002/2002 - 3 = 2.995
        (3000, False),   # k = 16000/6000 - 3 = -0.33
    ])
    def test_both_sides_of_the_threshold(self, base: DatasetStats, outer: int,
                                         fired: bool) -> None:
        x = three_point_intensity(outer)
        s = with_intensities(base, t1=x)
        assert select(s.intensity["t1"]["brain"]).chosen == "identity"
        d = intensity_tail_rule(s)
        # the clip at 0.5/99.5 leaves the outer masses (each > 0.5 %) where they are
        k = x.size / (2 * outer) - 3
        assert d.measured == pytest.approx(k, abs=1e-9)
        assert d.fired is fired
        assert d.outcome == ("clip" if fired else "none")
        if fired:
            # clipping rescales a symmetric three-point distribution without changing its
            # shape, so no level helps and the tightest is used
            assert d.params == {"t1": list(CLIP_LEVELS[-1])}
        else:
            assert d.params == {}
            assert "keeps the 0.5/99.5 percentile clip" in d.text

    def test_issue10_r3_bright_outliers_vanish_under_the_clip(
            self, base: DatasetStats, rng: np.random.Generator) -> None:
        # Normal brain with 0.3 % voxels at 25 SDs: the outliers dominate the raw kurtosis
        # (scipy: about 138), not what the network sees after the 0.5/99.5 clip (about
        # -0.08 on the raw scale). Before issue 10 this added a robust loss term.
        x = np.concatenate([rng.normal(1000, 100, 199_400), np.full(600, 3500.0)])
        assert scipy.stats.kurtosis(x) > 100
        lo, hi = np.percentile(x, [0.5, 99.5])
        assert abs(scipy.stats.kurtosis(np.clip(x, lo, hi))) < 0.2
        s = with_intensities(base, t1=x)
        t = select(s.intensity["t1"]["brain"]).transform()
        d = intensity_tail_rule(s)
        assert (d.outcome, d.fired) == ("none", False)
        # histogram of 4096 bins of width 1 here, against sd ~100: see test_seen.py
        assert d.measured == pytest.approx(clipped_kurtosis(x, t, CLIP_LEVELS[0]), abs=0.02)
        assert abs(d.measured) < 0.5

    def test_issue10_r3_heavy_tail_that_survives_the_clip_is_clipped_tighter(
            self, base: DatasetStats, rng: np.random.Generator) -> None:
        x = t2_intensity(rng)
        s = with_intensities(base, t1=x)
        t = select(s.intensity["t1"]["brain"]).transform()
        oracle = [clipped_kurtosis(x, t, lv) for lv in CLIP_LEVELS]
        # t(2) clipped at its quantiles (scipy, this sample): about 7.1, 3.7, 1.6, -0.09
        assert oracle[0] > KURTOSIS_THRESHOLD + 1
        first = next(lv for lv, k in zip(CLIP_LEVELS[1:], oracle[1:], strict=True)
                     if k <= KURTOSIS_THRESHOLD)
        d = intensity_tail_rule(s)
        assert (d.outcome, d.fired) == ("clip", True)
        assert d.measured == pytest.approx(oracle[0], abs=0.02)
        assert d.params == {"t1": list(first)}
        assert f"t1 clipped at {first[0]:g}/{first[1]:g}" in d.text

    def test_maximum_over_channels(self, base: DatasetStats, rng: np.random.Generator) -> None:
        a, b = rng.normal(1000, 100, 50_000), t2_intensity(rng)
        s = with_intensities(base, a=a, b=b)
        d = intensity_tail_rule(s)
        tb = select(s.intensity["b"]["brain"]).transform()
        assert d.measured == pytest.approx(clipped_kurtosis(b, tb, CLIP_LEVELS[0]), abs=0.02)
        assert set(d.params) == {"b"}
        assert "(b, after" in d.text

    def test_measured_after_the_chosen_transform(self, rng: np.random.Generator) -> None:
        # Log-normal intensities: raw excess kurtosis is large, ln makes them normal, the
        # normalization plan applies ln then clips, so nothing more to do.
        x = rng.lognormal(5.0, 0.6, size=50_000)
        s = make_stats(fractions=[0.01] * 5, volumes=[1, 2, 3, 4, 5], intensities={"t1": x})
        assert s.intensity["t1"]["brain"].moments.kurtosis > KURTOSIS_THRESHOLD
        t = select(s.intensity["t1"]["brain"]).transform()
        d = intensity_tail_rule(s)
        assert not d.fired
        assert "after ln and the 0.5/99.5 clip" in d.text
        # a clipped normal sample: about -0.2
        assert d.measured == pytest.approx(clipped_kurtosis(x, t, CLIP_LEVELS[0]), abs=0.02)
        assert abs(d.measured) < 0.5

    @pytest.mark.parametrize("k", [KURTOSIS_THRESHOLD + 1e-6, 9.0, 100.0, KURTOSIS_THRESHOLD,
                                   0.0, -1.2])
    def test_issue10_r3_without_histogram_measures_unclipped_and_never_clips(
            self, base: DatasetStats, k: float) -> None:
        # Statistics written before issue 10 have no histogram: the rule falls back to the
        # unclipped kurtosis after the chosen transform, says so, and cannot choose a clip.
        s = with_intensities(base, t1=symmetric_intensity(k))
        d = intensity_tail_rule(s)
        assert d.measured == k
        assert (d.outcome, d.fired, d.params) == ("none", False, {})
        assert "unclipped: these statistics have no histogram" in d.text
        if k > KURTOSIS_THRESHOLD:
            assert "the tighter clip cannot be measured" in d.text

    def test_all_undefined_is_not_fired(self, base: DatasetStats) -> None:
        s = with_intensities(base, t1=symmetric_intensity(math.nan))
        d = intensity_tail_rule(s)
        assert not d.fired
        assert math.isnan(d.measured)

    def test_missing_brain_region_names_the_field(self, base: DatasetStats) -> None:
        s = base.model_copy(update={"intensity": {"t1": {}, "t2": base.intensity["t2"]}})
        with pytest.raises(ValueError, match=r"field intensity\.t1\.brain is missing"):
            intensity_tail_rule(s)


# ----------------------------------------------------------------------- R5
class TestAdaptation:
    @staticmethod
    def with_cv(stats: DatasetStats, cv: float) -> DatasetStats:
        return with_profiles(stats, [cv_profile(cv)] * 5)

    @pytest.mark.parametrize(("cv", "region", "outcome"), [
        (ADAPT_CV_THRESHOLD * (1 + 1e-6), "dice", "heterogeneous"),
        (3.0, "dice", "heterogeneous"),
        (3.0, "none", "heterogeneous"),
        (ADAPT_CV_THRESHOLD * (1 - 1e-6), "dice", "fixed"),
        (0.4, "dice", "fixed"),
    ])
    def test_both_sides_of_the_threshold(self, base: DatasetStats, cv: float, region: str,
                                         outcome: str) -> None:
        d = adaptation_rule(self.with_cv(base, cv), region)
        assert d.outcome == outcome
        assert d.fired is (outcome == "heterogeneous")
        assert d.measured == pytest.approx(cv, rel=1e-12)
        assert d.params == {}  # issue 10 calibration: recorded, the loss is not changed

    def test_threshold_is_twice_one_ellipsoid(self) -> None:
        assert math.isclose(ADAPT_CV_THRESHOLD, 2 * ELLIPSOID_CV, rel_tol=1e-15)

    def test_median_over_cases_with_tumour(self, base: DatasetStats) -> None:
        # CVs 0.2, 0.4, 0.6, 2, 3 and two tumour-free cases: numpy median of the five = 0.6
        profiles = [cv_profile(c) for c in (0.2, 3.0, 0.6, 2.0, 0.4)] + [[0.0] * 20] * 2
        d = adaptation_rule(with_profiles(base, profiles), "tversky")
        assert d.measured == pytest.approx(0.6, rel=1e-12)
        assert "median over 5 cases" in d.text

    def test_no_tumour_anywhere_is_undefined(self, base: DatasetStats) -> None:
        d = adaptation_rule(with_profiles(base, [[0.0] * 155] * 4), "tversky")
        assert d.outcome == "fixed"
        assert math.isnan(d.measured)
        assert "undefined (no tumour)" in d.text

    @pytest.mark.parametrize("semi", [200.0, 40.0, 20.0, 10.0, 5.0])
    def test_slice_burden_cv_of_an_ellipsoid(self, semi: float) -> None:
        # Closed form 1/sqrt(5) (ELLIPSOID_CV) for the continuous profile; sampling at slice
        # centres moves the ends of the extent by up to one slice in 2·semi, a relative
        # error O(1/semi): stated tolerance 1/semi (observed <= 0.66/semi).
        for offset in np.linspace(0.0, 1.0, 5):
            f = ellipsoid_profile(semi, n_slices=int(2 * semi) + 40,
                                  centre=semi + 20 + offset)
            assert slice_burden_cv(f) == pytest.approx(ELLIPSOID_CV, abs=1.0 / semi)

    def test_slice_burden_cv_counts_gaps_and_ignores_tumour_free_slices(self) -> None:
        f = [0, 0, 0.1, 0, 0.1, 0, 0, 0]
        # extent [0.1, 0, 0.1]: mean 1/15, population std sqrt(2)/30 -> CV sqrt(2)/2 (hand)
        assert slice_burden_cv(f) == pytest.approx(math.sqrt(2) / 2, rel=1e-12)
        assert math.isnan(slice_burden_cv([0.0, 0.0]))
        assert math.isnan(slice_burden_cv([]))

    @pytest.mark.parametrize("semis", [(4, 6, 9, 12, 20, 30), (5,) * 6, (25,) * 6])
    def test_issue10_r5_compact_tumour_does_not_fire(self, base: DatasetStats,
                                                     semis: tuple[int, ...]) -> None:
        d = adaptation_rule(with_profiles(base, [ellipsoid_profile(s) for s in semis]),
                            "dice")
        assert (d.outcome, d.fired) == ("fixed", False)
        assert d.measured == pytest.approx(ELLIPSOID_CV, abs=1.0 / min(semis))

    @pytest.mark.parametrize(("semis", "gaps"), [
        ((6, 6, 6), (12, 12)),   # gap share g = 24/60 = 0.4: closed form CV 1
        ((8, 8), (20,)),         # g = 20/52: CV 0.975
        ((5, 5, 5), (15, 15)),   # g = 0.5: CV sqrt(1.4) = 1.18
    ])
    def test_issue10_r5_multifocal_tumour_fires(self, base: DatasetStats,
                                                semis: tuple[int, ...],
                                                gaps: tuple[int, ...]) -> None:
        # Equal ellipsoids with a share g of empty slices in the extent: E[f] and E[f²]
        # shrink by (1 - g), so CV² = (1 + 1/5)/(1 - g) - 1 (closed form); above the
        # threshold when g > 1/3, gaps longer than a focus.
        g = sum(gaps) / (2 * sum(semis) + sum(gaps))
        closed = math.sqrt(1.2 / (1 - g) - 1)
        profiles = [multifocal_profile(semis, gaps, start=10.0 + i) for i in range(5)]
        d = adaptation_rule(with_profiles(base, profiles), "tversky")
        assert (d.outcome, d.fired) == ("heterogeneous", True)
        assert d.measured == pytest.approx(closed, abs=1.0 / min(semis))
        assert d.measured > ADAPT_CV_THRESHOLD

    def test_multifocal_with_short_gaps_does_not_fire(self, base: DatasetStats) -> None:
        # g = 5/45: closed form CV sqrt(1.2 * 45/40 - 1) = 0.59, below 2/sqrt(5)
        profiles = [multifocal_profile((10, 10), (5,))] * 3
        d = adaptation_rule(with_profiles(base, profiles), "tversky")
        assert d.measured == pytest.approx(math.sqrt(1.2 * 45 / 40 - 1), abs=0.1)
        assert not d.fired

    def test_issue10_r5_uniform_tumour_does_not_fire(self, base: DatasetStats) -> None:
        # A slab with the same fraction on 10 % of the brain slices. Over all brain slices
        # (the old measure) its CV is sqrt((1 - q)/q) = 3 for q = 0.1, above the old
        # threshold 1; within the tumour's extent it is 0.
        f = uniform_profile(0.1)
        q = np.count_nonzero(f) / len(f)
        old = float(np.std(f) / np.mean(f))
        assert old == pytest.approx(math.sqrt((1 - q) / q), rel=1e-12)
        assert old > 1.0
        d = adaptation_rule(with_profiles(base, [f] * 5), "tversky")
        assert d.measured == 0.0
        assert (d.outcome, d.fired) == ("fixed", False)


# ----------------------------------------------------------------------- R4
class TestWeighting:
    @pytest.mark.parametrize(("n", "method", "fired"), [
        (1, "static", False), (2, "static", False), (3, "cov", True), (5, "cov", True)])
    def test_by_number_of_terms(self, n: int, method: str, fired: bool) -> None:
        d = weighting_rule(n)
        assert (d.outcome, d.params, d.measured, d.fired) == (method, {}, float(n), fired)

    def test_no_terms_raises(self) -> None:
        with pytest.raises(ValueError, match=r"need at least one loss term, got 0"):
            weighting_rule(0)


# ----------------------------------------------------------------------- assembly
class TestDecideLoss:
    def test_small_multifocal_heavy_tailed_tumours(self, base: DatasetStats) -> None:
        plan = decide_loss(base)
        assert [t.name for t in plan.terms] == ["dice", "focal"]
        assert (plan.weighting.method, plan.weighting.params) == ("static", {})
        assert [d.rule for d in plan.decisions] == ["R1", "R2", "R3", "R5", "R4"]
        dice, focal = plan.terms
        assert dice.params == {"include_background": False}
        assert set(focal.params) == {"gamma"}   # the bound stays in the decision
        assert 1.0 <= focal.params["gamma"] <= 3.0
        r3 = plan.decisions[2]
        assert (r3.outcome, set(r3.params)) == ("clip", {"t1"})

    def test_issue10_calibration_heterogeneous_burden_leaves_the_loss(
            self, base: DatasetStats) -> None:
        # R5 fires (multifocal profiles) but no longer swaps in adaptive Tversky
        multifocal = with_profiles(base, [multifocal_profile((5, 5, 5), (15, 15))] * 5)
        compact = with_profiles(base, [ellipsoid_profile(8)] * 5)
        a, b = decide_loss(multifocal), decide_loss(compact)
        assert (a.decisions[3].outcome, b.decisions[3].outcome) == ("heterogeneous", "fixed")
        assert [t.name for t in a.terms] == [t.name for t in b.terms] == ["dice", "focal"]

    def test_issue10_r3_adds_no_loss_term(self, base: DatasetStats) -> None:
        plan = decide_loss(base)
        assert plan.decisions[2].fired
        assert "barron" not in {t.name for t in plan.terms}
        assert not hasattr(rules, "BARRON_SCALE")

    def test_balanced_normal_data_is_bce_alone(self, rng: np.random.Generator) -> None:
        plan = decide_loss(balanced_stats(rng))
        assert [t.name for t in plan.terms] == ["bce"]
        assert plan.terms[0].params == {}
        assert (plan.weighting.method, plan.weighting.params) == ("static", {})

    def test_compact_tumours_keep_dice(self, base: DatasetStats) -> None:
        s = with_profiles(base, [ellipsoid_profile(4 + i % 12) for i in range(60)])
        plan = decide_loss(s)
        assert [t.name for t in plan.terms] == ["dice", "focal"]
        assert plan.terms[0].params == {"include_background": False}
        assert plan.weighting.method == "static"   # two terms of one scale: equal weights

    def test_every_term_reason_names_its_rule(self, base: DatasetStats) -> None:
        plan = decide_loss(base)
        for term, rule in zip(plan.terms, ["R1", "R2"], strict=True):
            assert term.reason.startswith(f"{rule}: ")
        assert "; R5: " in plan.terms[0].reason

    def test_term_names_are_a_subset_of_the_registry_names(self) -> None:
        assert set(rules.TERM_NAMES) == set(rules.LOSS_NAMES) - {"manifest"}


# ----------------------------------------------------------------------- the documented table
def test_docs_rule_table_states_every_rule_and_threshold() -> None:
    text = (REPO / "docs" / "rules.md").read_text(encoding="utf-8")
    for rule in RULES.values():
        assert re.search(rf"\|\s*{rule.id}\s*\|", text), f"{rule.id} missing from docs/rules.md"
        for name, value in rule.thresholds.items():
            assert f"{value:g}" in text, f"{rule.id} threshold {name}={value:g} not documented"
