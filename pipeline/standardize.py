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

What survives standardization
-----------------------------
A resample can lose what a case is for, silently: a header whose voxel size is absurd
(1e-6 mm puts the whole brain inside one grid voxel, 1e6 mm makes one source voxel
cover the grid) or a grid too coarse for a tiny tumour gives an empty brain or a
tumour-free label. Every case is therefore measured twice, in the source and on the
grid, and quarantined with the numbers (mL and voxel counts) when:

- its brain (non-zero in any channel) is empty after standardization;
- its source label had tumour (label > 0 on annotated slices) and none survives;
- the grid's field of view holds less than `MIN_FIELD_OF_VIEW_FRACTION` of the source
  brain or tumour;
- resampling changed a volume by a factor outside `VOLUME_RATIO_RANGE` (for the tumour:
  and by more than nearest-neighbour sampling can, `sampling_tolerance_ml`).

The field-of-view crop and the resample are told apart: the resampled volume is compared
with the part of the source whose voxel centres lie inside the grid's field of view,
and the crop is judged on its own. The grid is centred on the brain, so a crop is the
grid's choice (a field of view smaller than the head), not a fault of the case: a case
that keeps at least half of its brain and of its tumour is committed, flagged
``brain-cropped-by-grid`` / ``tumour-cropped-by-grid`` with the volumes recorded; one
that keeps less is mostly not there and is quarantined.

Why these bounds: nearest-neighbour resampling (labels) moves a structure's boundary by
at most half a grid voxel with no bias, and the non-zero mask of a linearly resampled
image grows by at most half a source voxel at each face (a voxel between a brain voxel
and the zero outside is interpolated non-zero). For a large structure both change the
volume by a few percent: from 0.94 x 0.94 x 1.5 mm to 1 mm, +8 % for a 90 mL phantom
brain, +3 % for a 1650 mL one, -2 % for a 1.8 mL phantom tumour. A factor of 2 either way
is therefore far outside what a resample does, and well inside what a wrong header or a
misplaced grid does (a mm/cm confusion on one axis alone is a factor 10).

