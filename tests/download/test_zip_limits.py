"""Issue 11, item 7: zip bombs are refused before inflating, and extraction is capped."""

from __future__ import annotations

import hashlib
import struct
import zipfile
from pathlib import Path

import pytest

from pipeline.download import safezip
from pipeline.download.errors import DownloadError, UnsafeArchiveError
from pipeline.download.safezip import (
    MAX_COMPRESSION_RATIO,
    RATIO_MIN_BYTES,
    ZipLimits,
    check_archive_sizes,
    safe_extract,
    verify_zip,
)
from tests.conftest import peak_bytes

from ._fakes import series_zip, tiny_dicom

MiB = 1 << 20


def write_zip(path: Path, members: dict[str, bytes | int]) -> Path:
    """A deflated zip; an int member is that many MiB of zeros, streamed 1 MiB at a time."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if isinstance(data, int):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as dst:
                    for _ in range(data):
                        dst.write(bytes(MiB))
            else:
                zf.writestr(name, data)
    return path


@pytest.fixture
def bomb(tmp_path: Path) -> Path:
    """A ~20 kB zip whose member 'bomb.dcm' inflates to 20 MiB of zeros (~1028:1)."""
    z = write_zip(tmp_path / "s.zip", {"ok.dcm": tiny_dicom("P", "1.2", "1.2.3", 1), "bomb.dcm": 20})
    assert z.stat().st_size < 40_000
    return z


class TestZipBomb:
    def test_issue11_zip_bomb_is_refused_naming_the_member(self, tmp_path: Path, bomb: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        def never(self, *args, **kwargs):
            raise AssertionError("a member was inflated")

        monkeypatch.setattr(zipfile.ZipFile, "open", never)
        dest = tmp_path / "out"
        with pytest.raises(
            UnsafeArchiveError,
            match=r"series 1\.2\.3: archive 's\.zip' member 'bomb\.dcm' inflates \d+ bytes to "
                  rf"20971520 \(ratio 10\d\d:1\); the limit is {MAX_COMPRESSION_RATIO}:1 "
                  r"\(XRAI_ZIP_MAX_RATIO\)",
        ) as info:
            safe_extract(bomb, dest, what="series 1.2.3")
        assert not info.value.retryable
        assert not dest.exists()

    def test_verify_zip_refuses_the_bomb_before_its_crc_test(
            self, bomb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        def never(self):
            raise AssertionError("testzip inflated the archive")

        monkeypatch.setattr(zipfile.ZipFile, "testzip", never)
        with pytest.raises(UnsafeArchiveError, match=r"member 'bomb\.dcm' inflates"):
            verify_zip(bomb, what="series 1.2.3")

    def test_ratio_limit_is_overridable(self, bomb: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XRAI_ZIP_MAX_RATIO", "2000")
        out = safe_extract(bomb, tmp_path / "out", what="series 1.2.3")
        assert {f.name: f.size for f in out}["bomb.dcm"] == 20 * MiB

    def test_small_members_are_not_ratio_checked(self, tmp_path: Path) -> None:
        # 4 MiB of zeros is ~1028:1 but under RATIO_MIN_BYTES: a blank slice, not a bomb.
        assert 4 * MiB <= RATIO_MIN_BYTES
        z = write_zip(tmp_path / "s.zip", {"blank.dcm": 4})
        out = safe_extract(z, tmp_path / "out", what="series 1.2.3")
        assert [(f.name, f.size) for f in out] == [("blank.dcm", 4 * MiB)]
        assert out[0].md5 == hashlib.md5(bytes(4 * MiB)).hexdigest()


class TestSizeLimits:
    def test_member_over_the_limit(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        z = write_zip(tmp_path / "s.zip", {"a.dcm": b"x" * 1000, "b.dcm": b"y" * 1001})
        monkeypatch.setenv("XRAI_ZIP_MAX_MEMBER_BYTES", "1000")
        with pytest.raises(
            UnsafeArchiveError,
            match=r"archive 's\.zip' member 'b\.dcm' declares 1001 bytes; the limit is 1000 "
                  r"\(XRAI_ZIP_MAX_MEMBER_BYTES\)",
        ):
            safe_extract(z, tmp_path / "out", what="series 1.2.3")
        assert not (tmp_path / "out").exists()

    def test_archive_total_over_the_limit(self, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        z = write_zip(tmp_path / "s.zip", {f"{i}.dcm": bytes([i]) * 600 for i in range(3)})
        monkeypatch.setenv("XRAI_ZIP_MAX_TOTAL_BYTES", "1500")
        with pytest.raises(
            UnsafeArchiveError,
            match=r"archive 's\.zip' members up to '2\.dcm' declare 1800 bytes; the limit is 1500 "
                  r"\(XRAI_ZIP_MAX_TOTAL_BYTES\)",
        ):
            verify_zip(z, what="series 1.2.3")

    def test_overlapping_members_are_refused(self, tmp_path: Path) -> None:
        z = write_zip(tmp_path / "s.zip", {"a.dcm": b"A" * 100, "b.dcm": b"B" * 100})
        raw = bytearray(z.read_bytes())
        # Point b.dcm's central-directory record at a.dcm's local record (offset 0): two
        # names for one body, the trick of the overlapping-entry zip bomb.
        second = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 4)
        raw[second + 42 : second + 46] = struct.pack("<I", 0)
        z.write_bytes(bytes(raw))
        with pytest.raises(UnsafeArchiveError, match=r"members 'a\.dcm' and 'b\.dcm' overlap"):
            safe_extract(z, tmp_path / "out", what="series 1.2.3")

    def test_bad_environment_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XRAI_ZIP_MAX_TOTAL_BYTES", "-5")
        with pytest.raises(ValueError, match=r"XRAI_ZIP_MAX_TOTAL_BYTES='-5' is not a positive"):
            ZipLimits.from_env()


class TestStreamingCap:
    def test_cap_holds_when_the_declared_sizes_are_not_checked(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # As if the declaration had passed: extraction itself counts and stops at the cap.
        z = write_zip(tmp_path / "s.zip", {"ok.dcm": b"o" * 100, "big.dcm": b"b" * 5000})
        monkeypatch.setattr(safezip, "check_archive_sizes", lambda *a, **k: 0)
        monkeypatch.setenv("XRAI_ZIP_MAX_MEMBER_BYTES", "1000")
        dest = tmp_path / "out"
        with pytest.raises(
            UnsafeArchiveError,
            match=r"archive 's\.zip' member 'big\.dcm' inflates past 1000 bytes "
                  r"\(XRAI_ZIP_MAX_MEMBER_BYTES\); extraction stopped",
        ):
            safe_extract(z, dest, what="series 1.2.3")
        assert sorted(p.name for p in dest.iterdir()) == ["ok.dcm"]  # partial file deleted

    def test_total_cap_while_streaming(self, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        z = write_zip(tmp_path / "s.zip", {f"{i}.dcm": bytes([i]) * 600 for i in range(3)})
        monkeypatch.setattr(safezip, "check_archive_sizes", lambda *a, **k: 0)
        monkeypatch.setenv("XRAI_ZIP_MAX_TOTAL_BYTES", "1500")
        with pytest.raises(UnsafeArchiveError,
                           match=r"member '2\.dcm' inflates past 300 bytes \(XRAI_ZIP_MAX_TOTAL"):
            safe_extract(z, tmp_path / "out", what="series 1.2.3")

    def test_a_lying_file_size_inflates_no_further(self, tmp_path: Path) -> None:
        # The records say 1000 bytes; the deflate stream holds 50 MiB of zeros.
        z = write_zip(tmp_path / "s.zip", {"liar.dcm": 50})
        raw = bytearray(z.read_bytes())
        central = raw.index(b"PK\x01\x02")  # uncompressed size at offset 24 (APPNOTE 4.3.12)
        assert struct.unpack("<I", raw[central + 24 : central + 28]) == (50 * MiB,)
        raw[central + 24 : central + 28] = struct.pack("<I", 1000)
        z.write_bytes(bytes(raw))
        dest = tmp_path / "out"
        with pytest.raises(DownloadError, match=r"member 'liar\.dcm' is corrupt .*CRC") as info:
            safe_extract(z, dest, what="series 1.2.3")
        assert info.value.retryable
        assert list(dest.iterdir()) == []  # the partial file is deleted
        assert peak_bytes(lambda: safe_extract(z, tmp_path / "again", what="s")) < 8 * MiB


def test_ordinary_series_zip_with_md5_still_extracts(tmp_path: Path) -> None:
    files = {f"1-{i:02d}.dcm": tiny_dicom("P", "1.2", "1.2.3", i) for i in range(1, 4)}
    z = tmp_path / "s.zip"
    z.write_bytes(series_zip(files))
    verify_zip(z, what="series 1.2.3")
    with zipfile.ZipFile(z) as zf:
        assert check_archive_sizes(zf, what="series 1.2.3") == sum(
            i.file_size for i in zf.infolist())
    out = safe_extract(z, tmp_path / "out", what="series 1.2.3", require_md5=True)
    assert {f.name: f.md5 for f in out} == {n: hashlib.md5(d).hexdigest() for n, d in files.items()}


def test_oversized_md5_csv_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(series_zip({"a.dcm": b"A"}))
    monkeypatch.setattr(safezip, "MAX_MD5_CSV_BYTES", 10)
    with pytest.raises(UnsafeArchiveError,
                       match=r"member 'md5hashes\.csv' inflates past 10 bytes \(MAX_MD5_CSV_BYTES\)"):
        safe_extract(z, tmp_path / "out", what="series 1.2.3")
