"""Safe extraction of a series zip: no entry escapes, only expected files, hashes checked.

The whole archive is inspected before a single byte is written: an entry with an
absolute path, a drive letter, a ``..`` component or a symbolic-link mode rejects the
archive (:class:`UnsafeArchiveError`). Entries are written flat (by their base name)
into one folder, only those whose suffix is expected (``.dcm``); a ``md5hashes.csv``
member (NBIA's ``IncludeMD5=Yes``) is read, not written, and every extracted file must
match it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.download.errors import ChecksumError, DownloadError, UnsafeArchiveError

__all__ = ["ExtractedFile", "check_member_name", "parse_md5_csv", "safe_extract", "verify_zip"]

MD5_MEMBER = "md5hashes.csv"
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ExtractedFile:
    """One file written by :func:`safe_extract`."""

    name: str
    size: int
    md5: str


def check_member_name(name: str, *, what: str) -> str:
    """Return the base name of a zip member, or raise if the name could escape.

    Raises
    ------
    UnsafeArchiveError
        For an absolute path, a drive letter, a backslash path or a ``..`` component.
    """
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise UnsafeArchiveError(what, f"zip entry {name!r} has an absolute path")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeArchiveError(what, f"zip entry {name!r} climbs out of the destination "
                                       "('..')")
    return parts[-1] if parts else ""


def verify_zip(path: Path, *, what: str) -> None:
    """Raise a retryable :class:`DownloadError` if `path` is not a complete, intact zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise DownloadError(what, f"archive is truncated or corrupt ({err})",
                            retryable=True) from err
    if bad is not None:
        raise DownloadError(what, f"archive member {bad!r} fails its CRC check", retryable=True)


def parse_md5_csv(text: str, *, what: str) -> dict[str, str]:
    """File name to md5 from NBIA's ``md5hashes.csv`` (a header row, then name,hash rows)."""
    out: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or not _HEX32.match(row[1].strip()):
            continue  # the header row, blank lines
        out[PurePosixPath(row[0].strip().replace("\\", "/")).name] = row[1].strip().lower()
    if not out:
        raise ChecksumError(what, f"{MD5_MEMBER} lists no file hashes")
    return out


def safe_extract(zip_path: Path, dest: Path, *, what: str,
                 suffixes: tuple[str, ...] = (".dcm",),
                 require_md5: bool = False) -> list[ExtractedFile]:
    """Extract the expected files of `zip_path` flat into the folder `dest`.

    Parameters
    ----------
    zip_path : Path
    dest : Path
        Folder that receives the files (created); nothing is written elsewhere.
    what : str
        The series, for messages.
    suffixes : tuple of str, default (".dcm",)
        Lower-case suffixes of the files to extract; other members are skipped.
    require_md5 : bool, default False
        Fail when the archive carries no ``md5hashes.csv``.

    Returns
    -------
    list of ExtractedFile
        In archive order.

    Raises
    ------
    UnsafeArchiveError
        An entry would escape `dest`, is a link, or two entries share a base name.
    ChecksumError
        A file's md5 differs from ``md5hashes.csv``, or a listed file is missing.
    DownloadError
        The archive is corrupt (retryable).
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise DownloadError(what, f"archive is truncated or corrupt ({err})",
                            retryable=True) from err
    with zf:
        wanted: list[tuple[zipfile.ZipInfo, str]] = []
        hashes: dict[str, str] | None = None
        seen: set[str] = set()
        for info in zf.infolist():  # inspect everything before writing anything
            base = check_member_name(info.filename, what=what)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(what, f"zip entry {info.filename!r} is a symbolic link")
            if info.is_dir() or not base:
                continue
            if base == MD5_MEMBER:
                hashes = parse_md5_csv(zf.read(info).decode("utf-8", "replace"), what=what)
                continue
            if not base.lower().endswith(suffixes):
                continue
            if base in seen:
                raise UnsafeArchiveError(what, f"two zip entries are named {base!r}")
            seen.add(base)
            wanted.append((info, base))
        if require_md5 and hashes is None:
            raise ChecksumError(what, f"archive carries no {MD5_MEMBER}")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        out: list[ExtractedFile] = []
        for info, base in wanted:
            target = (dest / base).resolve()
            if target.parent != root:  # belt and braces after the name check
                raise UnsafeArchiveError(what, f"zip entry {info.filename!r} resolves outside "
                                               f"{dest}")
            h = hashlib.md5()
            size = 0
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
            except (zipfile.BadZipFile, EOFError) as err:
                raise DownloadError(what, f"archive member {info.filename!r} is corrupt "
                                          f"({err})", retryable=True) from err
            out.append(ExtractedFile(base, size, h.hexdigest()))
    if hashes is not None:
        got = {f.name: f.md5 for f in out}
        for name, md5 in sorted(hashes.items()):
            if name not in got:
                raise ChecksumError(what, f"{MD5_MEMBER} lists {name!r} but the archive "
                                          "does not hold it")
            if got[name] != md5:
                raise ChecksumError(what, f"file {name!r} has md5 {got[name]} but "
                                          f"{MD5_MEMBER} says {md5}")
        extra = sorted(set(got) - set(hashes))
        if extra:
            raise ChecksumError(what, f"files {extra[:3]!r} are not listed in {MD5_MEMBER}")
    return out
