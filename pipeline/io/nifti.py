"""Read NIfTI-1/NIfTI-2 volumes with nibabel into SimpleITK images in ITK's LPS space.

nibabel reports the voxel-to-world affine in RAS+ (x grows towards the patient's Right,
y towards Anterior, z towards Superior); ITK and DICOM use LPS+ (x towards Left, y towards
Posterior, z towards Superior). The two differ by a sign flip of the first two world axes.

Declared size first
-------------------
Before nibabel parses a file, its header (and the chain of header extensions up to
``vox_offset``) is read from the first bytes of the (decompressed) stream and the
declared shape is checked against the limits of `pipeline.limits` (``MAX_VOXELS``,
``MAX_VOLUME_BYTES``, ``MAX_HEADER_BYTES``; environment variables ``XRAI_MAX_VOXELS``,
``XRAI_MAX_VOLUME_BYTES``, ``XRAI_MAX_HEADER_BYTES``). An uncompressed file shorter than
its declaration is refused as truncated before any voxel is read. A gzip (or bzip2)
stream is handed to nibabel through a reader that ends at ``vox_offset`` + the declared
payload: whatever the stream holds beyond that is never decompressed, so a small file
that inflates to gigabytes costs no more than its header declares.

From a path or from bytes
-------------------------
Every reader takes the file's path and, optionally, its bytes already read (``data=``;
the ingest reads each source file once, hashes it and decodes it from memory, see
`pipeline.sources.base`). Given the bytes, nothing is read from disk: the same header
checks, the same capped decompression and the same decoding run on them, and the path
only names the file in messages (and gives nibabel the name it checks). Without them the
file is opened (an uncompressed file is memory-mapped). One exception keeps the outcome
the same both ways: an uncompressed stream in a file whose name says compressed
(``.gz``, ``.bz2``, ``.zst``) is handed to nibabel by name, which refuses it as before.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError
from numpy.typing import NDArray

from pipeline.errors import VolumeError
from pipeline.limits import check_declared_size, max_header_bytes

#: RAS+ → LPS+ world-coordinate flip, applied on the left of a nibabel affine.
RAS_TO_LPS: NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest |cos| allowed between two affine columns before the grid counts as sheared.
#: Real scanners' affines are orthogonal to ~1e-6; SimpleITK cannot represent shear.
SHEAR_TOLERANCE = 1e-3

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, MemoryError)

#: Largest single read from a decompressing stream: bounds the decompressor's temporary
#: copy, so reading N declared bytes peaks at N plus this, not 2N.
_CHUNK = 1 << 20

#: sizeof_hdr → (image class, header size, magic) of the single-file NIfTI flavours.
_FLAVOURS: dict[int, tuple[type[nib.Nifti1Image], int, bytes]] = {
    348: (nib.Nifti1Image, 348, b"n+1"),
    540: (nib.Nifti2Image, 540, b"n+2"),
}


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


@dataclass(frozen=True)
class NiftiLayout:
    """What a single-file NIfTI header declares, read before any voxel is decoded.

    Parameters
    ----------
    image_class : type
        ``nibabel.Nifti1Image`` or ``nibabel.Nifti2Image``.
    shape : tuple of int
        The declared array shape (every dimension).
    dtype : numpy.dtype
        The stored voxel type.
    data_offset : int
        ``vox_offset``: bytes of header and extensions before the voxels.
    data_bytes : int
        ``prod(shape) * dtype.itemsize``.
    compressed : bool
        Whether the file is a gzip or bzip2 stream.
    """

    image_class: type[nib.Nifti1Image]
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int
    data_bytes: int
    compressed: bool

    @property
    def end(self) -> int:
        """Bytes of the (decompressed) stream the image occupies: header, extensions, voxels."""
        return self.data_offset + self.data_bytes


def _open_stream(path: Path, data: bytes | None = None) -> tuple[BinaryIO, bool]:
    """The decompressed byte stream of the file, or of its bytes ``data`` when given.

    gzip and bzip2 are sniffed by magic number.
    """
    if data is not None:
        raw = io.BytesIO(data)
        if data[:2] == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=raw, mode="rb"), True  # type: ignore[return-value]
        if data[:3] == b"BZh":
            return bz2.BZ2File(raw, "rb"), True  # type: ignore[return-value]
        return raw, False
    with open(path, "rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb"), True  # type: ignore[return-value]
    if magic == b"BZh":
        return bz2.open(path, "rb"), True  # type: ignore[return-value]
    return open(path, "rb"), False


def _read_exact(path: Path, fh: BinaryIO, n: int, where: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise VolumeError(path, f"not a readable NIfTI file (the stream ends inside {where})")
    return data


def _skip(path: Path, fh: BinaryIO, n: int, where: str) -> None:
    while n > 0:
        step = len(_read_exact(path, fh, min(n, _CHUNK), where))
        n -= step


def _parse_layout(path: Path, fh: BinaryIO, compressed: bool) -> NiftiLayout:
    head = fh.read(4)
    sizes = [int.from_bytes(head, order) for order in ("little", "big")] if len(head) == 4 else []
    flavour = next((_FLAVOURS[n] for n in sizes if n in _FLAVOURS), None)
    if flavour is None:
        raise VolumeError(
            path,
            f"not a readable NIfTI file (first bytes {head!r}; expected sizeof_hdr 348 "
            "for NIfTI-1 or 540 for NIfTI-2)",
        )
    klass, hsize, magic = flavour
    block = head + _read_exact(path, fh, hsize - 4, "the header")
    extension_flag = fh.read(4)
    header = klass.header_class(block, check=False)
    found = bytes(header["magic"])[:3]
    if found != magic:
        raise VolumeError(
            path,
            f"header magic is {found!r}; expected {magic!r} (a single-file NIfTI; a "
            "'.hdr'/'.img' pair is not supported)",
        )
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise VolumeError(path, f"header dim[0] is {ndim!r}; expected 1..7 dimensions")
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
    except (KeyError, ValueError, HeaderDataError) as err:
        raise VolumeError(
            path,
            f"header datatype {int(header['datatype'])!r} or dim "
            f"{header['dim'].tolist()!r} cannot be read ({type(err).__name__}: {err})",
        ) from err
    data_bytes = check_declared_size(path, shape, dtype.itemsize)
    vox_offset = float(header["vox_offset"])
    first, limit = hsize + 4, max_header_bytes()
    if not (math.isfinite(vox_offset) and first <= vox_offset <= limit):
        shown = int(vox_offset) if vox_offset.is_integer() else vox_offset
        raise VolumeError(
            path,
            f"header declares vox_offset {shown!r}; expected {first} to {limit} "
            "(header and extensions, XRAI_MAX_HEADER_BYTES)",
        )
    data_offset = int(vox_offset)
    if extension_flag[:1] not in (b"", b"\x00"):
        # Walk the extensions as nibabel will, refusing a size that would make it read
        # past vox_offset (or, for esize < 8, to the end of the stream); NIfTI-1 says
        # esize is a positive multiple of 16.
        order = "little" if header.endianness == "<" else "big"
        pos = first
        while data_offset - pos >= 16:
            ext = _read_exact(path, fh, 8, f"the header extension at byte {pos}")
            esize = int.from_bytes(ext[:4], order, signed=True)
            if not 16 <= esize <= data_offset - pos:
                raise VolumeError(
                    path,
                    f"header extension at byte {pos} declares esize {esize!r}; expected "
                    f"16 to {data_offset - pos} (extensions end at vox_offset {data_offset})",
                )
            _skip(path, fh, esize - 8, f"the header extension at byte {pos}")
            pos += esize
    return NiftiLayout(klass, shape, dtype, data_offset, data_bytes, compressed)


def nifti_layout(path: Path, *, data: bytes | None = None) -> NiftiLayout:
    """Read and check what a NIfTI file declares, without decoding its voxels.

    Parameters
    ----------
    path : Path
        ``.nii`` file, or a gzip/bzip2 stream of one (``.nii.gz``).
    data : bytes, optional
        The file's bytes, already read: parsed instead of the file (``path`` then only
        names it in messages).

    Returns
    -------
    NiftiLayout

    Raises
    ------
    VolumeError
        Missing file; not a single-file NIfTI-1/NIfTI-2 header; a declared shape over
        `~pipeline.limits.max_voxels` or `~pipeline.limits.max_volume_bytes`; a
        ``vox_offset`` inside the header or over `~pipeline.limits.max_header_bytes`;
        a header extension that runs past ``vox_offset``.

    Notes
    -----
    Reads at most ``vox_offset`` bytes of the (decompressed) stream, in chunks of 1 MiB.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise VolumeError(path, "file not found")
    try:
        fh, compressed = _open_stream(path, data)
        with fh:
            return _parse_layout(path, fh, compressed)
    except _READ_ERRORS as err:
        raise VolumeError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from err


