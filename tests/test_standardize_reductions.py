"""Issue 14: the cheaper reductions of standardize_case give what the plain numpy ones gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CaseRejected
from pipeline.standardize import (
    Loaded,
    _check_intensities,
    _check_resampled,
    _scan_numpy,
    bounding_box,
    nonzero_any,
    remap_labels,
    scan_channels,
)
from tests.conftest import make_image


def nonzero_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Oracle: the box from the listed voxels (what the code did before)."""
    zyx = np.nonzero(mask)
    if not zyx[0].size:
        return None
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in zyx)


class TestBoundingBox:
    @pytest.mark.parametrize("density", [1e-4, 0.01, 0.5, 1.0])
    def test_random_masks_match_nonzero(self, rng, density):
        for _ in range(20):
            mask = rng.random((7, 9, 11)) < density
            assert bounding_box(mask) == nonzero_box(mask)

    def test_empty_is_none(self):
        assert bounding_box(np.zeros((3, 4, 5), bool)) is None

    @pytest.mark.parametrize("where", [(0, 0, 0), (2, 3, 4), (0, 3, 1)])
    def test_one_voxel(self, where):
        mask = np.zeros((3, 4, 5), bool)
        mask[where] = True
        assert bounding_box(mask) == tuple(slice(i, i + 1) for i in where)

    def test_float_values_count_where_non_zero(self, rng):
        values = np.where(rng.random((6, 6, 6)) < 0.05, rng.normal(size=(6, 6, 6)), 0.0)
        values[0, 0, 0] = -0.0  # negative zero is zero
        assert bounding_box(values) == nonzero_box(values)


def test_nonzero_any_is_any_of_the_stack(rng):
    arrays = [np.where(rng.random((5, 6, 7)) < 0.2, rng.normal(size=(5, 6, 7)), 0.0)
              .astype(np.float32) for _ in range(4)]
    arrays[1][0, 0, 0] = np.nan  # NaN != 0, as in np.any(... != 0)
    want = np.any(np.stack(arrays) != 0.0, axis=0)
    for n in (1, 2, 4):
        np.testing.assert_array_equal(nonzero_any(arrays[:n]),
                                      np.any(np.stack(arrays[:n]) != 0.0, axis=0))
    assert nonzero_any(arrays).dtype == bool
    np.testing.assert_array_equal(nonzero_any(arrays), want)


class TestLabelValuesPresent:
    """`remap_labels` lists the values present as the bincount of every voxel did."""

    @pytest.mark.parametrize("fill", [0, 2])  # mostly background; every voxel labelled
    def test_matches_bincount_of_all_voxels(self, rng, fill):
        arr = np.full((8, 9, 10), fill, np.uint8)
        arr[rng.random(arr.shape) < 0.1] = 1
        arr[2, 3, 4] = 3
        want = [int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=256))]
        _, present = remap_labels("c", Path("seg"), arr, {})
        assert present == want

    def test_all_background(self):
        _, present = remap_labels("c", Path("seg"), np.zeros((2, 2, 2), np.uint8), {})
        assert present == [0]

    def test_outside_the_scheme_is_still_rejected(self):
        arr = np.zeros((2, 2, 2), np.uint8)
        arr[0, 0, 0] = 200
        with pytest.raises(CaseRejected, match=r"label values \[200\] are outside the scheme; "
                                                r"expected \[0, 1, 2, 3\] \(values present: "
                                                r"\[0, 200\]\)"):
            remap_labels("c", Path("seg"), arr, {})