A small tumour is different: its surface is large for its volume, so half a grid voxel
over it is a large fraction (a compact 0.05 mL phantom tumour at 0.94 x 0.94 x 1.5 mm
keeps 59 % of its volume on the 1 mm grid; a single source voxel becomes 0, 1 or 2 grid
voxels depending on where the grid's voxel centres fall). The tumour's ratio therefore
fails only when the change also exceeds what sampling can do, `sampling_tolerance_ml`:
half a grid voxel over the source tumour's surface plus `VOLUME_SLACK_VOXELS` grid
voxels for its edges and corners. A tumour that vanishes altogether is still
quarantined, because the stored case would be labelled tumour-free. The brain gets no
such allowance: on any accepted grid a brain is hundreds of voxels or more, and a
"brain" of a few voxels is the 1e-6 mm header above (its centre voxel can survive the
resample).

Intensities recorded for the rest of the pipeline
-------------------------------------------------
The case record (`StandardCase.info`) holds, per channel, the minimum and maximum of the
standardized image over the brain (``intensity_range``) and the number of brain voxels
below zero (``negative_voxels``); which negative values are acceptable is decided
downstream, per case. Non-finite values never reach the record: a resample that is not
finite rejects the case, and the record is checked before it is returned.
"""

from __future__ import annotations

import functools
import math
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
#: Accepted standardized / source volume of the brain and of the annotated tumour (the
#: source counted inside the grid's field of view); see "What survives standardization".
VOLUME_RATIO_RANGE: tuple[float, float] = (0.5, 2.0)
#: Grid voxels added to the tumour's sampling tolerance (`sampling_tolerance_ml`) for
#: the edges and corners of a structure of a few voxels (a 2 x 2 x 2 block).
VOLUME_SLACK_VOXELS = 8
#: Least fraction of the source brain, and of the source tumour, that the grid's field
#: of view must hold (voxel centres inside it).
MIN_FIELD_OF_VIEW_FRACTION = 0.5

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


@dataclass(frozen=True)
class StructureVolume:
    """Volume of one structure (brain or annotated tumour) before and after standardization.

    Attributes
    ----------
    what : str
        "brain" or "tumour", for messages.
    source_voxels, source_ml : int, float
        In the source, at the source's voxel size.
    in_grid_voxels, in_grid_ml : int, float
        The source voxels whose centres lie inside the grid's field of view.
    standardized_voxels, standardized_ml : int, float
        On the dataset grid.
    source_spacing, grid_spacing : tuple of float
        Voxel sizes (mm), for messages.
    """

    what: str
    source_voxels: int
    source_ml: float
    in_grid_voxels: int
    in_grid_ml: float
    standardized_voxels: int
    standardized_ml: float
    source_spacing: tuple[float, ...]
    grid_spacing: tuple[float, ...]

    @property
    def kept_fraction(self) -> float:
        """Fraction of the source voxels inside the grid's field of view (1 when none)."""
        return self.in_grid_voxels / self.source_voxels if self.source_voxels else 1.0

    def to_dict(self) -> dict[str, int | float]:
        """The numbers for the case record (JSON-safe: the checks have passed)."""
        return {
            "source_ml": self.source_ml, "source_voxels": self.source_voxels,
            "in_grid_ml": self.in_grid_ml, "in_grid_voxels": self.in_grid_voxels,
            "standardized_ml": self.standardized_ml,
            "standardized_voxels": self.standardized_voxels,
        }

    def describe(self) -> str:
        """The numbers in words: source, inside the field of view, standardized."""
        return (f"source {self.source_ml:.6g} mL ({self.source_voxels} voxels of "
                f"{_mm(self.source_spacing)} mm), {self.in_grid_ml:.6g} mL "
                f"({self.in_grid_voxels} voxels) inside the grid's field of view; "
                f"standardized {self.standardized_ml:.6g} mL ({self.standardized_voxels} "
                f"voxels of {_mm(self.grid_spacing)} mm)")


def _mm(values: tuple[float, ...]) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box (z, y, x slices) holding every non-zero voxel of a 3D array.

    Returns None when there is none. One projection of the whole array along (y, x),
    then projections of the slab of z-planes that hold any voxel only; the same box as
    ``np.nonzero`` gives (its minimum and maximum per axis), without listing the voxels.

    Examples
    --------
    >>> m = np.zeros((4, 5, 6), bool); m[1, 2, 3] = m[2, 4, 1] = True
    >>> bounding_box(m)
    (slice(1, 3, None), slice(2, 5, None), slice(1, 4, None))
    """
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    slab = mask[zs[0]:zs[-1] + 1]
    ys = np.flatnonzero(slab.any(axis=(0, 2)))
    xs = np.flatnonzero(slab[:, ys[0]:ys[-1] + 1].any(axis=(0, 1)))
    return (slice(int(zs[0]), int(zs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1),
            slice(int(xs[0]), int(xs[-1]) + 1))


def nonzero_any(arrays: list[np.ndarray]) -> np.ndarray:
    """Voxels that are non-zero in any of ``arrays`` (same shape), as one bool mask.

    Equal to ``np.any(np.stack(arrays) != 0, axis=0)``, accumulated in place without
    the stacked temporary.
    """
    mask = arrays[0] != 0
    scratch = np.empty_like(mask)
    for arr in arrays[1:]:
        np.not_equal(arr, 0, out=scratch)
        mask |= scratch
    return mask


def scan_channels(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brain mask of a case's resampled channels and what the record needs of them.

    Parameters
    ----------
    out : (C, Z, Y, X) float32 array

    Returns
    -------
    brain : (Z, Y, X) bool
        `nonzero_any` of the channels.
    fields : (C, 4) float64
        Per channel: non-finite voxels (of all), then over the brain: min, max and the
        voxels below zero (min and max are +inf and -inf for an empty brain).

    One compiled pass over the channels (`pipeline.standardize_kernels`; ahead of time
    through `pipeline.aot`), 30-40 ms less a 4 x 240x240x155 case than numpy's masks,
    gathers and reductions (`_scan_numpy`, used without numba, and the tests' reference).
    """
    kernel = _scan_kernel() if out.dtype == np.float32 and out.flags.c_contiguous else None
    if kernel is None:
        return _scan_numpy(out)
    brain = np.empty(out.shape[1:], dtype=bool)
    fields = np.empty((out.shape[0], 4))
    flat = out.reshape(out.shape[0], -1)
    kernel(flat, flat.view(np.int32), brain.reshape(-1), fields)
    return brain, fields


def _scan_numpy(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    brain = nonzero_any(list(out))
    fields = np.empty((out.shape[0], 4))
    for ci, channel in enumerate(out):
        values = channel[brain]
        fields[ci, 0] = channel.size - np.count_nonzero(np.isfinite(channel))
        fields[ci, 1:3] = (values.min(), values.max()) if values.size else (np.inf, -np.inf)
        fields[ci, 3] = np.count_nonzero(values < 0)
    return brain, fields


@functools.cache
def _scan_kernel() -> Any:
    """The compiled scan: the ahead-of-time module's, else numba's JIT, else None."""
    from pipeline import aot

    module = aot.install()[0]
    if module is not None:
        return module.scan_channels
    from pipeline import standardize_kernels

    return standardize_kernels._scan_channels if standardize_kernels.numba is not None else None


def count_inside(img: sitk.Image, mask: np.ndarray, target: sitk.Image) -> int:
    """Number of ``mask`` voxels (an array on ``img``'s grid) whose centres lie in ``target``.

    A voxel centre is inside when its continuous index in ``target`` lies within half a
    voxel of the target's voxel centres, i.e. in the box the target's voxels cover.
    """
    box = bounding_box(mask)
    if box is None:
        return 0
    n = int(np.count_nonzero(mask))
    src = (np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
           * np.asarray(img.GetSpacing(), dtype=np.float64))            # index -> mm (columns)
    dst = (np.asarray(target.GetDirection(), dtype=np.float64).reshape(3, 3)
           * np.asarray(target.GetSpacing(), dtype=np.float64))
    to_target = np.linalg.solve(dst, src)                               # -> target index
    shift = np.linalg.solve(dst, np.asarray(img.GetOrigin()) - np.asarray(target.GetOrigin()))
    upper = np.asarray(target.GetSize(), dtype=np.float64) - 0.5

    def inside(ijk: np.ndarray) -> np.ndarray:
        t = ijk @ to_target.T + shift
        return np.all((t >= -0.5) & (t < upper), axis=1)

    # The common case costs the bounding box: the target box is convex, so when the 8
    # corners of the mask's bounding box are inside, every voxel is.
    ranges = [(sl.start, sl.stop - 1) for sl in box[::-1]]              # x, y, z
    corners = np.array(np.meshgrid(*ranges, indexing="ij"), dtype=np.float64).reshape(3, -1).T
    if inside(corners).all():
        return n
    zyx = np.nonzero(mask)
    count = 0
    step = 1 << 20                                                      # bounds memory (~50 MB)
    for start in range(0, n, step):
        ijk = np.stack([a[start:start + step] for a in zyx[::-1]], axis=1).astype(np.float64)
        count += int(np.count_nonzero(inside(ijk)))
    return count


def measure_volume(what: str, source: np.ndarray, source_img: sitk.Image,
                   standardized: np.ndarray, target: sitk.Image) -> StructureVolume:
    """Measure a structure in the source (a mask on ``source_img``) and on the grid.

    Parameters
    ----------
    what : str
        "brain" or "tumour", for messages.
    source : ndarray of bool, shape (Z, Y, X)
        The structure on the source's grid.
    source_img : SimpleITK.Image
        The image whose grid ``source`` is on (its spacing gives the voxel volume).
    standardized : ndarray of bool
        The structure on the dataset grid.
    target : SimpleITK.Image
        The dataset grid (`target_reference`).

    Returns
    -------
    StructureVolume
        Volumes in mL (1 mL = 1000 mm³): voxel count times voxel volume.
    """
    src_ml = float(np.prod(source_img.GetSpacing())) / 1000.0
    dst_ml = float(np.prod(target.GetSpacing())) / 1000.0
    n_src = int(np.count_nonzero(source))
    n_in = count_inside(source_img, source, target)
    n_std = int(np.count_nonzero(standardized))
    return StructureVolume(what, n_src, n_src * src_ml, n_in, n_in * src_ml, n_std,
                           n_std * dst_ml, tuple(source_img.GetSpacing()),
                           tuple(target.GetSpacing()))


def sampling_tolerance_ml(mask: np.ndarray, img: sitk.Image, grid: Grid) -> float:
    """How much nearest-neighbour sampling onto ``grid`` can change a structure's volume.

    Parameters
    ----------
    mask : ndarray of bool, shape (Z, Y, X)
        The structure on ``img``'s grid.
    img : SimpleITK.Image
        The image whose grid ``mask`` is on.
    grid : Grid
        The dataset grid.

    Returns
    -------
    float
        In mL: half the largest grid spacing (whatever the source's orientation) times
        the structure's surface (its exposed voxel faces), plus `VOLUME_SLACK_VOXELS`
        grid voxels.

    Notes
    -----
    A grid voxel is labelled when its centre falls in the structure, so the labelled
    volume lies between the structure eroded and dilated by half a grid voxel; to first
    order both differ from it by the surface times half a grid voxel. The slack covers
    the edges and corners, which matter only for structures of a few voxels.
    """
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[::-1]    # (z, y, x)
    box = bounding_box(mask)
    surface_mm2 = 0.0
    if box is not None:
        sub = np.pad(mask[box], 1)
        for axis in range(3):
            faces = int(np.count_nonzero(np.diff(sub, axis=axis)))
            surface_mm2 += faces * float(np.prod(np.delete(spacing, axis)))
    return (surface_mm2 * max(grid.spacing) / 2.0) / 1000.0 + VOLUME_SLACK_VOXELS * grid.voxel_ml


def check_survival(case_id: str, vol: StructureVolume, path: Path, *,
                   grid: Grid, tolerance_ml: float = 0.0) -> list[str]:
    """Quarantine a case whose structure does not survive standardization.

    Parameters
    ----------
    case_id : str
        For messages.
    vol : StructureVolume
        The structure's volumes (`measure_volume`); nothing to check when the source
        has none of it.
    path : Path
        The file the structure comes from (the reference channel or the label).
    grid : Grid
        For the field of view in messages.
    tolerance_ml : float, default 0
        A change of at most this much passes whatever the ratio
        (`sampling_tolerance_ml` for the tumour, 0 for the brain).

    Returns
    -------
    list of str
        Flags: ``<what>-cropped-by-grid`` when the field of view cut part of it.

    Raises
    ------
    CaseRejected
        When the structure is empty on the grid, when less than
        `MIN_FIELD_OF_VIEW_FRACTION` of it lies in the grid's field of view, or when the
        resample changed its volume by a factor outside `VOLUME_RATIO_RANGE` and by
        more than ``tolerance_ml``. The message gives the volumes.
    """
    if vol.source_voxels == 0:
        return []
    fov = "x".join(f"{n * s:g}" for n, s in zip(grid.shape, grid.spacing, strict=True))

    def reject(problem: str) -> CaseRejected:
        return CaseRejected(
            case_id, f"{path}: {problem}: {vol.describe()}; check the voxel size in the "
            f"file's header against the grid ({_mm(grid.spacing)} mm, field of view "
            f"{fov} mm)", path)

    if vol.standardized_voxels == 0:
        lost = ("brain is empty after standardization" if vol.what == "brain"
                else "annotated tumour does not survive standardization (none left on the grid)")
        raise reject(lost)
    if vol.kept_fraction < MIN_FIELD_OF_VIEW_FRACTION:
        raise reject(f"the grid's field of view holds {100 * vol.kept_fraction:.3g} % of the "
                     f"source {vol.what}, expected at least {MIN_FIELD_OF_VIEW_FRACTION:.0%}")
    lo, hi = VOLUME_RATIO_RANGE
    # in_grid_voxels > 0 here: the standardized structure is not empty and keeps >= 50 %
    ratio = vol.standardized_ml / vol.in_grid_ml if vol.in_grid_ml > 0 else math.inf
    if not lo <= ratio <= hi and abs(vol.standardized_ml - vol.in_grid_ml) > tolerance_ml:
        within = (f" or within {tolerance_ml:.6g} mL of it (what sampling onto the grid "
                  "can change)" if tolerance_ml else "")
        raise reject(f"resampling changed the {vol.what} volume by a factor {ratio:.4g}, "
                     f"expected within [{lo:g}, {hi:g}]{within}")
    return [f"{vol.what}-cropped-by-grid"] if vol.in_grid_voxels < vol.source_voxels else []


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
    # min and max propagate NaN and reach any inf: both finite <=> every voxel is (two
    # fast reductions, no mask); only a failing channel pays for locating the voxel.
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(arr)
        bad = np.argwhere(~finite)
        z, y, x = (int(v) for v in bad[0])
        raise CaseRejected(
            case_id,
            f"{vol.path}: channel {name} has {len(bad)} non-finite voxel(s), first "
            f"{float(arr[z, y, x])!r} at index (x={x}, y={y}, z={z})",
            vol.path,
        )
    if lo == 0 and hi == 0:
        raise CaseRejected(case_id, f"{vol.path}: channel {name} is all zero", vol.path)
    return arr


def _brain_centre(case_id: str, ref: Loaded, arr: np.ndarray) -> tuple[float, float, float]:
    """Physical centre of the bounding box of the reference channel's non-zero voxels.

    ``arr`` is the channel, or its non-zero mask (cheaper to project).
    """
    box = bounding_box(arr)
    if box is None:
        raise CaseRejected(case_id, f"{ref.path}: channel is all zero", ref.path)
    (z0, z1), (y0, y1), (x0, x1) = ((sl.start, sl.stop - 1) for sl in box)
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
    # The values present: 0 unless every voxel is labelled, and the others counted over
    # the labelled voxels only (a small part of a volume) instead of all of them.
    labelled = arr[arr != 0]
    present = ([0] if labelled.size < arr.size else []) + [
        int(v) for v in np.flatnonzero(np.bincount(labelled, minlength=256))]
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
        Its ``info`` (the case record) holds, besides the provenance, ``brain_volume``
        and ``tumour_volume`` (`StructureVolume.to_dict`; the tumour None without a
        label), and per channel ``intensity_range`` ([min, max] over the brain) and
        ``negative_voxels`` (brain voxels below zero).

    Raises
    ------
    CaseRejected
        Non-finite or all-zero channels, label values outside the scheme, a label or
        channel that does not overlap the reference channel physically, a resample that
        is not finite in float32, and a brain or annotated tumour that does not survive
        standardization (see the module notes, "What survives standardization").
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

    ref_nonzero = arrays[ref_name] != 0
    target = target_reference(grid, _brain_centre(case_id, ref, ref_nonzero), ref.image)
    out = np.empty((len(channels), *grid.zyx), dtype=np.float32)
    info: dict[str, Any] = {"volumes": {}, "flags": flags}
    for ci, name in enumerate(channels):
        res = _resample(images[name].image, target, label=False)
        out[ci] = sitk.GetArrayViewFromImage(res)
        info["volumes"][name] = {"file": str(images[name].path), **geometry(images[name].image)}
    brain, fields = scan_channels(out)
    for ci, name in enumerate(channels):
        if fields[ci, 0]:  # raises, naming the first non-finite voxel
            _check_resampled(case_id, name, images[name].path, out[ci])

    # The brain is measured over the channels on the reference channel's grid (all of
    # them, unless one was flagged above), in the source and on the grid alike.
    same = [ci for ci, name in enumerate(channels)
            if ci == 0 or same_space(ref.image, images[name].image)]
    src_brain = ref_nonzero                       # same[0] is the reference channel
    for ci in same[1:]:
        src_brain |= arrays[channels[ci]] != 0
    std_brain = brain if len(same) == len(channels) else nonzero_any([out[ci] for ci in same])
    brain_vol = measure_volume("brain", src_brain, ref.image, std_brain, target)
    del src_brain, ref_nonzero
    flags.extend(check_survival(case_id, brain_vol, ref.path, grid=grid))
    info["brain_volume"] = {**brain_vol.to_dict(), "channels": [channels[ci] for ci in same]}

    annotated = np.ones(grid.zyx[0], dtype=bool)
    if label is None:
        lab = np.zeros(grid.zyx, dtype=np.uint8)
        annotated[:] = False
        info["label"] = None
        info["tumour_volume"] = None
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
        src_tumour = remapped > 0
        if annotated_slices is not None:
            mask = np.zeros(src.shape, dtype=np.uint8)
            keep = [k for k in annotated_slices if 0 <= k < src.shape[0]]
            mask[keep] = 1
            mask_img = sitk.GetImageFromArray(mask)
            mask_img.CopyInformation(label.image)
            mask_res = _resample(mask_img, target, label=True)
            annotated = sitk.GetArrayFromImage(mask_res).reshape(grid.zyx[0], -1).any(axis=1)
            info["label"]["annotated_source_slices"] = list(keep)
            src_tumour &= mask.astype(bool)
        tumour_vol = measure_volume("tumour", src_tumour, label.image,
                                    (lab > 0) & annotated[:, None, None], target)
        flags.extend(check_survival(case_id, tumour_vol, label.path, grid=grid,
                                    tolerance_ml=sampling_tolerance_ml(src_tumour,
                                                                       label.image, grid)))
        info["tumour_volume"] = tumour_vol.to_dict()

    info["target_origin"] = [round(float(o), 4) for o in target.GetOrigin()]
    info["intensity_range"], info["negative_voxels"] = {}, {}
    for ci, name in enumerate(channels):  # over the brain: not empty, check_survival passed
        info["intensity_range"][name] = [float(fields[ci, 1]), float(fields[ci, 2])]
        info["negative_voxels"][name] = int(fields[ci, 3])
    _check_json_safe(case_id, info)
    return StandardCase(image=out, label=lab, brain=brain, annotated=annotated, info=info)


def _check_resampled(case_id: str, name: str, path: Path, arr: np.ndarray) -> None:
    """A resampled channel must be finite (a guard: the sources were checked, and
    SimpleITK clamps to float32's range rather than overflow)."""
    if np.isfinite(arr.min()) and np.isfinite(arr.max()):  # NaN propagates, inf is reached
        return
    finite = np.isfinite(arr)
    if not finite.all():
        z, y, x = (int(v) for v in np.argwhere(~finite)[0])
        raise CaseRejected(
            case_id,
            f"{path}: channel {name} is not finite after resampling: "
            f"{int(arr.size - np.count_nonzero(finite))} voxel(s), first "
            f"{float(arr[z, y, x])!r} at grid index (x={x}, y={y}, z={z}); expected finite "
            "values",
            path,
        )


def _check_json_safe(case_id: str, info: Any, where: str = "info") -> None:
    """Every float in the case record is finite (JSON has no inf or nan)."""
    if isinstance(info, Mapping):
        for key, value in info.items():
            _check_json_safe(case_id, value, f"{where}[{key!r}]")
    elif isinstance(info, (list, tuple)):
        for i, value in enumerate(info):
            _check_json_safe(case_id, value, f"{where}[{i}]")
    elif isinstance(info, float) and not math.isfinite(info):
        raise CaseRejected(case_id, f"case record field {where} is {info!r}; expected a "
                                    "finite number (check the source files' headers)")


def _bounds_text(img: sitk.Image) -> str:
    lo, hi = physical_bounds(img)
    return f"[{', '.join(f'{v:.1f}' for v in lo)}]..[{', '.join(f'{v:.1f}' for v in hi)}] mm"
