"""Error types of the download stage.

Every message names the series (or file) at fault, the offending value and what was
expected; none of them ever contains a bearer token (messages built from transport
errors pass through :func:`pipeline.download.http.redact`).
"""

from __future__ import annotations

from pipeline.errors import XraiError


class DownloadError(XraiError):
    """A download could not be completed.

    Parameters
    ----------
    what : str
        The series UID or file path at fault (``"series 1.2.3"``, ``"file a/b.nii.gz"``).
    reason : str
        What went wrong, with the offending value.
    retryable : bool, default False
        Whether trying again may succeed (timeouts, resets, 429, 5xx, a truncated body,
        a checksum mismatch in transit). Unsafe archives and 4xx answers are not.
    """

    def __init__(self, what: str, reason: str, *, retryable: bool = False) -> None:
        self.what = what
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{what}: {reason}")


class ChecksumError(DownloadError):
    """A file's bytes do not match the checksum, size or count the source states."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(what, reason, retryable=True)


class UnsafeArchiveError(DownloadError):
    """A zip archive is unsafe to extract: an entry that would escape the destination, or
    sizes or a compression ratio beyond the limits of `pipeline.download.safezip` (never
    retried)."""


class ControlledAccessError(XraiError):
    """The collection is no longer openly downloadable; the message says how to get it."""


class NotFoundError(XraiError):
    """The collection, patient or series asked for does not exist at the source."""


class InsufficientSpaceError(XraiError):
    """The destination's file system has less free space than the plan needs."""