class _CappedStream(io.RawIOBase):
    """Read-only, seekable view of the first ``limit`` bytes of a binary stream.

    Reads stop at ``limit`` (a seek to the end goes to ``limit``), so a decompressing
    stream is never inflated beyond it; a large ``readinto`` is served in `_CHUNK`
    pieces, so the decompressor's temporary copy stays small.
    """

    def __init__(self, raw: BinaryIO, limit: int, name: str) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._pos = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._limit}[whence]
        self._pos = self._raw.seek(min(max(base + offset, 0), self._limit))
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._limit - self._pos)
        got = 0
        while got < want:
            n = self._raw.readinto(view[got : got + min(_CHUNK, want - got)])
            if not n:
                break
            got += n
        self._pos += got
        return got

    def read(self, size: int | None = -1) -> bytes:
        left = self._limit - self._pos
        n = left if size is None or size < 0 else min(size, left)
        parts = []
        while n > 0:
            chunk = self._raw.read(min(n, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            self._pos += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)


@contextmanager
def _open_image(path: Path, data: bytes | None = None) -> Iterator[nib.spatialimages.SpatialImage]:
    """The nibabel image of ``path`` (or of its bytes ``data``), its declaration checked.

    Voxels are read on demand. An uncompressed file is memory-mapped (from bytes in
    memory, its voxels are copied out of them) after checking it holds what the header
    declares. Compressed streams are read through `_CappedStream`, which ends at
    ``vox_offset`` + the declared voxel bytes; the stream stays open inside the block.
    """
    layout = nifti_layout(path, data=data)
    klass = layout.image_class
    if not layout.compressed:
        size = path.stat().st_size if data is None else len(data)
        if size < layout.end:
            raise VolumeError(
                path,
                f"voxel data cannot be decoded: the header declares {layout.end} bytes "
                f"(vox_offset {layout.data_offset} + {layout.data_bytes} of voxels of shape "
                f"{layout.shape!r}) but the file holds {size}; truncated file?",
            )
        try:
            if data is None or Path(path).suffix.lower() in ImageOpener.compress_ext_map:
                # nibabel decompresses by file name: a plain stream named '.gz' fails
                # there, and keeps failing the same way (read from the path again).
                img = klass.from_filename(str(path))
            else:
                # nibabel's own checks of the name, then the bytes in place of the file
                file_map = klass.filespec_to_file_map(str(path))
                file_map["image"].fileobj = io.BytesIO(data)
                img = klass.from_file_map(file_map, mmap=False)
        except _READ_ERRORS as err:
            raise VolumeError(
                path, f"not a readable NIfTI file ({type(err).__name__}: {err})"
            ) from err
        yield img
        return
    raw, _ = _open_stream(path, data)
    with raw, _CappedStream(raw, layout.end, str(path)) as capped:
        try:
            img = klass.from_file_map(klass.make_file_map({"image": capped}), mmap=False)
        except _READ_ERRORS as err:
            raise VolumeError(
                path, f"not a readable NIfTI file ({type(err).__name__}: {err})"
            ) from err
        yield img


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


def read_nifti_image(path: Path, *, data: bytes | None = None) -> sitk.Image:
    """Read a 3D NIfTI intensity volume as a float32 SimpleITK image in LPS+ space.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz`` file.
    data : bytes, optional
        The file's bytes, already read: decoded instead of the file (``path`` then
        only names it in messages).

    Returns
    -------
    SimpleITK.Image
        3D, ``sitkFloat32``, intensities scaled by the header's ``scl_slope`` and
        ``scl_inter``; or, when the header does not scale and the file stores 8- or
        16-bit integers, those integers (each exact in float32: same values); geometry from nibabel's affine (sform, else qform) converted by
        `affine_to_lps_geometry`.

    Raises
    ------
    VolumeError
        Missing, truncated or corrupt file; a declared size over the limits of
        `pipeline.limits` (checked by `nifti_layout` before any voxel is read); not 3D
        (a 4D volume whose extra dimensions are all 1 is squeezed); sheared affine.
    """
    path = Path(path)
    with _open_image(path, data) as img:
        proxy = img.dataobj
        unscaled = (getattr(proxy, "slope", None) == 1.0 and getattr(proxy, "inter", None) == 0.0)
        if unscaled and np.dtype(img.get_data_dtype()) in _EXACT_IN_FLOAT32:
            # Decoded at the stored integer type: every value is exact in float32, so
            # the resample (which interpolates in float64 and writes float32) gives the
            # same voxels, without converting the volume first (a tenth of an ingest).
            return _to_sitk(path, _data(path, img, None), img.affine)
        data = _data(path, img, np.float32)
        return _to_sitk(path, data, img.affine)


#: Stored types whose every value a float32 holds exactly.
_EXACT_IN_FLOAT32 = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16))


def read_nifti_label(path: Path, *, data: bytes | None = None) -> sitk.Image:
    """Read a 3D NIfTI label volume as uint8, keeping the stored label values.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz`` file.
    data : bytes, optional
        As `read_nifti_image`.

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
    with _open_image(path, data) as img:
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
