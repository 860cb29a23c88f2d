"""Read DICOM headers (pydicom) and DICOM image series (SimpleITK/GDCM).

SimpleITK's GDCM reader decodes the compressed transfer syntaxes GDCM ships with
(JPEG baseline/lossless, JPEG-LS, JPEG 2000 lossless and lossy, RLE) and applies the
modality rescale (RescaleSlope/RescaleIntercept). Slices are ordered here, by their
position along the slice normal, from headers read with pydicom, so that a missing or
duplicated slice is reported instead of silently stretching the grid.

Before any pixel is decoded, the size the headers declare (Columns × Rows × frames, the
frames of every file of the series summed) is checked against the limits of
`pipeline.limits` (``XRAI_MAX_VOXELS``, ``XRAI_MAX_VOLUME_BYTES``), and a file in the
Deflated Explicit VR Little Endian transfer syntax, which pydicom inflates whole in
memory, is first inflated in chunks to check it stays within those limits.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pipeline.errors import VolumeError
from pipeline.io.nifti import check_label_array
from pipeline.limits import check_declared_size, max_header_bytes, max_volume_bytes

#: Relative tolerance on the gaps between consecutive slice positions (1 %); a larger
#: spread means a missing slice or a mixed series.
SLICE_GAP_RTOL = 0.01

#: File-name suffixes that claim to be DICOM (besides the 'DICM' preamble marker).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")

#: Keywords whose values declare the size of a file's pixel data.
SIZE_TAGS: tuple[str, ...] = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
)

_HEADER_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, zlib.error)


def looks_like_dicom(path: Path) -> bool:
    """Whether a file claims to be DICOM: a DICOM suffix or 'DICM' at byte 128 (PS3.10)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path, *, specific_tags: Sequence[str] | None = None) -> pydicom.Dataset:
    """Read a DICOM file's header without its pixel data.

    Parameters
    ----------
    path : Path
        The file.
    specific_tags : sequence of str, optional
        Keywords to read (faster for large headers); all tags when omitted.

    Raises
    ------
    VolumeError
        Naming the file when it is missing or not a readable DICOM file.
    """
    path = Path(path)
    try:
        check_deflated_size(path)
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)
    except _HEADER_ERRORS as err:
        raise VolumeError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err


def check_deflated_size(path: Path) -> None:
    """Refuse a deflated DICOM file whose dataset inflates beyond the volume limits.

    pydicom inflates a Deflated Explicit VR Little Endian dataset (PS3.5 A.5) whole, in
    memory, before parsing a single tag. This inflates it first in 1 MiB pieces, keeping
    none, and stops as soon as the count passes `~pipeline.limits.max_volume_bytes`
    + `~pipeline.limits.max_header_bytes`. Other transfer syntaxes return at once
    (only the file meta information is read).

    Raises
    ------
    VolumeError
        Naming the file and the limit, when the dataset inflates beyond it.
    pydicom.errors.InvalidDicomError, OSError, zlib.error
        When the file or its deflate stream is unreadable (`read_header` names the file).
    """
    path = Path(path)
    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    if "FileMetaInformationGroupLength" not in meta:
        raise VolumeError(path, "deflated DICOM file has no FileMetaInformationGroupLength")
    # Preamble and 'DICM' (132 bytes), the group length element (12), then the group.
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    limit = max_volume_bytes() + max_header_bytes()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while (pending := fh.read(1 << 16)) and not inflater.eof:
            while pending and not inflater.eof:
                out = len(inflater.decompress(pending, 1 << 20))
                if not out and len(inflater.unconsumed_tail) == len(pending):
                    break  # no progress: a corrupt stream, for pydicom to report
                pending = inflater.unconsumed_tail
                total += out
                if total > limit:
                    raise VolumeError(
                        path,
                        f"deflated dataset inflates to more than {limit} bytes "
                        "(XRAI_MAX_VOLUME_BYTES + XRAI_MAX_HEADER_BYTES); refused before "
                        "reading",
                    )


