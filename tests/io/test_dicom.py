"""DICOM series reading: geometry against the DICOM formula, compression, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless

from pipeline.errors import VolumeError
from pipeline.io import read_image, read_label
from pipeline.io.dicom import order_slices, read_header
from pipeline.sources.base import VolumeRef
from tests.io import AXIAL, oblique_iop, write_mr_series


def dicom_position(series, i: int, j: int, k: int) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: P = S_k + X * Δcol * i + Y * Δrow * j (LPS mm)."""
    row_dir, col_dir = np.asarray(series.iop[:3]), np.asarray(series.iop[3:])
    d_row, d_col = series.pixel_spacing
    return series.position(k) + row_dir * d_col * i + col_dir * d_row * j


class TestGeometry:
    @pytest.mark.parametrize("iop", [AXIAL, oblique_iop(25.0), (0, 1, 0, 0, 0, -1)])
    def test_voxel_positions_follow_the_dicom_formula(self, tmp_path: Path, iop) -> None:
        series = write_mr_series(tmp_path / "s", iop=iop, rows=16, cols=12)
        image = read_image(VolumeRef("dicom", series.files))
        assert image.GetSize() == (12, 16, 4)
        for index in [(0, 0, 0), (11, 0, 0), (0, 15, 0), (5, 7, 3), (11, 15, 3)]:
            got = image.TransformIndexToPhysicalPoint(index)
            # DS values are written with up to 16 characters: 1e-6 mm is far above that.
            np.testing.assert_allclose(got, dicom_position(series, *index), atol=1e-6)

    def test_pixels_in_slice_order_whatever_the_file_names(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s")  # files are named in reverse slice order
        image = read_image(VolumeRef("dicom", tuple(sorted(series.files))))
        assert image.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), series.array)

    def test_rescale_slope_and_intercept_are_applied(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s", rescale=(0.5, -100.0))
        array = sitk.GetArrayFromImage(read_image(VolumeRef("dicom", series.files)))
        # Modality LUT (PS3.3 C.11.1.1.2): value = slope * stored + intercept, exact in float32.
        np.testing.assert_array_equal(array, series.array * 0.5 - 100.0)

    def test_order_slices_reports_positions_along_the_normal(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s", slice_gap=3.0, origin=(0.0, 0.0, -6.0))
        order = order_slices(series.files)
        assert order.paths == series.files  # helper returns files in slice order
        np.testing.assert_allclose(order.positions, [-6.0, -3.0, 0.0, 3.0])


def test_jpeg2000_lossless_series_reads_like_the_uncompressed_one(tmp_path: Path) -> None:
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes JPEG 2000 in this test")
    # OpenJPEG's default 6 resolution levels need at least 32 pixels per side.
    plain = write_mr_series(tmp_path / "plain", rows=32, cols=32, seed=3)
    j2k = write_mr_series(
        tmp_path / "j2k", rows=32, cols=32, seed=3, transfer_syntax=JPEG2000Lossless
    )
    assert pydicom.dcmread(j2k.files[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    a = read_image(VolumeRef("dicom", plain.files))
    b = read_image(VolumeRef("dicom", j2k.files))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))
    assert b.GetOrigin() == a.GetOrigin()


class TestBadInput:
    def test_unreadable_file_is_named(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s")
        series.files[1].write_bytes(b"this is not DICOM at all" * 10)
        with pytest.raises(VolumeError, match=rf"{series.files[1].name}: not a readable DICOM"):
            read_image(VolumeRef("dicom", series.files))

    def test_truncated_pixel_data_raises(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s")
        data = series.files[2].read_bytes()
        series.files[2].write_bytes(data[: len(data) - 300])
        with pytest.raises(VolumeError, match=rf"{series.files[2].name}: SimpleITK cannot decode"):
            read_image(VolumeRef("dicom", series.files))

    def test_missing_slice_is_reported(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s", n_slices=5)
        files = series.files[:2] + series.files[3:]
        with pytest.raises(VolumeError, match=r"slice gap 5\.0 mm .* median gap 2\.5 mm"):
            read_image(VolumeRef("dicom", files))

    def test_two_slices_at_one_position(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s")
        ds = pydicom.dcmread(series.files[1])
        ds.ImagePositionPatient = pydicom.dcmread(series.files[0]).ImagePositionPatient
        ds.save_as(series.files[1])
        with pytest.raises(VolumeError, match=r"two slices at the same position"):
            read_image(VolumeRef("dicom", series.files))

    def test_files_of_another_series(self, tmp_path: Path) -> None:
        a = write_mr_series(tmp_path / "a")
        b = write_mr_series(tmp_path / "b")
        with pytest.raises(VolumeError, match=rf"belongs to series '{b.uid}'"):
            read_image(VolumeRef("dicom", (*a.files, b.files[0])))

    def test_single_slice_is_not_a_volume(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s", n_slices=1)
        with pytest.raises(VolumeError, match=r"size \(16, 16, 1\).*expected a 3D scalar volume"):
            read_image(VolumeRef("dicom", series.files))

    def test_read_header_names_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(VolumeError, match=r"nope\.dcm: not a readable DICOM file"):
            read_header(tmp_path / "nope.dcm")


def test_label_series_keeps_values(tmp_path: Path) -> None:
    series = write_mr_series(tmp_path / "s")
    for path, k in zip(series.files, range(4), strict=True):
        ds = pydicom.dcmread(path)
        ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) % 3 * k).tobytes()
        ds.save_as(path)
    label = read_label(VolumeRef("dicom", series.files))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) == {0, 1, 2, 3, 4, 6}


def test_label_series_with_value_above_255_raises(tmp_path: Path) -> None:
    series = write_mr_series(tmp_path / "s")  # random values up to 3999
    with pytest.raises(VolumeError, match=r"label volume holds value \d{3,4}; expected 0\.\.255"):
        read_label(VolumeRef("dicom", series.files))
