"""Tests of pipeline.fsio, the one atomic writer (issue 12, items 3 and 9)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.fsio import open_atomic, write_bytes_atomic, write_text_atomic


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


class TestPermissions:
    """Issue 12, item 9: output files get 0666 & ~umask, like a plain open(), not
    mkstemp's 0600."""

    @pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
    @pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600),
                                                    (0o002, 0o664)])
    @pytest.mark.parametrize("writer", ["text", "bytes", "open"])
    def test_issue12_mode_follows_the_umask(self, tmp_path: Path, umask: None, mask: int,
                                            expected: int, writer: str) -> None:
        os.umask(mask)
        path = tmp_path / "stats.json"
        if writer == "text":
            write_text_atomic(path, "{}\n")
        elif writer == "bytes":
            write_bytes_atomic(path, b"{}\n")
        else:
            with open_atomic(path, "wb") as fh:
                fh.write(b"{}\n")
        assert mode_of(path) == expected  # 0o666 & ~mask
        # the same as a file created the ordinary way under that umask
        plain = tmp_path / "plain.json"
        plain.write_text("{}\n")
        assert mode_of(plain) == mode_of(path)

    @pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
    def test_issue12_replacing_a_private_file_gives_the_usual_mode(self, tmp_path: Path,
                                                                   umask: None) -> None:
        os.umask(0o022)
        path = tmp_path / "manifest.json"
        path.write_text("old")
        path.chmod(0o600)
        write_text_atomic(path, "new")
        assert mode_of(path) == 0o644


def write_then_raise(path: Path, error: BaseException) -> None:
    """Write part of a file through `open_atomic`, then fail inside the block."""
    with open_atomic(path, "w") as fh:
        fh.write("half a docu")
        raise error


class TestAtomicity:
    def test_writes_and_replaces(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / "out.txt"  # missing folders are created
        assert write_text_atomic(path, "one\n") == path
        assert path.read_text(encoding="utf-8") == "one\n"
        write_text_atomic(path, "two ü\r\n")
        assert path.read_bytes() == "two ü\r\n".encode()  # no newline translation
        write_bytes_atomic(path, b"\x00\xff")
        assert path.read_bytes() == b"\x00\xff"
        assert siblings(path) == ["out.txt"]  # no temporary file left behind

    def test_failure_keeps_the_old_file_and_removes_the_temporary(self,
                                                                  tmp_path: Path) -> None:
        path = tmp_path / "out.json"
        path.write_text("old")
        with pytest.raises(RuntimeError, match="boom"):
            write_then_raise(path, RuntimeError("boom"))
        assert path.read_text() == "old"
        assert siblings(path) == ["out.json"]

    def test_interrupt_removes_the_temporary(self, tmp_path: Path) -> None:
        path = tmp_path / "out.bin"
        with pytest.raises(KeyboardInterrupt, match="stop"):
            write_then_raise(path, KeyboardInterrupt("stop"))
        assert siblings(path) == []

    def test_failed_replace_removes_the_temporary(self, tmp_path: Path) -> None:
        path = tmp_path / "target"
        path.mkdir()  # os.replace of a file onto a non-empty folder fails
        (path / "keep").write_text("x")
        with pytest.raises(OSError, match="target"):  # EISDIR or ENOTEMPTY, naming it
            write_text_atomic(path, "text")
        assert siblings(path) == ["target"]

    def test_text_encoding_error_removes_the_temporary(self, tmp_path: Path) -> None:
        path = tmp_path / "out.txt"
        with pytest.raises(UnicodeEncodeError, match="ascii"):
            write_text_atomic(path, "ü", encoding="ascii")
        assert siblings(path) == []

    def test_rejects_other_modes(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"mode must be 'w' or 'wb', got 'a'"), \
                open_atomic(tmp_path / "x", "a"):  # type: ignore[arg-type]
            pass
        assert list(tmp_path.iterdir()) == []


def test_issue12_no_other_atomic_writer() -> None:
    """Issue 12, item 3: one implementation. Outside pipeline/fsio.py only the lease's
    exclusive create (a hard link, deliberately) and the downloads' verify-then-install
    of streamed ``.part`` files and staged folders may call os.replace / os.rename, and
    nothing uses tempfile.mkstemp / NamedTemporaryFile."""
    import re

    root = Path(__file__).resolve().parents[1]
    allowed_replace = {"pipeline/fsio.py", "pipeline/download/idc.py",
                       "pipeline/download/filelist.py", "pipeline/download/plan.py"}
    found = []
    for folder in ("pipeline", "stats", "flows", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text(encoding="utf-8")
            if re.search(r"\bmkstemp\(|NamedTemporaryFile\(", text):
                found.append(f"{rel}: tempfile")
            if rel not in allowed_replace and re.search(r"os\.(replace|rename)\(|"
                                                        r"\.replace\(\w+\)$", text, re.M):
                found.append(f"{rel}: os.replace/rename")
    assert found == []
