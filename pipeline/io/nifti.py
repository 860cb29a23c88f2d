"""Read NIfTI-1/NIfTI-2 volumes with nibabel into SimpleITK images in ITK's LPS space.

nibabel reports the voxel-to-world affine in RAS+ (x grows towards the patient's Right,
y towards Anterior, z towards Superior); ITK and DICOM use LPS+ (x towards Left, y towards
Posterior, z towards Superior). The two differ by a sign flip of the first two world axes.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from numpy.typing import NDArray

from pipeline.errors import VolumeError

#: RAS+ → LPS+ world-coordinate flip, applied on the left of a nibabel affine.
RAS_TO_LPS: NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest |cos| allowed between two affine columns before the grid counts as sheared.
#: Real scanners' affines are orthogonal to ~1e-6; SimpleITK cannot represent shear.
SHEAR_TOLERANCE = 1e-3

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, MemoryError)


def affine_to_lps_geometry(
    affine: NDArray[np.floating], path: Path | str = "<affine>"
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Split a RAS+ voxel-to-world affine into ITK origin, spacing and direction (LPS+).

    Parameters
    ----------
    affine : (4, 4) array
        nibabel's affine: ``world_RAS = affine @ [i, j, k, 1]``.
    path : Path or str
        Named in error messages.

    Returns
    -------
    origin, spacing, direction : tuple of float
        ``origin`` (3), ``spacing`` (3) and ``direction`` (9, row-major) such that
        SimpleITK's ``TransformIndexToPhysicalPoint((i, j, k))`` is the LPS+ position of
        voxel ``(i, j, k)``.

    Raises
    ------
    VolumeError
        If a column of the affine is zero (no spacing) or two columns are not orthogonal
        (a sheared grid, which an ITK image cannot represent).

    Notes
    -----
    With :math:`F = \\mathrm{diag}(-1, -1, 1)` and the affine ``A = [[M, t], [0, 1]]``,

    .. math::
        p_{LPS} = F (M\\,\\mathbf{i} + t) = D\\,\\mathrm{diag}(s)\\,\\mathbf{i} + o,
        \\quad s_c = \\lVert (FM)_{:,c} \\rVert,\\;
        D_{:,c} = (FM)_{:,c} / s_c,\\; o = F t,

    which covers oblique and flipped (negative-determinant) affines alike.

    References
    ----------
    .. [1] Cox, R. W. et al. (2003). A (sort of) new image data format standard:
       NIfTI-1. NIfTI Data Format Working Group, "nifti1.h" (qform/sform).
    """
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 0):
        raise VolumeError(
            path, f"affine {np.asarray(affine).tolist()!r} has a zero or non-finite column"
        )
    direction = m / spacing
    gram = direction.T @ direction
    off = np.abs(gram - np.eye(3)).max()
    if off > SHEAR_TOLERANCE:
        raise VolumeError(
            path,
            f"affine {np.asarray(affine).tolist()!r} is sheared (largest |cos| between "
            f"axes {off:.3g} > {SHEAR_TOLERANCE}); expected orthogonal voxel axes",
        )
    return (
        tuple(float(v) for v in lps[:3, 3]),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    if not path.is_file():
        raise VolumeError(path, "file not found")
    try:
        img = nib.load(path)
    except _READ_ERRORS as err:
        raise VolumeError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(path, f"expected a NIfTI image, nibabel read a {type(img).__name__}")
    return img


def _shape3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape, with trailing singleton dimensions dropped; raise otherwise."""
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(path, f"has shape {shape!r}; expected a 3D volume")
    if min(shape) < 1:
        raise VolumeError(path, f"has shape {shape!r} with an empty axis")
    return shape  # type: ignore[return-value]


def _data(path: Path, img: nib.spatialimages.SpatialImage, dtype: type | None) -> NDArray:
    """Decode the voxels (scaled by scl_slope/scl_inter) as (i, j, k)."""
    shape = _shape3d(path, tuple(int(n) for n in img.shape))
    try:
        if dtype is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = img.get_fdata(dtype=dtype, caching="unchanged")
    except _READ_ERRORS as err:
        raise VolumeError(
            path, f"voxel data cannot be decoded ({type(err).__name__}: {err}); truncated file?"
        ) from err
    return data.reshape(shape, order="F") if data.ndim != 3 else data


def _to_sitk(path: Path, data: NDArray, affine: NDArray[np.floating]) -> sitk.Image:
    origin, spacing, direction = affine_to_lps_geometry(affine, path)
    # nibabel arrays are Fortran-ordered (i, j, k): the transpose is a C-ordered (k, j, i)
    # view, which is SimpleITK's array order, so the only copy is into the image buffer.
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T), isVector=False)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def read_nifti_image(path: Path) -> sitk.Image:
    """Read a 3D NIfTI intensity volume as a float32 SimpleITK image in LPS+ space.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    SimpleITK.Image
        3D, ``sitkFloat32``, intensities scaled by the header's ``scl_slope`` and
        ``scl_inter``; geometry from nibabel's affine (sform, else qform) converted by
        `affine_to_lps_geometry`.

    Raises
    ------
    VolumeError
        Missing, truncated or corrupt file; not 3D (a 4D volume whose extra dimensions
        are all 1 is squeezed); sheared affine.
    """
    path = Path(path)
    img = _load(path)
    data = _data(path, img, np.float32)
    return _to_sitk(path, data, img.affine)


def read_nifti_label(path: Path) -> sitk.Image:
    """Read a 3D NIfTI label volume as uint8, keeping the stored label values.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    SimpleITK.Image
        3D ``sitkUInt8`` with the values as stored (no remapping).

    Raises
    ------
    VolumeError
        As `read_nifti_image`, and when a value is not an integer in 0..255 (the
        message gives the first offending value).
    """
    path = Path(path)
    img = _load(path)
    data = _data(path, img, None)
    return _to_sitk(path, check_label_array(path, data), img.affine)


def check_label_array(path: Path | str, data: NDArray) -> NDArray[np.uint8]:
    """Return ``data`` as uint8 after checking every value is an integer in 0..255.

    Raises
    ------
    VolumeError
        Naming ``path`` and the first offending value.
    """
    if data.dtype == np.uint8:
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            value = data[bad].flat[0]
            raise VolumeError(path, f"label volume holds non-integer value {float(value)!r}")
    elif data.dtype.kind not in "iu":
        raise VolumeError(path, f"label volume has unsupported dtype {str(data.dtype)!r}")
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 255:
        value = lo if lo < 0 else hi
        value = int(value) if float(value).is_integer() else float(value)
        raise VolumeError(path, f"label volume holds value {value!r}; expected 0..255")
    return data.astype(np.uint8)