def declared_size(
    items: Sequence[tuple[Path, pydicom.Dataset]], *, where: Path | None = None
) -> int:
    """Check the pixel data the headers of one volume declare against the limits.

    Parameters
    ----------
    items : sequence of (Path, pydicom.Dataset)
        Each file with its header (at least the `SIZE_TAGS`).
    where : Path, optional
        Named in messages (default: the first file, or its folder for several files).

    Returns
    -------
    int
        The declared bytes of pixel data.

    Raises
    ------
    VolumeError
        A size tag that is not a non-negative integer (naming the file), or a declared
        shape (largest Columns, largest Rows, all frames summed, samples) over
        `~pipeline.limits.max_voxels` or `~pipeline.limits.max_volume_bytes`.

    Notes
    -----
    Frames per file are NumberOfFrames (1 when absent), bytes per sample
    ``ceil(BitsAllocated / 8)``.
    """
    columns = rows = frames = samples = itemsize = 0
    for path, ds in items:
        try:
            c, r = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
            f = int(ds.get("NumberOfFrames") or 1)
            n = int(ds.get("SamplesPerPixel") or 1)
            b = -(-int(ds.get("BitsAllocated") or 8) // 8)
        except (TypeError, ValueError) as err:
            raise VolumeError(
                path, f"a size tag of {SIZE_TAGS!r} is not an integer ({err})"
            ) from err
        if min(c, r, f, n, b) < 0:
            raise VolumeError(
                path,
                f"declares Columns {c!r}, Rows {r!r}, NumberOfFrames {f!r}, SamplesPerPixel "
                f"{n!r}, BitsAllocated {b * 8!r}; expected non-negative integers",
            )
        columns, rows, samples = max(columns, c), max(rows, r), max(samples, n)
        frames += f
        itemsize = max(itemsize, b)
    if where is None:
        where = items[0][0] if len(items) == 1 else items[0][0].parent
    shape = (columns, rows, frames) + ((samples,) if samples > 1 else ())
    if len(items) == 1:
        subject, axes = "header declares", "Columns, Rows, NumberOfFrames"
    else:
        subject, axes = f"headers of {len(items)} files declare", "Columns, Rows, frames"
    if samples > 1:
        axes += ", SamplesPerPixel"
    what = f"{subject} ({axes})"
    return check_declared_size(where, shape, itemsize, what=what)


@dataclass(frozen=True)
class SliceOrder:
    """Files of a single-frame series ordered along the slice normal.

    Parameters
    ----------
    paths : tuple of Path
        Ordered by increasing position along ``normal``.
    positions : tuple of float
        Each slice's ImagePositionPatient projected on the normal (mm).
    normal : tuple of float
        Row direction × column direction (ImageOrientationPatient), LPS+.
    """

    paths: tuple[Path, ...]
    positions: tuple[float, ...]
    normal: tuple[float, float, float]


def order_slices(paths: Iterable[Path], *, where: Path | None = None) -> SliceOrder:
    """Order the files of one series along its slice normal and check the spacing.

    Parameters
    ----------
    paths : iterable of Path
        The files of one series (single-frame images), in any order.
    where : Path, optional
        Named in messages (default: the first file's folder).

    Returns
    -------
    SliceOrder

    Raises
    ------
    VolumeError
        An unreadable file (named); a file of another series; missing
        ImagePositionPatient/ImageOrientationPatient; orientations that differ between
        slices; a declared size over the limits (see `declared_size`); two slices at the
        same position; gaps between slices that differ by more than `SLICE_GAP_RTOL` (a
        missing slice).

    Notes
    -----
    The position of slice :math:`n` is :math:`d_n = \\mathbf{p}_n \\cdot (\\mathbf{r}
    \\times \\mathbf{c})`, with :math:`\\mathbf{p}_n` its ImagePositionPatient and
    :math:`\\mathbf{r}, \\mathbf{c}` the row and column direction cosines (DICOM PS3.3
    C.7.6.2.1.1).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise VolumeError(where or "<series>", "series has no files")
    where = where or files[0].parent
    tags = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", *SIZE_TAGS]
    entries: list[tuple[float, Path]] = []
    headers: list[tuple[Path, pydicom.Dataset]] = []
    series_uid: str | None = None
    orientation: np.ndarray | None = None
    normal = np.zeros(3)
    for path in files:
        ds = read_header(path, specific_tags=tags)
        headers.append((path, ds))
        uid = str(ds.get("SeriesInstanceUID", ""))
        if series_uid is None:
            series_uid = uid
        elif uid != series_uid:
            raise VolumeError(
                path, f"belongs to series {uid!r}, not to {series_uid!r} like {files[0].name!r}"
            )
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise VolumeError(
                path, "has no ImagePositionPatient/ImageOrientationPatient; cannot place slice"
            )
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if orientation is None:
            orientation = iop
            normal = np.cross(iop[:3], iop[3:])
        elif np.abs(iop - orientation).max() > 1e-4:
            raise VolumeError(
                path,
                f"ImageOrientationPatient {iop.tolist()!r} differs from "
                f"{orientation.tolist()!r} of {files[0].name!r}",
            )
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        entries.append((float(ipp @ normal), path))
    declared_size(headers, where=where)
    entries.sort(key=lambda e: e[0])
    positions = np.asarray([e[0] for e in entries])
    if len(entries) > 1:
        gaps = np.diff(positions)
        if gaps.min() <= 1e-6 * max(1.0, float(np.abs(positions).max())):
            n = int(np.argmin(gaps))
            raise VolumeError(
                where,
                f"two slices at the same position {positions[n]!r} mm: "
                f"{entries[n][1].name!r} and {entries[n + 1][1].name!r}",
            )
        median = float(np.median(gaps))
        worst = int(np.argmax(np.abs(gaps - median)))
        if abs(gaps[worst] - median) > SLICE_GAP_RTOL * median:
            raise VolumeError(
                where,
                f"slice gap {float(gaps[worst])!r} mm between {entries[worst][1].name!r} and "
                f"{entries[worst + 1][1].name!r} differs from the median gap {median!r} mm "
                "(missing slice?)",
            )
    return SliceOrder(
        tuple(e[1] for e in entries),
        tuple(float(d) for d in positions),
        (float(normal[0]), float(normal[1]), float(normal[2])),
    )


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else repr(err)


def _read_series(paths: Sequence[Path], pixel_type: int) -> sitk.Image:
    files = [Path(p) for p in paths]
    where = files[0].parent if len(files) > 1 else files[0]
    if len(files) == 1:
        # A named error for an unreadable file; the declared size before any decoding.
        declared_size([(files[0], read_header(files[0]))])
        ordered = files
    else:
        ordered = list(order_slices(files, where=where).paths)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in ordered])
    reader.SetOutputPixelType(pixel_type)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        # GDCM's series error does not always say which file failed: find it (error path only).
        for path in ordered:
            try:
                sitk.ReadImage(str(path), pixel_type)
            except RuntimeError as file_err:
                raise VolumeError(
                    path, f"SimpleITK cannot decode the pixel data: {_last_line(file_err)}"
                ) from err
        raise VolumeError(where, f"SimpleITK cannot read the series: {_last_line(err)}") from err
    size = image.GetSize()
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1 or size[2] < 2:
        raise VolumeError(
            where,
            f"series reads as size {size!r} with {image.GetNumberOfComponentsPerPixel()} "
            "component(s); expected a 3D scalar volume of at least 2 slices",
        )
    return image


def read_dicom_series(paths: Sequence[Path]) -> sitk.Image:
    """Read one DICOM image series as a 3D float32 SimpleITK image (LPS+).

    Parameters
    ----------
    paths : sequence of Path
        The files of one series (single-frame slices in any order), or one multi-frame
        file.

    Returns
    -------
    SimpleITK.Image
        ``sitkFloat32`` with the modality rescale applied; origin, spacing and direction
        from the headers (DICOM's patient space is LPS+, like ITK's).

    Raises
    ------
    VolumeError
        Unreadable file (named), inconsistent or incomplete slice stack (see
        `order_slices`), a declared size over the limits of `pipeline.limits` (see
        `declared_size`), pixel data SimpleITK cannot decode, fewer than 2 slices.
    """
    return _read_series(paths, sitk.sitkFloat32)


def read_dicom_label_series(paths: Sequence[Path]) -> sitk.Image:
    """Read a label map stored as an ordinary DICOM image series, values as stored.

    Returns
    -------
    SimpleITK.Image
        ``sitkUInt8``.

    Raises
    ------
    VolumeError
        As `read_dicom_series`, and for values that are not integers in 0..255.
    """
    image = _read_series(paths, sitk.sitkFloat64)
    files = [Path(p) for p in paths]
    where = files[0].parent if len(files) > 1 else files[0]
    array = check_label_array(where, sitk.GetArrayViewFromImage(image))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out
