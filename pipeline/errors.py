"""Error types of the pipeline.

Every message says *what* was wrong, *where* (file, case id or field path), the offending
value and what was expected, so that a quarantine list reads as a to-do list.
"""

from __future__ import annotations

from pathlib import Path

# The root lives in stats/ (the bottom layer) so that stats/ raises project errors too;
# stats.errors imports nothing, so this pulls in neither pydantic nor the manifest schema.
from stats.errors import ManifestError, XraiError

__all__ = ["CaseRejected", "ManifestError", "StoreError", "StoreFull", "VolumeError", "XraiError"]


class VolumeError(XraiError):
    """A volume (one file or one DICOM series) cannot be read or used.

    Parameters
    ----------
    path : Path or str
        The file or folder at fault.
    reason : str
        What is wrong, with the offending value.
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CaseRejected(XraiError):
    """A case cannot be ingested; it is quarantined with this message as its reason.

    Parameters
    ----------
    case_id : str
        The case at fault.
    reason : str
        What is wrong, naming the file and the offending value.
    path : Path or str, optional
        The file at fault, when one file is to blame.
    """

    def __init__(self, case_id: str, reason: str, path: Path | str | None = None) -> None:
        self.case_id = case_id
        self.reason = reason
        self.path = None if path is None else Path(path)
        super().__init__(f"case {case_id!r}: {reason}")

    @classmethod
    def from_volume_error(cls, case_id: str, err: VolumeError) -> CaseRejected:
        return cls(case_id, str(err), err.path)


class StoreError(XraiError):
    """The Zarr store is missing, inconsistent, or was created with another grid."""


class StoreFull(StoreError):
    """The store's disk (or quota, or file-size limit) is full; the run stopped cleanly.

    The case being written when it happened is not committed; cases committed before
    stay committed, and a re-run after freeing space continues where this one stopped.
    """
