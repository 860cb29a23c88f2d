"""Tests of stats.rules: each rule fires on the statistics that should trigger it, and only
then (both sides of every threshold), and decide_loss assembles the terms (issue 4).

Synthetic `DatasetStats` are built from samples (moments from scipy, the oracle), or
with moments set exactly where a threshold is probed.
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
    ADAPT_A,
    ADAPT_B,
    ADAPT_CV_THRESHOLD,
    FOCAL_SKEW_THRESHOLD,
    IMBALANCE_MILD,
    IMBALANCE_STRONG,
    KURTOSIS_THRESHOLD,
    RULES,
    adaptation_rule,
    decide_loss,
    imbalance_rule,
    intensity_tail_rule,
    volume_tail_rule,
    weighting_rule,
)
from stats.summary import PERCENTILES, DatasetStats, Distribution, Moments
from stats.transforms import candidates_for

REPO = Path(__file__).resolve().parents[2]


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
    """Brain intensities with skewness 0 and the given excess kurtosis; every transform
    scores worse than identity, so identity is chosen and its kurtosis is the one measured."""
    ident = make_moments(n, 500.0, 100.0, 0.0, kurtosis)
    worse = make_moments(n, 6.0, 0.2, -1.0, kurtosis + 2)
    pct = {"0.5": 250.0, "99.5": 750.0, "50": 500.0}
    return explicit_distribution("intensity/t1/brain", "intensity",
                                 {"identity": ident, "ln": worse, "log10": worse}, None, pct)


def make_stats(*, fractions: Sequence[float] | np.ndarray,
               slice_fractions: Sequence[float] | np.ndarray,
               volumes: Sequence[float] | np.ndarray,
               intensities: Mapping[str, Distribution | np.ndarray],
               components: Sequence[float] | None = None,
               voxel_ml: float = 0.001) -> DatasetStats:
    """DatasetStats from per-case samples and per-channel brain intensities."""
    n = len(fractions)
    upper = 4096.0
    channels = list(intensities)
    intensity = {}
    for ch, v in intensities.items():
        d = v if isinstance(v, Distribution) else distribution(
            f"intensity/{ch}/brain", "intensity", v, scale=upper)
        intensity[ch] = {"brain": d}
    labels = {
        "tumour_fraction_case": distribution("label/tumour_fraction_case", "fraction",
                                             fractions, unit_offset=1e-6),
        "tumour_fraction_slice": distribution("label/tumour_fraction_slice", "fraction",
                                              slice_fractions, unit_offset=1e-6),
        "tumour_volume_ml": distribution("label/tumour_volume_ml", "volume", volumes,
                                         unit_offset=voxel_ml),
        "components": distribution("label/components", "count",
                                   components if components is not None else [1] * n,
                                   unit_offset=1.0),
    }
    cases = [f"case-{i:03d}" for i in range(n)]
    return DatasetStats(
        dataset="synthetic", store="memory://synthetic", content_hash="ab" * 32, n_cases=n,
        cases=cases, channels=channels, spacing_mm=[1.0, 1.0, 1.0], voxel_ml=voxel_ml,
        label_scheme={"0": "background", "1": "NCR", "2": "ED", "3": "ET"},
        intensity=intensity, labels=labels,
        class_frequencies={"background": 0.97, "NCR": 0.01, "ED": 0.015, "ET": 0.005},
        per_case={}, created_at="2026-01-01T00:00:00+00:00", code_version="0.1.0",
        histogram_bins=4096,
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


def small_tumour_stats(rng: np.random.Generator, *, n: int = 60) -> DatasetStats:
    """Strong imbalance, log-normal volumes, heavy-tailed intensities, many empty slices."""
    volumes = rng.lognormal(mean=2.5, sigma=1.0, size=n)           # mL, right-skewed
    fractions = np.clip(volumes / 1400.0, 0, 1)                     # ~1 % median
    slices = np.concatenate([np.zeros(400), rng.beta(0.5, 20, size=200)])
    heavy = np.abs(scipy.stats.t.rvs(df=3, size=20_000, random_state=rng)) * 100 + 1000
    return make_stats(fractions=fractions, slice_fractions=slices, volumes=volumes,
                      intensities={"t1": heavy, "t2": rng.normal(800, 50, size=20_000)})


def balanced_stats(rng: np.random.Generator, *, n: int = 60) -> DatasetStats:
    """Tumour fraction ~30 %, symmetric volumes, normal intensities, even slices."""
    fractions = rng.uniform(0.25, 0.35, size=n)
    return make_stats(fractions=fractions, slice_fractions=rng.uniform(0.2, 0.4, size=600),
                      volumes=rng.normal(300, 20, size=n),
                      intensities={"t1": rng.normal(600, 40, size=20_000)})


@pytest.fixture
def base(rng: np.random.Generator) -> DatasetStats:
    return small_tumour_stats(rng)


# ----------------------------------------------------------------------- R1
class TestImbalance:
    @pytest.mark.parametrize(("f", "outcome"), [
        (0.006, "tversky"),
        (IMBALANCE_STRONG - 1e-9, "tversky"),
        (IMBALANCE_STRONG, "dice"),
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

    def test_tversky_weights_and_sentence(self, base: DatasetStats) -> None:
        d = imbalance_rule(with_median_fraction(base, 0.006))
        assert d.params == {"alpha": 0.3, "beta": 0.7}
        assert d.text.startswith("median tumour fraction per case 0.6% < 5%: Tversky region term")

    def test_median_comes_from_the_samples(self, rng: np.random.Generator) -> None:
        fr = np.array([0.01, 0.02, 0.03, 0.2, 0.4])   # numpy median: 0.03
        s = make_stats(fractions=fr, slice_fractions=fr, volumes=[1, 2, 3, 4, 5],
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
        s = replace_label_moments(base, "tumour_volume_ml", make_moments(50, 10, 5, skew, 3.0))
        d = volume_tail_rule(s)
        assert d.outcome == outcome
        assert d.fired is (outcome == "focal")
        if gamma is None:
            assert d.params == {}
        else:
            assert d.params["gamma"] == pytest.approx(gamma, abs=1e-4)

    def test_lognormal_volumes_fire(self, base: DatasetStats) -> None:
        # Log-normal(sigma=1): population skewness (e+2)sqrt(e-1) = 6.18 (closed form).
        d = volume_tail_rule(base)
        assert d.outcome == "focal"
        assert d.measured == pytest.approx(base.labels["tumour_volume_ml"].moments.skewness)

    def test_undefined_skewness_says_so(self, base: DatasetStats) -> None:
        s = replace_label_moments(base, "tumour_volume_ml",
                                  make_moments(2, 10, 5, math.nan, math.nan))
        assert "undefined: BCE" in volume_tail_rule(s).text


# ----------------------------------------------------------------------- R3
class TestIntensityTail:
    @pytest.mark.parametrize(("k", "fired", "alpha0"), [
        (KURTOSIS_THRESHOLD + 1e-6, True, 1.0),   # Laplace tail -> alpha 1 (pseudo-Huber)
        (9.0, True, 0.5),                         # 6 / (3 + 9)
        (100.0, True, 0.1),                       # floor: 6/103 < 0.1
        (KURTOSIS_THRESHOLD, False, None),
        (0.0, False, None),
        (-1.2, False, None),                      # uniform: light tails
    ])
    def test_both_sides_of_the_threshold(self, base: DatasetStats, k: float, fired: bool,
                                         alpha0: float | None) -> None:
        s = base.model_copy(update={"channels": ["t1"],
                                    "intensity": {"t1": {"brain": symmetric_intensity(k)}}})
        d = intensity_tail_rule(s)
        assert d.fired is fired
        assert d.outcome == ("barron" if fired else "none")
        if fired:
            assert d.params["alpha"] == pytest.approx(alpha0, abs=1e-4)

    def test_maximum_over_channels(self, base: DatasetStats) -> None:
        s = base.model_copy(update={"channels": ["a", "b"], "intensity": {
            "a": {"brain": symmetric_intensity(0.5)}, "b": {"brain": symmetric_intensity(4.0)}}})
        d = intensity_tail_rule(s)
        assert (d.measured, d.params["channel"]) == (4.0, "b")

    def test_measured_after_the_chosen_transform(self, rng: np.random.Generator) -> None:
        # Log-normal intensities: raw excess kurtosis is large, ln makes them normal, the
        # normalization plan applies ln, so no robust term.
        x = rng.lognormal(5.0, 0.6, size=50_000)
        s = make_stats(fractions=[0.01] * 5, slice_fractions=[0.0, 0.1] * 5,
                       volumes=[1, 2, 3, 4, 5], intensities={"t1": x})
        assert s.intensity["t1"]["brain"].moments.kurtosis > KURTOSIS_THRESHOLD
        d = intensity_tail_rule(s)
        assert not d.fired
        assert "after ln" in d.text
        assert abs(d.measured) < 0.5   # kurtosis of a normal sample of 50k: ~0 +- 0.05

    def test_heavy_tailed_samples_fire(self, base: DatasetStats) -> None:
        d = intensity_tail_rule(base)   # |t_3| intensities in channel t1
        assert d.fired
        assert d.params["channel"] == "t1"

    def test_all_undefined_is_not_fired(self, base: DatasetStats) -> None:
        const = symmetric_intensity(math.nan)
        s = base.model_copy(update={"channels": ["t1"], "intensity": {"t1": {"brain": const}}})
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
        return replace_label_moments(stats, "tumour_fraction_slice",
                                     make_moments(500, 0.02, 0.02 * cv, 2.0, 5.0))

    @pytest.mark.parametrize(("cv", "region", "outcome"), [
        (ADAPT_CV_THRESHOLD * (1 + 1e-6), "tversky", "adaptive_tversky"),
        (3.0, "dice", "adaptive_tversky"),
        (ADAPT_CV_THRESHOLD, "tversky", "fixed"),
        (0.4, "tversky", "fixed"),
        (3.0, "none", "none"),
    ])
    def test_both_sides_of_the_threshold(self, base: DatasetStats, cv: float, region: str,
                                         outcome: str) -> None:
        d = adaptation_rule(self.with_cv(base, cv), region)
        assert d.outcome == outcome
        assert d.fired is (outcome == "adaptive_tversky")
        assert d.measured == pytest.approx(cv, rel=1e-12)
        if d.fired:
            assert d.params == {"A": ADAPT_A, "B": ADAPT_B, "regions_per_axis": 2}
            assert math.isclose(2 * ADAPT_A + ADAPT_B, 1.0)   # alpha + beta = 1 (Chen 2023)

    def test_no_tumour_anywhere_is_undefined(self, base: DatasetStats) -> None:
        s = replace_label_moments(base, "tumour_fraction_slice", make_moments(500, 0, 0,
                                                                              math.nan, math.nan))
        d = adaptation_rule(s, "tversky")
        assert d.outcome == "fixed"
        assert math.isnan(d.measured)
        assert "undefined (no tumour)" in d.text


# ----------------------------------------------------------------------- R4
class TestWeighting:
    @pytest.mark.parametrize(("n", "method", "params"), [
        (1, "static", {}), (2, "softadapt", {"beta": 0.1}), (3, "cov", {}), (5, "cov", {})])
    def test_by_number_of_terms(self, n: int, method: str, params: dict) -> None:
        d = weighting_rule(n)
        assert (d.outcome, d.params, d.measured) == (method, params, float(n))

    def test_no_terms_raises(self) -> None:
        with pytest.raises(ValueError, match=r"need at least one loss term, got 0"):
            weighting_rule(0)


# ----------------------------------------------------------------------- assembly
class TestDecideLoss:
    def test_small_heavy_tailed_tumours(self, base: DatasetStats) -> None:
        plan = decide_loss(base)
        assert [t.name for t in plan.terms] == ["adaptive_tversky", "focal", "barron"]
        assert plan.weighting.method == "cov"
        assert [d.rule for d in plan.decisions] == ["R1", "R2", "R3", "R5", "R4"]
        at, focal, barron = plan.terms
        assert at.params == {"A": 0.3, "B": 0.4, "regions_per_axis": 2,
                             "include_background": False}
        assert 1.0 <= focal.params["gamma"] <= 3.0
        assert barron.params["learnable"] is True
        assert 0.0 < barron.params["alpha"] < 1.0

    def test_balanced_normal_data_is_bce_alone(self, rng: np.random.Generator) -> None:
        plan = decide_loss(balanced_stats(rng))
        assert [t.name for t in plan.terms] == ["bce"]
        assert (plan.weighting.method, plan.weighting.params) == ("static", {})

    def test_two_terms_get_softadapt(self, base: DatasetStats) -> None:
        s = base.model_copy(update={"channels": ["t1"],
                                    "intensity": {"t1": {"brain": symmetric_intensity(0.0)}}})
        s = replace_label_moments(s, "tumour_fraction_slice",
                                  make_moments(500, 0.02, 0.01, 1.0, 1.0))   # CV 0.5
        plan = decide_loss(s)
        assert [t.name for t in plan.terms] == ["tversky", "focal"]
        assert plan.terms[0].params == {"alpha": 0.3, "beta": 0.7, "include_background": False}
        assert plan.weighting.method == "softadapt"

    def test_every_term_reason_names_its_rule(self, base: DatasetStats) -> None:
        plan = decide_loss(base)
        for term, rule in zip(plan.terms, ["R1", "R2", "R3"], strict=True):
            assert term.reason.startswith(f"{rule}: ")

    def test_term_names_are_a_subset_of_the_registry_names(self) -> None:
        assert set(rules.TERM_NAMES) == set(rules.LOSS_NAMES) - {"manifest"}


# ----------------------------------------------------------------------- the documented table
def test_docs_rule_table_states_every_rule_and_threshold() -> None:
    text = (REPO / "docs" / "rules.md").read_text(encoding="utf-8")
    for rule in RULES.values():
        assert re.search(rf"\|\s*{rule.id}\s*\|", text), f"{rule.id} missing from docs/rules.md"
        for name, value in rule.thresholds.items():
            assert f"{value:g}" in text, f"{rule.id} threshold {name}={value:g} not documented"
