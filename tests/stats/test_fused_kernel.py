"""Tests of the fused compiled kernel (issue 14, item 1): stats.fused.region_partials
against scipy (the oracle), against the numpy kernel it replaces (stats.kernels), and its
histogram against numpy.histogram (exact)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from stats import fused
from stats.dataset import (
    INTENSITY_OFFSET_SHARE,
    N_CODES,
    EngineConfig,
    case_partials,
    clamped,
    nice_upper,
)
from stats.histogram import HistogramPartial, fixed_edges
from stats.kernels import IDENTITY, region_partials
from stats.moments import MomentPartial, kurtosis_from_partial, skew_from_partial, variance
from stats.transforms import arcsin_sqrt, ln
from tests.conftest import ENGINE_CASE_CODE

needs_numba = pytest.mark.skipif(not fused.available(), reason="numba is not importable")


def fused_kernels():
    from stats import fused_kernels as k

    return k
ROOT = Path(__file__).resolve().parents[2]


def engine_transforms(scale: float) -> dict[str, object]:
    """The transforms the engine computes from the data (log10 is derived from ln)."""
    return {"ln": ln(scale * INTENSITY_OFFSET_SHARE), "arcsin_sqrt": arcsin_sqrt(scale)}


def sample(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Intensity volumes of several shapes (float32, as stored)."""
    if kind == "lognormal":  # MRI-like, right-skewed
        x = rng.lognormal(5.0, 0.8, shape)
    elif kind == "heavy_tail":  # Student t with 2 degrees of freedom, shifted positive
        x = 2000.0 + 100.0 * scipy.stats.t.rvs(df=2, size=shape, random_state=rng)
    elif kind == "pareto":  # a few enormous values
        x = 10.0 * (1.0 + rng.pareto(1.5, shape))
    elif kind == "huge_offset":  # 1e6 + noise: naive power sums lose every digit here
        x = 1e6 + rng.normal(0.0, 0.5, shape)
    elif kind == "negatives":  # resampling overshoot: some values < 0 (clamped for transforms)
        x = rng.normal(50.0, 40.0, shape)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def volume(kind: str, shape: tuple[int, ...] = (18, 25, 31), seed: int = 20261130):
    rng = np.random.default_rng(seed)
    values = sample(kind, shape, rng)
    codes = rng.choice(np.arange(N_CODES, dtype=np.uint8), size=shape,
                       p=[0.3, 0.55, 0.05, 0.08, 0.02])
    codes[:2] = 0  # a slab of ignored voxels
    return values, codes


def setup(values: np.ndarray) -> tuple[float, dict[str, object], np.ndarray]:
    """Scale (largest value), engine transforms and dyadic edges, as the engine sets them."""
    scale = float(np.max(values))
    return scale, engine_transforms(scale), fixed_edges(0.0, nice_upper(scale), 4096)


def close(ours: float, ref: float, rtol: float = 1e-9) -> bool:
    """The DESIGN contract: 1e-9 relative to max(1, |value|); NaN only where NaN."""
    if math.isnan(ref) or math.isnan(ours):
        return math.isnan(ref) and math.isnan(ours)
    return abs(ours - ref) <= rtol * max(1.0, abs(ref))


