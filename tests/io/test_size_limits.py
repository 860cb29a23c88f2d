"""Issue 11, item 7: declared sizes are checked before decoding; decompression is capped.

Every refused file here is tiny; the tests show nothing near the declared size is ever
allocated (tracemalloc peaks of a few MiB) and that the decoders are never reached.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pipeline.errors import VolumeError
from pipeline.io import read_image, read_label
from pipeline.io.dicom import read_header
from pipeline.io.nifti import nifti_layout
from pipeline.limits import MAX_VOXELS, check_declared_size
from pipeline.sources.base import VolumeRef
from tests.conftest import peak_bytes
from tests.io import write_mr_series, write_seg

MiB = 1 << 20


def nifti_header(shape, dtype=np.int16, **fields) -> bytes:
    """A single-file NIfTI-1 header (348 bytes) and its 4-byte extension flag, no voxels."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    for key, value in fields.items():
        hdr[key] = value
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def gzip_with_zeros(head: bytes, zero_mib: int) -> bytes:
    """gzip of ``head`` followed by ``zero_mib`` MiB of zeros, built 1 MiB at a time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(head)]
    zeros = bytes(MiB)
    parts += [z.compress(zeros) for _ in range(zero_mib)]
    parts.append(z.flush())
    return b"".join(parts)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if nibabel starts decoding voxel data."""

    def refuse(*args, **kwargs):
        raise AssertionError("voxel data was decoded")

    monkeypatch.setattr(nib.arrayproxy, "array_from_file", refuse)


