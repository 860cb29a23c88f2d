"""Atomic file writes: the one implementation every writer of a file in the project uses.

A file is written under a hidden temporary name in its own folder (same file system),
flushed and fsync'ed, moved over the target with `os.replace`, and the folder is fsync'ed
so the new name survives a crash too. A run killed at any moment leaves either the old
file or the new one, never half of one; on any failure (including ``KeyboardInterrupt``)
the temporary file is removed.

Permissions are those of a plain ``open(path, "w")``: the temporary file is created with
mode ``0o666`` and the process umask applies (``0o644`` under umask 022, ``0o600`` under
077), so colleagues on a shared server can read statistics, manifests and reports.
(`tempfile.mkstemp`, which this replaces, always creates ``0o600``.) Replacing a file
gives it these permissions, whatever the old file had.

`open_atomic` serves writers that need a file object (``torch.save``, ``np.savez``,
``savefig``, ``csv``); `write_text_atomic` and `write_bytes_atomic` write a whole
document.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["open_atomic", "write_bytes_atomic", "write_text_atomic"]

#: Attempts at a fresh temporary name before giving up (each name has 32 random bits).
_ATTEMPTS = 100


def _create_temp(target: Path) -> tuple[int, Path]:
    """Create (exclusively) a hidden temporary file beside ``target``; its fd and path.

    Mode ``0o666`` filtered by the umask, as `open` would create the target itself.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(
        os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {str(target)!r}: "
                          f"{_ATTEMPTS} random names were all taken")


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable. Best effort: some file systems (and Windows) refuse to
    open or fsync a folder; the file's contents are already on disk by then."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike[str], mode: Literal["w", "wb"] = "wb", *,
                encoding: str = "utf-8", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a file for writing that appears at ``path`` only when the block succeeds.

    Parameters
    ----------
    path : str or PathLike
        The file to create or replace; missing parent folders are created.
    mode : {"wb", "w"}, default "wb"
        Binary or text.
    encoding : str, default "utf-8"
        Text mode only.
    newline : str, optional
        Text mode only, as `open`'s (``""`` for the `csv` module).

    Yields
    ------
    file object
        Writing to it writes the temporary file. When the block ends normally the file is
        fsync'ed and moved over ``path``; when it raises, the temporary file is removed,
        ``path`` is unchanged and the exception propagates.

    Raises
    ------
    ValueError
        If ``mode`` is not ``"w"`` or ``"wb"``.
    OSError
        If the folder cannot be created or written (the message names the file).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        if mode == "wb":
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); return the path."""
    with open_atomic(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *,
                      encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); return the path.

    Newlines are written as given (no translation), so the file is the same on every
    platform.
    """
    with open_atomic(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)
