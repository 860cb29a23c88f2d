"""One error root (issue 12, item 4): every project error is an XraiError, and importing
the errors module loads neither pydantic nor the manifest schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.errors
import stats.errors
from pipeline.errors import CaseRejected, ManifestError, StoreError, VolumeError, XraiError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["pipeline.errors", "stats.errors"])
def test_issue12_importing_the_errors_loads_no_pydantic_or_manifest(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pydantic', 'pydantic_core') or m in ('stats.manifest', 'stats.rules')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_issue12_manifest_error_is_an_xrai_error() -> None:
    assert issubclass(ManifestError, XraiError)
    assert issubclass(ManifestError, ValueError)  # as before: `except ValueError` still works
    with pytest.raises(XraiError, match=r"m\.json: field loss"):
        raise ManifestError("m.json: field loss")


def test_one_root_and_one_class_per_name() -> None:
    assert pipeline.errors.XraiError is stats.errors.XraiError
    assert pipeline.errors.ManifestError is stats.errors.ManifestError
    for cls in (CaseRejected, StoreError, VolumeError):
        assert issubclass(cls, XraiError)


def test_every_project_exception_is_under_the_root() -> None:
    """Every exception class defined in the project's packages derives from XraiError
    (found by importing the modules that define them)."""
    import inspect

    from flows.config import ConfigError
    from flows.e2e import CheckFailed
    from pipeline.download import errors as download_errors
    from pipeline.train.loop import TrainingDiverged

    classes = [CheckFailed, ConfigError, TrainingDiverged,
               *(c for _, c in inspect.getmembers(download_errors, inspect.isclass)
                 if issubclass(c, BaseException) and c.__module__ == download_errors.__name__)]
    assert [c.__name__ for c in classes if not issubclass(c, XraiError)] == []
