"""Tests of stats.kernels.region_partials: per code against scipy on the masked values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats

from stats.histogram import HistogramPartial, fixed_edges
from stats.kernels import RegionPartials, region_partials
from stats.moments import (
    MomentPartial,
    kurtosis_from_partial,
    scale_partial,
    skew_from_partial,
    variance,
)


def volume(shape: tuple[int, ...] = (20, 30, 40), n_codes: int = 5, seed: int = 13):
    """A small 'MRI' volume: lognormal intensities, codes 0 (outside) .. n_codes-1."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(5.0, 0.8, shape).astype(np.float32)
    codes = rng.integers(0, n_codes, shape).astype(np.uint8)
    codes[:3] = 0  # a slab of ignored voxels
    return values, codes


def assert_matches_scipy(p: MomentPartial, x: np.ndarray) -> None:
    """Oracle: numpy/scipy.stats on the region's values; tolerance = the 1e-9 contract."""
    x = x.astype(np.float64)
    assert p.n == x.size
    assert (p.minimum, p.maximum) == (x.min(), x.max())
    for ours, ref in (
        (p.mean, x.mean()),
        (variance(p, 1), x.var(ddof=1)),
        (skew_from_partial(p), scipy.stats.skew(x)),
        (skew_from_partial(p, bias=False), scipy.stats.skew(x, bias=False)),
        (kurtosis_from_partial(p), scipy.stats.kurtosis(x)),
        (
            kurtosis_from_partial(p, fisher=False, bias=False),
            scipy.stats.kurtosis(x, fisher=False, bias=False),
        ),
    ):
        assert abs(ours - ref) <= 1e-9 * max(1.0, abs(ref)), (ours, ref)


class TestAgainstScipy:
    @pytest.mark.parametrize("block_size", [262_144, 1000, 7])
    def test_identity_per_code(self, block_size: int) -> None:
        values, codes = volume()
        res = region_partials(values, codes, 5, block_size=block_size)
        assert isinstance(res, RegionPartials)
        assert res.codes == (1, 2, 3, 4)
        assert set(res.moments) == {"identity"}
        for code in res.codes:
            assert_matches_scipy(res["identity"][code], values[codes == code])

    def test_transforms_per_code(self) -> None:
        values, codes = volume()

        def ln(x: np.ndarray) -> np.ndarray:
            return np.log(x + 1.0)

        res = region_partials(values, codes, 5, {"ln": ln, "sqrt": np.sqrt})
        for code in res.codes:
            x = values[codes == code].astype(np.float64)
            assert_matches_scipy(res["ln"][code], ln(x))
            assert_matches_scipy(res["sqrt"][code], np.sqrt(x))
            # log10 derived from ln without touching the data
            log10 = scale_partial(res["ln"][code], 1 / math.log(10))
            ref = scipy.stats.skew(np.log10(x + 1.0))
            assert abs(skew_from_partial(log10) - ref) <= 1e-9 * max(1.0, abs(ref))

    def test_many_codes_sorted_path_equals_mask_path(self) -> None:
        # 30 codes take the argsort path; a subset of 4 codes the per-code mask path
        values, codes = volume(n_codes=30, seed=14)
        many = region_partials(values, codes, 30)
        for code in many.codes:
            assert_matches_scipy(many["identity"][code], values[codes == code])
        few_codes = np.where(codes < 5, codes, 0).astype(np.uint8)
        few = region_partials(values, few_codes, 5)
        for code in few.codes:
            assert few["identity"][code] == many["identity"][code]  # same values, same order

    def test_histograms_per_code(self) -> None:
        values, codes = volume()
        e_id, e_ln = fixed_edges(0, 2000, 100), fixed_edges(0, 10, 40)
        res = region_partials(
            values, codes, 5, {"ln": np.log}, edges={"identity": e_id, "ln": e_ln}, block_size=500
        )
        for code in res.codes:
            x = values[codes == code].astype(np.float64)
            assert res.histograms["identity"][code] == HistogramPartial.from_values(x, e_id)
            assert res.histograms["ln"][code] == HistogramPartial.from_values(np.log(x), e_ln)
        only_identity = region_partials(values, codes, 5, {"ln": np.log}, edges=e_id)
        assert set(only_identity.histograms) == {"identity"}

    def test_int_values_and_bool_codes(self) -> None:
        rng = np.random.default_rng(15)
        values = rng.integers(-1000, 1000, (10, 10, 10)).astype(np.int16)
        mask = rng.random((10, 10, 10)) < 0.3
        res = region_partials(values, mask, 2)
        assert_matches_scipy(res["identity"][1], values[mask])


class TestEdgeCases:
    def test_absent_code_is_empty(self) -> None:
        values, codes = volume()
        res = region_partials(
            values, np.where(codes == 2, 0, codes).astype(np.uint8), 5, edges=fixed_edges(0, 1, 4)
        )
        assert res["identity"][2] == MomentPartial.empty()
        assert res.histograms["identity"][2].total == 0

    def test_constant_region_gives_nan_without_warning(self) -> None:
        values = np.full((4, 4), 42.0)  # exactly representable constant
        codes = np.ones((4, 4), dtype=np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = region_partials(values, codes, 2)["identity"][1]
            assert math.isnan(skew_from_partial(p))
            assert math.isnan(kurtosis_from_partial(p))

    def test_single_code_volume(self) -> None:
        res = region_partials(np.ones(3), np.zeros(3, dtype=np.uint8), 1)
        assert res.codes == ()
        assert dict(res["identity"]) == {}

    def test_unknown_name(self) -> None:
        values, codes = volume()
        with pytest.raises(KeyError, match="no partials named 'ln'"):
            region_partials(values, codes, 5)["ln"]


class TestValidation:
    def test_shape_mismatch(self) -> None:
        with pytest.raises(
            ValueError, match=r"values have shape \(3,\) but codes have shape \(4,\)"
        ):
            region_partials(np.ones(3), np.ones(4, dtype=np.uint8), 2)

    def test_code_out_of_range(self) -> None:
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 1\] \(n_codes=2\), found 5"):
            region_partials(np.ones(3), np.array([0, 1, 5], dtype=np.uint8), 2)
        with pytest.raises(ValueError, match="found -1"):
            region_partials(np.ones(3), np.array([0, 1, -1]), 2)

    def test_bad_types(self) -> None:
        with pytest.raises(TypeError, match="codes must be an integer"):
            region_partials(np.ones(3), np.ones(3), 2)
        with pytest.raises(TypeError, match="transform 'ln' must be callable"):
            region_partials(np.ones(3), np.ones(3, dtype=np.uint8), 2, {"ln": 3})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="n_codes must be an integer >= 1, got 0"):
            region_partials(np.ones(3), np.zeros(3, dtype=np.uint8), 0)

    def test_reserved_and_unknown_names(self) -> None:
        v, c = np.ones(3), np.ones(3, dtype=np.uint8)
        with pytest.raises(ValueError, match="'identity' is reserved"):
            region_partials(v, c, 2, {"identity": np.log})
        with pytest.raises(ValueError, match=r"edges given for unknown names \['ln'\]"):
            region_partials(v, c, 2, edges={"ln": fixed_edges(0, 1, 2)})

    def test_transform_must_be_elementwise(self) -> None:
        with pytest.raises(ValueError, match="transform 'total' must be elementwise"):
            region_partials(np.ones(3), np.ones(3, dtype=np.uint8), 2, {"total": np.sum})
