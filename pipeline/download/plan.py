"""What a download will fetch (the plan), where it lands, and how a run is summarised.

Layout written under the destination ``DEST``:

- DICOM sources (NBIA, IDC): ``DEST/<PatientID>/<SeriesInstanceUID>/*.dcm``, one folder per
  patient holding its series (MR and SEG), as ``xrai ingest --layout dicom`` reads it.
- HTTP file lists: ``DEST/<relative path from the list>``, the collection's own layout.
- Bookkeeping: ``DEST/.xrai-download/`` holds the temporary files (``tmp/``) and one
  completion record per verified item (``done/``). An item counts as complete only when
  its record exists and the files it lists are present with their recorded sizes (and,
  for series, their number equals the count stated by the index or API); anything else
  is fetched again. Files are written under ``tmp/`` and renamed into place once
  verified, so a partial item never sits where a reader would take it for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.download.errors import ChecksumError, DownloadError, InsufficientSpaceError
from pipeline.fsio import write_text_atomic

__all__ = [
    "STATE_DIR",
    "Fetcher",
    "Outcome",
    "Plan",
    "PlanItem",
    "Reporter",
    "StateDir",
    "Summary",
    "check_disk_space",
    "format_bytes",
    "install_series",
    "run_plan",
    "safe_component",
    "series_is_complete",
]

logger = logging.getLogger(__name__)

STATE_DIR = ".xrai-download"
ItemKind = Literal["series", "file"]
Status = Literal["downloaded", "skipped", "failed"]

_UNSAFE_COMPONENT = re.compile(r"[/\\\x00]")


def safe_component(name: str, *, field_name: str, what: str) -> str:
    """Return `name` if it can be used as one folder name, else raise.

    Raises
    ------
    DownloadError
        For an empty name, ``.``/``..``, a leading dot, or a path separator (never
        retried: the source's metadata is at fault).
    """
    if not name or name in (".", "..") or name.startswith(".") or _UNSAFE_COMPONENT.search(name):
        raise DownloadError(what, f"{field_name} {name!r} cannot be used as a folder name")
    return name


def format_bytes(n: int | None) -> str:
    """Human-readable size (binary units), ``"?"`` when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class PlanItem:
    """One thing to download: a DICOM series or a single file.

    Parameters
    ----------
    key : str
        The SeriesInstanceUID (series) or the relative path in the collection (file).
    patient_id : str
        The patient (case) it belongs to.
    kind : {"series", "file"}
    size_bytes : int or None
        Stated size (NBIA ``FileSize``, IDC ``series_size_MB``, the list's size).
    n_files : int or None
        Stated number of files (NBIA ``ImageCount``, IDC ``instanceCount``); 1 for a file.
    modality, description, study_uid : str, optional
    series_date : date, optional
    ref : str, optional
        Where the bytes are: an S3 URL (IDC) or an HTTP URL (file lists).
    sha256 : str, optional
        Expected sha256 of a file.
    """

    key: str
    patient_id: str
    kind: ItemKind = "series"
    size_bytes: int | None = None
    n_files: int | None = None
    modality: str | None = None
    description: str | None = None
    study_uid: str | None = None
    series_date: date | None = None
    ref: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        """How messages name this item (``series <uid>`` or ``file <path>``)."""
        return f"{self.kind} {self.key}"

    def target(self, dest: Path) -> Path:
        """Final location under `dest` (a folder for a series, a file otherwise)."""
        if self.kind == "series":
            return (dest / safe_component(self.patient_id, field_name="PatientID",
                                          what=self.label)
                    / safe_component(self.key, field_name="SeriesInstanceUID",
                                     what=self.label))
        return dest / self.key


@dataclass(frozen=True)
class Plan:
    """The items a run will consider, in order, and their stated total size."""

    collection: str
    source: str
    items: tuple[PlanItem, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the stated sizes (items of unknown size count 0; see `unknown_sizes`)."""
        return sum(i.size_bytes or 0 for i in self.items)

    @property
    def unknown_sizes(self) -> int:
        """Number of items whose size the source does not state."""
        return sum(i.size_bytes is None for i in self.items)

    @property
    def patients(self) -> list[str]:
        """Patients in the plan, in order of first appearance."""
        return list(dict.fromkeys(i.patient_id for i in self.items))

    def describe(self) -> str:
        """One line: counts and total size."""
        unknown = f" ({self.unknown_sizes} of unknown size)" if self.unknown_sizes else ""
        noun = "series" if all(i.kind == "series" for i in self.items) else "files"
        return (f"{self.collection} via {self.source}: {len(self.patients)} patients, "
                f"{len(self.items)} {noun}, {format_bytes(self.total_bytes)}{unknown}")


class StateDir:
    """The bookkeeping folder ``DEST/.xrai-download`` (temporary files, completion records)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.root = dest / STATE_DIR

    def tmp(self, name: str) -> Path:
        """A temporary path under ``tmp/`` on the same file system as `dest`."""
        path = self.root / "tmp" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record_path(self, source: str, key: str) -> Path:
        digest = hashlib.sha1(f"{source}\0{key}".encode()).hexdigest()
        return self.root / "done" / f"{source}-{digest}.json"

    def read(self, source: str, key: str) -> dict[str, Any] | None:
        """The completion record of an item, or None."""
        path = self._record_path(source, key)
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def write(self, source: str, key: str, record: Mapping[str, Any]) -> None:
        """Write a completion record atomically (`pipeline.fsio.write_text_atomic`)."""
        write_text_atomic(self._record_path(source, key),
                          json.dumps({"key": key, **record}, indent=1, sort_keys=True))

    def forget(self, source: str, key: str) -> None:
        """Remove an item's completion record."""
        self._record_path(source, key).unlink(missing_ok=True)


def series_is_complete(item: PlanItem, dest: Path, state: StateDir, source: str) -> bool:
    """Whether a series was downloaded and verified before and is still intact on disk.

    Complete means: a completion record exists, its file count equals the count the
    source states now (when it states one), and every recorded file is present in the
    series folder with its recorded size.
    """
    record = state.read(source, item.key)
    if record is None:
        return False
    files: dict[str, int] = record.get("files", {})
    if item.n_files is not None and len(files) != item.n_files:
        return False
    folder = item.target(dest)
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
    return bool(files)


def install_series(item: PlanItem, staged: Path, dest: Path, state: StateDir, source: str,
                   files: Mapping[str, int], hashes: Mapping[str, str]) -> Path:
    """Verify the file count of a staged series folder and move it into place.

    Parameters
    ----------
    item : PlanItem
    staged : Path
        Folder under ``tmp/`` holding the verified files.
    dest : Path
    state : StateDir
    source : str
    files : mapping of str to int
        File name to size, as written.
    hashes : mapping of str to str
        File name to checksum (``md5:<hex>``), recorded for provenance.

    Raises
    ------
    ChecksumError
        When the number of files differs from the stated ``n_files``, or none was found.
    """
    if not files:
        raise ChecksumError(item.label, "the download holds no DICOM file")
    if item.n_files is not None and len(files) != item.n_files:
        raise ChecksumError(item.label, f"holds {len(files)} DICOM files, the source states "
                                        f"{item.n_files}")
    target = item.target(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    state.forget(source, item.key)
    if target.exists():  # an earlier, unverified attempt: replace it
        shutil.rmtree(target)
    os.replace(staged, target)
    state.write(source, item.key, {"patient_id": item.patient_id, "files": dict(files),
                                   "hashes": dict(hashes)})
    return target


@dataclass(frozen=True)
class Outcome:
    """What happened to one item."""

    item: PlanItem
    status: Status
    bytes: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Summary:
    """The outcomes of a run.

    ``exit_code`` (the convention of ``xrai ingest``): 0 when nothing failed, 3 when some
    items failed but others are usable (downloaded or skipped as complete), 1 when
    nothing usable came out.
    """

    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)

    def of(self, status: Status) -> list[Outcome]:
        """Outcomes with the given status."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def exit_code(self) -> int:
        """0 all ok, 3 partial, 1 nothing usable."""
        failed = len(self.of("failed"))
        if failed == 0 and self.outcomes:
            return 0
        return 3 if failed < len(self.outcomes) else 1


class Reporter(Protocol):
    """Receives progress; the CLI draws rich progress bars from it."""

    def start(self, item: PlanItem) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self, outcome: Outcome) -> None: ...


class _Silent:
    def start(self, item: PlanItem) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self, outcome: Outcome) -> None:
        pass


class Fetcher(Protocol):
    """A source's downloader: says whether an item is complete, fetches one otherwise."""

    source: str

    def is_complete(self, item: PlanItem, dest: Path) -> bool: ...

    def fetch(self, item: PlanItem, dest: Path, progress: Callable[[int], None]) -> int: ...


def check_disk_space(dest: Path, items: Sequence[PlanItem], *, staging_factor: float = 1.0,
                     margin: int = 64 << 20,
                     disk_usage: Callable[[Path], Any] | None = None) -> int:
    """Raise if the file system of `dest` cannot hold the items; return the bytes needed.

    Parameters
    ----------
    dest : Path
    items : sequence of PlanItem
        The items still to download.
    staging_factor : float, default 1.0
        Extra copies of the largest item held at once while it is unpacked (1 for a
        zip extracted next to itself, 0 for files renamed into place).
    margin : int, default 64 MiB
        Kept free in addition.
    disk_usage : callable, optional
        Default ``shutil.disk_usage``.

    Notes
    -----
    needed = Σ sizes + staging_factor × max size + margin; items of unknown size count 0.

    Raises
    ------
    InsufficientSpaceError
        Naming the folder, the free and the needed bytes.
    """
    sizes = [i.size_bytes or 0 for i in items]
    needed = sum(sizes) + int(staging_factor * max(sizes, default=0)) + margin
    probe = dest
    while not probe.exists():
        probe = probe.parent
    free = (disk_usage or shutil.disk_usage)(probe).free
    if free < needed:
        raise InsufficientSpaceError(
            f"{dest}: {format_bytes(free)} free, the plan needs {format_bytes(needed)} "
            f"({len(items)} items plus staging and a {format_bytes(margin)} margin)")
    return needed


def run_plan(plan: Plan | Iterable[PlanItem], fetcher: Fetcher, dest: Path, *,
             reporter: Reporter | None = None) -> Summary:
    """Fetch every item that is not already complete; never stop at a failed one.

    Returns
    -------
    Summary
        One outcome per item: ``skipped`` (complete before), ``downloaded`` (fetched and
        verified now) or ``failed`` (with the reason, naming the item).
    """
    items = plan.items if isinstance(plan, Plan) else tuple(plan)
    reporter = reporter or _Silent()
    outcomes: list[Outcome] = []
    for item in items:
        reporter.start(item)
        try:
            if fetcher.is_complete(item, dest):
                outcome = Outcome(item, "skipped", reason="complete and verified before")
            else:
                n = fetcher.fetch(item, dest, reporter.advance)
                outcome = Outcome(item, "downloaded", bytes=n)
        except DownloadError as err:
            logger.error("%s", err)
            outcome = Outcome(item, "failed", reason=err.reason)
        except OSError as err:  # disk full, permissions: name the item and go on
            logger.error("%s: %s", item.label, err)
            outcome = Outcome(item, "failed", reason=f"{type(err).__name__}: {err}")
        reporter.finish(outcome)
        outcomes.append(outcome)
    return Summary(tuple(outcomes))
