"""DICOM SEG: segments painted on the referenced series' grid, chosen by description."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import VolumeError
from pipeline.io import label_values, read_image, read_label
from pipeline.io.seg import find_series_files
from pipeline.sources.base import VolumeRef
from tests.io import AXIAL, oblique_iop, write_mr_series, write_seg


def tumour_and_ventricles(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    tumour = np.zeros(shape, bool)
    tumour[1, 2:6, 3:8] = True
    tumour[2, 4:7, 4:6] = True
    ventricles = np.zeros(shape, bool)
    ventricles[2, 10:13, 9:12] = True
    ventricles[3, 0:2, 0:3] = True
    ventricles[2, 5, 5] = True  # overlaps the tumour on one voxel
    return {"Tumor": tumour, "Ventricles": ventricles}


@pytest.fixture
def patient(tmp_path: Path):
    """A patient folder: one MR series and one SEG (Tumor, Ventricles) in its own folder."""
    series = write_mr_series(tmp_path / "P001" / "mr", iop=oblique_iop(20.0))
    masks = tumour_and_ventricles(series.array.shape)
    seg = write_seg(tmp_path / "P001" / "seg" / "seg.dcm", series, masks)
    return series, masks, seg


class TestPlacement:
    def test_tumour_segment_alone_is_painted_1_on_the_series_grid(self, patient) -> None:
        series, masks, seg = patient
        reference = read_image(VolumeRef("dicom", series.files))
        label = read_label(VolumeRef("dicom-seg", (seg,), segments=("tumor",)), reference=reference)
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label.GetSize() == reference.GetSize()
        assert label.GetOrigin() == reference.GetOrigin()
        assert label.GetDirection() == reference.GetDirection()
        assert label.GetSpacing() == reference.GetSpacing()
        # Oracle: the (k, j, i) masks the SEG was written from.
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(label), masks["Tumor"].astype(np.uint8)
        )

    def test_referenced_series_is_found_when_no_reference_is_given(self, patient) -> None:
        series, masks, seg = patient
        assert sorted(find_series_files(seg, series.uid)) == sorted(series.files)
        label = read_label(VolumeRef("dicom-seg", (seg,), segments=("TUMOUR", "tumor")))
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(label), masks["Tumor"].astype(np.uint8)
        )
        expected = read_image(VolumeRef("dicom", series.files))
        assert label.GetOrigin() == expected.GetOrigin()

    def test_all_segments_keep_their_numbers_higher_wins(self, patient) -> None:
        series, masks, seg = patient
        label = sitk.GetArrayFromImage(read_label(VolumeRef("dicom-seg", (seg,))))
        expected = np.zeros(series.array.shape, np.uint8)
        expected[masks["Tumor"]] = 1
        expected[masks["Ventricles"]] = 2  # SegmentNumber 2 painted last
        np.testing.assert_array_equal(label, expected)

    def test_other_segment_chosen_by_substring(self, patient) -> None:
        _series, masks, seg = patient
        label = read_label(VolumeRef("dicom-seg", (seg,), segments=("ventric",)))
        assert label_values(label) == {0, 1}
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(label), masks["Ventricles"].astype(np.uint8)
        )

    def test_fractional_segmentation_is_thresholded_at_half(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "P" / "mr", iop=AXIAL)
        prob = np.zeros(series.array.shape, np.float32)
        prob[1, 3, 3], prob[1, 3, 4], prob[2, 8, 8] = 0.9, 0.3, 0.5
        seg = write_seg(
            tmp_path / "P" / "seg.dcm", series, {"Tumor": prob}, segmentation_type="FRACTIONAL"
        )
        label = sitk.GetArrayFromImage(
            read_label(VolumeRef("dicom-seg", (seg,), segments=("tumor",)))
        )
        assert {tuple(int(v) for v in ix) for ix in np.argwhere(label)} == {(1, 3, 3), (2, 8, 8)}


class TestBadInput:
    def test_no_matching_segment_lists_the_segments(self, patient) -> None:
        _, _, seg = patient
        with pytest.raises(
            VolumeError,
            match=r"no segment matches \('cavity',\); segments are \{1: 'Tumor', 2: 'Ventricles'\}",
        ):
            read_label(VolumeRef("dicom-seg", (seg,), segments=("cavity",)))

    def test_referenced_series_not_found(self, patient) -> None:
        series, _, seg = patient
        for path in series.files:
            path.unlink()
        with pytest.raises(
            VolumeError, match=rf"seg\.dcm: referenced series '{series.uid}' not found"
        ):
            read_label(VolumeRef("dicom-seg", (seg,), segments=("tumor",)))

    def test_reference_on_another_grid(self, patient, tmp_path: Path) -> None:
        _, _, seg = patient
        shifted = write_mr_series(
            tmp_path / "other", iop=oblique_iop(20.0), origin=(-9.5, 20.0, 30.0)
        )
        reference = read_image(VolumeRef("dicom", shifted.files))
        with pytest.raises(VolumeError, match=r"frame \d+ at .* not on one of its slices"):
            read_label(VolumeRef("dicom-seg", (seg,), segments=("tumor",)), reference=reference)

    def test_reference_with_other_orientation(self, patient, tmp_path: Path) -> None:
        _, _, seg = patient
        axial = write_mr_series(tmp_path / "other", iop=AXIAL)
        reference = read_image(VolumeRef("dicom", axial.files))
        with pytest.raises(VolumeError, match=r"frame \d+ orientation .* differs"):
            read_label(VolumeRef("dicom-seg", (seg,), segments=("tumor",)), reference=reference)

    def test_reference_of_another_size(self, patient, tmp_path: Path) -> None:
        _, _, seg = patient
        small = write_mr_series(tmp_path / "other", rows=8, cols=8)
        reference = read_image(VolumeRef("dicom", small.files))
        with pytest.raises(VolumeError, match=r"SEG frames are 16x16 .* slices are 8x8"):
            read_label(VolumeRef("dicom-seg", (seg,)), reference=reference)

    def test_an_mr_file_is_not_a_seg(self, patient) -> None:
        series, _, _ = patient
        with pytest.raises(VolumeError, match=r"Modality is 'MR'; expected 'SEG'"):
            read_label(VolumeRef("dicom-seg", (series.files[0],)))

    def test_unreadable_seg(self, tmp_path: Path) -> None:
        path = tmp_path / "seg.dcm"
        path.write_bytes(b"garbage" * 50)
        with pytest.raises(VolumeError, match=r"seg\.dcm: not a readable DICOM file"):
            read_label(VolumeRef("dicom-seg", (path,)))

    def test_seg_referencing_several_series(self, patient) -> None:
        _, _, seg = patient
        ds = pydicom.dcmread(seg)
        extra = pydicom.Dataset()
        extra.SeriesInstanceUID = "1.2.3.4"
        extra.ReferencedInstanceSequence = []
        ds.ReferencedSeriesSequence.append(extra)
        ds.save_as(seg)
        with pytest.raises(VolumeError, match=r"SEG references 2 series .*; expected exactly one"):
            read_label(VolumeRef("dicom-seg", (seg,)))
