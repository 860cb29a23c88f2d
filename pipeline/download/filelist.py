"""Collections distributed as plain files (NIfTI: UCSF-PDGM, BraTS-Africa) from a checksummed list.

A file list is a local file or an http(s) URL in one of two forms:

- CSV (comma or tab separated) with a header; columns ``path`` (relative path in the
  collection, kept under the destination) and ``sha256`` are required, ``url`` (else
  ``--base-url`` + path, or the list's own folder + path), ``size`` (bytes) and
  ``patient`` (else the first component of ``path``) are optional;
- ``sha256sum`` output: ``<sha256>  <path>`` per line (urls from the base URL).

Each file is fetched into ``DEST/.xrai-download/tmp`` with HTTP Range resume (a partial
file from an interrupted run is continued, not restarted), its size and sha256 are
verified, and only then it is renamed to ``DEST/<path>``. A file already there is
skipped when its completion record matches its size and modification time, or else
when its sha256 matches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlparse

from pipeline.download.errors import ChecksumError, NotFoundError
from pipeline.download.http import HttpClient
from pipeline.download.plan import Plan, PlanItem, StateDir

__all__ = ["FileListFetcher", "parse_file_list", "plan_filelist", "sha256_file"]

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def sha256_file(path: Path, *, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _check_path(path: str, *, where: str) -> str:
    clean = path.strip().replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if not clean or clean.startswith("/") or re.match(r"^[A-Za-z]:", clean) or ".." in parts:
        raise ValueError(f"{where}: path {path!r} must be relative and stay inside the "
                         "destination")
    if any(p.startswith(".") for p in parts):
        raise ValueError(f"{where}: path {path!r} has a hidden component")
    return "/".join(parts)


def parse_file_list(text: str, *, list_name: str, base_url: str | None) -> list[PlanItem]:
    """Plan items (``kind="file"``) from the text of a file list.

    Parameters
    ----------
    text : str
    list_name : str
        Where the list came from, for messages.
    base_url : str or None
        Prefix of relative paths when a row has no ``url``.

    Raises
    ------
    ValueError
        Naming the line and the offending value (bad path, checksum, size, no url).
    """
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"file list {list_name}: no entries")
    first = lines[0].split()
    rows: list[tuple[int, dict[str, str]]] = []
    if len(first) == 2 and _HEX64.match(first[0]):  # sha256sum format
        for n, line in enumerate(lines, start=1):
            digest, _, path = line.strip().partition(" ")
            rows.append((n, {"sha256": digest, "path": path.strip().lstrip("*")}))
    else:
        dialect = "excel-tab" if "\t" in lines[0] else "excel"
        reader = csv.DictReader(io.StringIO("\n".join(lines)), dialect=dialect)
        fields = {f.strip().lower() for f in reader.fieldnames or []}
        missing = {"path", "sha256"} - fields
        if missing:
            raise ValueError(f"file list {list_name}: header {reader.fieldnames!r} lacks "
                             f"{sorted(missing)!r}")
        for n, row in enumerate(reader, start=2):
            rows.append((n, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}))
    items = []
    seen: set[str] = set()
    for n, row in rows:
        where = f"file list {list_name}, line {n}"
        path = _check_path(row.get("path", ""), where=where)
        digest = row.get("sha256", "")
        if not _HEX64.match(digest):
            raise ValueError(f"{where}: sha256 {digest!r} is not 64 hex digits")
        size = row.get("size") or None
        if size is not None and not size.isdigit():
            raise ValueError(f"{where}: size {size!r} is not a whole number of bytes")
        url = row.get("url") or None
        if url is None:
            if not base_url:
                raise ValueError(f"{where}: no url column and no base URL to resolve {path!r}")
            url = urljoin(base_url.rstrip("/") + "/", quote(path))
        if path in seen:
            raise ValueError(f"{where}: path {path!r} is listed twice")
        seen.add(path)
        items.append(PlanItem(key=path, patient_id=row.get("patient") or path.split("/")[0],
                              kind="file", size_bytes=None if size is None else int(size),
                              n_files=1, ref=url, sha256=digest.lower()))
    return items


def plan_filelist(collection: str, file_list: str, *, http: HttpClient,
                  base_url: str | None = None, patients: Sequence[str] | None = None,
                  limit: int | None = None) -> Plan:
    """The files to download, from a list given as a local path or an http(s) URL.

    ``patients`` keeps the files of those patients (the ``patient`` column, else the
    first path component); ``limit`` keeps the first N patients in list order.

    Raises
    ------
    FileNotFoundError
        The local list does not exist.
    ValueError
        The list is malformed.
    NotFoundError
        None of the patients asked for is in the list.
    """
    if urlparse(file_list).scheme in ("http", "https"):
        raw = http.get_text(file_list, what=f"file list {file_list}")
        default_base = file_list.rsplit("/", 1)[0]
    else:
        path = Path(file_list)
        if not path.is_file():
            raise FileNotFoundError(f"file list {file_list!r} does not exist")
        raw = path.read_text()
        default_base = None
    items = parse_file_list(raw, list_name=file_list, base_url=base_url or default_base)
    if patients:
        wanted = set(patients)
        items = [i for i in items if i.patient_id in wanted]
        if not items:
            raise NotFoundError(f"file list {file_list} has no files for patients "
                                f"{sorted(wanted)!r}")
    if limit is not None:
        keep = set(list(dict.fromkeys(i.patient_id for i in items))[:limit])
        items = [i for i in items if i.patient_id in keep]
    return Plan(collection=collection, source="http", items=tuple(items))


class FileListFetcher:
    """Downloads single files with Range resume into ``DEST/<path>``, sha256-verified."""

    source = "http"

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    def is_complete(self, item: PlanItem, dest: Path) -> bool:
        """Whether ``DEST/<path>`` holds the listed bytes (record, else a fresh sha256)."""
        target = item.target(dest)
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if item.size_bytes is not None and st.st_size != item.size_bytes:
            return False
        state = StateDir(dest)
        record = state.read(self.source, item.key)
        if (record is not None and record.get("sha256") == item.sha256
                and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns):
            return True
        if sha256_file(target) != item.sha256:
            return False
        self._record(state, item, target)
        return True

    def _record(self, state: StateDir, item: PlanItem, target: Path) -> None:
        st = target.stat()
        state.write(self.source, item.key, {"sha256": item.sha256, "size": st.st_size,
                                            "mtime_ns": st.st_mtime_ns})

    def fetch(self, item: PlanItem, dest: Path, progress: Callable[[int], None]) -> int:
        """Download (resuming a partial), verify and install one file; return its size."""
        state = StateDir(dest)
        target = item.target(dest)
        part = state.tmp(hashlib.sha1(item.key.encode()).hexdigest() + ".part")
        if part.exists():
            progress(part.stat().st_size)  # resumed bytes count as done

        def validate(path: Path) -> None:
            digest = sha256_file(path)
            if digest != item.sha256:
                raise ChecksumError(item.label, f"sha256 is {digest}, the list says "
                                                f"{item.sha256}")

        size = self.http.download(item.ref or "", part, what=item.label,
                                  expected_size=item.size_bytes, resume=True,
                                  progress=progress, validate=validate)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        self._record(state, item, target)
        return size
