"""Safe extraction of a series zip: no entry escapes, only expected files, hashes checked.

The whole archive is inspected before a single byte is written: an entry with an
absolute path, a drive letter, a ``..`` component or a symbolic-link mode rejects the
archive (:class:`UnsafeArchiveError`). Entries are written flat (by their base name)
into one folder, only those whose suffix is expected (``.dcm``); a ``md5hashes.csv``
member (NBIA's ``IncludeMD5=Yes``) is read, not written, and every extracted file must
match it.

Size limits (zip bombs)
-----------------------
Before anything is inflated (by :func:`verify_zip`'s CRC test or by
:func:`safe_extract`), every member's declared size is checked, and a violation rejects
the archive with :class:`UnsafeArchiveError` naming the archive and the member:

==========================  ==========================  ===============================
limit                       default                     environment variable
==========================  ==========================  ===============================
`MAX_MEMBER_BYTES`          2**31 (2 GiB) per member    ``XRAI_ZIP_MAX_MEMBER_BYTES``
`MAX_TOTAL_BYTES`           2**33 (8 GiB) per archive   ``XRAI_ZIP_MAX_TOTAL_BYTES``
`MAX_COMPRESSION_RATIO`     1000 (uncompressed :        ``XRAI_ZIP_MAX_RATIO``
                            compressed), for members
                            over `RATIO_MIN_BYTES`
                            (8 MiB)
==========================  ==========================  ===============================

Members whose local records overlap (the overlapping-entry bomb) are refused too. The
declared ``file_size`` may lie, so extraction also counts the bytes it writes and stops
at the same limits (and at the declared size), deleting the partial file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline.download.errors import ChecksumError, DownloadError, UnsafeArchiveError
from pipeline.limits import env_limit

__all__ = ["MAX_COMPRESSION_RATIO", "MAX_MEMBER_BYTES", "MAX_TOTAL_BYTES", "RATIO_MIN_BYTES",
           "ExtractedFile", "ZipLimits", "check_archive_sizes", "check_member_name",
           "parse_md5_csv", "safe_extract", "verify_zip"]

MD5_MEMBER = "md5hashes.csv"

#: Most bytes one member may inflate to (``XRAI_ZIP_MAX_MEMBER_BYTES`` overrides).
MAX_MEMBER_BYTES = 2**31
#: Most bytes all members of one archive may inflate to (``XRAI_ZIP_MAX_TOTAL_BYTES``).
MAX_TOTAL_BYTES = 2**33
#: Largest file_size / compress_size of a member over `RATIO_MIN_BYTES`
#: (``XRAI_ZIP_MAX_RATIO``); deflate's own ceiling is about 1032.
MAX_COMPRESSION_RATIO = 1000
#: Members up to this size are not ratio-checked: a blank slice compresses ~700:1.
RATIO_MIN_BYTES = 2**23
#: Most bytes of ``md5hashes.csv`` read into memory (a 10 000-file series lists ~600 kB).
MAX_MD5_CSV_BYTES = 2**24
#: Fixed part of a zip local file header (APPNOTE 4.3.7), before name and extra field.
_LOCAL_HEADER = 30
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


@dataclass(frozen=True)
class ZipLimits:
    """The size limits in force (module constants, or their environment overrides)."""

    member_bytes: int
    total_bytes: int
    ratio: int

    @classmethod
    def from_env(cls) -> ZipLimits:
        """`MAX_MEMBER_BYTES`, `MAX_TOTAL_BYTES`, `MAX_COMPRESSION_RATIO` or overrides."""
        return cls(env_limit("XRAI_ZIP_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES),
                   env_limit("XRAI_ZIP_MAX_TOTAL_BYTES", MAX_TOTAL_BYTES),
                   env_limit("XRAI_ZIP_MAX_RATIO", MAX_COMPRESSION_RATIO))


def check_archive_sizes(zf: zipfile.ZipFile, *, what: str,
                        limits: ZipLimits | None = None) -> int:
    """Check every member's declared size before anything is inflated.

    Parameters
    ----------
    zf : zipfile.ZipFile
    what : str
        The series, for messages.
    limits : ZipLimits, optional
        Default: :meth:`ZipLimits.from_env`.

    Returns
    -------
    int
        The declared uncompressed size of all members.

    Raises
    ------
    UnsafeArchiveError
        Naming the archive (`what` and its file) and the member: a member over
        ``limits.member_bytes``; members together over ``limits.total_bytes``; a member
        over `RATIO_MIN_BYTES` that inflates more than ``limits.ratio`` times; two
        members whose local records overlap.
    """
    limits = limits or ZipLimits.from_env()
    where = f"archive {Path(zf.filename or '<stream>').name!r}"
    total = 0
    for info in zf.infolist():
        if info.file_size > limits.member_bytes:
            raise UnsafeArchiveError(
                what, f"{where} member {info.filename!r} declares {info.file_size} bytes; the "
                      f"limit is {limits.member_bytes} (XRAI_ZIP_MAX_MEMBER_BYTES)")
        if info.file_size > RATIO_MIN_BYTES and (
                info.file_size > limits.ratio * info.compress_size):
            ratio = info.file_size / max(info.compress_size, 1)
            raise UnsafeArchiveError(
                what, f"{where} member {info.filename!r} inflates {info.compress_size} bytes "
                      f"to {info.file_size} (ratio {ratio:.0f}:1); the limit is "
                      f"{limits.ratio}:1 (XRAI_ZIP_MAX_RATIO), a zip bomb?")
        total += info.file_size
        if total > limits.total_bytes:
            raise UnsafeArchiveError(
                what, f"{where} members up to {info.filename!r} declare {total} bytes; the "
                      f"limit is {limits.total_bytes} (XRAI_ZIP_MAX_TOTAL_BYTES)")
    records = sorted(zf.infolist(), key=lambda i: i.header_offset)
    for a, b in itertools.pairwise(records):
        if a.header_offset + _LOCAL_HEADER + a.compress_size > b.header_offset:
            raise UnsafeArchiveError(
                what, f"{where} members {a.filename!r} and {b.filename!r} overlap (at byte "
                      f"{b.header_offset}); a zip bomb?")
    return total


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: BinaryIO, *, what: str,
                 cap: int, cap_name: str) -> tuple[int, str]:
    """Copy one member into `dst`, counting; stop past its declared size or `cap`."""
    h = hashlib.md5()
    size = 0
    where = f"archive {Path(zf.filename or '<stream>').name!r}"
    with zf.open(info) as src:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > info.file_size or size > cap:
                limit, name = ((info.file_size, "its declared file_size") if size > info.file_size
                               else (cap, cap_name))
                raise UnsafeArchiveError(
                    what, f"{where} member {info.filename!r} inflates past {limit} bytes "
                          f"({name}); extraction stopped")
            h.update(chunk)
            dst.write(chunk)
    return size, h.hexdigest()


def verify_zip(path: Path, *, what: str) -> None:
    """Raise a retryable :class:`DownloadError` if `path` is not a complete, intact zip.

    The declared sizes are checked first (:func:`check_archive_sizes`), so the CRC test
    never inflates a zip bomb; a violation raises :class:`UnsafeArchiveError` (not
    retried).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            check_archive_sizes(zf, what=what)
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
        An entry would escape `dest`, is a link, or two entries share a base name; a
        member or the archive over the size limits (see :func:`check_archive_sizes`),
        declared or found while inflating (the partial file is deleted).
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
        limits = ZipLimits.from_env()
        wanted: list[tuple[zipfile.ZipInfo, str]] = []
        md5_info: zipfile.ZipInfo | None = None
        seen: set[str] = set()
        for info in zf.infolist():  # inspect everything before writing anything
            base = check_member_name(info.filename, what=what)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(what, f"zip entry {info.filename!r} is a symbolic link")
            if info.is_dir() or not base:
                continue
            if base == MD5_MEMBER:
                md5_info = info
                continue
            if not base.lower().endswith(suffixes):
                continue
            if base in seen:
                raise UnsafeArchiveError(what, f"two zip entries are named {base!r}")
            seen.add(base)
            wanted.append((info, base))
        check_archive_sizes(zf, what=what, limits=limits)
        hashes: dict[str, str] | None = None
        if md5_info is not None:
            buf = io.BytesIO()
            try:
                _copy_member(zf, md5_info, buf, what=what, cap=MAX_MD5_CSV_BYTES,
                             cap_name="MAX_MD5_CSV_BYTES")
            except (zipfile.BadZipFile, EOFError) as err:
                raise DownloadError(what, f"archive member {md5_info.filename!r} is corrupt "
                                          f"({err})", retryable=True) from err
            hashes = parse_md5_csv(buf.getvalue().decode("utf-8", "replace"), what=what)
        if require_md5 and hashes is None:
            raise ChecksumError(what, f"archive carries no {MD5_MEMBER}")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        out: list[ExtractedFile] = []
        total = 0
        for info, base in wanted:
            target = (dest / base).resolve()
            if target.parent != root:  # belt and braces after the name check
                raise UnsafeArchiveError(what, f"zip entry {info.filename!r} resolves outside "
                                               f"{dest}")
            if limits.member_bytes <= limits.total_bytes - total:
                cap, cap_name = limits.member_bytes, "XRAI_ZIP_MAX_MEMBER_BYTES"
            else:
                cap, cap_name = limits.total_bytes - total, "XRAI_ZIP_MAX_TOTAL_BYTES"
            try:
                with open(target, "wb") as dst:
                    size, md5 = _copy_member(zf, info, dst, what=what, cap=cap,
                                             cap_name=cap_name)
            except UnsafeArchiveError:
                target.unlink(missing_ok=True)
                raise
            except (zipfile.BadZipFile, EOFError) as err:
                target.unlink(missing_ok=True)
                raise DownloadError(what, f"archive member {info.filename!r} is corrupt "
                                          f"({err})", retryable=True) from err
            total += size
            out.append(ExtractedFile(base, size, md5))
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
