"""NIfTI reading: RAS→LPS geometry against nibabel's affine, shapes, labels, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import VolumeError
from pipeline.io import label_values, read_image, read_label
from pipeline.io.nifti import affine_to_lps_geometry
from pipeline.sources.base import VolumeRef


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    x, y, z = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine(matrix: np.ndarray, spacing, origin) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(matrix) @ np.diag(spacing)
    out[:3, 3] = origin
    return out


AFFINES = {
    "ras": affine(np.eye(3), (1.0, 1.2, 2.5), (-90.0, -126.0, -72.0)),
    "lps": affine(np.diag([-1.0, -1.0, 1.0]), (0.9, 0.9, 3.0), (100.0, 120.0, -50.0)),
    "oblique": affine(rotation(12.0, -20.0, 33.0), (1.1, 0.8, 2.0), (5.0, -7.0, 9.0)),
    # A flipped (negative determinant) oblique grid, and a sagittal acquisition
    # (voxel axes permuted: i → A, j → S, k → R).
    "oblique-flipped": affine(
        rotation(-8.0, 15.0, 70.0) @ np.diag([1.0, -1.0, 1.0]), (1.0, 1.0, 1.5), (0.0, 3.0, 1.0)
    ),
    "sagittal": affine(
        np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        (1.0, 1.0, 1.2),
        (-60.0, -100.0, -80.0),
    ),
}


def save(path: Path, data: np.ndarray, aff: np.ndarray = AFFINES["ras"], **header) -> Path:
    img = nib.Nifti1Image(data, aff)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, path)
    return path


class TestGeometry:
    @pytest.mark.parametrize("name", sorted(AFFINES))
    def test_world_position_is_nibabel_ras_with_x_y_negated(
        self, tmp_path: Path, name: str
    ) -> None:
        aff = AFFINES[name]
        data = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
        image = read_image(VolumeRef("nifti", (save(tmp_path / "a.nii.gz", data, aff),)))
        assert image.GetSize() == (5, 6, 7)
        stored = nib.load(tmp_path / "a.nii.gz").affine  # as nibabel reads it back (float32 header)
        for index in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (2, 3, 4), (4, 5, 6)]:
            ras = stored @ np.array([*index, 1.0])
            lps = image.TransformIndexToPhysicalPoint(index)
            # Oracle: nibabel's affine; RAS→LPS negates x and y. 1e-9 mm: float64 round-off.
            np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)

    @pytest.mark.parametrize("name", sorted(AFFINES))
    def test_voxel_values_keep_their_index(self, tmp_path: Path, name: str) -> None:
        data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
        image = read_image(VolumeRef("nifti", (save(tmp_path / "a.nii", data, AFFINES[name]),)))
        for i, j, k in [(0, 0, 0), (4, 1, 2), (3, 5, 6)]:
            assert image.GetPixel(i, j, k) == data[i, j, k]

    def test_direction_of_a_flipped_affine_has_negative_determinant(self) -> None:
        _, spacing, direction = affine_to_lps_geometry(AFFINES["oblique-flipped"])
        # det(diag(-1,-1,1)) = 1, so the LPS direction keeps the affine's negative handedness.
        assert np.linalg.det(np.reshape(direction, (3, 3))) == pytest.approx(-1.0, abs=1e-12)
        np.testing.assert_allclose(spacing, (1.0, 1.0, 1.5), rtol=1e-12)

    def test_sheared_affine_is_refused(self, tmp_path: Path) -> None:
        aff = AFFINES["ras"].copy()
        aff[0, 1] = 0.5  # the j axis leans into x: not representable by an ITK direction
        path = save(tmp_path / "shear.nii.gz", np.zeros((3, 3, 3), np.float32), aff)
        with pytest.raises(VolumeError, match=r"shear\.nii\.gz: affine .* is sheared"):
            read_image(VolumeRef("nifti", (path,)))


class TestPixels:
    def test_image_is_float32_with_header_scaling(self, tmp_path: Path) -> None:
        data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
        path = save(tmp_path / "s.nii.gz", data, scl_slope=2.0, scl_inter=10.0)
        image = read_image(VolumeRef("nifti", (path,)))
        assert image.GetPixelID() == sitk.sitkFloat32
        # NIfTI-1: value = scl_slope * stored + scl_inter.
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), (data * 2.0 + 10.0).T)

    @pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8])
    def test_unscaled_small_integers_resample_as_their_float32_values(
        self, tmp_path: Path, dtype: type
    ) -> None:
        """Unscaled 8/16-bit volumes are decoded at their stored type (no float32 copy);
        the ingest's linear resample onto an oblique, finer grid then gives bit for bit
        what it gives from the float32 volume (the reference: the same values cast)."""
        from pipeline.standardize import _resample

        info = np.iinfo(dtype)
        rng = np.random.default_rng(4)
        data = rng.integers(info.min, info.max, size=(17, 13, 11), endpoint=True).astype(dtype)
        path = save(tmp_path / "i.nii.gz", data, AFFINES["oblique"])
        image = read_image(VolumeRef("nifti", (path,)))
        assert image.GetPixelID() != sitk.sitkFloat32  # decoded as stored
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), data.T)
        as_float = sitk.Cast(image, sitk.sitkFloat32)
        # a finer grid, turned 17 degrees about S, centred on the volume
        ref = sitk.Image([23, 19, 15], sitk.sitkUInt8)
        ref.SetSpacing((0.7, 0.8, 0.9))
        c, s_ = np.cos(0.3), np.sin(0.3)
        direction = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
        ref.SetDirection(tuple(direction.ravel()))
        centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(
            tuple((n - 1) / 2.0 for n in image.GetSize())))
        half = (np.array([23, 19, 15]) - 1) / 2.0 * np.array([0.7, 0.8, 0.9])
        ref.SetOrigin(tuple(centre - direction @ half + 0.013))
        ours = sitk.GetArrayFromImage(_resample(image, ref, label=False))
        reference = sitk.GetArrayFromImage(_resample(as_float, ref, label=False))
        assert ours.dtype == np.float32
        assert np.count_nonzero(ours) > ours.size // 4  # the grids overlap
        np.testing.assert_array_equal(ours, reference)

    def test_trailing_singleton_dimension_is_squeezed(self, tmp_path: Path) -> None:
        data = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)
        image = read_image(VolumeRef("nifti", (save(tmp_path / "s.nii.gz", data),)))
        assert image.GetSize() == (2, 3, 4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data[..., 0].T)


class TestShapes:
    def test_4d_volume_is_refused(self, tmp_path: Path) -> None:
        path = save(tmp_path / "dwi.nii.gz", np.zeros((4, 5, 6, 3), np.float32))
        with pytest.raises(
            VolumeError, match=r"dwi\.nii\.gz: has shape \(4, 5, 6, 3\); expected a 3D"
        ):
            read_image(VolumeRef("nifti", (path,)))

    def test_2d_volume_is_refused(self, tmp_path: Path) -> None:
        path = save(tmp_path / "slice.nii.gz", np.zeros((4, 5), np.float32))
        with pytest.raises(VolumeError, match=r"slice\.nii\.gz: has shape \(4, 5\); expected a 3D"):
            read_image(VolumeRef("nifti", (path,)))


class TestBadFiles:
    def test_truncated_gzip(self, tmp_path: Path) -> None:
        data = np.random.default_rng(2).normal(size=(20, 20, 20)).astype(np.float32)
        path = save(tmp_path / "cut.nii.gz", data)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(VolumeError, match=r"cut\.nii\.gz: voxel data cannot be decoded"):
            read_image(VolumeRef("nifti", (path,)))

    def test_truncated_uncompressed(self, tmp_path: Path) -> None:
        path = save(tmp_path / "cut.nii", np.ones((20, 20, 20), np.float32))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) - 1000])
        with pytest.raises(VolumeError, match=r"cut\.nii: voxel data cannot be decoded"):
            read_label(VolumeRef("nifti", (path,)))

    def test_garbage_that_is_not_gzip(self, tmp_path: Path) -> None:
        path = tmp_path / "junk.nii.gz"
        path.write_bytes(b"<html>404 not found</html>" * 30)
        with pytest.raises(VolumeError, match=r"junk\.nii\.gz: not a readable NIfTI file"):
            read_image(VolumeRef("nifti", (path,)))

    def test_gzip_of_garbage(self, tmp_path: Path) -> None:
        path = tmp_path / "junk.nii.gz"
        path.write_bytes(gzip.compress(b"\x00\x01" * 400))
        with pytest.raises(VolumeError, match=r"junk\.nii\.gz: not a readable NIfTI file"):
            read_image(VolumeRef("nifti", (path,)))

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(VolumeError, match=r"absent\.nii\.gz: file not found"):
            read_image(VolumeRef("nifti", (tmp_path / "absent.nii.gz",)))


class TestLabels:
    def test_values_are_kept_as_stored(self, tmp_path: Path) -> None:
        data = np.zeros((4, 4, 4), np.int16)
        data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = 1, 2, 4
        label = read_label(VolumeRef("nifti", (save(tmp_path / "seg.nii.gz", data),)))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label_values(label) == {0, 1, 2, 4}
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), data.T)

    def test_integral_float_labels_are_accepted(self, tmp_path: Path) -> None:
        data = np.array([0.0, 1.0, 2.0, 3.0] * 16, np.float32).reshape(4, 4, 4)
        label = read_label(VolumeRef("nifti", (save(tmp_path / "seg.nii.gz", data),)))
        assert label_values(label) == {0, 1, 2, 3}

    @pytest.mark.parametrize(
        ("value", "dtype", "message"),
        [
            (1.5, np.float32, r"holds non-integer value 1\.5"),
            (np.nan, np.float32, r"holds non-integer value nan"),
            (-1, np.int16, r"holds value -1; expected 0\.\.255"),
            (300, np.int16, r"holds value 300; expected 0\.\.255"),
        ],
    )
    def test_bad_values_are_refused(self, tmp_path: Path, value, dtype, message) -> None:
        data = np.zeros((3, 3, 3), dtype)
        data[1, 2, 0] = value
        path = save(tmp_path / "seg.nii.gz", data)
        with pytest.raises(VolumeError, match=rf"seg\.nii\.gz: label volume {message}"):
            read_label(VolumeRef("nifti", (path,)))

    def test_label_values_of_a_wider_integer_image(self) -> None:
        image = sitk.GetImageFromArray(np.array([[[0, 7, 300]]], np.int16))
        assert label_values(image) == {0, 7, 300}

    def test_label_values_refuses_float_images(self) -> None:
        with pytest.raises(
            TypeError, match=r"expects an integer image, got pixel type '32-bit float'"
        ):
            label_values(sitk.GetImageFromArray(np.zeros((1, 1, 2), np.float32)))


def test_wrong_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"'dicom-seg' is not an image"):
        read_image(VolumeRef("dicom-seg", (tmp_path / "seg.dcm",)))
    with pytest.raises(VolumeError, match=r"a 'nifti' volume is one file; got 2 paths"):
        read_label(VolumeRef("nifti", (tmp_path / "a.nii", tmp_path / "b.nii")))
