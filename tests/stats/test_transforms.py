"""Tests of stats.transforms: candidates, domains, inverses, and the selection (issue 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stats.moments import MomentPartial, scale_partial
from stats.summary import Distribution
from stats.transforms import (
    DERIVED,
    Transform,
    arcsin_sqrt,
    candidates_for,
    identity,
    ln,
    log10,
    make_transform,
    normality_score,
    select,
)
from tests.stats.test_rules import distribution, explicit_distribution, make_moments, moments_of

ALL = [identity(), ln(1.0), log10(1.0), ln(0.001), log10(0.0), arcsin_sqrt(1.0),
       arcsin_sqrt(4096.0)]


# ----------------------------------------------------------------------- transforms
class TestForwardInverse:
    @pytest.mark.parametrize("t", ALL, ids=lambda t: t.expression)
    def test_inverse_undoes_forward(self, t: Transform) -> None:
        top = t.params.get("scale", 1e4)
        low = 1e-3 if t.name in ("ln", "log10") and t.params["offset"] == 0 else 0.0
        x = np.linspace(low, top, 1001)
        # float64 round trip: exp/log lose a few ulps relative to max(1, |x|)
        np.testing.assert_allclose(t.inverse(t.forward(x)), x, rtol=1e-12, atol=1e-12 * top)

    @settings(max_examples=60, deadline=None)
    @given(st.floats(min_value=0.0, max_value=1e6), st.floats(min_value=1e-6, max_value=10.0))
    def test_ln_round_trip_property(self, x: float, c: float) -> None:
        t = ln(c)
        assert float(t.inverse(t.forward(x))) == pytest.approx(x, rel=1e-10, abs=1e-10 * c)

    def test_closed_forms(self) -> None:
        # Hand-computed: ln(e - 1 + 1) = 1; log10(99 + 1) = 2; arcsin(sqrt(1/4)) = pi/6.
        assert float(ln(1.0).forward(math.e - 1)) == pytest.approx(1.0, rel=1e-15)
        assert float(log10(1.0).forward(99.0)) == pytest.approx(2.0, rel=1e-15)
        assert float(arcsin_sqrt(8.0).forward(2.0)) == pytest.approx(math.pi / 6, rel=1e-15)
        assert float(arcsin_sqrt(8.0).forward(8.0)) == math.pi / 2

    @pytest.mark.parametrize("t", ALL, ids=lambda t: t.expression)
    def test_strictly_increasing_so_percentiles_map_exactly(self, t: Transform) -> None:
        rng = np.random.default_rng(7)
        x = rng.uniform(0.01, t.params.get("scale", 100.0), size=999)
        for q in (0.5, 50, 99.5):
            # an order-statistic percentile (no interpolation) commutes with f exactly
            assert np.percentile(t.forward(x), q, method="inverted_cdf") == float(
                t.forward(np.percentile(x, q, method="inverted_cdf")))

    def test_float32_input_is_computed_in_float64(self) -> None:
        x = np.array([0.0, 1.0, 1000.0], dtype=np.float32)
        assert ln(1.0).forward(x).dtype == np.float64

    def test_make_transform_rebuilds(self) -> None:
        assert make_transform("ln", {"offset": 2}) == ln(2.0)
        assert make_transform("identity") == identity()


class TestDomain:
    @pytest.mark.parametrize(("t", "x", "message"), [
        (ln(1.0), [3.0, -0.5], r"transform 'ln' \(ln\(x \+ 1\)\): value -0\.5 is outside "
                               r"its domain x >= 0"),
        (log10(0.0), [1.0, 0.0], r"transform 'log10' \(log10\(x\)\): value 0\.0 is outside "
                                 r"its domain x > 0"),
        (arcsin_sqrt(4.0), [1.0, 4.5], r"value 4\.5 is outside its domain 0 <= x <= 4"),
        (arcsin_sqrt(1.0), [-1e-9], r"value -1e-09 is outside its domain 0 <= x <= 1"),
        (ln(1.0), [1.0, math.nan], r"value nan is outside its domain"),
        (ln(1.0), [math.inf], r"value inf is outside its domain"),
    ])
    def test_forward_outside_domain_raises(self, t: Transform, x: list[float],
                                           message: str) -> None:
        with pytest.raises(ValueError, match=message):
            t.forward(np.array(x))

    @pytest.mark.parametrize(("t", "y", "message"), [
        (ln(2.0), [-1.0], r"transformed value -1\.0 is outside its range y >= ln\(2\)"),
        (arcsin_sqrt(1.0), [2.0], r"transformed value 2\.0 is outside its range 0 <= y <= pi/2"),
        (log10(0.0), [math.nan], r"transformed value nan is outside its range any finite y"),
    ])
    def test_inverse_outside_range_raises(self, t: Transform, y: list[float],
                                          message: str) -> None:
        with pytest.raises(ValueError, match=message):
            t.inverse(np.array(y))

    def test_identity_accepts_anything_real(self) -> None:
        x = np.array([-5.0, math.inf])
        np.testing.assert_array_equal(identity().forward(x), x)

    def test_empty_input(self) -> None:
        assert ln(1.0).forward(np.array([])).shape == (0,)

    @pytest.mark.parametrize(("name", "params", "message"), [
        ("sqrt", {}, r"unknown transform 'sqrt'"),
        ("ln", {}, r"'ln' takes exactly the parameters \['offset'\], got \{\}"),
        ("ln", {"offset": 1.0, "scale": 2.0}, r"takes exactly the parameters"),
        ("ln", {"offset": -1.0}, r"offset must be finite and >= 0, got -1\.0"),
        ("arcsin_sqrt", {"scale": 0.0}, r"scale must be finite and > 0, got 0\.0"),
        ("log10", {"offset": math.nan}, r"offset must be finite and >= 0, got nan"),
        ("log10", {"offset": True}, r"offset must be a number, got True"),
    ])
    def test_bad_parameters_raise(self, name: str, params: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            Transform(name, params)


class TestCandidates:
    def test_intensity(self) -> None:
        c = candidates_for("intensity", scale=4096.0)
        assert list(c) == ["identity", "ln", "log10", "arcsin_sqrt"]
        assert c["ln"].params == {"offset": 1.0}          # one intensity unit
        assert c["arcsin_sqrt"].params == {"scale": 4096.0}

    def test_intensity_without_scale_has_no_arcsin(self) -> None:
        assert "arcsin_sqrt" not in candidates_for("intensity")

    def test_fraction(self) -> None:
        c = candidates_for("fraction", unit_offset=1 / 20_000)
        assert c["arcsin_sqrt"].params == {"scale": 1.0}
        assert c["log10"].params == {"offset": 5e-5}

    def test_fraction_default_offset(self) -> None:
        assert candidates_for("fraction")["ln"].params == {"offset": 1e-4}

    def test_volume_needs_the_voxel_volume(self) -> None:
        with pytest.raises(ValueError, match=r"volume candidates need unit_offset"):
            candidates_for("volume")
        assert candidates_for("volume", unit_offset=0.001)["ln"].expression == "ln(x + 0.001)"

    def test_count(self) -> None:
        assert candidates_for("count")["ln"].expression == "ln(x + 1)"

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"kind": "mass"}, r"unknown kind 'mass'"),
        ({"kind": "intensity", "scale": -1.0}, r"scale must be finite and > 0, got -1\.0"),
        ({"kind": "count", "unit_offset": 0.0}, r"unit_offset must be finite and > 0"),
    ])
    def test_bad_arguments(self, kwargs: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            candidates_for(**kwargs)

    def test_log10_is_derived_from_ln_exactly(self) -> None:
        x = np.random.default_rng(3).lognormal(3.0, 1.0, size=5000)
        source, factor = DERIVED["log10"]
        c = candidates_for("intensity")
        derived = scale_partial(MomentPartial.from_values(c[source].forward(x)), factor)
        direct = MomentPartial.from_values(c["log10"].forward(x))
        for f in ("mean", "m2", "m3", "m4", "minimum", "maximum"):
            # different rounding paths (log10 vs ln * const): agree to ~1e-13 relative
            assert getattr(derived, f) == pytest.approx(getattr(direct, f), rel=1e-11, abs=1e-9)


# ----------------------------------------------------------------------- selection
def test_normality_score_closed_form() -> None:
    # Exponential: skewness 2, excess kurtosis 6 -> 4 + 36/4 = 13; normal -> 0.
    assert normality_score(2.0, 6.0) == 13.0
    assert normality_score(0.0, 0.0) == 0.0
    assert math.isnan(normality_score(math.nan, 0.0))


class TestSelectKnownShapes:
    def test_lognormal_chooses_ln(self) -> None:
        x = np.random.default_rng(11).lognormal(2.0, 0.8, size=5000)
        sel = select(distribution("label/tumour_volume_ml", "volume", x, unit_offset=1e-3))
        assert sel.chosen == "ln"
        assert sel.params == {"offset": 1e-3}
        assert sel.score_chosen < 0.05 < sel.score_identity

    def test_lognormal_with_log10_requested(self) -> None:
        x = np.random.default_rng(11).lognormal(2.0, 0.8, size=5000)
        d = distribution("v", "volume", x, unit_offset=1e-3)
        sel = select(d, prefer_log="log10")
        assert sel.chosen == "log10"
        note = {r.candidate: r.note for r in sel.evidence}["ln"]
        assert "same shape as log10" in note

    def test_ln_and_log10_have_the_same_score_and_the_evidence_says_so(self) -> None:
        x = np.random.default_rng(12).lognormal(1.0, 1.0, size=3000)
        sel = select(distribution("v", "volume", x, unit_offset=0.01))
        assert sel.scores["ln"] == pytest.approx(sel.scores["log10"], rel=1e-9)
        notes = {r.candidate: r.note for r in sel.evidence}
        assert "scale-invariant skewness and kurtosis" in notes["log10"]
        assert notes["ln"].startswith("preferred over log10")

    def test_proportions_near_zero_choose_arcsin_or_a_log(self) -> None:
        p = np.random.default_rng(13).beta(0.8, 40.0, size=4000)   # mean ~2 %
        sel = select(distribution("label/tumour_fraction_case", "fraction", p,
                                  unit_offset=1e-4))
        assert sel.chosen in ("arcsin_sqrt", "ln", "log10")
        assert sel.score_chosen < 0.5 * sel.score_identity

    def test_normal_keeps_identity(self) -> None:
        x = np.random.default_rng(14).normal(1000.0, 50.0, size=20_000)
        sel = select(distribution("intensity/t1/brain", "intensity", x, scale=4096.0))
        assert sel.chosen == "identity"
        assert sel.reason.startswith("identity kept: best candidate")

    def test_evidence_has_before_and_after_for_every_candidate(self) -> None:
        x = np.random.default_rng(15).lognormal(0.0, 0.5, size=1000)
        d = distribution("v", "volume", x, unit_offset=0.001)
        sel = select(d)
        assert [r.candidate for r in sel.evidence] == ["identity", "ln", "log10"]
        for r in sel.evidence:
            assert r.skewness_before == d.moments.skewness
            assert r.kurtosis_before == d.moments.kurtosis
            assert r.skewness_after == d.candidates[r.candidate].skewness
            assert r.kurtosis_after == d.candidates[r.candidate].kurtosis
            assert r.score == pytest.approx(r.skewness_after**2 + r.kurtosis_after**2 / 4)


class TestSelectDegenerate:
    @pytest.mark.parametrize(("x", "why"), [
        (np.full(50, 42.0), "constant values"),
        (np.array([1.0, 2.0, 9.0]), "n = 3 < 4"),
        (np.array([]), "no values"),
    ])
    def test_undefined_moments_keep_identity(self, x: np.ndarray, why: str) -> None:
        sel = select(distribution("v", "volume", x, unit_offset=0.001))
        assert sel.chosen == "identity"
        assert sel.reason == f"identity kept: skewness/kurtosis undefined ({why})"
        assert math.isnan(sel.score_identity)

    def test_undefined_candidates_are_skipped(self) -> None:
        d = explicit_distribution("v", "intensity", {
            "identity": make_moments(1000, 5, 1, 1.0, 1.0),
            "ln": make_moments(1000, 1, 0.1, math.nan, math.nan)})
        sel = select(d)
        assert sel.chosen == "identity"
        assert "no candidate has a defined score" in sel.reason

    def test_moments_computed_for_the_factory_match_scipy_conventions(self) -> None:
        m = moments_of(np.array([1.0, 2.0, 3.0, 10.0]))
        assert m.n == 4
        assert not math.isnan(m.kurtosis)


class TestImprovementThresholds:
    """Identity is kept unless the gain is >= 10 % relative and >= max(0.05, 12/n)."""

    @staticmethod
    def dist(n: int, s0: float, s1: float) -> Distribution:
        # skewness only (kurtosis 0): score = skewness**2
        return explicit_distribution("v", "intensity", {
            "identity": make_moments(n, 5, 1, math.sqrt(s0), 0.0),
            "ln": make_moments(n, 1, 0.1, math.sqrt(s1), 0.0)})

    @pytest.mark.parametrize(("n", "s0", "s1", "chosen"), [
        (10**6, 1.0, 0.91, "identity"),   # 9 % better: too little
        (10**6, 1.0, 0.89, "ln"),         # 11 % better
        (10**6, 0.1, 0.06, "identity"),   # 40 % better but 0.04 < 0.05 absolute
        (10**6, 0.1, 0.04, "ln"),         # 0.06 >= 0.05
        (20, 2.0, 1.5, "identity"),       # 0.5 < 12/20 = 0.6: within sampling noise
        (20, 2.0, 1.3, "ln"),             # 0.7 >= 0.6
        (10**6, 1.0, 1.0, "identity"),    # tie keeps identity
    ])
    def test_both_sides(self, n: int, s0: float, s1: float, chosen: str) -> None:
        assert select(self.dist(n, s0, s1)).chosen == chosen

    def test_custom_threshold(self) -> None:
        assert select(self.dist(10**6, 1.0, 0.91), min_improvement=0.05).chosen == "ln"

    def test_exact_tie_between_candidates_goes_to_the_earlier_name(self) -> None:
        m = make_moments(10**6, 1, 0.1, 0.1, 0.0)
        d = explicit_distribution("v", "intensity", {
            "identity": make_moments(10**6, 5, 1, 2.0, 0.0), "ln": m, "arcsin_sqrt": m})
        assert select(d).chosen == "ln"

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"min_improvement": 1.0}, r"need 0 <= min_improvement < 1"),
        ({"min_absolute": -0.1}, r"min_absolute >= 0"),
        ({"prefer_log": "log2"}, r"prefer_log must be 'ln' or 'log10', got 'log2'"),
    ])
    def test_bad_arguments(self, kwargs: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            select(self.dist(100, 1.0, 0.5), **kwargs)

    def test_candidate_without_parameters_raises(self) -> None:
        d = explicit_distribution("v", "intensity", {
            "identity": make_moments(10, 5, 1, 1.0, 0.0),
            "ln": make_moments(10, 1, 0.1, 0.0, 0.0)}, params={"identity": {}})
        with pytest.raises(ValueError, match=r"candidate 'ln' has moments but no parameters"):
            select(d)

    def test_unknown_candidate_raises(self) -> None:
        d = explicit_distribution("v", "intensity", {
            "identity": make_moments(10, 5, 1, 1.0, 0.0),
            "sqrt": make_moments(10, 1, 0.1, 0.0, 0.0)}, params={"identity": {}, "sqrt": {}})
        with pytest.raises(ValueError, match=r"unknown candidates \['sqrt'\]"):
            select(d)
