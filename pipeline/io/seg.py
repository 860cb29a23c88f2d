"""Read DICOM Segmentation (SEG) objects onto the grid of the series they annotate.

A SEG stores one frame per (segment, source slice); each frame carries its plane
position, and the shared (or per-frame) functional groups carry orientation and pixel
spacing. This module reads the SEG with pydicom, checks that every frame lies exactly on
a slice of the referenced series' grid (same orientation, spacing, rows and columns; a
frame origin at an integer slice index), and paints the kept segments into one uint8
label volume with the geometry of that series.

Segment selection and values
----------------------------
``segments`` (``VolumeRef.segments``) lists case-insensitive substrings; a segment is kept
when its SegmentLabel or SegmentDescription contains one of them (all segments are kept
when ``segments`` is empty). If exactly one segment is kept it is painted with value 1
(one tumour segment, e.g. ReMIND's "Tumor" beside "Resection cavity" and "Ventricles");
otherwise each kept segment is painted with its SegmentNumber, and where kept segments
overlap the higher SegmentNumber wins. BINARY frames are painted where the bit is set,
FRACTIONAL frames where the value is at least half of MaximumFractionalValue, LABELMAP
frames (DICOM 2024) where the stored value is the number of a kept segment.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.errors import VolumeError
from pipeline.io.dicom import (
    check_deflated_size,
    declared_size,
    looks_like_dicom,
    read_dicom_series,
    read_header,
)

#: Largest distance (in voxels) between a SEG frame's origin and the reference slice it is
#: placed on; DICOM's DS strings carry ~16 significant characters, far below this.
PLACEMENT_TOLERANCE = 0.05


def segment_names(ds: pydicom.Dataset) -> dict[int, str]:
    """SegmentNumber → "label" or "label (description)" of every segment in a SEG."""
    out: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        label = str(item.get("SegmentLabel", "") or "")
        desc = str(item.get("SegmentDescription", "") or "")
        out[int(item.SegmentNumber)] = f"{label} ({desc})" if desc and desc != label else label
    return out


def select_segments(ds: pydicom.Dataset, wanted: Sequence[str], path: Path) -> dict[int, int]:
    """SegmentNumber → output value of the kept segments (see the module notes).

    Raises
    ------
    VolumeError
        The SEG has no segments, none matches ``wanted``, or a kept SegmentNumber > 255.
    """
    names = segment_names(ds)
    if not names:
        raise VolumeError(path, "SEG object has no SegmentSequence items")
    needles = [w.lower() for w in wanted]
    kept = sorted(
        n for n, name in names.items() if not needles or any(w in name.lower() for w in needles)
    )
    if not kept:
        raise VolumeError(
            path,
            f"no segment matches {tuple(wanted)!r}; segments are "
            f"{ {n: names[n] for n in sorted(names)}!r}",
        )
    if len(kept) == 1:
        return {kept[0]: 1}
    if kept[-1] > 255:
        raise VolumeError(path, f"SegmentNumber {kept[-1]!r} does not fit a uint8 label")
    return {n: n for n in kept}


def referenced_series_uid(ds: pydicom.Dataset, path: Path) -> str:
    """The SeriesInstanceUID the SEG annotates (ReferencedSeriesSequence)."""
    refs = ds.get("ReferencedSeriesSequence", [])
    uids = {str(item.SeriesInstanceUID) for item in refs if "SeriesInstanceUID" in item}
    if len(uids) != 1:
        raise VolumeError(
            path, f"SEG references {len(uids)} series {sorted(uids)!r}; expected exactly one"
        )
    return uids.pop()


def find_series_files(seg_path: Path, series_uid: str) -> list[Path]:
    """Files of series ``series_uid`` near a SEG: its folder, else its parent folder.

    Each folder is searched recursively, headers only. Returns an empty list when
    nothing is found.
    """
    seg_path = Path(seg_path)
    searched: set[Path] = set()
    for folder in (seg_path.parent, seg_path.parent.parent):
        found: list[Path] = []
        for path in sorted(folder.rglob("*")):
            if path in searched or not path.is_file() or path == seg_path:
                continue
            searched.add(path)
            if not looks_like_dicom(path):
                continue
            try:
                ds = read_header(path, specific_tags=["SeriesInstanceUID", "Modality"])
            except VolumeError:
                continue  # another file's problem; the series may still be complete
            if str(ds.get("SeriesInstanceUID", "")) == series_uid:
                found.append(path)
        if found:
            return found
    return []


def _frame_item(ds: pydicom.Dataset, n: int, keyword: str) -> pydicom.Dataset | None:
    """Functional-group item ``keyword`` of frame ``n``: per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and n < len(per_frame) and keyword in per_frame[n]:
        return per_frame[n][keyword][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and keyword in shared[0]:
        return shared[0][keyword][0]
    return None


def _check_plane(
    ds: pydicom.Dataset, n: int, reference: sitk.Image, path: Path
) -> tuple[np.ndarray, int]:
    """Frame ``n``'s ImagePositionPatient, after checking orientation and spacing."""
    position = _frame_item(ds, n, "PlanePositionSequence")
    orientation = _frame_item(ds, n, "PlaneOrientationSequence")
    measures = _frame_item(ds, n, "PixelMeasuresSequence")
    if position is None or "ImagePositionPatient" not in position:
        raise VolumeError(path, f"frame {n + 1} has no PlanePositionSequence; cannot place it")
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    if orientation is not None and "ImageOrientationPatient" in orientation:
        iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
        want = np.concatenate([direction[:, 0], direction[:, 1]])
        if np.abs(iop - want).max() > 1e-3:
            raise VolumeError(
                path,
                f"frame {n + 1} orientation {iop.tolist()!r} differs from the referenced "
                f"series' {want.round(6).tolist()!r}",
            )
    if measures is not None and "PixelSpacing" in measures:
        row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
        sx, sy = reference.GetSpacing()[:2]
        if abs(col_mm - sx) > 1e-3 * sx or abs(row_mm - sy) > 1e-3 * sy:
            raise VolumeError(
                path,
                f"frame {n + 1} PixelSpacing {[row_mm, col_mm]!r} differs from the "
                f"referenced series' {[sy, sx]!r}",
            )
    ipp = np.asarray([float(v) for v in position.ImagePositionPatient])
    index = np.asarray(reference.TransformPhysicalPointToContinuousIndex(ipp.tolist()))
    k = round(float(index[2]))
    if np.abs(index[:2]).max() > PLACEMENT_TOLERANCE or abs(index[2] - k) > PLACEMENT_TOLERANCE:
        raise VolumeError(
            path,
            f"frame {n + 1} at {ipp.tolist()!r} mm lies at index {index.round(3).tolist()!r} "
            "of the referenced series, not on one of its slices",
        )
    if not 0 <= k < reference.GetSize()[2]:
        raise VolumeError(
            path,
            f"frame {n + 1} at {ipp.tolist()!r} mm is slice {k!r}, outside the referenced "
            f"series' {reference.GetSize()[2]} slices",
        )
    return ipp, k


def read_seg_label(
    path: Path, *, segments: Sequence[str] = (), reference: sitk.Image | None = None
) -> sitk.Image:
    """Paint a DICOM SEG's kept segments onto its referenced series' grid.

    Parameters
    ----------
    path : Path
        The SEG file.
    segments : sequence of str
        Case-insensitive substrings of SegmentLabel/SegmentDescription to keep; empty
        keeps every segment. See the module notes for the painted values.
    reference : SimpleITK.Image, optional
        The referenced series, already read. When omitted it is located with
        `find_series_files` and read with `read_dicom_series`.

    Returns
    -------
    SimpleITK.Image
        ``sitkUInt8`` with ``reference``'s size, origin, spacing and direction.

    Raises
    ------
    VolumeError
        Not a readable SEG; no segment matches ``segments``; the referenced series is not
        found; Rows/Columns differ from it; Rows × Columns × NumberOfFrames over the
        limits of `pipeline.limits` (checked before the frames are decoded); a frame
        does not lie on the referenced grid.
    """
    path = Path(path)
    try:
        check_deflated_size(path)
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, zlib.error) as err:
        raise VolumeError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from err
    modality = str(ds.get("Modality", ""))
    if modality != "SEG":
        raise VolumeError(path, f"Modality is {modality!r}; expected 'SEG'")
    values = select_segments(ds, segments, path)
    uid = referenced_series_uid(ds, path)
    if reference is None:
        files = find_series_files(path, uid)
        if not files:
            raise VolumeError(
                path,
                f"referenced series {uid!r} not found under {str(path.parent)!r} or "
                f"{str(path.parent.parent)!r}",
            )
        reference = read_dicom_series(files)
    size = reference.GetSize()
    rows, cols = int(ds.Rows), int(ds.Columns)
    if (cols, rows) != (size[0], size[1]):
        raise VolumeError(
            path,
            f"SEG frames are {rows}x{cols} (rows x columns) but the referenced series' "
            f"slices are {size[1]}x{size[0]}",
        )
    declared_size([(path, ds)])  # before pydicom allocates the frames
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as err:
        raise VolumeError(
            path, f"SEG pixel data cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    n_frames = int(ds.get("NumberOfFrames", 1))
    pixels = pixels.reshape(n_frames, rows, cols)
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    if seg_type == "FRACTIONAL":
        threshold = 0.5 * float(ds.get("MaximumFractionalValue", 255))
    elif seg_type in ("BINARY", "LABELMAP"):
        threshold = 1.0
    else:
        raise VolumeError(path, f"SegmentationType {seg_type!r} is not supported")

    out = np.zeros(size[::-1], dtype=np.uint8)  # (k, j, i)
    lut = np.zeros(max(max(values), int(pixels.max(initial=0))) + 1, dtype=np.uint8)
    for number, value in values.items():
        lut[number] = value
    # Paint in increasing output value so that the higher SegmentNumber wins overlaps.
    order = []
    for n in range(n_frames):
        if seg_type == "LABELMAP":
            order.append((0, n))
            continue
        ident = _frame_item(ds, n, "SegmentIdentificationSequence")
        if ident is None:
            raise VolumeError(path, f"frame {n + 1} has no SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber)
        if number in values:
            order.append((values[number], n))
    for value, n in sorted(order):
        _, k = _check_plane(ds, n, reference, path)
        frame = pixels[n]
        if seg_type == "LABELMAP":
            painted = lut[frame]
            out[k] = np.maximum(out[k], painted)
        else:
            out[k][frame >= threshold] = value
    label = sitk.GetImageFromArray(out)
    label.CopyInformation(reference)
    return label
