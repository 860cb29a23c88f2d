"""One case onto the dataset's common grid.

Canonical orientation
---------------------
Every case is stored in **LPS** orientation with an identity direction matrix in ITK's
(DICOM's) patient frame: array index x grows towards the patient's Left, y towards
Posterior, z towards Superior; arrays are stored (z, y, x). LPS is SimpleITK's native
frame, so the single resample below needs no extra flip, and DICOM data needs no sign
change. (NIfTI's RAS+ world is LPS with x and y negated; the readers convert.)

One resample per volume
-----------------------
Reorientation, resampling to the target spacing and crop/pad to the target shape are
one and the same linear map from target voxels to source voxels, so each volume is
resampled exactly once (SimpleITK, linear for images, nearest neighbour for labels)
onto a target grid centred on the brain's bounding box. Doing them as separate steps
would interpolate twice and cost two passes.

Geometry check
--------------
Two volumes share a physical space when their sizes are equal, their spacings and
origins agree within `GEOMETRY_TOLERANCE_MM` and their direction cosines within
`DIRECTION_TOLERANCE`. A label (or channel) that does not share the reference channel's
space but overlaps it physically is resampled onto the target grid like everything
else (and flagged); one whose physical extent does not overlap the reference at all is
rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.errors import CaseRejected
from pipeline.sources.base import CHANNELS, LABEL_SCHEME
from pipeline.store import Grid

#: Spacing and origin agreement (mm) for two volumes to count as the same space.
GEOMETRY_TOLERANCE_MM = 1e-3
#: Agreement of direction cosines for the same space.
DIRECTION_TOLERANCE = 1e-4

_LPS_CODES = (("L", "R"), ("P", "A"), ("S", "I"))


@dataclass(frozen=True)
class Loaded:
    """A volume as read, with the file it came from (for messages and provenance)."""

    image: sitk.Image
    path: Path


@dataclass(frozen=True)
class StandardCase:
    """One case on the dataset grid, ready for the store."""

    image: np.ndarray  # (C, Z, Y, X) float32
    label: np.ndarray  # (Z, Y, X) uint8, dataset scheme
    brain: np.ndarray  # (Z, Y, X) bool
    annotated: np.ndarray  # (Z,) bool
    info: dict[str, Any] = field(default_factory=dict)


def orientation_code(img: sitk.Image) -> str:
    """Three-letter orientation of an image's axes in the LPS patient frame (e.g. 'LPS', 'RAS')."""
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    code = []
    for col in range(3):
        axis = int(np.argmax(np.abs(d[:, col])))
        code.append(_LPS_CODES[axis][0 if d[axis, col] > 0 else 1])
    return "".join(code)


def geometry(img: sitk.Image) -> dict[str, Any]:
    """Spacing, origin, size, direction and orientation code of an image (for provenance)."""
    return {
        "size": list(img.GetSize()),
        "spacing": [round(float(s), 6) for s in img.GetSpacing()],
        "origin": [round(float(o), 4) for o in img.GetOrigin()],
        "direction": [round(float(v), 6) for v in img.GetDirection()],
        "orientation": orientation_code(img),
    }


def same_space(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images sample the same physical grid (see module notes for tolerances)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=GEOMETRY_TOLERANCE_MM)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=GEOMETRY_TOLERANCE_MM)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_TOLERANCE)
    )


def physical_bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical box (LPS mm) covering the image's voxels, half a voxel out."""
    size = np.asarray(img.GetSize(), dtype=np.float64)
    corners = np.array(np.meshgrid(*[(-0.5, s - 0.5) for s in size], indexing="ij")).reshape(3, -1).T
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])
    return pts.min(axis=0), pts.max(axis=0)


def overlap_fraction(a: sitk.Image, b: sitk.Image) -> float:
    """Fraction of b's physical box that lies inside a's (0 when they do not meet)."""
    alo, ahi = physical_bounds(a)
    blo, bhi = physical_bounds(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None)
    vol_b = float(np.prod(bhi - blo))
    return float(np.prod(inter)) / vol_b if vol_b > 0 else 0.0


