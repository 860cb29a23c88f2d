"""Downloading TCIA collections: the NBIA REST API, Imaging Data Commons, checksummed file lists.

Each source turns a collection name (and optional patient, modality and count filters)
into a :class:`~pipeline.download.plan.Plan` and has a fetcher that downloads one item,
verifies it and moves it into place; :func:`~pipeline.download.plan.run_plan` runs a plan
and returns a :class:`~pipeline.download.plan.Summary`. The tree written is the one
``xrai ingest`` reads: ``DEST/<PatientID>/<SeriesInstanceUID>/*.dcm`` for DICOM sources,
the collection's own relative paths for file lists.
"""

from __future__ import annotations

from pipeline.download.errors import (
    ChecksumError,
    ControlledAccessError,
    DownloadError,
    InsufficientSpaceError,
    NotFoundError,
    UnsafeArchiveError,
)
from pipeline.download.http import HttpClient, RetryPolicy
from pipeline.download.plan import Outcome, Plan, PlanItem, Summary, check_disk_space, run_plan

__all__ = [
    "ChecksumError",
    "ControlledAccessError",
    "DownloadError",
    "HttpClient",
    "InsufficientSpaceError",
    "NotFoundError",
    "Outcome",
    "Plan",
    "PlanItem",
    "RetryPolicy",
    "Summary",
    "UnsafeArchiveError",
    "check_disk_space",
    "run_plan",
]
