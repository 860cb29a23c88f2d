"""Limits on the size a volume may declare, checked from its header before any voxel is read.

A file's header states how many voxels follow (NIfTI ``dim``; DICOM Rows × Columns ×
NumberOfFrames, summed over the files of a series). The readers of `pipeline.io` check
that declaration against the limits below *before* decoding a single voxel, so that a
100-byte file declaring 1000³ voxels is refused instead of allocating gigabytes, and a
compressed stream is never decompressed beyond its declared size (see `pipeline.io.nifti`).
A refused volume raises `~pipeline.errors.VolumeError`, and the ingest quarantines the
case with that message.

=========================  ====================  ================================================
limit                      default               environment variable (a positive integer)
=========================  ====================  ================================================
`MAX_VOXELS`               2**28 (268 435 456)   ``XRAI_MAX_VOXELS``
`MAX_VOLUME_BYTES`         2**31 (2 GiB)         ``XRAI_MAX_VOLUME_BYTES``
`MAX_HEADER_BYTES`         2**24 (16 MiB)        ``XRAI_MAX_HEADER_BYTES``
=========================  ====================  ================================================

The environment is read at each check, so a limit can be raised for one run
(``XRAI_MAX_VOXELS=1000000000 xrai ingest ...``). A 0.5 mm isotropic whole head is about
75 M voxels, a 1 mm BraTS volume 8.9 M; the byte limit admits `MAX_VOXELS` float64 voxels.
Peak memory while reading one volume is about the declared payload plus the decoded result
(float32 for images).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import VolumeError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_VOLUME_BYTES",
    "MAX_VOXELS",
    "check_declared_size",
    "max_header_bytes",
    "max_volume_bytes",
    "max_voxels",
]

#: Most voxels one volume may declare (all dimensions, all files of a DICOM series).
MAX_VOXELS = 2**28

#: Most bytes the voxel data of one volume may declare (voxels × bytes per voxel as stored).
MAX_VOLUME_BYTES = 2**31

#: Most bytes a NIfTI header with its extensions may declare (``vox_offset``).
MAX_HEADER_BYTES = 2**24


def env_limit(name: str, default: int) -> int:
    """The positive integer in environment variable ``name``, else ``default``.

    Raises
    ------
    ValueError
        The variable is set to something else than a positive integer (named).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name}={text!r} is not a positive integer")
    return value


def max_voxels() -> int:
    """`MAX_VOXELS`, or ``XRAI_MAX_VOXELS`` when set."""
    return env_limit("XRAI_MAX_VOXELS", MAX_VOXELS)


def max_volume_bytes() -> int:
    """`MAX_VOLUME_BYTES`, or ``XRAI_MAX_VOLUME_BYTES`` when set."""
    return env_limit("XRAI_MAX_VOLUME_BYTES", MAX_VOLUME_BYTES)


def max_header_bytes() -> int:
    """`MAX_HEADER_BYTES`, or ``XRAI_MAX_HEADER_BYTES`` when set."""
    return env_limit("XRAI_MAX_HEADER_BYTES", MAX_HEADER_BYTES)


def check_declared_size(
    path: Path | str, shape: Sequence[int], itemsize: int, *, what: str = "header declares shape"
) -> int:
    """Refuse a volume whose declared size exceeds `max_voxels` or `max_volume_bytes`.

    Parameters
    ----------
    path : Path or str
        The file or series folder, named in the message.
    shape : sequence of int
        The declared array shape (every dimension; a DICOM series' frames summed).
    itemsize : int
        Bytes per voxel as stored.
    what : str, default "header declares shape"
        The start of the message, before the shape ("headers of 120 files declare
        (Columns, Rows, frames)").

    Returns
    -------
    int
        The declared number of bytes, ``prod(shape) * itemsize``.

    Raises
    ------
    VolumeError
        For a negative dimension, or when the voxels or bytes exceed the limits; the
        message gives the declared shape, the count and the limit with its variable.

    Examples
    --------
    >>> check_declared_size("t1.nii.gz", (240, 240, 155), 2)
    17856000
    """
    dims = tuple(int(n) for n in shape)
    if any(n < 0 for n in dims):
        raise VolumeError(path, f"{what} {dims!r}, with a negative dimension")
    voxels = math.prod(dims)
    limit = max_voxels()
    if voxels > limit:
        raise VolumeError(
            path,
            f"{what} {dims!r} = {voxels} voxels; the limit is {limit} (XRAI_MAX_VOXELS)",
        )
    nbytes = voxels * int(itemsize)
    limit = max_volume_bytes()
    if nbytes > limit:
        raise VolumeError(
            path,
            f"{what} {dims!r} of {int(itemsize)}-byte voxels = {nbytes} bytes; "
            f"the limit is {limit} (XRAI_MAX_VOLUME_BYTES)",
        )
    return nbytes
