"""Safe zip extraction: escaping entries, links, unexpected files, md5 checks."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from pathlib import Path

import pytest

from pipeline.download.errors import ChecksumError, DownloadError, UnsafeArchiveError
from pipeline.download.safezip import parse_md5_csv, safe_extract, verify_zip

from ._fakes import series_zip


def write_zip(path: Path, entries: dict[str, bytes], *, link: str | None = None) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/abs/evil.dcm",
                                  "C:/evil.dcm", "\\\\server\\evil.dcm", "..\\evil.dcm"])
def test_escaping_entry_rejects_the_archive_before_writing(tmp_path: Path, name: str) -> None:
    z = write_zip(tmp_path / "s.zip", {"ok.dcm": b"fine", name: b"owned"})
    dest = tmp_path / "out" / "series"
    with pytest.raises(UnsafeArchiveError, match=r"zip entry .* (climbs out|absolute)"):
        safe_extract(z, dest, what="series 1.2")
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["s.zip"]


def test_symlink_entry_is_rejected(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "s.zip", {"ok.dcm": b"fine"}, link="link.dcm")
    with pytest.raises(UnsafeArchiveError, match=r"'link.dcm' is a symbolic link"):
        safe_extract(z, tmp_path / "out", what="series 1.2")


def test_only_expected_types_are_extracted_flat(tmp_path: Path) -> None:
    files = {"a.dcm": b"A" * 10, "b.DCM": b"B" * 5}
    z = tmp_path / "s.zip"
    z.write_bytes(series_zip(files, extra={"readme.txt": b"x", "run.sh": b"rm -rf /",
                                           "sub/": b""}))
    out = safe_extract(z, tmp_path / "out", what="series 1.2")
    assert sorted(f.name for f in out) == ["a.dcm", "b.DCM"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.dcm", "b.DCM"]
    assert {f.name: f.md5 for f in out} == {n: hashlib.md5(d).hexdigest() for n, d in files.items()}


def test_wrong_md5_is_a_retryable_checksum_error(tmp_path: Path) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(series_zip({"a.dcm": b"A"}, wrong_md5="a.dcm"))
    with pytest.raises(ChecksumError, match=r"'a.dcm' has md5 .* but md5hashes.csv says 0{32}") as info:
        safe_extract(z, tmp_path / "out", what="series 1.2")
    assert info.value.retryable


def test_missing_md5_csv_fails_when_required(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "s.zip", {"a.dcm": b"A"})
    with pytest.raises(ChecksumError, match=r"carries no md5hashes.csv"):
        safe_extract(z, tmp_path / "out", what="series 1.2", require_md5=True)


def test_truncated_zip_is_retryable(tmp_path: Path) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(series_zip({"a.dcm": b"A" * 1000})[:-40])
    with pytest.raises(DownloadError, match=r"truncated or corrupt") as info:
        verify_zip(z, what="series 1.2")
    assert info.value.retryable


def test_parse_md5_csv_skips_header() -> None:
    text = "FileName,MD5Hash\nsub/1-01.dcm," + "a" * 32 + "\n"
    assert parse_md5_csv(text, what="s") == {"1-01.dcm": "a" * 32}