def _check_intensities(case_id: str, name: str, vol: Loaded) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(vol.image)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        z, y, x = (int(v) for v in bad[0])
        raise CaseRejected(
            case_id,
            f"{vol.path}: channel {name} has {len(bad)} non-finite voxel(s), first "
            f"{float(arr[z, y, x])!r} at index (x={x}, y={y}, z={z})",
            vol.path,
        )
    if not arr.any():
        raise CaseRejected(case_id, f"{vol.path}: channel {name} is all zero", vol.path)
    return arr


def _brain_centre(case_id: str, ref: Loaded, arr: np.ndarray) -> tuple[float, float, float]:
    """Physical centre of the bounding box of the reference channel's non-zero voxels."""
    idx = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(arr.any(axis=other))
        idx.append((nz[0], nz[-1]))
    (z0, z1), (y0, y1), (x0, x1) = idx
    centre_index = ((x0 + x1) / 2.0, (y0 + y1) / 2.0, (z0 + z1) / 2.0)
    return ref.image.TransformContinuousIndexToPhysicalPoint(centre_index)


def target_reference(grid: Grid, centre: tuple[float, float, float],
                     lattice: sitk.Image | None = None) -> sitk.Image:
    """An empty image describing the target grid (LPS, identity direction) centred on ``centre``.

    With ``lattice``, the origin is moved (by less than one source voxel) onto the
    nearest voxel centre of that image, so that a source already on the target spacing
    and axes is copied voxel for voxel instead of being interpolated half-way between
    voxels everywhere.
    """
    ref = sitk.Image([int(s) for s in grid.shape], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in grid.spacing])
    ref.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    half = (np.asarray(grid.shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(grid.spacing)
    origin = tuple(float(c) for c in np.asarray(centre) - half)
    if lattice is not None:
        # A tiny physical nudge breaks half-voxel ties the same way whatever the
        # source's storage orientation (towards +L, +P, +S).
        nudged = tuple(o + 1e-4 for o in origin)
        index = np.rint(lattice.TransformPhysicalPointToContinuousIndex(nudged))
        origin = lattice.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in index))
    ref.SetOrigin(origin)
    return ref


def _resample(img: sitk.Image, ref: sitk.Image, *, label: bool) -> sitk.Image:
    return sitk.Resample(
        img, ref, sitk.Transform(),
        sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
        0.0,
        sitk.sitkUInt8 if label else sitk.sitkFloat32,
    )


def remap_labels(case_id: str, path: Path, arr: np.ndarray,
                 label_map: Mapping[int, int]) -> tuple[np.ndarray, list[int]]:
    """Map source label values onto the dataset scheme after checking what the file holds.

    Values allowed in the file are the scheme's (0..3) and the keys of ``label_map``
    (e.g. 4 for the older BraTS convention); anything else rejects the case.
    """
    present = [int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=256))]
    allowed = set(LABEL_SCHEME) | {int(k) for k in label_map}
    outside = sorted(set(present) - allowed)
    if outside:
        raise CaseRejected(
            case_id,
            f"{path}: label values {outside} are outside the scheme; expected "
            f"{sorted(allowed)} (values present: {present})",
            path,
        )
    if not label_map:
        return arr, present
    lut = np.arange(256, dtype=np.uint8)
    for src, dst in label_map.items():
        lut[int(src)] = int(dst)
    return lut[arr], present


