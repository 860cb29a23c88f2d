"""What a source yields: one `CaseSource` per case, naming the files of each channel.

A source only *finds* files (it never reads voxels): discovery is cheap and the reading,
standardizing and storing happen per case in worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: Canonical channel names, in store order (BraTS 2023 naming).
CHANNELS: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

#: The dataset label scheme every collection is mapped onto (BraTS 2023).
LABEL_SCHEME: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

VolumeKind = Literal["nifti", "dicom", "dicom-seg"]


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
        """sha256 of every source file (see `files`)."""
        return {path: file_sha256(path) for path in self.files()}

    def content_hash(self, file_hashes: Mapping[Path, str] | None = None) -> str:
        """sha256 over the files' bytes and the options that change the result.

        Used to skip unchanged cases on re-runs: any change of bytes, of the label map
        or of the chosen segments changes it. Pass ``file_hashes`` (from `file_hashes`)
        to avoid reading the files twice.
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


def file_sha256(path: Path, *, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()
