"""Imaging Data Commons: discovery from idc-index's shipped index, download from its buckets.

Discovery reads the series index that the ``idc-index`` package ships (its dependency
``idc-index-data`` holds ``idc_index.parquet``, one row per series, about 1 M rows) with
DuckDB, filtering on ``collection_id``, ``PatientID`` and ``Modality``; nothing is fetched
from the network, so ``--dry-run`` works offline. ``idc_index.IDCClient`` is not used: it
loads the whole index into pandas (about 5 s) and needs the ``s5cmd`` binary; the file it
reads is the same one.

Download lists the series' objects in its public bucket (``series_aws_url``, e.g.
``s3://idc-open-data/<crdc_series_uuid>/*``) anonymously with boto3 (unsigned requests;
endpoint from ``--s3-endpoint`` or ``XRAI_S3_ENDPOINT``), checks that their number equals
``instanceCount``, and fetches each object with the retry policy of the HTTP client.
Each file's size is checked against the listing and its md5 against the object's ETag
where the ETag is a plain md5 (single-part uploads); files already staged and verified
are kept when a series is resumed.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.download.errors import ChecksumError, DownloadError, NotFoundError
from pipeline.download.http import RetryPolicy, retry_call
from pipeline.download.plan import Plan, PlanItem, StateDir, install_series, series_is_complete
from pipeline.download.safezip import check_member_name

__all__ = [
    "DEFAULT_S3_ENDPOINT",
    "S3_ENDPOINT_ENV",
    "IdcFetcher",
    "idc_collection_id",
    "idc_index_path",
    "parse_s3_url",
    "plan_idc",
]

logger = logging.getLogger(__name__)

S3_ENDPOINT_ENV = "XRAI_S3_ENDPOINT"
DEFAULT_S3_ENDPOINT = "https://s3.amazonaws.com"
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_RETRY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                          "Throttling", "ThrottlingException", "RequestTimeTooSkewed",
                          "500", "502", "503", "504", "429"})


def idc_collection_id(name: str) -> str:
    """IDC's ``collection_id`` for a TCIA collection name (``"UPENN-GBM"`` → ``"upenn_gbm"``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def idc_index_path() -> Path:
    """The series index shipped with idc-index (``idc_index_data.IDC_INDEX_PARQUET_FILEPATH``).

    Raises
    ------
    ModuleNotFoundError
        Saying which package to install.
    """
    try:
        import idc_index_data
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "--source idc needs the idc-index package (pip install idc-index)") from err
    return Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix/*``."""
    match = re.match(r"^s3://([^/]+)/(.*?)\*?$", url or "")
    if not match:
        raise ValueError(f"series_aws_url {url!r} is not of the form s3://bucket/prefix/*")
    return match.group(1), match.group(2)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def plan_idc(collection: str, *, patients: Sequence[str] | None = None,
             modality: Sequence[str] | None = None, limit: int | None = None,
             index: Path | None = None) -> Plan:
    """The series to download from IDC, read offline from the shipped index.

    Parameters
    ----------
    collection : str
        TCIA name or IDC ``collection_id`` (``"UPENN-GBM"`` or ``"upenn_gbm"``).
    patients, modality, limit :
        As for :func:`pipeline.download.nbia.plan_nbia`.
    index : Path, optional
        A parquet file with idc-index's columns; default the shipped one.

    Notes
    -----
    ``size_bytes`` is ``series_size_MB × 2**20``, which errs on the large side when the
    index counts 10**6-byte megabytes (used for the plan and the disk-space check only).

    Raises
    ------
    NotFoundError
        Unknown collection (with suggestions), patients or modalities.
    """
    import duckdb

    path = index or idc_index_path()
    cid = idc_collection_id(collection)
    where = [f"collection_id = {_sql_str(cid)}"]
    if patients:
        where.append("PatientID IN (" + ", ".join(_sql_str(p) for p in patients) + ")")
    con = duckdb.connect()
    try:
        table = f"read_parquet({_sql_str(str(path))})"
        rows = con.execute(
            "SELECT PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, SeriesDescription, "
            "CAST(SeriesDate AS VARCHAR), instanceCount, series_size_MB, series_aws_url "
            f"FROM {table} WHERE {' AND '.join(where)} "
            "ORDER BY PatientID, StudyInstanceUID, SeriesInstanceUID").fetchall()
        if not rows:
            names = [r[0] for r in con.execute(
                f"SELECT DISTINCT collection_id FROM {table} ORDER BY 1").fetchall()]
            if cid not in names:
                close = difflib.get_close_matches(cid, names, n=3)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise NotFoundError(f"collection {collection!r} (collection_id {cid!r}) is not "
                                    f"in the IDC index {path.name}.{hint}")
            raise NotFoundError(f"IDC collection {cid!r} has no series for patients "
                                f"{list(patients or [])!r}")
    finally:
        con.close()
    if modality:
        wanted = {m.upper() for m in modality}
        kept = [r for r in rows if (r[3] or "").upper() in wanted]
        if not kept:
            present = sorted({r[3] or "?" for r in rows})
            raise NotFoundError(f"IDC collection {cid!r} has no series of modality "
                                f"{sorted(wanted)!r}; present: {present!r}")
        rows = kept
    if limit is not None:
        keep = set(list(dict.fromkeys(r[0] for r in rows))[:limit])
        rows = [r for r in rows if r[0] in keep]
    from pipeline.download.nbia import parse_nbia_date

    items = tuple(
        PlanItem(key=uid, patient_id=pid, kind="series",
                 size_bytes=None if size_mb is None else round(size_mb * (1 << 20)),
                 n_files=None if count is None else int(count), modality=mod,
                 description=desc, study_uid=study, series_date=parse_nbia_date(sdate),
                 ref=url)
        for pid, study, uid, mod, desc, sdate, count, size_mb, url in rows)
    return Plan(collection=collection, source="idc", items=items)


def _is_local_io_error(err: Exception) -> bool:
    """A failure of our own disk (full, read-only, no permission): not worth retrying."""
    local = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
    return isinstance(err, OSError) and err.errno in local


def _boto_error(err: Exception, what: str) -> DownloadError:
    """Map a boto3/botocore/urllib3 failure to a DownloadError, retryable where it may clear."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        retryable = code in _RETRY_CODES or status == 429 or status >= 500
        return DownloadError(what, f"S3 error {code or status}: {err}", retryable=retryable)
    if isinstance(err, BotoCoreError):
        return DownloadError(what, f"S3 transfer failed: {err}", retryable=True)
    return DownloadError(what, f"S3 transfer failed: {type(err).__name__}: {err}", retryable=True)


class IdcFetcher:
    """Downloads one IDC series from its bucket into ``DEST/<PatientID>/<SeriesInstanceUID>/``.

    Parameters
    ----------
    endpoint_url : str, optional
        S3 endpoint; default ``$XRAI_S3_ENDPOINT``, else AWS (``https://s3.amazonaws.com``).
    policy : RetryPolicy, optional
    timeout : float, default 60
        Connect and read timeout in seconds.
    sleep, rng :
        Injected in tests.
    client : optional
        A ready boto3 S3 client (tests).
    """

    source = "idc"

    def __init__(self, *, endpoint_url: str | None = None, policy: RetryPolicy | None = None,
                 timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, client: Any = None) -> None:
        self.endpoint_url = (endpoint_url or os.environ.get(S3_ENDPOINT_ENV)
                             or DEFAULT_S3_ENDPOINT)
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.rng = rng or random.Random()
        if client is None:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                config=Config(signature_version=UNSIGNED, connect_timeout=timeout,
                              read_timeout=timeout, retries={"max_attempts": 1}))
        self.s3 = client

    def _retry(self, fn: Callable[[int], Any], what: str) -> Any:
        return retry_call(fn, what=what, policy=self.policy, sleep=self.sleep, rng=self.rng)

    def is_complete(self, item: PlanItem, dest: Path) -> bool:
        """Whether the series is already downloaded and verified."""
        return series_is_complete(item, dest, StateDir(dest), self.source)

    def list_objects(self, item: PlanItem) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of the series' ``.dcm`` objects."""
        if not item.ref:
            raise DownloadError(item.label, "the index gives no series_aws_url")
        try:
            bucket, prefix = parse_s3_url(item.ref)
        except ValueError as err:
            raise DownloadError(item.label, str(err)) from err

        def attempt(_: int) -> list[tuple[str, int, str]]:
            out = []
            try:
                pages = self.s3.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix)
                for page in pages:
                    for obj in page.get("Contents", []):
                        if obj["Key"].lower().endswith(".dcm"):
                            out.append((obj["Key"], int(obj["Size"]), obj.get("ETag", "")))
            except Exception as err:
                raise _boto_error(err, item.label) from err
            return out

        return self._retry(attempt, item.label)

    def _fetch_object(self, bucket: str, key: str, size: int, etag: str, target: Path, *,
                      what: str, progress: Callable[[int], None]) -> str:
        """Download one object to `target` (via ``.part``), verified; return its md5."""
        expected_md5 = m.group(1).lower() if (m := _MD5_ETAG.match(etag)) else None
        part = target.with_name(target.name + ".part")

        def attempt(_: int) -> str:
            h = hashlib.md5()
            got = 0
            try:
                body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
                with open(part, "wb") as fh:
                    for chunk in body.iter_chunks(1 << 16):
                        fh.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        progress(len(chunk))
            except Exception as err:
                progress(-got)
                if _is_local_io_error(err):
                    raise
                raise _boto_error(err, what) from err
            if got != size:
                progress(-got)
                raise ChecksumError(what, f"object {key!r} gave {got} bytes, listing says {size}")
            if expected_md5 is not None and h.hexdigest() != expected_md5:
                progress(-got)
                raise ChecksumError(what, f"object {key!r} has md5 {h.hexdigest()}, its ETag "
                                          f"says {expected_md5}")
            os.replace(part, target)
            return h.hexdigest()

        try:
            return self._retry(attempt, what)
        finally:
            part.unlink(missing_ok=True)

    def fetch(self, item: PlanItem, dest: Path, progress: Callable[[int], None]) -> int:
        """Download, verify and install one series; return the bytes received."""
        state = StateDir(dest)
        item.target(dest)
        bucket, _ = parse_s3_url(item.ref or "")
        objects = self.list_objects(item)
        if item.n_files is not None and len(objects) != item.n_files:
            raise DownloadError(item.label, f"bucket {bucket!r} holds {len(objects)} DICOM "
                                            f"objects for it, instanceCount is {item.n_files}")
        staged = state.tmp(f"{item.key}.staged")
        staged.mkdir(exist_ok=True)
        sizes: dict[str, int] = {}
        hashes: dict[str, str] = {}
        received = 0
        for key, size, etag in objects:
            name = check_member_name(key.rsplit("/", 1)[-1], what=item.label)
            if name in sizes:
                raise DownloadError(item.label, f"two objects are named {name!r}")
            target = staged / name
            md5 = None
            if target.exists() and target.stat().st_size == size:  # staged by an earlier run
                md5 = hashlib.md5(target.read_bytes()).hexdigest()
                expected = m.group(1).lower() if (m := _MD5_ETAG.match(etag)) else md5
                if md5 != expected:
                    md5 = None
                else:
                    progress(size)
            if md5 is None:
                md5 = self._fetch_object(bucket, key, size, etag, target, what=item.label,
                                         progress=progress)
                received += size
            sizes[name] = size
            hashes[name] = f"md5:{md5}"
        install_series(item, staged, dest, state, self.source, sizes, hashes)
        if staged.exists():
            shutil.rmtree(staged)
        return received
