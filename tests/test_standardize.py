from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import CaseRejected
from pipeline.standardize import (
    Loaded,
    orientation_code,
    remap_labels,
    same_space,
    standardize_case,
)
from pipeline.store import Grid
from tests.conftest import make_image

GRID = Grid(spacing=(1.0, 1.0, 1.0), shape=(40, 36, 30))
SHAPE = (24, 32, 32)  # source (z, y, x)


def _head_and_tumour():
    """A bright ellipsoid 'brain' with a small 'tumour' block of distinct intensity."""
    z, y, x = np.indices(SHAPE)
    brain = ((z - 12) / 10) ** 2 + ((y - 16) / 13) ** 2 + ((x - 16) / 13) ** 2 <= 1
    image = np.where(brain, 100.0, 0.0).astype(np.float32)
    tumour = (slice(8, 12), slice(10, 14), slice(18, 23))  # off-centre, asymmetric
    image[tumour] = 300.0
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[tumour] = 3
    return image, label


def _channels(image, **geometry):
    return {c: Loaded(make_image(image, **geometry), Path(f"{c}.nii.gz"))
            for c in ("t1n", "t1c", "t2w", "t2f")}


def _flip_to_ras(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    """The same physical content stored with x and y axes reversed (an RAS-ordered array)."""
    _nz, ny, nx = arr.shape
    flipped = arr[:, ::-1, ::-1].copy()
    # index 0 of the flipped x axis sits where index nx-1 was, and steps towards -x (right)
    new_origin = (origin[0] + (nx - 1) * spacing[0], origin[1] + (ny - 1) * spacing[1], origin[2])
    return make_image(flipped, spacing=spacing, origin=new_origin,
                      direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))


class TestAlignment:
    def test_label_stored_in_other_orientation_lands_on_the_tumour(self):
        image, label = _head_and_tumour()
        ras_label = _flip_to_ras(label)
        assert orientation_code(ras_label) == "RAS"
        out = standardize_case("c1", _channels(image), Loaded(ras_label, Path("seg.nii.gz")),
                               grid=GRID)
        tumour_voxels = out.image[0] == 300.0
        # exact: the label covers the bright tumour voxels and nothing else
        np.testing.assert_array_equal(out.label == 3, tumour_voxels)
        assert "label-resampled-from-other-geometry" in out.info["flags"]

    def test_image_stored_in_ras_ends_in_lps(self):
        image, label = _head_and_tumour()
        lps = standardize_case("c1", _channels(image), Loaded(make_image(label), Path("s")),
                               grid=GRID)
        ras_imgs = {c: Loaded(_flip_to_ras(image), Path(c)) for c in ("t1n", "t1c", "t2w", "t2f")}
        ras = standardize_case("c1", ras_imgs, Loaded(_flip_to_ras(label), Path("s")), grid=GRID)
        np.testing.assert_array_equal(lps.image, ras.image)
        np.testing.assert_array_equal(lps.label, ras.label)
        assert ras.info["volumes"]["t1n"]["orientation"] == "RAS"

    def test_anisotropic_source_is_resampled_to_the_grid(self):
        image, label = _head_and_tumour()
        out = standardize_case("c1", _channels(image, spacing=(1.0, 1.0, 1.5)),
                               Loaded(make_image(label, spacing=(1.0, 1.0, 1.5)), Path("s")),
                               grid=GRID)
        assert out.image.shape == (4, *GRID.zyx)
        # the tumour block is 4 source slices of 1.5 mm = 6 mm tall: 6 target slices at 1 mm
        tz = np.flatnonzero((out.label == 3).any(axis=(1, 2)))
        assert tz[-1] - tz[0] + 1 == 6
        assert out.brain.sum() > 0
        assert out.annotated.all()


class TestRejections:
    def test_nan_voxels_name_file_and_value(self):
        image, label = _head_and_tumour()
        chans = _channels(image)
        bad = image.copy()
        bad[3, 4, 5] = np.nan
        chans["t2w"] = Loaded(make_image(bad), Path("case-t2w.nii.gz"))
        with pytest.raises(CaseRejected, match=r"case-t2w\.nii\.gz: channel t2w has 1 non-finite voxel\(s\), first nan at index \(x=5, y=4, z=3\)"):
            standardize_case("c1", chans, Loaded(make_image(label), Path("s")), grid=GRID)

    def test_inf_voxels(self):
        image, _label = _head_and_tumour()
        chans = _channels(image)
        bad = image.copy()
        bad[0, 0, 0] = np.inf
        chans["t1c"] = Loaded(make_image(bad), Path("t1c.nii.gz"))
        with pytest.raises(CaseRejected, match=r"first inf"):
            standardize_case("c1", chans, None, grid=GRID)

    def test_all_zero_channel(self):
        image, _ = _head_and_tumour()
        chans = _channels(image)
        chans["t2f"] = Loaded(make_image(np.zeros(SHAPE, np.float32)), Path("t2f.nii.gz"))
        with pytest.raises(CaseRejected, match=r"t2f\.nii\.gz: channel t2f is all zero"):
            standardize_case("c1", chans, None, grid=GRID)

    def test_label_values_outside_scheme(self):
        image, label = _head_and_tumour()
        label[0, 0, 0] = 7
        with pytest.raises(CaseRejected, match=r"seg\.nii\.gz: label values \[7\] are outside the scheme"):
            standardize_case("c1", _channels(image), Loaded(make_image(label), Path("seg.nii.gz")),
                             grid=GRID)

    def test_label_far_away_is_rejected(self):
        image, label = _head_and_tumour()
        far = make_image(label, origin=(500.0, 0.0, 0.0))
        with pytest.raises(CaseRejected, match=r"seg\.nii\.gz: label does not overlap the images"):
            standardize_case("c1", _channels(image), Loaded(far, Path("seg.nii.gz")), grid=GRID)

    def test_missing_channel(self):
        image, _ = _head_and_tumour()
        chans = _channels(image)
        del chans["t1c"]
        with pytest.raises(CaseRejected, match=r"missing channel\(s\) \['t1c'\]"):
            standardize_case("c1", chans, None, grid=GRID)


def test_old_brats_label_four_becomes_three():
    arr = np.array([[[0, 1, 2, 4]]], dtype=np.uint8)
    out, present = remap_labels("c", Path("seg"), arr, {4: 3})
    assert out.tolist() == [[[0, 1, 2, 3]]]
    assert present == [0, 1, 2, 4]


def test_partially_annotated_slices_are_carried_to_the_grid():
    image, label = _head_and_tumour()
    out = standardize_case("c1", _channels(image), Loaded(make_image(label), Path("s")),
                           grid=GRID, annotated_slices=(8, 9, 10, 11))
    # 4 annotated source slices at 1 mm -> 4 annotated target slices
    assert int(out.annotated.sum()) == 4


def test_same_space_tolerance():
    a = make_image(np.zeros((2, 2, 2), np.float32))
    b = make_image(np.zeros((2, 2, 2), np.float32), origin=(5e-4, 0, 0))
    c = make_image(np.zeros((2, 2, 2), np.float32), origin=(2e-3, 0, 0))
    assert same_space(a, b)
    assert not same_space(a, c)
    assert isinstance(a, sitk.Image)