class TestDeclaredNiftiSize:
    @pytest.mark.parametrize("name", ["big.nii", "big.nii.gz"])
    @pytest.mark.parametrize("reader", [read_image, read_label])
    def test_issue11_header_declaring_1000_cubed_is_refused_before_allocation(
        self, tmp_path: Path, name: str, reader, no_decoding
    ) -> None:
        # 1000³ int16 = 2 GB declared by a 352-byte file (about 60 bytes gzipped).
        path = write(tmp_path / name, nifti_header((1000, 1000, 1000)))
        assert path.stat().st_size <= 352
        ref = VolumeRef("nifti", (path,))
        with pytest.raises(
            VolumeError,
            match=rf"{name}: header declares shape \(1000, 1000, 1000\) = 1000000000 voxels; "
            rf"the limit is {MAX_VOXELS} \(XRAI_MAX_VOXELS\)",
        ):
            reader(ref)
        assert peak_bytes(lambda: reader(ref)) < 4 * MiB

    def test_all_dimensions_count(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = write(tmp_path / "dwi.nii.gz", nifti_header((10, 10, 10, 5)))
        monkeypatch.setenv("XRAI_MAX_VOXELS", "4999")
        with pytest.raises(
            VolumeError, match=r"shape \(10, 10, 10, 5\) = 5000 voxels; the limit is 4999"
        ):
            read_image(VolumeRef("nifti", (path,)))

    def test_declared_bytes_limit(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "f64.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float64), np.eye(4)), path)
        monkeypatch.setenv("XRAI_MAX_VOLUME_BYTES", "7999")
        with pytest.raises(
            VolumeError,
            match=r"f64\.nii\.gz: header declares shape \(10, 10, 10\) of 8-byte voxels = 8000 "
            r"bytes; the limit is 7999 \(XRAI_MAX_VOLUME_BYTES\)",
        ):
            read_image(VolumeRef("nifti", (path,)))

    @pytest.mark.parametrize(("limit", "refused"), [("999", True), ("1000", False)])
    def test_limit_is_overridable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, refused: bool
    ) -> None:
        path = tmp_path / "t1.nii.gz"
        data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        monkeypatch.setenv("XRAI_MAX_VOXELS", limit)
        if refused:
            with pytest.raises(VolumeError, match=r"1000 voxels; the limit is 999"):
                read_image(VolumeRef("nifti", (path,)))
        else:
            image = read_image(VolumeRef("nifti", (path,)))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data.T)

    def test_bad_environment_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XRAI_MAX_VOXELS", "lots")
        with pytest.raises(ValueError, match=r"XRAI_MAX_VOXELS='lots' is not a positive integer"):
            check_declared_size("t1.nii.gz", (2, 2, 2), 4)

    def test_truncated_uncompressed_file_is_refused_before_allocation(
        self, tmp_path: Path, no_decoding
    ) -> None:
        # 512³ int16 (256 MiB) is within the limits, but the file holds only the header.
        path = write(tmp_path / "cut.nii", nifti_header((512, 512, 512)))
        ref = VolumeRef("nifti", (path,))
        with pytest.raises(
            VolumeError,
            match=r"cut\.nii: voxel data cannot be decoded: the header declares 268435808 bytes "
            r".* but the file holds 352; truncated file\?",
        ):
            read_image(ref)
        assert peak_bytes(lambda: read_image(ref)) < 4 * MiB

    @pytest.mark.parametrize(
        ("vox_offset", "shown"), [(2.0**30, "1073741824"), (100.0, "100"), (np.inf, "inf")]
    )
    def test_vox_offset_outside_header_bounds(
        self, tmp_path: Path, vox_offset: float, shown: str
    ) -> None:
        path = write(tmp_path / "off.nii.gz", nifti_header((4, 4, 4), vox_offset=vox_offset))
        with pytest.raises(
            VolumeError,
            match=rf"off\.nii\.gz: header declares vox_offset {shown}; expected 352 to 16777216",
        ):
            read_image(VolumeRef("nifti", (path,)))

    @pytest.mark.parametrize("esize", [0, -16, 2**31 - 16])
    def test_extension_running_past_vox_offset_is_refused(
        self, tmp_path: Path, esize: int, no_decoding
    ) -> None:
        # nibabel would read esize - 8 bytes: for 0 or -16 the whole stream, for 2**31 - 16
        # it would allocate 2 GiB. Here 50 MiB of zeros follow the extension header.
        head = bytearray(nifti_header((4, 4, 4), vox_offset=1024))
        head[348] = 1  # extensions present
        head += esize.to_bytes(4, "little", signed=True) + (6).to_bytes(4, "little")
        path = tmp_path / "ext.nii.gz"
        path.write_bytes(gzip_with_zeros(bytes(head), 50))
        ref = VolumeRef("nifti", (path,))
        with pytest.raises(
            VolumeError,
            match=rf"ext\.nii\.gz: header extension at byte 352 declares esize {esize}; "
            r"expected 16 to 672 \(extensions end at vox_offset 1024\)",
        ):
            read_image(ref)
        assert peak_bytes(lambda: read_image(ref)) < 4 * MiB

    def test_pair_header_is_refused(self, tmp_path: Path) -> None:
        path = write(tmp_path / "pair.nii", nifti_header((4, 4, 4), magic=b"ni1"))
        with pytest.raises(
            VolumeError, match=r"pair\.nii: header magic is b'ni1'; expected b'n\+1'"
        ):
            read_image(VolumeRef("nifti", (path,)))

    @pytest.mark.parametrize("name", ["t1.nii", "t1.nii.gz", "t1.nii.bz2"])
    @pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
    @pytest.mark.parametrize("extension", [False, True])
    def test_normal_small_files_still_read(
        self, tmp_path: Path, name: str, klass, extension: bool
    ) -> None:
        data = np.random.default_rng(7).integers(0, 200, size=(6, 5, 4)).astype(np.int16)
        img = klass(data, np.eye(4))
        if extension:
            img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 40))
        path = tmp_path / name
        nib.save(img, path)
        layout = nifti_layout(path)
        assert (layout.shape, layout.data_bytes) == ((6, 5, 4), 6 * 5 * 4 * 2)
        assert layout.data_offset == (352 if klass is nib.Nifti1Image else 544) + 48 * extension
        image = read_image(VolumeRef("nifti", (path,)))
        label = read_label(VolumeRef("nifti", (path,)))
        # Oracle: the array that was saved, in SimpleITK's (k, j, i) order.
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data.T.astype(np.float32))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), data.T.astype(np.uint8))