class TestIntensityChecks:
    """Fast min/max checks; a failing channel gets the message it got before."""

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_names_the_first_voxel(self, bad):
        arr = np.ones((4, 5, 6), np.float32)
        arr[3, 1, 2] = bad
        arr[1, 2, 3] = bad
        vol = Loaded(make_image(arr), Path("t1.nii.gz"))
        with pytest.raises(CaseRejected, match=rf"t1\.nii\.gz: channel t1n has 2 non-finite "
                                                rf"voxel\(s\), first {bad!r} at index "
                                                r"\(x=3, y=2, z=1\)"):
            _check_intensities("c", "t1n", vol)

    @pytest.mark.parametrize("zero", [0.0, -0.0])
    def test_all_zero(self, zero):
        vol = Loaded(make_image(np.full((3, 3, 3), zero, np.float32)), Path("t1.nii.gz"))
        with pytest.raises(CaseRejected, match=r"t1\.nii\.gz: channel t1n is all zero"):
            _check_intensities("c", "t1n", vol)

    def test_a_valid_channel_is_returned_as_a_view(self):
        arr = np.zeros((3, 3, 3), np.float32)
        arr[1, 1, 1] = -2.5  # one non-zero voxel, negative
        vol = Loaded(make_image(arr), Path("t1.nii.gz"))
        out = _check_intensities("c", "t1n", vol)
        np.testing.assert_array_equal(out, arr)
        assert not out.flags.owndata

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_resampled_non_finite(self, bad):
        arr = np.zeros((3, 4, 5), np.float32)
        arr[2, 0, 1] = bad
        with pytest.raises(CaseRejected, match=rf"channel t2w is not finite after resampling: "
                                                rf"1 voxel\(s\), first {bad!r} at grid index "
                                                r"\(x=1, y=0, z=2\)"):
            _check_resampled("c", "t2w", Path("t2.nii.gz"), arr)
        arr[2, 0, 1] = 1e30
        _check_resampled("c", "t2w", Path("t2.nii.gz"), arr)


class TestScanChannels:
    """`scan_channels` (one compiled pass) against the numpy forms the record used: the
    brain as `nonzero_any`, and per channel the non-finite count and min, max and
    negative count over ``out[c][brain]`` (exact: min, max and counts do not round)."""

    @staticmethod
    def reference(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        brain = np.any(out != 0, axis=0)
        fields = []
        for channel in out:
            values = channel[brain]
            fields.append([np.count_nonzero(~np.isfinite(channel)),
                           values.min() if values.size else np.inf,
                           values.max() if values.size else -np.inf,
                           np.count_nonzero(values < 0)])
        return brain, np.array(fields, dtype=np.float64)

    @pytest.mark.parametrize("zero_share", [0.0, 0.5, 0.95, 1.0])
    def test_equals_numpy(self, rng, zero_share):
        out = rng.normal(50.0, 80.0, (4, 9, 10, 11)).astype(np.float32)
        out[rng.random(out.shape) < zero_share] = 0.0
        for got in (scan_channels(out), _scan_numpy(out)):
            want = self.reference(out)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])

    @pytest.mark.parametrize("kind", ["positive", "negative with zeros", "one negative",
                                      "channel all zero", "all zero", "negative zeros",
                                      "no positive, no zero in the brain"])
    def test_the_branches_equal_numpy(self, rng, kind):
        """Each way the compiled scan finds the brain's min and max (see its notes),
        in the ahead-of-time form ``scan_channels`` runs here and in numba's JIT form."""
        from pipeline import standardize_kernels

        for _ in range(30):
            out = rng.normal(0.0, 1.0, (3, 4, 5, 6)).astype(np.float32)
            if kind == "positive":
                out = np.abs(out)
            elif kind == "negative with zeros":
                out = -np.abs(out)
                out[rng.random(out.shape) < 0.5] = 0.0
            elif kind == "one negative":
                out[:] = 0.0
                out[2, 1, 1, 1] = -3.0
            elif kind == "channel all zero":
                out[0] = 0.0
                out[1] = -np.abs(out[1])
            elif kind == "all zero":
                out[:] = 0.0
            elif kind == "negative zeros":
                out[rng.random(out.shape) < 0.3] = -0.0
            else:
                out = -np.abs(out)
            want = self.reference(out)
            flat = out.reshape(3, -1)
            brain, fields = np.empty(flat.shape[1], bool), np.empty((3, 4))
            standardize_kernels._scan_channels(flat, flat.view(np.int32), brain, fields)
            for got in (scan_channels(out), (brain.reshape(out.shape[1:]), fields)):
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])

    def test_counts_non_finite_values(self, rng):
        out = rng.uniform(1.0, 2.0, (3, 4, 5, 6)).astype(np.float32)
        out[1, 0, 0, 0], out[1, 3, 4, 5], out[2, 1, 1, 1] = np.nan, np.inf, -np.inf
        for brain, fields in (scan_channels(out), _scan_numpy(out)):
            assert brain.all()
            assert fields[:, 0].tolist() == [0, 2, 1]

    def test_standardize_case_uses_the_compiled_scan(self):
        """The compiled form is what ingest runs here (numba is a dependency)."""
        from pipeline.standardize import _scan_kernel

        assert _scan_kernel() is not None
