"""NIfTI decoded from bytes in memory (issue 14): the same image, the same errors, no open."""

from __future__ import annotations

import builtins
import bz2
import gzip
import io
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import VolumeError
from pipeline.io import read_image, read_label
from pipeline.sources.base import VolumeRef

_REAL_OPEN = builtins.open
COMPRESSIONS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "bzip2": bz2.compress, "none": lambda b: b}
#: File names: the readers sniff compression by magic number, so a bzip2 stream named
#: '.nii.gz' is read as bzip2.
NAMES = {"gzip": "v.nii.gz", "bzip2": "v.nii.gz", "none": "v.nii"}


def _write(path: Path, data: np.ndarray, compression: str, **header) -> bytes:
    affine = np.diag([-0.9, 1.1, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    blob = COMPRESSIONS[compression](img.to_bytes())
    path.write_bytes(blob)
    return blob


def _same(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetPixelID() == b.GetPixelID()
    assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (
        b.GetOrigin(), b.GetSpacing(), b.GetDirection())
    assert sitk.GetArrayViewFromImage(a).tobytes() == sitk.GetArrayViewFromImage(b).tobytes()


def _refusing_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Python-level open() fail: the decoder must use the bytes it is given."""

    def refuse(file, *args, **kwargs):
        raise AssertionError(f"{file!r} was opened")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)


def _outcome(fn: Callable[[], sitk.Image]) -> sitk.Image | str:
    try:
        return fn()
    except VolumeError as err:
        return f"VolumeError: {err}"


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
class TestIssue14SameAsFromThePath:
    def test_image_with_scaling(self, tmp_path, rng, compression, monkeypatch):
        data = rng.integers(-50, 3000, size=(9, 8, 7)).astype(np.int16)
        path = tmp_path / NAMES[compression]
        blob = _write(path, data, compression, scl_slope=0.5, scl_inter=3.0)
        ref = VolumeRef("nifti", (path,))
        from_path = read_image(ref)
        _refusing_open(monkeypatch)
        _same(read_image(ref, data=blob), from_path)

    def test_label(self, tmp_path, rng, compression, monkeypatch):
        data = rng.integers(0, 5, size=(6, 5, 4)).astype(np.float32)
        path = tmp_path / NAMES[compression]
        blob = _write(path, data, compression)
        ref = VolumeRef("nifti", (path,))
        from_path = read_label(ref)
        _refusing_open(monkeypatch)
        _same(read_label(ref, data=blob), from_path)

    @pytest.mark.parametrize("damage", ["truncated", "garbage", "four_d", "non_integer_label",
                                        "over_the_voxel_limit"])
    def test_the_same_error(self, tmp_path, rng, compression, damage, monkeypatch):
        data = rng.integers(0, 4, size=(8, 8, 6)).astype(np.float32)
        if damage == "four_d":
            data = np.stack([data, data], axis=-1)
        if damage == "non_integer_label":
            data[1, 2, 3] = 1.5
        path = tmp_path / NAMES[compression]
        blob = _write(path, data, compression)
        if damage == "truncated":
            blob = blob[: len(blob) - 200]
        elif damage == "garbage":
            blob = b"not a nifti at all" + blob[18:]
        elif damage == "over_the_voxel_limit":
            monkeypatch.setenv("XRAI_MAX_VOXELS", "100")
        path.write_bytes(blob)
        ref = VolumeRef("nifti", (path,))
        reader = read_label if damage == "non_integer_label" else read_image
        from_path = _outcome(lambda: reader(ref))
        assert isinstance(from_path, str), "the damage must be refused"
        _refusing_open(monkeypatch)
        assert _outcome(lambda: reader(ref, data=blob)) == from_path


def test_bytes_are_refused_for_a_kind_read_from_its_paths(tmp_path):
    ref = VolumeRef("dicom", (tmp_path / "1.dcm", tmp_path / "2.dcm"))
    with pytest.raises(ValueError, match=r"kind 'dicom', which is read from its paths"):
        read_image(ref, data=b"DICM")
    seg = VolumeRef("dicom-seg", (tmp_path / "seg.dcm",))
    with pytest.raises(ValueError, match=r"kind 'dicom-seg', which is read from its paths"):
        read_label(seg, data=b"DICM")


def test_a_plain_stream_named_gz_fails_as_from_the_path(tmp_path, rng):
    # nibabel picks gzip from the name '.nii.gz'; the bytes give the same refusal
    path = tmp_path / "v.nii.gz"
    blob = _write(path, rng.integers(0, 4, size=(8, 8, 6)).astype(np.float32), "none")
    ref = VolumeRef("nifti", (path,))
    from_path = _outcome(lambda: read_image(ref))
    assert isinstance(from_path, str)
    assert "BadGzipFile" in from_path
    assert _outcome(lambda: read_image(ref, data=blob)) == from_path
