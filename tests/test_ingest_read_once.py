"""Issue 14: ingest reads each source file once, hashing it while it is there to decode."""

from __future__ import annotations

import builtins
import gzip
import io
from collections import Counter
from pathlib import Path

import pytest

from pipeline.ingest import ingest_cases
from pipeline.sources.base import CaseSource, SourceFiles
from pipeline.sources.local import discover
from pipeline.sources.phantom import write_phantom
from pipeline.store import DatasetStore, Grid

GRID = Grid(spacing=(1.5, 1.5, 1.5), shape=(64, 64, 48))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Three phantom cases: gzip, uncompressed '.nii', and one with a truncated channel."""
    root = tmp_path_factory.mktemp("src")
    write_phantom(root, cases=3, seed=5, shape=(48, 48, 32))
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for path in sorted(folders[1].glob("*.nii.gz")):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    bad = next(folders[2].glob("*-t1c.nii.gz"))
    bad.write_bytes(bad.read_bytes()[:5000])
    return root


@pytest.fixture
def opens(monkeypatch) -> Counter:
    """Counts Python-level open() calls per path while the test runs."""
    counts: Counter = Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            counts[Path(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return counts


def _cases(root: Path) -> list[CaseSource]:
    return discover(root, layout="brats")


def _sources(cases: list[CaseSource]) -> list[Path]:
    return [p for case in cases for p in case.files()]


def test_issue14_a_changed_case_is_read_from_disk_once(source, tmp_path, opens):
    cases = _cases(source)
    opens.clear()
    report = ingest_cases(cases, str(tmp_path / "s.zarr"), "ds", grid=GRID)
    assert [o.status for o in report.outcomes] == ["ingested", "ingested", "quarantined"]
    assert {p: opens[p] for p in _sources(cases)} == dict.fromkeys(_sources(cases), 1)


def test_issue14_an_unchanged_case_is_hashed_without_decoding(source, tmp_path, opens,
                                                              monkeypatch):
    cases = _cases(source)
    url = str(tmp_path / "s.zarr")
    ingest_cases(cases, url, "ds", grid=GRID)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an unchanged case was decoded")

    monkeypatch.setattr("pipeline.ingest.read_case", no_decoding)
    monkeypatch.setattr("pipeline.io.nifti._open_image", no_decoding)
    opens.clear()
    again = ingest_cases(cases, url, "ds", grid=GRID)
    assert [o.status for o in again.outcomes] == ["unchanged", "unchanged", "quarantined"]
    assert {p: opens[p] for p in _sources(cases)} == dict.fromkeys(_sources(cases), 1)


def test_issue14_decoding_from_memory_stores_what_decoding_from_the_files_did(
        source, tmp_path, monkeypatch):
    """Same content hashes, stored voxels (checksums), records and quarantine reasons."""
    cases = _cases(source)
    ours = str(tmp_path / "memory.zarr")
    ingest_cases(cases, ours, "ds", grid=GRID)

    def hashed_then_read_from_paths(self: CaseSource, **kwargs) -> SourceFiles:
        # the previous order: sha256 of each file's bytes, then decoding from the paths
        return SourceFiles(hashes=self.file_hashes(), data={})

    monkeypatch.setattr(CaseSource, "read_files", hashed_then_read_from_paths)
    before = str(tmp_path / "paths.zarr")
    ingest_cases(cases, before, "ds", grid=GRID)

    def summary(url: str) -> tuple[dict, dict]:
        store = DatasetStore.open(url, "ds")
        skip = {"ingested_at", "code_version"}
        records = {cid: (r.content_hash, {k: v for k, v in r.attrs.items() if k not in skip})
                   for cid, r in store.committed().items()}
        return records, store.quarantined()

    got, want = summary(ours), summary(before)
    assert len(want[0]) == 2
    assert len(want[1]) == 1
    assert got == want
