"""Fixtures of the flow tests: one Prefect test server for the session, tiny phantom data.

Prefect's test harness builds a new SQLite database and starts a server subprocess
(15-19 s on two cores), so one session-wide harness serves every flow test; task
bodies are tested directly with ``task.fn(...)``. The server's API URL is also put in
the environment so that Dask worker processes report to it instead of starting their
own temporary servers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before prefect is imported: no telemetry, a private home, a generous startup timeout.
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xrai-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"

#: Smallest phantom field of view (`pipeline.sources.phantom.MIN_SHAPE`): fast to ingest.
SHAPE = (40, 40, 32)
CASES = 3


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A Prefect server on a temporary database for the whole session; its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def phantom_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom cases plus one broken case (no segmentation) in BraTS 2023 layout.

    Built once per session; tests that change the source copy it first.
    """
    from pipeline.sources.phantom import case_id, write_phantom

    root = tmp_path_factory.mktemp("phantom") / "src"
    write_phantom(root, cases=CASES, seed=0, shape=SHAPE)
    broken = root / "XRAI-PHANTOM-00099-000"
    broken.mkdir()
    good = root / case_id(0)
    for ch in ("t1n", "t1c", "t2w", "t2f"):
        shutil.copy(good / f"{case_id(0)}-{ch}.nii.gz", broken / f"{broken.name}-{ch}.nii.gz")
    return root


def copy_source(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


class PlainRun:
    """The pipeline's plain functions run once on `phantom_source` (no Prefect)."""

    def __init__(self, root: Path, source: Path) -> None:
        from pipeline.ingest import ingest
        from pipeline.stats_runner import run_stats
        from pipeline.store import DatasetStore, Grid
        from stats.manifest import build_manifest

        self.store_url = str(root / "store.zarr")
        self.dataset = "plain"
        self.report = ingest(source, self.store_url, self.dataset, layout="brats",
                             grid=Grid(spacing=(1.0, 1.0, 1.0), shape=SHAPE))
        self.stats = run_stats(self.store_url, self.dataset, scheduler="synchronous")
        self.manifest = build_manifest(self.stats, seed=0)
        self.store = DatasetStore.open(self.store_url, self.dataset)


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory: pytest.TempPathFactory, phantom_source: Path) -> PlainRun:
    return PlainRun(tmp_path_factory.mktemp("plain"), phantom_source)
