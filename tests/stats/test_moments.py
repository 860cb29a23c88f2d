"""Tests of stats.moments against scipy.stats (the oracle), exact arithmetic and properties."""

from __future__ import annotations

import functools
import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stats.moments import (
    MomentPartial,
    kurtosis,
    kurtosis_from_partial,
    mean,
    merge,
    merge_all,
    scale_partial,
    shift_partial,
    skew,
    skew_from_partial,
    std,
    variance,
)

DISTS = ["normal", "lognormal", "student_t3", "int16", "offset_1e6", "mixture", "bernoulli_0.01"]


def sample(dist: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Test data of the issue's distributions."""
    if dist == "normal":
        return rng.normal(3.0, 2.0, size)
    if dist == "lognormal":
        return rng.lognormal(0.0, 1.0, size)
    if dist == "student_t3":
        return rng.standard_t(3, size)
    if dist == "int16":
        return rng.integers(-32768, 32768, size).astype(np.int16)
    if dist == "offset_1e6":
        return 1e6 + rng.normal(0.0, 1.0, size)
    if dist == "mixture":  # background-like lognormal + a bright normal component
        k = rng.random(size) < 0.85
        return np.where(k, rng.lognormal(4.0, 0.5, size), rng.normal(300.0, 20.0, size))
    if dist == "bernoulli_0.01":
        return (rng.random(size) < 0.01).astype(np.float64)
    raise ValueError(dist)


def assert_close_to(ours: float, ref: float) -> None:
    """The issue's contract: |ours - ref| <= 1e-9 * max(1, |ref|)."""
    assert abs(ours - ref) <= 1e-9 * max(1.0, abs(ref)), (ours, ref)


def split(x: np.ndarray, n_blocks: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Unequal random chunks (some of them empty when n_blocks is large)."""
    cuts = np.sort(rng.integers(0, x.size + 1, n_blocks - 1))
    return np.split(x, cuts)


class TestAgainstScipy:
    @pytest.mark.parametrize("n_blocks", [1, 3, 17, 64])
    @pytest.mark.parametrize("dist", DISTS)
    def test_merged_partials_match_scipy(self, dist: str, n_blocks: int) -> None:
        rng = np.random.default_rng(20261122)
        x = sample(dist, 20_000, rng)
        p = merge_all(MomentPartial.from_values(b) for b in split(x, n_blocks, rng))
        xf = x.astype(np.float64)
        assert p.n == x.size
        assert p.minimum == xf.min()
        assert p.maximum == xf.max()
        # oracle: scipy.stats 1.17 on the whole array; tolerance = the contract
        assert_close_to(mean(p), float(np.mean(xf)))
        for ddof in (0, 1):
            assert_close_to(variance(p, ddof), float(np.var(xf, ddof=ddof)))
            assert_close_to(std(p, ddof), float(np.std(xf, ddof=ddof)))
        for order, m in ((2, p.m2), (3, p.m3), (4, p.m4)):
            ref = float(scipy.stats.moment(xf, order))
            assert abs(m / p.n - ref) <= 1e-9 * max(1.0, abs(ref))
        for bias in (True, False):
            assert_close_to(skew_from_partial(p, bias=bias), scipy.stats.skew(xf, bias=bias))
            for fisher in (True, False):
                assert_close_to(
                    kurtosis_from_partial(p, fisher=fisher, bias=bias),
                    scipy.stats.kurtosis(xf, fisher=fisher, bias=bias),
                )

    @pytest.mark.parametrize("dist", DISTS)
    def test_sequential_merge_order_matches_scipy(self, dist: str) -> None:
        rng = np.random.default_rng(7)
        x = sample(dist, 10_000, rng)
        parts = [MomentPartial.from_values(b) for b in split(x, 40, rng)]
        p = functools.reduce(merge, parts)  # left fold, not a tree
        assert_close_to(skew_from_partial(p), scipy.stats.skew(x.astype(float)))
        assert_close_to(kurtosis_from_partial(p), scipy.stats.kurtosis(x.astype(float)))

    @pytest.mark.parametrize("seed", [1, 2])
    def test_large_offset_against_exact_rational_arithmetic(self, seed: int) -> None:
        # Oracle: the moments computed exactly with fractions.Fraction (every float64 is
        # a rational), rounded once. We are near-exact here; scipy is off by ~1e-10.
        x = 1e6 + np.random.default_rng(seed).normal(size=1500)
        xs = [Fraction(v) for v in x]
        mu = sum(xs) / len(xs)
        d = [v - mu for v in xs]
        m2, m3, m4 = (sum(t**p for t in d) / len(d) for p in (2, 3, 4))
        exact_skew = float(m3) / float(m2) ** 1.5
        exact_kurt = float(m4) / float(m2) ** 2 - 3.0
        parts = [MomentPartial.from_values(b) for b in np.array_split(x, 7)]
        p = merge_all(parts)
        # Each chunk's mean is stored in float64 (rounding up to ulp(1e6)/2 = 5.8e-11),
        # which moves the merged skewness by ~1e-11: allow 5e-11 (scipy's own error on
        # this data is 1e-10 .. 6e-10). One array in one block is exact to ~1e-15.
        assert abs(skew_from_partial(p) - exact_skew) <= 5e-11
        assert abs(kurtosis_from_partial(p) - exact_kurt) <= 5e-11
        assert abs(skew(x) - exact_skew) <= 1e-13
        assert abs(kurtosis(x) - exact_kurt) <= 1e-13

    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("dist", DISTS)
    def test_skew_kurtosis_functions_match_scipy(self, dist: str, bias: bool) -> None:
        x = sample(dist, 5_000, np.random.default_rng(3))
        assert_close_to(skew(x, bias=bias), scipy.stats.skew(x, bias=bias))
        assert_close_to(
            kurtosis(x, fisher=False, bias=bias), scipy.stats.kurtosis(x, fisher=False, bias=bias)
        )
        assert isinstance(skew(x), float)

    @pytest.mark.parametrize("axis", [0, 1, 2, -1, None])
    def test_axis_like_scipy(self, axis: int | None) -> None:
        x = np.random.default_rng(4).lognormal(size=(30, 20, 6))
        for bias in (True, False):
            ours, ref = skew(x, axis=axis, bias=bias), scipy.stats.skew(x, axis=axis, bias=bias)
            assert np.shape(ours) == np.shape(ref)
            np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)  # contract
            ours = kurtosis(x, axis=axis, bias=bias)
            ref = scipy.stats.kurtosis(x, axis=axis, bias=bias)
            np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)

    def test_int16_2d_axis(self) -> None:
        x = np.random.default_rng(5).integers(-500, 500, (200, 7)).astype(np.int16)
        np.testing.assert_allclose(skew(x), scipy.stats.skew(x), rtol=1e-9, atol=1e-9)


class TestNanPolicy:
    def make(self) -> np.ndarray:
        x = np.random.default_rng(6).normal(size=(40, 5))
        x[3, 1] = x[7, 1] = x[0, 4] = np.nan
        return x

    @pytest.mark.parametrize("axis", [0, 1, None])
    def test_propagate_and_omit_like_scipy(self, axis: int | None) -> None:
        x = self.make()
        for policy in ("propagate", "omit"):
            ours = skew(x, axis=axis, nan_policy=policy)
            ref = scipy.stats.skew(x, axis=axis, nan_policy=policy)
            np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)  # NaN where scipy's
            ours = kurtosis(x, axis=axis, bias=False, nan_policy=policy)
            ref = scipy.stats.kurtosis(x, axis=axis, bias=False, nan_policy=policy)
            np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)

    def test_raise(self) -> None:
        with pytest.raises(ValueError, match="The input contains nan values"):
            skew(self.make(), nan_policy="raise")
        assert not math.isnan(skew(np.arange(5.0) ** 2, nan_policy="raise"))

    def test_unknown_policy(self) -> None:
        with pytest.raises(ValueError, match="nan_policy must be one of"):
            kurtosis(np.arange(5.0), nan_policy="ignore")  # type: ignore[arg-type]

    def test_bad_axis_and_dtype(self) -> None:
        with pytest.raises(np.exceptions.AxisError, match="out of bounds"):
            skew(np.ones((3, 3)), axis=2)
        with pytest.raises(TypeError, match="real numeric"):
            skew(np.array(["a", "b"]))


class TestEdgeCases:
    def test_constant_input_is_nan_like_scipy(self) -> None:
        x = np.full(50, 42.0)  # exactly representable: scipy also gives NaN
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parts = merge_all(MomentPartial.from_values(b) for b in np.array_split(x, 5))
            assert math.isnan(skew_from_partial(parts))
            assert math.isnan(kurtosis_from_partial(parts, bias=False))
            assert math.isnan(skew(x))
            assert math.isnan(kurtosis(x))
            assert variance(parts) == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "Precision loss" note
            assert math.isnan(scipy.stats.skew(x))
            assert math.isnan(scipy.stats.kurtosis(x))

    def test_empty(self) -> None:
        p = MomentPartial.from_values(np.array([]))
        assert p == MomentPartial.empty()
        assert (p.minimum, p.maximum) == (math.inf, -math.inf)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for value in (
                mean(p),
                variance(p),
                std(p, 1),
                skew_from_partial(p),
                kurtosis_from_partial(p, bias=False),
                skew([]),
                kurtosis(np.array([])),
            ):
                assert math.isnan(value)
            assert np.isnan(skew(np.zeros((0, 3)))).all()

    @pytest.mark.parametrize("value", [0.0, 3.0, -7.25])
    def test_single_value(self, value: float) -> None:
        p = MomentPartial.from_values([value])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert (p.n, p.mean, p.m2, p.minimum, p.maximum) == (1, value, 0.0, value, value)
            assert variance(p) == 0.0
            assert math.isnan(variance(p, ddof=1))
            assert math.isnan(skew_from_partial(p, bias=False))
            assert math.isnan(kurtosis_from_partial(p))

    @pytest.mark.parametrize(
        "x", [[1.0, 2.0], [1.0, 2.0, 5.0], [0.5, -1.0, 4.0, 4.5]], ids=["n2", "n3", "n4"]
    )
    def test_small_n_unbiased_like_scipy(self, x: list[float]) -> None:
        # scipy leaves skew uncorrected for n <= 2 and kurtosis for n <= 3
        p = MomentPartial.from_values(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for bias in (True, False):
                assert_close_to(skew_from_partial(p, bias=bias), scipy.stats.skew(x, bias=bias))
                for fisher in (True, False):
                    assert_close_to(
                        kurtosis_from_partial(p, fisher=fisher, bias=bias),
                        scipy.stats.kurtosis(x, fisher=fisher, bias=bias),
                    )

    def test_n2_kurtosis_value(self) -> None:
        # two distinct values: m4/m2^2 = 1 exactly, so Fisher kurtosis -2 (closed form)
        assert kurtosis_from_partial(MomentPartial.from_values([1.0, 2.0]), bias=False) == -2.0

    def test_inf_input_gives_nan_without_warning(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = MomentPartial.from_values([1.0, np.inf])
            assert math.isnan(skew_from_partial(p))
            assert p.maximum == math.inf

    def test_merge_with_empty_is_identity(self) -> None:
        p = MomentPartial.from_values([1.0, 4.0, 9.0])
        assert merge(p, MomentPartial.empty()) == p == merge(MomentPartial.empty(), p)
        assert merge_all([]) == MomentPartial.empty()


class TestAffine:
    @pytest.mark.parametrize("factor", [2.5, -0.3, 1 / math.log(10)])
    def test_scale_equals_recomputation(self, factor: float) -> None:
        x = np.random.default_rng(8).lognormal(size=5000)
        got = scale_partial(MomentPartial.from_values(x), factor)
        ref = MomentPartial.from_values(factor * x)
        for name in ("mean", "m2", "m3", "m4", "minimum", "maximum"):
            assert math.isclose(getattr(got, name), getattr(ref, name), rel_tol=1e-12), name

    def test_log10_from_ln(self) -> None:
        x = np.random.default_rng(9).lognormal(2.0, 0.7, 5000)
        via_ln = scale_partial(MomentPartial.from_values(np.log(x)), 1 / math.log(10))
        direct = np.log10(x)
        assert_close_to(skew_from_partial(via_ln), scipy.stats.skew(direct))
        assert_close_to(kurtosis_from_partial(via_ln), scipy.stats.kurtosis(direct))
        assert_close_to(mean(via_ln), float(direct.mean()))

    def test_scale_by_zero_and_shift(self) -> None:
        p = MomentPartial.from_values([1.0, 2.0, 6.0])
        z = scale_partial(p, 0.0)
        assert (z.mean, z.m2, z.minimum, z.maximum) == (0.0, 0.0, 0.0, 0.0)
        s = shift_partial(p, 10.0)
        assert (s.mean, s.m2, s.m3, s.minimum, s.maximum) == (13.0, p.m2, p.m3, 11.0, 16.0)
        assert shift_partial(MomentPartial.empty(), 5.0) == MomentPartial.empty()

    def test_non_finite_factor_raises(self) -> None:
        with pytest.raises(ValueError, match="factor must be finite, got inf"):
            scale_partial(MomentPartial.empty(), math.inf)
        with pytest.raises(ValueError, match="offset must be finite, got nan"):
            shift_partial(MomentPartial.empty(), math.nan)


class TestSerialisation:
    @pytest.mark.parametrize(
        "p",
        [
            MomentPartial.empty(),
            MomentPartial.from_values([0.1, 0.7, 1e60]),
            MomentPartial.from_values(np.random.default_rng(10).normal(size=99)),
        ],
    )
    def test_json_round_trip_is_exact(self, p: MomentPartial) -> None:
        text = json.dumps(p.to_dict(), allow_nan=False)  # JSON-safe: no bare inf/nan
        assert MomentPartial.from_dict(json.loads(text)) == p

    def test_from_dict_errors(self) -> None:
        d = MomentPartial.empty().to_dict()
        with pytest.raises(ValueError, match=r"missing \['m4'\]"):
            MomentPartial.from_dict({k: v for k, v in d.items() if k != "m4"})
        with pytest.raises(ValueError, match="field 'mean' must be a number, got 'x'"):
            MomentPartial.from_dict({**d, "mean": "x"})
        with pytest.raises(ValueError, match=r"field 'n' must be an integer, got 1\.5"):
            MomentPartial.from_dict({**d, "n": 1.5})

    def test_constructor_validation(self) -> None:
        with pytest.raises(ValueError, match="n must be >= 0, got -1"):
            MomentPartial(-1, 0.0, 0.0, 0.0, 0.0)
        with pytest.raises(TypeError, match="n must be an integer, got True"):
            MomentPartial(True, 0.0, 0.0, 0.0, 0.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a MomentPartial"):
            merge_all([MomentPartial.empty(), 3])  # type: ignore[list-item]


# ------------------------------------------------------------------ property tests
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
arrays = hnp.arrays(np.float64, st.integers(1, 60), elements=finite)


def assert_partials_close(a: MomentPartial, b: MomentPartial, ref: np.ndarray) -> None:
    """Equal up to rounding: tolerance scaled by sum |x - mean|^p of the data (naive oracle)."""
    assert a.n == b.n
    assert a.minimum == b.minimum
    assert a.maximum == b.maximum
    d = np.abs(ref - ref.mean())
    scale = max(1.0, float(np.abs(ref).max()))
    assert math.isclose(a.mean, b.mean, rel_tol=1e-12, abs_tol=1e-12 * scale)
    for name, p in (("m2", 2), ("m3", 3), ("m4", 4)):
        tol = 1e-9 * float((d**p).sum()) + 1e-12 * scale**p
        assert abs(getattr(a, name) - getattr(b, name)) <= tol, name


class TestMergeProperties:
    @settings(max_examples=60, deadline=None)
    @given(arrays, arrays, arrays)
    def test_associative_and_commutative(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        a, b, c = (MomentPartial.from_values(v) for v in (x, y, z))
        allv = np.concatenate([x, y, z])
        assert_partials_close(merge(a, b), merge(b, a), np.concatenate([x, y]))
        assert_partials_close(merge(merge(a, b), c), merge(a, merge(b, c)), allv)
        assert_partials_close(merge(merge(a, c), b), merge(merge(c, b), a), allv)

    @settings(max_examples=60, deadline=None)
    @given(hnp.arrays(np.float64, st.integers(1, 300), elements=finite), st.data())
    def test_merged_chunks_equal_whole(self, x: np.ndarray, data: st.DataObject) -> None:
        cuts = sorted(data.draw(st.lists(st.integers(0, x.size), max_size=8)))
        parts = [MomentPartial.from_values(b) for b in np.split(x, cuts)]
        whole = MomentPartial.from_values(x)
        assert_partials_close(merge_all(parts), whole, x)
        assert_partials_close(functools.reduce(merge, parts), whole, x)


class TestConstructorChecks:
    """The constructor's fast path (exact int and float) and its checks for the rest."""

    def test_numpy_scalars_are_converted_to_python_numbers(self):
        p = MomentPartial(np.int64(3), np.float32(1.5), np.float64(2.0), 0, 0, -1, 4)
        assert type(p.n) is int
        assert p.n == 3
        assert all(type(getattr(p, f)) is float
                   for f in ("mean", "m2", "m3", "m4", "minimum", "maximum"))
        assert (p.mean, p.minimum) == (1.5, -1.0)

    @pytest.mark.parametrize("bad", [True, 2.0, "3"])
    def test_n_must_be_an_integer(self, bad):
        with pytest.raises(TypeError, match=r"MomentPartial\.n must be an integer"):
            MomentPartial(bad, 0.0, 0.0, 0.0, 0.0)

    def test_negative_n(self):
        with pytest.raises(ValueError, match=r"MomentPartial\.n must be >= 0, got -1"):
            MomentPartial(-1, 0.0, 0.0, 0.0, 0.0)

    @pytest.mark.parametrize("bad", [True, "1.0", None])
    def test_fields_must_be_real(self, bad):
        with pytest.raises(TypeError, match=r"MomentPartial\.m2 must be a real number"):
            MomentPartial(1, 0.0, bad, 0.0, 0.0)
