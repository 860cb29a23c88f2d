"""Tests of the dask adapters: several chunkings, threaded scheduler, scipy as oracle."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.stats
from dask.delayed import Delayed

from stats import moments
from stats.dask_graph import (
    histogram_partial,
    kurtosis,
    moment_partial,
    moment_reduction,
    skew,
    tree_reduce,
)
from stats.histogram import HistogramPartial, fixed_edges
from stats.moments import MomentPartial, merge, skew_from_partial

# many blocks, an uneven last block, unequal explicit chunks, one block
CHUNKINGS_1D = {
    "many": 50,
    "uneven_last": 3_001,
    "unequal": ((10, 4_000, 1, 2_989, 3_000),),
    "one": -1,
}
CHUNKINGS_3D = {"many": (7, 5, 3), "uneven_last": (23, 13, 4), "one": -1}


def data_1d() -> np.ndarray:
    rng = np.random.default_rng(16)
    return np.concatenate([rng.lognormal(0, 1, 6_000), 1e6 + rng.normal(0, 1, 4_000)])


def data_3d() -> np.ndarray:
    return np.random.default_rng(17).standard_t(3, (40, 30, 6))


def close(ours: np.ndarray, ref: np.ndarray) -> None:
    """The 1e-9 contract relative to max(1, |ref|); NaN where the oracle is NaN."""
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


class TestSkewKurtosisOnDask:
    @pytest.mark.parametrize("chunks", list(CHUNKINGS_1D.values()), ids=list(CHUNKINGS_1D))
    def test_1d_matches_scipy(self, chunks: object) -> None:
        x = data_1d()
        d = da.from_array(x, chunks=chunks)
        lazy = [skew(d), skew(d, bias=False), kurtosis(d), kurtosis(d, fisher=False, bias=False)]
        assert all(isinstance(r, da.Array) and r.shape == () for r in lazy)
        got = dask.compute(*lazy, scheduler="threads")  # one pass for all four
        refs = (
            scipy.stats.skew(x),
            scipy.stats.skew(x, bias=False),
            scipy.stats.kurtosis(x),
            scipy.stats.kurtosis(x, fisher=False, bias=False),
        )
        for g, r in zip(got, refs, strict=True):
            close(g, r)

    @pytest.mark.parametrize("axis", [0, 1, 2, -1, None])
    @pytest.mark.parametrize("chunks", list(CHUNKINGS_3D.values()), ids=list(CHUNKINGS_3D))
    def test_3d_axes_match_scipy(self, chunks: object, axis: int | None) -> None:
        x = data_3d()
        d = da.from_array(x, chunks=chunks)
        with dask.config.set(scheduler="threads"):
            s = skew(d, axis=axis, bias=False)
            k = kurtosis(d, axis=axis)
            assert s.shape == np.shape(scipy.stats.skew(x, axis=axis))
            close(s.compute(), scipy.stats.skew(x, axis=axis, bias=False))
            close(k.compute(), scipy.stats.kurtosis(x, axis=axis))

    def test_split_every_two(self) -> None:
        x = data_1d()
        r = moment_reduction(da.from_array(x, chunks=100), lambda f: f[0], split_every=2)
        assert r.compute(scheduler="threads") == x.size

    def test_int16_input(self) -> None:
        x = np.random.default_rng(18).integers(-30_000, 30_000, 5_000).astype(np.int16)
        close(skew(da.from_array(x, chunks=999)).compute(scheduler="threads"), scipy.stats.skew(x))

    def test_nan_policies(self) -> None:
        x = data_3d()
        x[5, 3, 2] = np.nan
        d = da.from_array(x, chunks=(7, 5, 3))
        with dask.config.set(scheduler="threads"):
            for policy in ("propagate", "omit"):
                close(
                    skew(d, axis=0, nan_policy=policy).compute(),
                    scipy.stats.skew(x, axis=0, nan_policy=policy),
                )
            lazy = kurtosis(d, axis=None, nan_policy="raise")  # building the graph is fine
            with pytest.raises(ValueError, match="The input contains nan values"):
                lazy.compute()

    def test_constant_is_nan(self) -> None:
        d = da.full((100,), 42.0, chunks=13)
        assert math.isnan(skew(d).compute(scheduler="threads"))


class TestPartialGraphs:
    @pytest.mark.parametrize("chunks", list(CHUNKINGS_3D.values()), ids=list(CHUNKINGS_3D))
    def test_moment_partial_equals_numpy(self, chunks: object) -> None:
        x = data_3d()
        lazy = moment_partial(da.from_array(x, chunks=chunks), split_every=3)
        assert isinstance(lazy, Delayed)
        p = lazy.compute(scheduler="threads")
        ref = MomentPartial.from_values(x)
        assert (p.n, p.minimum, p.maximum) == (ref.n, ref.minimum, ref.maximum)
        for name in ("mean", "m2", "m3", "m4"):
            assert math.isclose(getattr(p, name), getattr(ref, name), rel_tol=1e-11), name
        close(skew_from_partial(p), scipy.stats.skew(x, axis=None))

    @pytest.mark.parametrize("chunks", list(CHUNKINGS_1D.values()), ids=list(CHUNKINGS_1D))
    def test_histogram_partial_is_exact(self, chunks: object) -> None:
        x = data_1d()
        e = fixed_edges(0, 20, 40)
        h = histogram_partial(da.from_array(x, chunks=chunks), e).compute(scheduler="threads")
        assert h == HistogramPartial.from_values(x, e)

    def test_tree_reduce_and_errors(self) -> None:
        parts = [dask.delayed(MomentPartial.from_values)(np.arange(i, i + 3.0)) for i in range(10)]
        p = tree_reduce(parts, merge, split_every=2).compute(scheduler="threads")
        assert p.n == 30
        assert p.maximum == 11.0
        with pytest.raises(ValueError, match="got no partials"):
            tree_reduce([], merge)
        with pytest.raises(ValueError, match="split_every must be an integer >= 2, got 1"):
            tree_reduce(parts, merge, split_every=1)
        with pytest.raises(TypeError, match=r"expected a dask\.array\.Array, got 'ndarray'"):
            moment_partial(np.ones(3))  # type: ignore[arg-type]


class TestOneWayDependency:
    """Issue 12, item 6: the dask adapters depend on the partial functions, never the
    reverse; the numpy finalisers refuse dask input instead of computing it into memory."""

    def test_moments_does_not_import_dask_graph_or_dask(self) -> None:
        import subprocess
        import sys

        code = ("import sys, stats.moments; "
                "print(sorted(m for m in sys.modules if m == 'stats.dask_graph' "
                "or m.split('.')[0] == 'dask'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "[]"

    @pytest.mark.parametrize("name", ["skew", "kurtosis"])
    def test_numpy_finaliser_points_to_the_dask_one(self, name: str) -> None:
        d = da.arange(10.0, chunks=3)
        with pytest.raises(TypeError, match=rf"use stats\.dask_graph\.{name}, the lazy"):
            getattr(moments, name)(d)

    def test_dask_skew_rejects_numpy_input(self) -> None:
        with pytest.raises(TypeError, match=r"skew: expected a dask\.array\.Array, got "
                                            r"'ndarray'"):
            skew(np.arange(10.0))
