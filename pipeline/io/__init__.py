"""Read one volume, whatever its format: the dispatch API of `pipeline.io`.

`read_image` and `read_label` take a `~pipeline.sources.base.VolumeRef` and return a 3D
SimpleITK image in ITK's LPS+ physical space: float32 intensities for images, uint8
label values *as stored* for labels (remapping to the dataset scheme is the
standardizer's job, after `label_values` has shown what the file holds).

======================  =================================  ============================
``VolumeRef.kind``      image                              label
======================  =================================  ============================
``"nifti"``             `nifti.read_nifti_image`           `nifti.read_nifti_label`
``"dicom"``             `dicom.read_dicom_series`          `dicom.read_dicom_label_series`
``"dicom-seg"``         (not an image: VolumeError)        `seg.read_seg_label`
======================  =================================  ============================

Both take the file's bytes when the caller has already read them (``data=``, for the
kinds of `~pipeline.sources.base.IN_MEMORY_KINDS`: NIfTI), and then decode those bytes
without opening the file; the ingest reads each source file once, hashes and decodes it
(`~pipeline.sources.base.CaseSource.read_files`). DICOM is read from its paths.

Every failure is a `~pipeline.errors.VolumeError` naming the file and the offending
value, which the ingest records as the case's quarantine reason. That includes a volume
whose header declares more voxels or bytes than `pipeline.limits` allows
(``XRAI_MAX_VOXELS``, ``XRAI_MAX_VOLUME_BYTES``), refused before any voxel is decoded.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.errors import VolumeError
from pipeline.io.dicom import read_dicom_label_series, read_dicom_series
from pipeline.io.nifti import read_nifti_image, read_nifti_label
from pipeline.io.seg import read_seg_label
from pipeline.sources.base import IN_MEMORY_KINDS, VolumeRef

__all__ = ["label_values", "read_image", "read_label"]


def _check_ref(ref: VolumeRef) -> None:
    if not ref.paths:
        raise VolumeError("<no path>", f"volume reference {ref!r} has no files")
    if ref.kind in ("nifti", "dicom-seg") and len(ref.paths) != 1:
        raise VolumeError(
            ref.path, f"a {ref.kind!r} volume is one file; got {len(ref.paths)} paths"
        )


def _check_data(ref: VolumeRef, data: bytes | None) -> None:
    if data is not None and ref.kind not in IN_MEMORY_KINDS:
        raise ValueError(
            f"volume {str(ref.path)!r} is of kind {ref.kind!r}, which is read from its "
            f"paths; bytes in memory (data=) are decoded only for kinds {IN_MEMORY_KINDS!r}"
        )


def read_image(ref: VolumeRef, *, data: bytes | None = None) -> sitk.Image:
    """Read an intensity volume as a 3D float32 SimpleITK image (LPS+ geometry).

    Parameters
    ----------
    ref : VolumeRef
        ``kind`` "nifti" (one file) or "dicom" (the files of one series).
    data : bytes, optional
        For "nifti": the file's bytes, already read; decoded without opening the file.

    Returns
    -------
    SimpleITK.Image

    Raises
    ------
    VolumeError
        Unknown kind, or the reader's own errors (missing, corrupt, truncated file; not
        3D; unreadable DICOM; incomplete slice stack).
    ValueError
        ``data`` given for a kind that is read from its paths.
    """
    _check_ref(ref)
    _check_data(ref, data)
    if ref.kind == "nifti":
        return read_nifti_image(ref.paths[0], data=data)
    if ref.kind == "dicom":
        return read_dicom_series(ref.paths)
    raise VolumeError(
        ref.path, f"volume kind {ref.kind!r} is not an image; expected 'nifti' or 'dicom'"
    )


def read_label(ref: VolumeRef, *, reference: sitk.Image | None = None,
               data: bytes | None = None) -> sitk.Image:
    """Read a label volume as 3D uint8 with its values as stored.

    Parameters
    ----------
    ref : VolumeRef
        ``kind`` "nifti", "dicom" or "dicom-seg". For "dicom-seg", ``ref.segments``
        chooses the segments (case-insensitive substrings of SegmentLabel or
        SegmentDescription; empty keeps all); one kept segment is painted 1, several
        are painted with their SegmentNumber (see `pipeline.io.seg`).
    reference : SimpleITK.Image, optional
        For "dicom-seg": the already-read image of the referenced series, whose grid
        the label takes. When omitted the series is located next to the SEG. Ignored
        for the other kinds.
    data : bytes, optional
        For "nifti": the file's bytes, already read; decoded without opening the file.

    Returns
    -------
    SimpleITK.Image
        ``sitkUInt8``.

    Raises
    ------
    VolumeError
        Unknown kind; values that are not integers in 0..255; the readers' own errors
        (for SEG: no matching segment, referenced series not found, frames off-grid).
    ValueError
        ``data`` given for a kind that is read from its paths.
    """
    _check_ref(ref)
    _check_data(ref, data)
    if ref.kind == "nifti":
        return read_nifti_label(ref.paths[0], data=data)
    if ref.kind == "dicom":
        return read_dicom_label_series(ref.paths)
    if ref.kind == "dicom-seg":
        return read_seg_label(ref.paths[0], segments=ref.segments, reference=reference)
    raise VolumeError(
        ref.path, f"volume kind {ref.kind!r} is unknown; expected 'nifti', 'dicom' or 'dicom-seg'"
    )


def label_values(img: sitk.Image) -> set[int]:
    """The distinct values of an integer label image.

    Examples
    --------
    >>> import numpy as np, SimpleITK as sitk
    >>> sorted(label_values(sitk.GetImageFromArray(np.array([[[0, 4, 1, 4]]], np.uint8))))
    [0, 1, 4]
    """
    array = sitk.GetArrayViewFromImage(img)
    if array.dtype.kind not in "iub":
        raise TypeError(
            f"label_values expects an integer image, got pixel type {img.GetPixelIDTypeAsString()!r}"
        )
    if array.dtype == np.uint8:
        return {int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=256))}
    return {int(v) for v in np.unique(array)}
