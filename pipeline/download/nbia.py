"""The TCIA NBIA REST API (v4): discovery and series download.

Endpoints used (all ``GET`` under the API root, ``…/nbia-api/services/v4``):

======================  ==========================================  =========================
endpoint                parameters                                  fields read
======================  ==========================================  =========================
getCollectionValues     –                                           Collection
getPatient              Collection                                  PatientId (or PatientID)
getPatientStudy         Collection, PatientID                       StudyInstanceUID, StudyDate
getSeries               Collection, PatientID                       SeriesInstanceUID, PatientID,
                                                                    StudyInstanceUID, Modality,
                                                                    SeriesDescription, SeriesDate,
                                                                    ImageCount, FileSize
getSeriesSize           SeriesInstanceUID                           TotalSizeInBytes, ObjectCount
getImage                SeriesInstanceUID, IncludeMD5=Yes           a zip with md5hashes.csv
getImageWithMD5Hash     SeriesInstanceUID                           the same zip, for servers
                                                                    that refuse IncludeMD5
======================  ==========================================  =========================

The API as it behaves: an unknown parameter is answered with HTTP 400 (so only the
parameters above are ever sent), an empty result is an empty body rather than ``[]``,
empty fields are absent keys, dates read ``MM-DD-YYYY``, and ``getImage`` streams its zip
without a ``Content-Length`` (so a cut-off stream is caught by the zip check and retried
from the start; it cannot be resumed with a Range).
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pipeline.download.errors import (
    ChecksumError,
    ControlledAccessError,
    DownloadError,
    NotFoundError,
)
from pipeline.download.http import AccessRefusedError, BadRequestError, HttpClient
from pipeline.download.plan import Plan, PlanItem, StateDir, install_series, series_is_complete
from pipeline.download.safezip import safe_extract, verify_zip

__all__ = [
    "CONTROLLED_ACCESS",
    "DEFAULT_NBIA_URL",
    "NBIA_URL_ENV",
    "NbiaClient",
    "NbiaFetcher",
    "NbiaSeries",
    "controlled_access_message",
    "parse_nbia_date",
    "plan_nbia",
]

logger = logging.getLogger(__name__)

DEFAULT_NBIA_URL = "https://services.cancerimagingarchive.net/nbia-api/services/v4"
NBIA_URL_ENV = "XRAI_NBIA_URL"

#: Collections that left open access, keyed by lower-case name: (name, where it went).
CONTROLLED_ACCESS: dict[str, tuple[str, str]] = {
    "lgg-1p19qdeletion": (
        "LGG-1p19qDeletion",
        "moved in 2025 from TCIA's open archive to NCI's controlled-access repository",
    ),
}


def controlled_access_message(collection: str) -> str | None:
    """How to obtain a collection that is no longer openly downloadable, or None."""
    entry = CONTROLLED_ACCESS.get(collection.strip().lower())
    if entry is None:
        return None
    name, where = entry
    return (
        f"collection {name!r} is not openly downloadable: it {where}. Request access "
        "through NCI's controlled-data process (see the collection's page on "
        "https://www.cancerimagingarchive.net and "
        "https://www.cancerimagingarchive.net/nih-controlled-data-access-policy/), download it "
        "with the tools that repository provides, then ingest the local copy, e.g. "
        "`xrai ingest <folder> --layout dicom --store <store> --dataset lgg`. An institutional "
        "mirror that still serves it can be used with --base-url (or XRAI_NBIA_URL) and a "
        "token in XRAI_TCIA_TOKEN."
    )


def parse_nbia_date(value: Any) -> date | None:
    """A date from NBIA's ``MM-DD-YYYY`` (also ``YYYY-MM-DD``, with or without a time).

    Returns None for an absent or empty value, and (logged) for one that matches none
    of the forms: a date never stops a download.

    Examples
    --------
    >>> parse_nbia_date("03-17-2021")
    datetime.date(2021, 3, 17)
    >>> parse_nbia_date("2021-03-17 00:00:00.0")
    datetime.date(2021, 3, 17)
    """
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    head = text.split(" ")[0].split("T")[0]
    for fmt in ("%m-%d-%Y", "%Y-%m-%d", "%Y/%m/%d", "%m/%d/%Y", "%Y%m%d"):
        try:
            return datetime.strptime(head, fmt).date()
        except ValueError:
            continue
    logger.warning("unrecognised NBIA date %r; kept as unknown", text)
    return None


def _int_or_none(value: Any, *, field_name: str, what: str) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError) as err:
        raise DownloadError(what, f"field {field_name} is {value!r}, not a number") from err


@dataclass(frozen=True)
class NbiaSeries:
    """One row of ``getSeries`` (absent keys read as None)."""

    series_uid: str
    patient_id: str
    study_uid: str | None
    modality: str | None
    description: str | None
    series_date: date | None
    image_count: int | None
    file_size: int | None

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> NbiaSeries:
        """Parse one ``getSeries`` object; raise naming the field that is missing."""
        uid = row.get("SeriesInstanceUID")
        what = f"series {uid}" if uid else "getSeries row"
        for key in ("SeriesInstanceUID", "PatientID"):
            if not row.get(key):
                raise DownloadError(what, f"getSeries answer lacks {key}: {dict(row)!r}")
        return cls(
            series_uid=str(row["SeriesInstanceUID"]),
            patient_id=str(row["PatientID"]),
            study_uid=row.get("StudyInstanceUID"),
            modality=row.get("Modality"),
            description=row.get("SeriesDescription"),
            series_date=parse_nbia_date(row.get("SeriesDate")),
            image_count=_int_or_none(row.get("ImageCount"), field_name="ImageCount", what=what),
            file_size=_int_or_none(row.get("FileSize"), field_name="FileSize", what=what),
        )

    def to_item(self) -> PlanItem:
        """The plan item of this series."""
        return PlanItem(key=self.series_uid, patient_id=self.patient_id, kind="series",
                        size_bytes=self.file_size, n_files=self.image_count,
                        modality=self.modality, description=self.description,
                        study_uid=self.study_uid, series_date=self.series_date)


class NbiaClient:
    """Queries of the NBIA v4 API.

    Parameters
    ----------
    http : HttpClient
    base_url : str, optional
        The API root up to and including ``/nbia-api/services/v4``; default
        ``$XRAI_NBIA_URL``, else TCIA's public server. Its host becomes one of
        `http`'s token hosts (:meth:`HttpClient.allow_token_host`): the bearer token
        goes there, over https only.

    Raises
    ------
    ValueError
        The base URL names no host.
    """

    def __init__(self, http: HttpClient, base_url: str | None = None) -> None:
        self.http = http
        self.base_url = (base_url or os.environ.get(NBIA_URL_ENV) or DEFAULT_NBIA_URL).rstrip("/")
        http.allow_token_host(self.base_url)

    def url(self, endpoint: str) -> str:
        """Full URL of an endpoint."""
        return f"{self.base_url}/{endpoint}"

    def _rows(self, endpoint: str, params: Mapping[str, str], *, what: str) -> list[dict[str, Any]]:
        data = self.http.get_json(self.url(endpoint), params, what=what)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DownloadError(what, f"{endpoint} answered {str(data)[:120]!r}, expected a "
                                      "list of objects")
        return data

    def collections(self) -> list[str]:
        """Names of the collections the server offers."""
        rows = self._rows("getCollectionValues", {}, what="collection list")
        return sorted(str(r["Collection"]) for r in rows if r.get("Collection"))

    def patients(self, collection: str) -> list[str]:
        """Patient IDs of a collection (``getPatient`` spells the key ``PatientId``)."""
        rows = self._rows("getPatient", {"Collection": collection},
                          what=f"collection {collection}")
        ids = (r.get("PatientId") or r.get("PatientID") for r in rows)
        return sorted({str(i) for i in ids if i})

    def studies(self, collection: str, patient_id: str) -> list[dict[str, Any]]:
        """Studies of one patient (``getPatientStudy``), dates parsed."""
        rows = self._rows("getPatientStudy", {"Collection": collection, "PatientID": patient_id},
                          what=f"patient {patient_id}")
        return [{**r, "StudyDate": parse_nbia_date(r.get("StudyDate"))} for r in rows]

    def series(self, collection: str, patient_id: str | None = None) -> list[NbiaSeries]:
        """Series of a collection, or of one patient in it."""
        params = {"Collection": collection}
        if patient_id is not None:
            params["PatientID"] = patient_id
        what = f"patient {patient_id}" if patient_id else f"collection {collection}"
        return [NbiaSeries.from_json(r) for r in self._rows("getSeries", params, what=what)]

    def series_size(self, series_uid: str) -> tuple[int | None, int | None]:
        """(bytes, number of files) of a series from ``getSeriesSize``."""
        what = f"series {series_uid}"
        rows = self._rows("getSeriesSize", {"SeriesInstanceUID": series_uid}, what=what)
        if not rows:
            return None, None
        row = rows[0]
        return (_int_or_none(row.get("TotalSizeInBytes"), field_name="TotalSizeInBytes",
                             what=what),
                _int_or_none(row.get("ObjectCount"), field_name="ObjectCount", what=what))


def _not_found(client: NbiaClient, collection: str, patients: Sequence[str] | None) -> Exception:
    """The clearest error for an empty getSeries answer."""
    message = controlled_access_message(collection)
    if message is not None:
        return ControlledAccessError(message)
    names = client.collections()
    if collection not in names:
        same = [n for n in names if n.lower() == collection.lower()]
        close = same or difflib.get_close_matches(collection, names, n=3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return NotFoundError(f"collection {collection!r} is not on {client.base_url}.{hint} "
                             f"It offers {len(names)} collections, e.g. {names[:5]!r}")
    if patients:
        return NotFoundError(f"collection {collection!r} has no series for patients "
                             f"{list(patients)!r}")
    return NotFoundError(f"collection {collection!r} has no series on {client.base_url}")


def plan_nbia(client: NbiaClient, collection: str, *, patients: Sequence[str] | None = None,
              modality: Sequence[str] | None = None, limit: int | None = None) -> Plan:
    """The series to download from NBIA.

    Parameters
    ----------
    client : NbiaClient
    collection : str
        TCIA collection name as the API spells it (``"UPENN-GBM"``).
    patients : sequence of str, optional
        Only these PatientIDs.
    modality : sequence of str, optional
        Only series of these modalities (``MR``, ``SEG``), case-insensitive.
    limit : int, optional
        At most this many patients (the first in PatientID order).

    Raises
    ------
    ControlledAccessError
        For a collection that left open access (with how to obtain it).
    NotFoundError
        Unknown collection (with suggestions), unknown patients, or no series of the
        modalities asked for (with the modalities present).
    """
    try:
        if patients:
            rows = [s for p in dict.fromkeys(patients) for s in client.series(collection, p)]
        else:
            rows = client.series(collection)
    except AccessRefusedError as err:
        message = controlled_access_message(collection)
        if message is not None:
            raise ControlledAccessError(message) from err
        raise
    if not rows:
        raise _not_found(client, collection, patients)
    if modality:
        wanted = {m.upper() for m in modality}
        kept = [s for s in rows if (s.modality or "").upper() in wanted]
        if not kept:
            present = sorted({s.modality or "?" for s in rows})
            raise NotFoundError(f"collection {collection!r} has no series of modality "
                                f"{sorted(wanted)!r}; present: {present!r}")
        rows = kept
    rows.sort(key=lambda s: (s.patient_id, s.study_uid or "", s.series_uid))
    if limit is not None:
        keep = set(list(dict.fromkeys(s.patient_id for s in rows))[:limit])
        rows = [s for s in rows if s.patient_id in keep]
    items = []
    for s in rows:
        item = s.to_item()
        if item.size_bytes is None or item.n_files is None:
            size, count = client.series_size(s.series_uid)
            item = PlanItem(**{**item.__dict__,
                               "size_bytes": item.size_bytes if item.size_bytes is not None
                               else size,
                               "n_files": item.n_files if item.n_files is not None else count})
        items.append(item)
    return Plan(collection=collection, source="nbia", items=tuple(items))


class NbiaFetcher:
    """Downloads one series with ``getImage`` into ``DEST/<PatientID>/<SeriesInstanceUID>/``.

    The zip is streamed to a temporary file, checked (complete zip, CRCs), extracted
    safely into a staging folder (only ``.dcm`` files; no entry may escape), every file
    is checked against ``md5hashes.csv`` and the count against ``ImageCount``; only then
    is the folder renamed into place. A truncated zip or a checksum mismatch is retried
    (from the start); an unsafe archive fails the series at once.

    Parameters
    ----------
    client : NbiaClient
    require_md5 : bool, default True
        Fail a series whose zip carries no ``md5hashes.csv``.
    """

    source = "nbia"

    def __init__(self, client: NbiaClient, *, require_md5: bool = True) -> None:
        self.client = client
        self.require_md5 = require_md5
        self._md5_endpoint = False  # set once the server refuses IncludeMD5 on getImage

    def _download(self, item: PlanItem, part: Path, progress: Callable[[int], None],
                  validate: Callable[[Path], None]) -> int:
        """``getImage`` with ``IncludeMD5=Yes``; a server that answers 400 to that parameter
        (NBIA's v4 sources list only ``SeriesInstanceUID`` there) is asked through
        ``getImageWithMD5Hash`` instead, for this and every later series."""
        params = {"SeriesInstanceUID": item.key}
        if not self._md5_endpoint:
            try:
                return self.client.http.download(
                    self.client.url("getImage"), part, what=item.label,
                    params={**params, "IncludeMD5": "Yes"}, resume=False, progress=progress,
                    validate=validate)
            except BadRequestError as err:
                logger.info("%s; using getImageWithMD5Hash", err)
                self._md5_endpoint = True
        return self.client.http.download(
            self.client.url("getImageWithMD5Hash"), part, what=item.label, params=params,
            resume=False, progress=progress, validate=validate)

    def is_complete(self, item: PlanItem, dest: Path) -> bool:
        """Whether the series is already downloaded and verified."""
        return series_is_complete(item, dest, StateDir(dest), self.source)

    def fetch(self, item: PlanItem, dest: Path, progress: Callable[[int], None]) -> int:
        """Download, verify and install one series; return the bytes received."""
        state = StateDir(dest)
        item.target(dest)  # refuse unusable PatientID/UID before any byte is written
        part = state.tmp(f"{item.key}.zip.part")
        staged = state.tmp(f"{item.key}.staged")
        extracted: dict[str, Any] = {}

        def validate(path: Path) -> None:
            verify_zip(path, what=item.label)
            if staged.exists():
                shutil.rmtree(staged)
            files = safe_extract(path, staged, what=item.label, require_md5=self.require_md5)
            if item.n_files is not None and len(files) != item.n_files:
                raise ChecksumError(item.label, f"archive holds {len(files)} DICOM files, "
                                                f"ImageCount is {item.n_files}")
            extracted["files"] = files

        try:
            size = self._download(item, part, progress, validate)
            files = extracted["files"]
            if item.size_bytes is not None:
                total = sum(f.size for f in files)
                if total != item.size_bytes:
                    logger.warning("%s: files total %d bytes, FileSize states %d", item.label,
                                   total, item.size_bytes)
            install_series(item, staged, dest, state, self.source,
                           {f.name: f.size for f in files},
                           {f.name: f"md5:{f.md5}" for f in files})
            return size
        finally:
            part.unlink(missing_ok=True)
            if staged.exists():
                shutil.rmtree(staged)