def assert_matches_scipy(p: MomentPartial, y: np.ndarray) -> None:
    """Oracle: numpy and scipy.stats on the values, shifted by one of them.

    The statistics are shift-invariant; the shift ``k`` (the median element) makes the
    oracle itself accurate on values such as 1e6 + N(0, 0.5), where scipy on the raw
    values errs by ~3e-9 (it does not correct the rounding of its mean; checked against
    long-double sums of the exactly shifted values). ``y - k`` is exact for every value
    within a factor 2 of ``k`` (Sterbenz), which covers such data entirely.
    """
    y = y.astype(np.float64)
    assert p.n == y.size
    k = float(np.sort(y)[y.size // 2]) if y.size else 0.0
    z = y - k
    refs = {"mean": (p.mean, k + z.mean()), "var": (variance(p, 1), z.var(ddof=1))}
    y = z
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # scipy's "Precision loss" warning
        # the oracle itself is unreliable where it warns (STYLE: such inputs are skipped)
        with contextlib.suppress(RuntimeWarning):
            refs.update({
                "skew": (skew_from_partial(p), scipy.stats.skew(y)),
                "skew_unbiased": (skew_from_partial(p, bias=False),
                                  scipy.stats.skew(y, bias=False)),
                "kurtosis": (kurtosis_from_partial(p), scipy.stats.kurtosis(y)),
                "kurtosis_unbiased": (kurtosis_from_partial(p, bias=False),
                                      scipy.stats.kurtosis(y, bias=False)),
            })
    for name, (ours, ref) in refs.items():
        assert close(ours, float(ref)), (name, ours, ref)


def numpy_kernel(values, codes, transforms, scale, edges):
    """The fallback the engine uses without numba (stats.dataset._channel_partials)."""
    funcs = {n: clamped(t.forward, scale) for n, t in transforms.items()}
    return region_partials(values, codes, N_CODES, funcs, edges=edges)


KINDS = ["lognormal", "heavy_tail", "pareto", "huge_offset", "negatives"]


@needs_numba
class TestAgainstScipy:
    @pytest.mark.parametrize("block", [fused.BLOCK, 1000, 7])
    @pytest.mark.parametrize("kind", KINDS)
    def test_every_code_and_candidate(self, kind: str, block: int) -> None:
        values, codes = volume(kind)
        scale, transforms, edges = setup(values)
        res = fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                    clamp=(0.0, scale), block=block)
        assert res is not None
        assert res.codes == (1, 2, 3, 4)
        for code in res.codes:
            x = values[codes == code].astype(np.float64)
            c = np.clip(x, 0.0, scale)  # the engine's clamping rule
            assert_matches_scipy(res[IDENTITY][code], x)
            assert_matches_scipy(res["ln"][code], np.log(c + scale * INTENSITY_OFFSET_SHARE))
            assert_matches_scipy(res["arcsin_sqrt"][code], np.arcsin(np.sqrt(c / scale)))
            assert (res[IDENTITY][code].minimum, res[IDENTITY][code].maximum) == (x.min(),
                                                                                  x.max())

    def test_huge_offset_where_naive_power_sums_fail(self) -> None:
        # 1e6 + N(0, 0.5): sum(x**4) / n - ... in float64 loses all digits of the kurtosis;
        # the block-centred sums keep them (scipy centres on the mean as well).
        rng = np.random.default_rng(7)
        x = 1e6 + rng.normal(0.0, 0.5, 50_000)
        codes = np.ones(x.size, dtype=np.uint8)
        res = fused.region_partials(x, codes, 2, {}, edges=fixed_edges(0.0, 2**20, 4096),
                                    clamp=(0.0, 2**20))
        assert res is not None
        assert_matches_scipy(res[IDENTITY][1], x)
        naive_m2 = float(np.sum(x**2) - np.sum(x) ** 2 / x.size)  # what a naive pass gives
        assert not close(naive_m2, float(x.var() * x.size), rtol=1e-6)

    @pytest.mark.parametrize("block", [fused.BLOCK, 1000, 7])
    def test_offset_costs_no_digits_against_long_double(self, block: int) -> None:
        # Oracle: long-double central sums of x - 1e6, exact for these float32 values
        # (multiples of 1/16 near 1e6). Every block shares one shift, so the merges see
        # the spread and not the offset: ~1e-15, where means rounded at 1e6 (ulp 1e-10,
        # 2e-10 of the spread) would leave ~1e-11 after many merges.
        rng = np.random.default_rng(8)
        x = (1e6 + rng.normal(0.0, 0.5, 30_000)).astype(np.float32)
        codes = np.ones(x.size, dtype=np.uint8)
        res = fused.region_partials(x, codes, 2, {}, edges=fixed_edges(0.0, 2**20, 64),
                                    clamp=(0.0, 2**20), block=block)
        assert res is not None
        z = (x.astype(np.float64) - 1e6).astype(np.longdouble)
        d = z - z.mean()
        p = res[IDENTITY][1]
        for ours, ref in ((p.m2, (d**2).sum()), (p.m3, (d**3).sum()), (p.m4, (d**4).sum())):
            assert abs(ours - float(ref)) <= 1e-13 * abs(float(ref))
        assert abs(p.mean - float(1e6 + z.mean())) <= 1e-16 * 1e6


@needs_numba
class TestAgainstNumpyKernel:
    @pytest.mark.parametrize("kind", KINDS)
    def test_same_partials_and_histograms(self, kind: str) -> None:
        values, codes = volume(kind, seed=11)
        scale, transforms, edges = setup(values)
        ours = fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                     clamp=(0.0, scale))
        ref = numpy_kernel(values, codes, transforms, scale, edges)
        assert ours is not None
        assert set(ours.moments) == set(ref.moments) == {IDENTITY, "ln", "arcsin_sqrt"}
        for name in ref.moments:
            for code in ref.codes:
                a, b = ours[name][code], ref[name][code]
                assert a.n == b.n
                # both kernels are far inside the contract here; 1e-10 leaves room for
                # the numpy path's mean rounding at offsets (see the long-double test)
                for field in ("mean", "m2", "m3", "m4", "minimum", "maximum"):
                    assert close(getattr(a, field), getattr(b, field), rtol=1e-10), (
                        name, code, field, getattr(a, field), getattr(b, field))
        for code in ref.codes:
            assert ours.histograms[IDENTITY][code] == ref.histograms[IDENTITY][code]

    def test_case_partials_equal_under_both_kernels(self, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
        rng = np.random.default_rng(3)
        shape = (12, 20, 22)
        image = np.stack([sample("lognormal", shape, rng), sample("negatives", shape, rng)])
        label = rng.integers(0, 4, shape).astype(np.uint8)
        brain = rng.random(shape) < 0.7
        annotated = np.ones(shape[0], dtype=bool)
        annotated[-3:] = False
        arrays = {"image": image, "label": label, "brain": brain, "annotated": annotated}
        tops = {"t1": float(image[0].max()), "t2": float(image[1].max())}
        config = EngineConfig(channels=("t1", "t2"),
                              upper={c: nice_upper(v) for c, v in tops.items()},
                              voxel_ml=0.001, scale=tops)
        monkeypatch.setenv(fused.ENV_VAR, "numba")
        a = case_partials("c", "h", arrays, config)
        monkeypatch.setenv(fused.ENV_VAR, "numpy")
        b = case_partials("c", "h", arrays, config)
        assert a.labels == b.labels
        for ch in config.channels:
            for code in range(1, N_CODES):
                assert a.channels[ch].histograms[code] == b.channels[ch].histograms[code]
                pa, pb = a.channels[ch].moments[code], b.channels[ch].moments[code]
                assert set(pa) == set(pb) == {"identity", "ln", "log10", "arcsin_sqrt"}
                for cand in pa:
                    for field in ("n", "mean", "m2", "m3", "m4", "minimum", "maximum"):
                        assert close(getattr(pa[cand], field), getattr(pb[cand], field),
                                     rtol=1e-10), (ch, code, cand, field)


@needs_numba
class TestHistogram:
    @pytest.mark.parametrize("edges", [
        fixed_edges(0.0, 1024.0, 4096),                 # the engine's (dyadic)
        fixed_edges(-3.0, 1000.0, 333),                 # equally spaced, not dyadic
        np.array([-1.0, 0.0, 0.5, 2.0, 10.0, 100.0, 500.0, 5000.0]),  # any increasing
    ], ids=["dyadic", "uniform", "general"])
    def test_counts_equal_numpy_histogram(self, edges: np.ndarray) -> None:
        rng = np.random.default_rng(5)
        x = rng.lognormal(4.0, 1.5, 20_000) - 5.0
        x[:200] = rng.choice(edges, 200)  # values exactly on edges (first/last included)
        x[200:210] = edges[-1] + 1.0      # overflow
        codes = rng.integers(0, 3, x.size).astype(np.uint8)
        res = fused.region_partials(x, codes, 3, {}, edges=edges, clamp=(0.0, 1.0))
        assert res is not None
        for code in (1, 2):
            y = x[codes == code]
            h = res.histograms[IDENTITY][code]
            counts, _ = np.histogram(y, edges)
            np.testing.assert_array_equal(h.counts, counts)
            assert h.underflow == int((y < edges[0]).sum())
            assert h.overflow == int((y > edges[-1]).sum())
            assert h == HistogramPartial.from_values(y, edges)


@needs_numba
class TestEdgeCases:
    def test_constant_region_is_nan_like_scipy(self) -> None:
        values = np.full((4, 5, 6), 42.0, dtype=np.float32)  # exactly representable
        codes = np.ones(values.shape, dtype=np.uint8)
        res = fused.region_partials(values, codes, 2, engine_transforms(64.0),
                                    edges=fixed_edges(0.0, 64.0, 64), clamp=(0.0, 64.0))
        assert res is not None
        for name in (IDENTITY, "ln", "arcsin_sqrt"):
            p = res[name][1]
            assert p.n == values.size
            assert p.m2 == 0.0
            assert math.isnan(skew_from_partial(p))
            assert math.isnan(kurtosis_from_partial(p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "Precision loss" note
            assert math.isnan(scipy.stats.skew(values.ravel().astype(np.float64)))

    def test_empty_regions_are_empty_partials(self) -> None:
        values, codes = volume("lognormal")
        codes[codes == 3] = 1  # code 3 has no voxel
        scale, transforms, edges = setup(values)
        res = fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                    clamp=(0.0, scale))
        assert res is not None
        for name in (IDENTITY, "ln", "arcsin_sqrt"):
            assert res[name][3] == MomentPartial.empty()
        assert res.histograms[IDENTITY][3] == HistogramPartial.empty(edges)

    def test_all_codes_zero_and_bool_codes(self) -> None:
        values, _ = volume("lognormal")
        scale, transforms, edges = setup(values)
        none = fused.region_partials(values, np.zeros(values.shape, dtype=bool), 2,
                                     transforms, edges=edges, clamp=(0.0, scale))
        assert none is not None
        assert none[IDENTITY][1] == MomentPartial.empty()
        mask = values > np.median(values)
        res = fused.region_partials(values, mask, 2, transforms, edges=edges,
                                    clamp=(0.0, scale))
        assert res is not None
        assert_matches_scipy(res[IDENTITY][1], values[mask])

    def test_negative_values_count_as_zero_for_the_candidates(self) -> None:
        values, codes = volume("negatives")
        scale, transforms, edges = setup(values)
        assert (values[codes > 0] < 0).sum() > 100
        res = fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                    clamp=(0.0, scale))
        assert res is not None
        offset = scale * INTENSITY_OFFSET_SHARE
        for code in res.codes:
            x = values[codes == code].astype(np.float64)
            assert res["ln"][code].minimum == pytest.approx(math.log(offset), rel=1e-15)
            assert res[IDENTITY][code].minimum == x.min() < 0  # raw moments see x as it is
            assert res.histograms[IDENTITY][code].underflow == int((x < 0).sum())

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite_in_a_region_goes_to_the_numpy_path(self, bad: float) -> None:
        values, codes = volume("lognormal")
        scale, transforms, edges = setup(values)
        values[5, 5, 5] = bad
        codes[5, 5, 5] = 2
        assert fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                     clamp=(0.0, scale)) is None

    def test_nan_in_a_region_raises_like_the_numpy_path(self, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
        # the engine's rule (stats.transforms): NaN is outside every candidate's domain
        shape = (6, 8, 8)
        rng = np.random.default_rng(2)
        image = sample("lognormal", shape, rng)[None]
        image[0, 3, 3, 3] = np.nan
        arrays = {"image": image, "label": np.zeros(shape, np.uint8),
                  "brain": np.ones(shape, bool), "annotated": np.ones(shape[0], bool)}
        top = float(np.nanmax(image))
        config = EngineConfig(channels=("t1",), upper={"t1": nice_upper(top)}, voxel_ml=1.0,
                              scale={"t1": top})
        for kernel in ("numba", "numpy"):
            monkeypatch.setenv(fused.ENV_VAR, kernel)
            with pytest.raises(ValueError, match=r"value nan is outside its domain"):
                case_partials("c", "h", arrays, config)

    def test_nan_outside_the_regions_is_ignored(self) -> None:
        values, codes = volume("lognormal")
        scale, transforms, edges = setup(values)
        values[0, 0, 0] = np.nan  # code 0 (the ignored slab)
        res = fused.region_partials(values, codes, N_CODES, transforms, edges=edges,
                                    clamp=(0.0, scale))
        ref = numpy_kernel(values, codes, transforms, scale, edges)
        assert res is not None
        for code in ref.codes:
            assert close(res[IDENTITY][code].m4, ref[IDENTITY][code].m4, rtol=1e-12)

    @pytest.mark.parametrize(("dtype", "bad"), [(np.uint8, 9), (np.int16, -1), (np.int64, 5)])
    def test_code_out_of_range(self, dtype: type, bad: int) -> None:
        values, codes = volume("lognormal")
        codes = codes.astype(dtype)
        codes[4, 4, 4] = bad
        with pytest.raises(ValueError, match=rf"codes must lie in \[0, 4\] \(n_codes=5\), "
                                             rf"found {bad}"):
            fused.region_partials(values, codes, N_CODES, {}, edges=[0.0, 1.0],
                                  clamp=(0.0, 1.0))

    def test_unsupported_transforms_are_refused(self) -> None:
        values, codes = volume("lognormal")
        assert not fused.supports({"ln": ln(0.0)}, (0.0, 1.0))   # ln(0) is outside the domain
        assert not fused.supports({"a": arcsin_sqrt(1.0)}, (0.0, 2.0))  # clamp above scale
        assert not fused.supports({"s": np.sqrt}, (0.0, 1.0))
        assert fused.supports(engine_transforms(10.0), (0.0, 10.0))
        with pytest.raises(ValueError, match=r"the fused kernel computes ln"):
            fused.region_partials(values, codes, N_CODES, {"ln": ln(0.0)}, edges=[0.0, 1.0],
                                  clamp=(0.0, 1.0))


@needs_numba
class TestElementwise:
    """The vectorisable ln and arcsin-sqrt against numpy's (oracle) over their ranges."""

    def test_ln_within_one_ulp(self) -> None:
        rng = np.random.default_rng(1)
        x = np.concatenate([rng.lognormal(0.0, 5.0, 200_000), np.exp(rng.uniform(-700, 700,
                            200_000)), [np.finfo(np.float64).tiny, 1.0, 2.0, 1e308]])
        out = np.empty_like(x)
        fused_kernels()._ln_into(x, x.size, 0.0, np.inf, 0.0, out)
        ref = np.log(x)
        ulp = np.abs(out - ref) / np.spacing(np.abs(ref))
        assert ulp[ref != 0].max() <= 1.0
        assert out[-3] == 0.0  # ln 1 is exactly 0

    def test_arcsin_sqrt_within_two_ulp(self) -> None:
        rng = np.random.default_rng(2)
        u = np.concatenate([rng.uniform(0, 1, 200_000), rng.uniform(0, 1e-9, 10_000),
                            1 - rng.uniform(0, 1e-9, 10_000), [0.0, 0.25, 0.5, 1.0]])
        out = np.empty_like(u)
        fused_kernels()._arcsin_sqrt_into(u, u.size, 0.0, 1.0, 1.0, out)
        ref = np.arcsin(np.sqrt(u))
        ulp = np.abs(out - ref)[ref != 0] / np.spacing(ref[ref != 0])
        assert ulp.max() <= 2.0
        assert out[-4] == 0.0
        assert out[-1] == ref[-1]


class TestSelection:
    def test_env_forces_numpy(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(fused.ENV_VAR, "numpy")
        assert fused.selected() == "numpy"

    def test_default_is_numba_when_importable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(fused.ENV_VAR, raising=False)
        assert fused.selected() == ("numba" if fused.available() else "numpy")

    def test_unknown_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(fused.ENV_VAR, "cuda")
        with pytest.raises(ValueError, match=r"XRAI_STATS_KERNEL must be 'numba' or 'numpy', got 'cuda'"):
            fused.selected()


@needs_numba
@pytest.mark.slow
def test_compiled_once_then_loaded_from_the_cache(tmp_path: Path) -> None:
    """cache=True: a second process (a Dask worker) loads the machine code, it does not
    compile again (numba's dispatcher counts cache hits and misses; the JIT form, with
    the ahead-of-time module turned off)."""
    code = (
        "import numpy as np\nfrom stats import fused, fused_kernels as k\n"
        "from stats.transforms import ln\n"
        "v = np.ones(100, np.float32); c = np.ones(100, np.uint8)\n"
        "fused.region_partials(v, c, 2, {'ln': ln(1.0)}, edges=[0.0, 2.0], clamp=(0.0, 2.0))\n"
        "print(sum(k._fused.stats.cache_hits.values()),"
        " sum(k._fused.stats.cache_misses.values()))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "XRAI_STATS_AOT": "0"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=ROOT, env=env).stdout.split() for _ in range(2)]
    assert runs[0] == ["0", "1"]  # the first process compiles
    assert runs[1] == ["1", "0"]  # the next one loads


@needs_numba
def test_warm_up_loads_the_code_the_engine_then_runs() -> None:
    """`fused.warm_up` readies the very specialisation `case_partials` calls (float32
    volumes, uint8 codes, the engine's candidates): in a fresh process (no earlier call
    has compiled anything), the real call after it adds no signature (the JIT form)."""
    code = """
from stats import fused, fused_kernels as k
fused.warm_up()
before = [len(f.signatures) for f in (k._fused, k._codes, k._slices, k._components)]
""" + ENGINE_CASE_CODE + """
from stats.dataset import case_partials
case_partials("c", "h", arrays, config)
print(before == [len(f.signatures) for f in (k._fused, k._codes, k._slices, k._components)],
      before)
"""
    env = {**os.environ, fused.ENV_VAR: "numba", "XRAI_STATS_AOT": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env).stdout.strip().split(maxsplit=1)
    assert out == ["True", "[1, 1, 1, 1]"]


@needs_numba
@pytest.mark.parametrize("seed", range(6))
def test_region_codes_and_slice_counts_equal_numpy(seed: int, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """The compiled region codes and per-slice counts are the numpy forms' arrays, bit for
    bit (random labels, brains and annotated slices; an empty tumour among them)."""
    from stats.dataset import _bounding_box
    from stats.dataset import region_codes as codes_of

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 12, size=3))
    label = rng.integers(0, 5, size=shape).astype(np.uint8)
    if seed == 0:
        label[:] = 0  # no tumour: no box
    brain = rng.random(shape) < 0.7
    annotated = rng.random(shape[0]) < 0.8
    monkeypatch.setenv(fused.ENV_VAR, "numpy")
    reference = codes_of(label, brain, annotated)
    monkeypatch.setenv(fused.ENV_VAR, "numba")
    codes = codes_of(label, brain, annotated)
    assert codes.dtype == reference.dtype == np.uint8
    np.testing.assert_array_equal(codes, reference)
    per_brain, per_tumour, box = fused.slice_counts(codes)
    tumour = reference >= 2
    np.testing.assert_array_equal(per_brain, np.count_nonzero(reference.reshape(shape[0], -1),
                                                              axis=1))
    np.testing.assert_array_equal(per_tumour, np.count_nonzero(tumour.reshape(shape[0], -1),
                                                               axis=1))
    assert box == (_bounding_box(tumour, per_tumour) if tumour.any() else None)


@needs_numba
def test_label_statistics_equal_under_both_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Components, fractions and class counts of a multifocal case: the same numbers from
    the compiled passes and from numpy's."""
    from stats.dataset import label_stats, region_codes

    rng = np.random.default_rng(5)
    label = np.zeros((20, 24, 22), np.uint8)
    for _ in range(4):  # four blobs, some touching
        z, y, x = (int(v) for v in rng.integers(2, 18, size=3))
        label[z - 2:z + 2, y - 2:y + 3, x - 1:x + 2] = rng.integers(1, 4)
    brain = np.ones(label.shape, bool)
    annotated = np.ones(label.shape[0], bool)
    annotated[3] = False
    out = {}
    for kernel in ("numpy", "numba"):
        monkeypatch.setenv(fused.ENV_VAR, kernel)
        out[kernel] = label_stats(label, region_codes(label, brain, annotated), 0.001)
    assert out["numba"] == out["numpy"]
    assert out["numba"].components >= 1
