"""Tests of stats.histogram: counts against numpy.histogram, merging, the percentile bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stats.histogram import HistogramPartial, fixed_edges, merge, percentile

Q = np.array([0.0, 0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5, 100.0])


def datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "normal": rng.normal(50.0, 10.0, 20_000),
        "lognormal": np.minimum(rng.lognormal(2.0, 0.6, 20_000), 100.0),
        "student_t3": np.clip(rng.standard_t(3, 20_000) * 5 + 50, 0, 100),
        # integers land exactly on edges (ties at bin boundaries)
        "int16": rng.integers(0, 101, 5_000).astype(np.int16),
        # two clusters with many empty bins between them
        "bimodal_gap": np.concatenate([rng.normal(5, 0.5, 3000), rng.normal(90, 0.5, 40)]),
        "tiny": np.array([42.0]),
    }


def uneven_edges() -> np.ndarray:
    e = np.sort(np.random.default_rng(12).uniform(0.0, 100.0, 37))
    return np.concatenate([[0.0], e, [100.0]])


class TestCounts:
    @pytest.mark.parametrize(
        "edges", [fixed_edges(0, 100, 50), uneven_edges()], ids=["fixed", "uneven"]
    )
    @pytest.mark.parametrize("name", list(datasets()))
    def test_counts_equal_numpy_histogram(self, name: str, edges: np.ndarray) -> None:
        x = datasets()[name]
        h = HistogramPartial.from_values(x, edges)
        inside = x[(x >= edges[0]) & (x <= edges[-1])]
        # oracle: numpy.histogram, same bin convention (last bin closed)
        np.testing.assert_array_equal(h.counts, np.histogram(inside, edges)[0])
        assert h.total == x.size

    def test_values_on_every_edge(self) -> None:
        e = fixed_edges(0.0, 1.0, 10)
        h = HistogramPartial.from_values(e, e)
        np.testing.assert_array_equal(h.counts, np.histogram(e, e)[0])
        assert h.counts[-1] == 2  # 0.9 and the closed last edge 1.0

    def test_underflow_overflow_nan(self) -> None:
        h = HistogramPartial.from_values([-1.0, 0.0, 0.5, 2.0, np.nan, 3.0], fixed_edges(0, 1, 2))
        assert (h.underflow, h.overflow, h.n_nan, h.counts.tolist()) == (1, 2, 1, [1, 1])
        assert h.total == 5

    def test_merge_is_exact_and_commutative(self) -> None:
        x = datasets()["normal"]
        e = fixed_edges(0, 100, 64)
        parts = [HistogramPartial.from_values(b, e) for b in np.array_split(x, [10, 5000, 5001])]
        whole = HistogramPartial.from_values(x, e)
        assert merge(merge(parts[0], parts[1]), merge(parts[2], parts[3])) == whole
        assert merge(parts[3], parts[0]) == merge(parts[0], parts[3])

    def test_merge_result_is_what_the_constructor_makes(self) -> None:
        """`merge` builds its result without the constructor's checks: the same
        histogram as a checked one, read-only, sharing no counts with its inputs."""
        e = fixed_edges(0, 10, 8)
        a = HistogramPartial.from_values([1.0, 2.0, 2.5, -1.0, np.nan], e)
        b = HistogramPartial.from_values([9.5, 11.0, 2.2], e)
        m = merge(a, b)
        checked = HistogramPartial(e, a.counts + b.counts, 1, 1, 1)
        assert m == checked
        assert (m.underflow, m.overflow, m.n_nan) == (1, 1, 1)
        assert m.counts.dtype == np.int64
        assert not m.counts.flags.writeable
        assert not m.edges.flags.writeable
        assert not np.shares_memory(m.counts, a.counts)
        assert not np.shares_memory(m.counts, b.counts)

    def test_merge_different_edges_raises(self) -> None:
        a = HistogramPartial.empty(fixed_edges(0, 1, 4))
        b = HistogramPartial.empty(fixed_edges(0, 1, 5))
        with pytest.raises(ValueError, match="cannot merge histograms with different edges"):
            merge(a, b)

    def test_json_round_trip(self) -> None:
        h = HistogramPartial.from_values(datasets()["lognormal"], fixed_edges(0.1, 40.3, 33))
        assert HistogramPartial.from_dict(json.loads(json.dumps(h.to_dict()))) == h
        with pytest.raises(ValueError, match=r"missing \['n_nan'\]"):
            HistogramPartial.from_dict({k: v for k, v in h.to_dict().items() if k != "n_nan"})

    def test_validation(self) -> None:
        with pytest.raises(ValueError, match="must increase strictly"):
            HistogramPartial.empty([0.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="must be finite"):
            HistogramPartial.empty([0.0, np.inf])
        with pytest.raises(ValueError, match=r"counts must have shape \(2,\)"):
            HistogramPartial(np.array([0.0, 1.0, 2.0]), np.array([1, 2, 3]))
        with pytest.raises(ValueError, match="bins must be an integer >= 1, got 0"):
            fixed_edges(0, 1, 0)
        with pytest.raises(ValueError, match="need finite low < high, got low=2, high=1"):
            fixed_edges(2, 1, 4)
        with pytest.raises(TypeError, match="real numeric"):
            HistogramPartial.from_values(np.array(["a"]), fixed_edges(0, 1, 1))


class TestPercentile:
    @pytest.mark.parametrize(
        "edges", [fixed_edges(0, 100, 200), uneven_edges()], ids=["fixed", "uneven"]
    )
    @pytest.mark.parametrize("name", list(datasets()))
    def test_error_at_most_one_bin_width(self, name: str, edges: np.ndarray) -> None:
        x = datasets()[name]
        h = HistogramPartial.from_values(x, edges)
        assert h.underflow == h.overflow == 0
        q = np.concatenate([Q, np.linspace(0, 100, 301)])
        got = percentile(h, q)
        ref = np.percentile(x, q)  # oracle: numpy's 'linear' method
        # the bound proved in percentile's Notes: < the widest bin, plus float rounding
        width = np.diff(edges).max()
        assert np.all(np.abs(got - ref) <= width * (1 + 1e-12)), np.abs(got - ref).max()

    def test_bound_is_tight_enough_to_matter(self) -> None:
        # with 1000 bins over [0, 100] the 0.5/99.5 percentiles are within 0.1 of numpy's
        x = datasets()["normal"]
        h = HistogramPartial.from_values(x, fixed_edges(0, 100, 1000))
        np.testing.assert_allclose(
            percentile(h, [0.5, 50, 99.5]), np.percentile(x, [0.5, 50, 99.5]), atol=0.1
        )

    def test_scalar_and_empty(self) -> None:
        e = fixed_edges(0, 10, 10)
        h = HistogramPartial.from_values([1.0, 2.0, 3.0], e)
        assert isinstance(percentile(h, 50), float)
        assert math.isnan(percentile(HistogramPartial.empty(e), 50))
        # one value: every percentile is the middle of its bin (closed form)
        assert percentile(HistogramPartial.from_values([4.2], e), 37.0) == 4.5

    def test_outside_modes(self) -> None:
        h = HistogramPartial.from_values([1.0, 2.0, 100.0], fixed_edges(0, 10, 10))
        assert math.isnan(percentile(h, 100))
        assert percentile(h, 100, outside="clip") == 10.0
        assert percentile(h, 0, outside="raise") == 1.5
        with pytest.raises(ValueError, match=r"percentile\(s\) \[100.0\] fall outside"):
            percentile(h, 100, outside="raise")

    def test_q_validation(self) -> None:
        h = HistogramPartial.empty(fixed_edges(0, 1, 2))
        with pytest.raises(ValueError, match=r"percentiles must be in \[0, 100\], got 101"):
            percentile(h, 101)
        with pytest.raises(ValueError, match="outside must be"):
            percentile(h, 1, outside="drop")  # type: ignore[arg-type]

    @settings(max_examples=80, deadline=None)
    @given(
        hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-50, 50, width=64)),
        st.integers(1, 40),
        st.floats(0, 100),
    )
    def test_bound_property(self, x: np.ndarray, bins: int, q: float) -> None:
        e = fixed_edges(-50, 50, bins)
        got = percentile(HistogramPartial.from_values(x, e), q)
        assert abs(got - np.percentile(x, q)) <= (100 / bins) * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("upper", [1.0, 2048.0, 2.0**-3])
def test_dyadic_edges_from_zero_match_numpy_exactly(upper: float) -> None:
    """The engine's edges (0 .. 2**k in 2**m bins) take a path with no correction step."""
    edges = fixed_edges(0.0, upper, 4096)
    rng = np.random.default_rng(11)
    # random values plus every edge itself (the ties a fast path could get wrong)
    x = np.concatenate([rng.uniform(0.0, upper, 20_000), edges, np.nextafter(edges, -1)[1:]])
    ours = HistogramPartial.from_values(x, edges)
    ref, _ = np.histogram(x, edges)  # numpy.histogram is the oracle: counts must be equal
    np.testing.assert_array_equal(ours.counts, ref)