def standardize_case(
    case_id: str,
    images: Mapping[str, Loaded],
    label: Loaded | None,
    *,
    grid: Grid,
    channels: tuple[str, ...] = CHANNELS,
    label_map: Mapping[int, int] | None = None,
    annotated_slices: tuple[int, ...] | None = None,
) -> StandardCase:
    """Put one case on the dataset grid.

    Parameters
    ----------
    case_id : str
        For messages.
    images : mapping of str to Loaded
        Every channel in ``channels``.
    label : Loaded or None
        The segmentation with source label values; None gives an all-background label
        and no annotated slices.
    grid : Grid
        Target spacing and shape.
    label_map : mapping of int to int, optional
        Source value to scheme value (see `remap_labels`).
    annotated_slices : tuple of int, optional
        Source-label axial slices (index k of the label image) that carry annotations;
        None means the whole label volume is annotated.

    Returns
    -------
    StandardCase

    Raises
    ------
    CaseRejected
        Non-finite or all-zero channels, label values outside the scheme, a label or
        channel that does not overlap the reference channel physically.
    """
    missing = [c for c in channels if c not in images]
    if missing:
        raise CaseRejected(case_id, f"missing channel(s) {missing}")
    ref_name = channels[0]
    ref = images[ref_name]
    arrays = {name: _check_intensities(case_id, name, images[name]) for name in channels}
    flags: list[str] = []

    def check_geometry(vol: Loaded, what: str, against: str, flag: str) -> None:
        """Same space as the reference channel; else it must overlap it (then flagged)."""
        if same_space(ref.image, vol.image):
            return
        if overlap_fraction(ref.image, vol.image) <= 0.0:
            raise CaseRejected(
                case_id,
                f"{vol.path}: {what} does not overlap {against} ({ref.path}) in physical "
                f"space: {_bounds_text(vol.image)} vs {_bounds_text(ref.image)}",
                vol.path,
            )
        flags.append(f"{flag}-resampled-from-other-geometry")

    for name in channels[1:]:
        check_geometry(images[name], f"channel {name}", ref_name, name)

    target = target_reference(grid, _brain_centre(case_id, ref, arrays[ref_name]), ref.image)
    out = np.empty((len(channels), *grid.zyx), dtype=np.float32)
    info: dict[str, Any] = {"volumes": {}, "flags": flags}
    for ci, name in enumerate(channels):
        res = _resample(images[name].image, target, label=False)
        out[ci] = sitk.GetArrayViewFromImage(res)
        info["volumes"][name] = {"file": str(images[name].path), **geometry(images[name].image)}
    brain = np.any(out != 0.0, axis=0)

    annotated = np.ones(grid.zyx[0], dtype=bool)
    if label is None:
        lab = np.zeros(grid.zyx, dtype=np.uint8)
        annotated[:] = False
        info["label"] = None
    else:
        check_geometry(label, "label", "the images", "label")
        src = sitk.GetArrayViewFromImage(label.image)
        remapped, present = remap_labels(case_id, label.path, src, label_map or {})
        lab_img = sitk.GetImageFromArray(remapped) if remapped is not src else label.image
        if remapped is not src:
            lab_img.CopyInformation(label.image)
        lab = sitk.GetArrayFromImage(_resample(lab_img, target, label=True))
        info["label"] = {"file": str(label.path), **geometry(label.image),
                         "values_present": present,
                         "label_map": {str(k): int(v) for k, v in (label_map or {}).items()}}
        if annotated_slices is not None:
            mask = np.zeros(src.shape, dtype=np.uint8)
            keep = [k for k in annotated_slices if 0 <= k < src.shape[0]]
            mask[keep] = 1
            mask_img = sitk.GetImageFromArray(mask)
            mask_img.CopyInformation(label.image)
            mask_res = _resample(mask_img, target, label=True)
            annotated = sitk.GetArrayFromImage(mask_res).reshape(grid.zyx[0], -1).any(axis=1)
            info["label"]["annotated_source_slices"] = list(keep)

    info["target_origin"] = [round(float(o), 4) for o in target.GetOrigin()]
    info["intensity_range"] = {
        name: [float(out[ci].min()), float(out[ci].max())] for ci, name in enumerate(channels)
    }
    return StandardCase(image=out, label=lab, brain=brain, annotated=annotated, info=info)


def _bounds_text(img: sitk.Image) -> str:
    lo, hi = physical_bounds(img)
    return f"[{', '.join(f'{v:.1f}' for v in lo)}]..[{', '.join(f'{v:.1f}' for v in hi)}] mm"
