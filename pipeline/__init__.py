"""XRAI pipeline: ingest, store, statistics runner, trainer and the ``xrai`` command."""

from __future__ import annotations


def code_version() -> str:
    """Installed version of the ``xrai-pipeline`` distribution (recorded in provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xrai-pipeline")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"
