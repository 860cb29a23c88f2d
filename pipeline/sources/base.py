"""What a source yields: one `CaseSource` per case, naming the files of each channel.

A source only *finds* files (it never reads voxels): discovery is cheap and the reading,
standardizing and storing happen per case in worker processes.

Each source file is read once
-----------------------------
The ingest hashes a case's files to tell whether it changed (`CaseSource.content_hash`)
and, when it did, decodes them. `CaseSource.read_files` reads every file once: it
computes each file's SHA-256 and keeps the bytes of the files whose reader decodes from
memory (`IN_MEMORY_KINDS`: NIfTI, `pipeline.io.read_image` with ``data=``), so that an
unchanged case costs one read and no decoding, and a changed one is decoded from the
very bytes that were hashed. DICOM files (series and SEG objects) are only hashed:
SimpleITK/GDCM and pydicom read them from their paths again, from the page cache.

A file's bytes are kept only when its size, checked before reading, is within
`~pipeline.limits.max_volume_bytes` + `~pipeline.limits.max_header_bytes` (no valid
volume file is larger) and within what is left of the case's `MAX_CASE_BYTES_IN_MEMORY`;
a larger file is hashed in blocks and decoded from its path as before (its reader then
refuses it from its header where the limits say so). The SHA-256 values, and so the
content hash, are those of `file_hashes` whichever way a file was read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.limits import max_header_bytes, max_volume_bytes

#: Canonical channel names, in store order (BraTS 2023 naming).
CHANNELS: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

#: The dataset label scheme every collection is mapped onto (BraTS 2023).
LABEL_SCHEME: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

VolumeKind = Literal["nifti", "dicom", "dicom-seg"]

#: Volume kinds whose reader decodes from bytes in memory (`pipeline.io.read_image` and
#: `pipeline.io.read_label` with ``data=``); `CaseSource.read_files` keeps their bytes.
IN_MEMORY_KINDS: tuple[VolumeKind, ...] = ("nifti",)

#: Most bytes of one case's files `CaseSource.read_files` keeps in memory (1 GiB); files
#: beyond it are hashed in blocks and decoded from their paths.
MAX_CASE_BYTES_IN_MEMORY = 2**30


@dataclass(frozen=True)
class VolumeRef:
    """Where one volume lives.

    Parameters
    ----------
    kind : {"nifti", "dicom", "dicom-seg"}
        ``nifti``: one ``.nii``/``.nii.gz`` file. ``dicom``: the files of one DICOM
        series. ``dicom-seg``: one DICOM SEG object (``paths[0]``).
    paths : tuple of Path
        The file(s).
    segments : tuple of str, optional
        For label volumes stored as several segments or files (ReMIND), the segment
        descriptions to keep as tumour; matched case-insensitively as substrings.
    """

    kind: VolumeKind
    paths: tuple[Path, ...]
    segments: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        """The file that names this volume in messages (the first file, or the folder)."""
        if self.kind == "dicom" and len(self.paths) > 1:
            return self.paths[0].parent
        return self.paths[0]


@dataclass(frozen=True)
class CaseSource:
    """One case as found on disk.

    Parameters
    ----------
    case_id : str
        Identifier, unique within the dataset (the collection's own id).
    images : mapping of str to VolumeRef
        Canonical channel name (one of `CHANNELS`) to its volume. A channel that
        the layout expects but did not find is absent here and listed in `missing`.
    label : VolumeRef or None
        The segmentation, or None for an unlabelled case.
    label_map : mapping of int to int
        Source label value to dataset scheme value (e.g. ``{4: 3}`` for the
        pre-2023 BraTS enhancing label). Values absent from the map are kept as
        they are and must lie in `LABEL_SCHEME`.
    missing : tuple of str
        Expected channels (or the label) that were not found, as ``"t1c: <expected
        path>"`` strings; a case with anything missing is quarantined.
    flags : tuple of str
        Quirks recorded in the provenance, e.g. ``"automated-segmentation"``.
    annotated_slices : tuple of int or None
        Source-grid axial slices that carry annotations, for collections that
        annotate only some slices (LGG-1p19qDeletion); None means every slice.
    """

    case_id: str
    images: Mapping[str, VolumeRef]
    label: VolumeRef | None
    label_map: Mapping[int, int] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    annotated_slices: tuple[int, ...] | None = None

    def files(self) -> list[Path]:
        """Every source file of the case, images first, in a stable order."""
        out: list[Path] = []
        for channel in sorted(self.images, key=_channel_order):
            out.extend(sorted(self.images[channel].paths))
        if self.label is not None:
            out.extend(sorted(self.label.paths))
        return out

    def file_hashes(self) -> dict[Path, str]:
        """sha256 of every source file (see `files`), read in blocks; nothing is kept."""
        return {path: file_sha256(path) for path in self.files()}

    def read_files(self, *, budget: int = MAX_CASE_BYTES_IN_MEMORY) -> SourceFiles:
        """Read every source file once: its sha256, and the bytes of those decoded from memory.

        Parameters
        ----------
        budget : int, default `MAX_CASE_BYTES_IN_MEMORY`
            Most bytes kept in memory for the case, files taken in `files` order.

        Returns
        -------
        SourceFiles
            ``hashes`` equal to `file_hashes` (the same SHA-256 of the same bytes);
            ``data`` the bytes of the files of `IN_MEMORY_KINDS` volumes whose size,
            checked before reading, is within the volume limits and the budget (see the
            module notes).

        Raises
        ------
        OSError
            A file cannot be opened or read (``filename`` names it).
        """
        in_memory = {p for ref in self._volumes() if ref.kind in IN_MEMORY_KINDS
                     for p in ref.paths}
        try:
            largest = max_volume_bytes() + max_header_bytes()
        except ValueError:  # a bad XRAI_MAX_* value: the reader reports it, as before
            largest = -1
        hashes: dict[Path, str] = {}
        data: dict[Path, bytes] = {}
        for path in self.files():
            limit = min(largest, budget) if path in in_memory else -1
            hashes[path], blob = read_and_hash(path, limit=limit)
            if blob is not None:
                data[path] = blob
                budget -= len(blob)
        return SourceFiles(hashes=hashes, data=data)

    def _volumes(self) -> list[VolumeRef]:
        return [*self.images.values(), *([self.label] if self.label is not None else [])]

    def content_hash(self, file_hashes: Mapping[Path, str] | None = None) -> str:
        """sha256 over the files' bytes and the options that change the result.

        Used to skip unchanged cases on re-runs: any change of bytes, of the label map
        or of the chosen segments changes it. Pass ``file_hashes`` (from `file_hashes`,
        or ``read_files().hashes``) to avoid reading the files again.
        """
        hashes = self.file_hashes() if file_hashes is None else file_hashes
        h = hashlib.sha256()
        for path in self.files():
            h.update(path.name.encode())
            h.update(hashes[path].encode())
        h.update(repr(sorted(self.label_map.items())).encode())
        if self.label is not None:
            h.update(repr(self.label.segments).encode())
        h.update(repr(self.annotated_slices).encode())
        return h.hexdigest()


def _channel_order(name: str) -> int:
    return CHANNELS.index(name) if name in CHANNELS else len(CHANNELS)


@dataclass(frozen=True)
class SourceFiles:
    """A case's source files as read once by `CaseSource.read_files`.

    Parameters
    ----------
    hashes : mapping of Path to str
        Hex SHA-256 of every file's bytes (as `CaseSource.file_hashes`).
    data : mapping of Path to bytes
        The bytes of the files kept in memory for decoding; the others are absent.
    """

    hashes: Mapping[Path, str]
    data: Mapping[Path, bytes]


def file_sha256(path: Path, *, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    return read_and_hash(path, limit=-1, block=block)[0]


def read_and_hash(path: Path, *, limit: int, block: int = 1 << 20) -> tuple[str, bytes | None]:
    """Read a file once: its sha256, and its bytes when it holds at most ``limit`` bytes.

    The size is taken from the open file before anything is read; a larger file (or
    ``limit < 0``) is hashed in blocks of ``block`` bytes and nothing is kept. A file
    that grows while it is read is hashed whole and its bytes are not kept.

    Returns
    -------
    (str, bytes or None)
        The hex digest of every byte read, and those bytes or None.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(size) if 0 <= size <= limit else None
        if data is not None:
            h.update(data)
        grew = False
        while chunk := fh.read(block):
            h.update(chunk)
            grew = data is not None
    return h.hexdigest(), None if grew else data
