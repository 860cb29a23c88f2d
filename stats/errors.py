"""The project's error root and the errors of ``stats/``.

Every error condition of the project derives from `XraiError`, so one ``except XraiError``
(the CLI's) handles all of them. The root lives here, at the bottom of the dependency
order (``stats/`` <- ``pipeline/`` <- ``flows/``), so that ``stats/`` can raise project
errors without importing ``pipeline/``; ``pipeline.errors`` re-exports both names.
This module imports nothing: importing the error root pulls in neither pydantic nor the
manifest schema.

Every message says *what* was wrong, *where* (file, case id or field path), the offending
value and what was expected.
"""

from __future__ import annotations

__all__ = ["ManifestError", "XraiError"]


class XraiError(Exception):
    """Root of the project's own error conditions."""


class ManifestError(XraiError, ValueError):
    """A manifest (or the statistics it is built from) is invalid; the message names the
    file, the field path and the offending value.

    Also a `ValueError` (what it derived from before it joined `XraiError`), so callers
    that catch ``ValueError`` for a bad value keep catching it.
    """