class TestGzipBomb:
    @pytest.fixture
    def bomb(self, tmp_path: Path) -> tuple[Path, np.ndarray]:
        """A valid 10×10×10 uint8 NIfTI followed by 50 MiB of zeros, gzipped (~50 kB)."""
        data = (np.arange(1000) % 7).astype(np.uint8).reshape(10, 10, 10)
        raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
        path = tmp_path / "bomb.nii.gz"
        path.write_bytes(gzip_with_zeros(raw, 50))
        assert path.stat().st_size < 100_000
        return path, data

    def test_issue11_gzip_bomb_is_not_decompressed_beyond_the_declared_size(
        self, bomb, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path, data = bomb
        inflated = []
        for method in ("read", "readinto"):
            original = getattr(gzip.GzipFile, method)

            def counting(self, *args, _original=original):
                out = _original(self, *args)
                inflated.append(out if isinstance(out, int) else len(out))
                return out

            monkeypatch.setattr(gzip.GzipFile, method, counting)
        label = read_label(VolumeRef("nifti", (path,)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), data.T)
        # Header (352) and voxels (1000), read once for the check and once by nibabel;
        # nowhere near the 50 MiB the stream holds.
        assert 0 < sum(inflated) <= 2 * (352 + 1000)

    def test_gzip_bomb_peak_memory_is_bounded_by_the_declaration(self, bomb) -> None:
        path, _ = bomb
        assert peak_bytes(lambda: read_image(VolumeRef("nifti", (path,)))) < 4 * MiB


class TestDeclaredDicomSize:
    def test_series_declared_size_is_refused_before_decoding(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        series = write_mr_series(tmp_path / "s", n_slices=5, rows=16, cols=12)

        def refuse(self):
            raise AssertionError("pixel data was decoded")

        monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", refuse)
        monkeypatch.setenv("XRAI_MAX_VOXELS", str(12 * 16 * 5 - 1))
        with pytest.raises(
            VolumeError,
            match=r"s: headers of 5 files declare \(Columns, Rows, frames\) \(12, 16, 5\) = 960 "
            r"voxels; the limit is 959 \(XRAI_MAX_VOXELS\)",
        ):
            read_image(VolumeRef("dicom", series.files))

    def test_multiframe_file_declaring_a_huge_volume_is_refused(self, tmp_path: Path) -> None:
        series = write_mr_series(tmp_path / "s", n_slices=1, rows=8, cols=8)
        ds = pydicom.dcmread(series.files[0])
        ds.Rows = ds.Columns = 1024
        ds.NumberOfFrames = 100_000  # 1e11 voxels declared by a ~1 kB file
        path = tmp_path / "multi.dcm"
        ds.save_as(path, enforce_file_format=True)
        ref = VolumeRef("dicom", (path,))
        with pytest.raises(
            VolumeError,
            match=r"multi\.dcm: header declares \(Columns, Rows, NumberOfFrames\) "
            r"\(1024, 1024, 100000\) = 104857600000 voxels",
        ):
            read_image(ref)
        assert peak_bytes(lambda: read_image(ref)) < 4 * MiB

    def test_seg_frames_are_checked_before_decoding(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        series = write_mr_series(tmp_path / "P" / "mr", n_slices=4, rows=16, cols=16)
        mask = np.zeros(series.array.shape, bool)
        mask[1:3, 4:8, 4:8] = True
        seg = write_seg(tmp_path / "P" / "seg" / "seg.dcm", series, {"Tumor": mask})
        frames = int(pydicom.dcmread(seg, stop_before_pixels=True).NumberOfFrames)
        reference = read_image(VolumeRef("dicom", series.files))
        monkeypatch.setenv("XRAI_MAX_VOXELS", str(16 * 16 * frames - 1))
        with pytest.raises(
            VolumeError,
            match=rf"seg\.dcm: header declares \(Columns, Rows, NumberOfFrames\) "
            rf"\(16, 16, {frames}\) = {16 * 16 * frames} voxels",
        ):
            read_label(VolumeRef("dicom-seg", (seg,)), reference=reference)

    @pytest.fixture
    def deflated(self, tmp_path: Path) -> Path:
        """A deflated DICOM whose dataset inflates to 20 MiB of (zero) pixel data."""
        series = write_mr_series(tmp_path / "s", n_slices=1, rows=8, cols=8)
        ds = pydicom.dcmread(series.files[0])
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.Rows, ds.Columns = 2048, 5120
        ds.PixelData = bytes(2048 * 5120 * 2)
        path = tmp_path / "deflated.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert path.stat().st_size < 100_000
        return path

    def test_deflated_dataset_over_the_limit_is_not_inflated(
        self, deflated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("XRAI_MAX_VOLUME_BYTES", "1000000")
        monkeypatch.setenv("XRAI_MAX_HEADER_BYTES", "1000000")
        with pytest.raises(
            VolumeError,
            match=r"deflated\.dcm: deflated dataset inflates to more than 2000000 bytes",
        ):
            read_header(deflated)
        assert peak_bytes(lambda: read_header(deflated)) < 4 * MiB

    def test_deflated_dataset_within_the_limits_reads(self, deflated: Path) -> None:
        assert (read_header(deflated).Rows, read_header(deflated).Columns) == (2048, 5120)
