"""Checks of command-line values shared by the ``xrai`` commands (typer callbacks).

Each raises `typer.BadParameter`, so a bad value is a usage error: click prints
``Invalid value for '--x': ...`` and the command exits 2 before it does anything.
Conditions of the data (an unreadable store, a damaged case) are not checked here; the
commands report them as one-line errors with exit 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.grid import people

__all__ = ["check_dataset_name", "check_device", "check_store", "people"]


def check_store(value: str | None) -> str | None:
    """A local store path must not be a regular file (a Zarr store is a folder).

    fsspec URLs (``scheme://...``) are passed on unchecked.
    """
    if value is None or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{value!r} is a file, not a Zarr store (a folder or an "
                                 "fsspec URL)")
    return value


def check_dataset_name(value: str | None) -> str | None:
    """A dataset name is one plain store key: not empty, no ``/``, not starting with ``_``
    or ``.`` (the rule `pipeline.store.DatasetStore` enforces)."""
    if value is None:
        return value
    if not value or "/" in value or "\\" in value or value.startswith(("_", ".")):
        raise typer.BadParameter(f"{value!r} is not a plain name (no '/', not starting "
                                 "with '_' or '.'), e.g. upenn")
    return value


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where it is available
    (`pipeline.train.loop.select_device`)."""
    import re

    from pipeline.train.options import DEVICE_PATTERN

    if not re.match(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    from pipeline.train.loop import select_device

    try:
        select_device(value)
    except ValueError as err:
        raise typer.BadParameter(f"{value!r}: CUDA is not available on this machine"
                                 if "CUDA" in str(err) else str(err)) from err
    return value
