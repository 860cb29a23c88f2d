"""Issue 11, item 1 (Prefect half): one writer per dataset, queued in Prefect.

Two flow runs that write one dataset take turns on its write slot
(`flows.concurrency.dataset_write_slot`); runs on different datasets do not wait; the
``reprocess`` deployments allow one run at a time and enqueue the rest. Flow runs are
started from threads against the session's test server.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect import flow

from flows.concurrency import (
    dataset_write_slot,
    ensure_write_limit,
    store_identity,
    write_limit_name,
)
from flows.config import DaskOptions, GridOptions, parse_config
from pipeline.errors import XraiError

from .conftest import CASES, SHAPE

#: Seconds a writer holds its slot in the serialisation tests.
HOLD_S = 0.5
#: Longest time a test waits for a thread or a barrier before failing (not hanging).
WAIT_S = 60.0

# Keyed by the test's own name: what a writing section does while it holds the slot
# (default: sleep `HOLD_S`), and the (dataset, entered, left) it records.
_SECTIONS: dict[str, Callable[[], None]] = {}
_INTERVALS: dict[str, list[tuple[str, float, float]]] = {}


@flow(name="xrai-test-writer")
def writer(store: str, dataset: str, key: str, timeout_seconds: float | None = None) -> None:
    """A flow whose writing section holds the dataset's slot while it runs."""
    with dataset_write_slot(store, dataset, timeout_seconds=timeout_seconds):
        entered = time.monotonic()
        _SECTIONS.get(key, lambda: time.sleep(HOLD_S))()
        _INTERVALS.setdefault(key, []).append((dataset, entered, time.monotonic()))


@flow(name="xrai-test-nested-writer")
def nested_writer(store: str, dataset: str, key: str) -> None:
    """Holds the slot and runs a subflow that asks for it again (as ``pipeline`` does)."""
    with dataset_write_slot(store, dataset):
        writer(store, dataset, key, timeout_seconds=5.0)


class Background:
    """A call running in its own thread (a fresh context, as a second process would
    have); `result` is its return value or the error it raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except BaseException as err:  # reported to the test
            self.result = err

    def join(self) -> object:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), f"still running after {WAIT_S} s"
        return self.result


def run_in_threads(*calls: Callable[[], object]) -> list[object]:
    """Start every call in its own thread at once; return results or raised errors."""
    running = [Background(c) for c in calls]
    return [r.join() for r in running]


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, *running: Background) -> None:
    """Until a captured record contains `text` (fails if a call ended or after WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not any(text in r.getMessage() for r in caplog.records):
        assert all(r.thread.is_alive() for r in running), [r.result for r in running]
        assert time.monotonic() < deadline, f"no log record with {text!r} after {WAIT_S} s"
        time.sleep(0.1)


def read_limit(name: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def set_limit(name: str, slots: int) -> None:
    """What an operator does on the UI's Concurrency page."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots))


class TestLimitName:
    @pytest.mark.parametrize("dataset", [
        "BraTS-2023", "UPENN_GBM.v2", "a b%c&d<e>f?g#h", "ümlaut", "x" * 300])
    def test_is_a_valid_prefect_name(self, dataset: str) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        name = write_limit_name("/data/xrai.zarr", dataset)
        GlobalConcurrencyLimitCreate(name=name, limit=1)  # Prefect's own validation
        # Nothing that Prefect bans (/ % & > <) or that breaks the API path (? # space).
        assert re.fullmatch(r"xrai-write:[0-9a-f]{12}:[A-Za-z0-9._~-]+", name), name
        assert len(name) <= len("xrai-write:") + 12 + 1 + 80 + 9

    def test_keeps_a_plain_dataset_name_readable(self) -> None:
        assert write_limit_name("/data/xrai.zarr", "BraTS-2023").endswith(":BraTS-2023")

    def test_spellings_of_one_store_share_a_name(self, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        store = tmp_path / "store.zarr"
        store.mkdir()
        link = tmp_path / "link.zarr"
        link.symlink_to(store)
        monkeypatch.chdir(tmp_path)
        spellings = [str(store), f"{store}/", "store.zarr", "./store.zarr", str(link),
                     f"file://{store}"]
        assert {write_limit_name(s, "ds") for s in spellings} == {write_limit_name(str(store),
                                                                                   "ds")}
        assert store_identity("S3://Bucket/x.zarr/") == "s3://Bucket/x.zarr"

    def test_other_stores_and_datasets_get_other_names(self, tmp_path: Path) -> None:
        names = {write_limit_name(str(tmp_path / "a.zarr"), "ds"),
                 write_limit_name(str(tmp_path / "b.zarr"), "ds"),
                 write_limit_name(str(tmp_path / "a.zarr"), "ds2"),
                 write_limit_name("s3://bucket/a.zarr", "ds"),
                 # made safe, these two would read alike without the hash suffix
                 write_limit_name(str(tmp_path / "a.zarr"), "a b"),
                 write_limit_name(str(tmp_path / "a.zarr"), "a_b")}
        assert len(names) == 6

    def test_empty_dataset_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"dataset name must not be empty, got ''"):
            write_limit_name("/data/xrai.zarr", "")


@pytest.mark.usefixtures("prefect_server")
class TestSerialisation:
    @pytest.fixture
    def key(self, request: pytest.FixtureRequest) -> Iterator[str]:
        yield request.node.name
        _INTERVALS.pop(request.node.name, None)
        _SECTIONS.pop(request.node.name, None)

    def test_second_writer_of_a_dataset_waits_for_the_first(
            self, tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture) -> None:
        store = str(tmp_path / "store.zarr")
        caplog.set_level(logging.INFO)
        inside, release, lock = threading.Event(), threading.Event(), threading.Lock()

        def section() -> None:  # the first writer in stays until the test releases it
            with lock:
                first = not inside.is_set()
                inside.set()
            if first:
                assert release.wait(WAIT_S)

        _SECTIONS[key] = section
        one = Background(lambda: writer(store, "same", key))
        assert inside.wait(WAIT_S), one.join()
        two = Background(lambda: writer(store, "same", key))
        # The second run is now asking for the slot the first holds: it has to wait.
        wait_for_log(caplog, "waiting for the write slot of dataset 'same'", one, two)
        assert len(_INTERVALS.get(key, [])) == 0
        release.set()
        assert [one.join(), two.join()] == [None, None]
        (_, _, leave1), (_, enter2, _) = sorted(_INTERVALS[key], key=lambda r: r[1])
        assert enter2 >= leave1, "the two writing sections overlapped"
        limit = read_limit(write_limit_name(store, "same"))
        assert (limit.limit, limit.active_slots) == (1, 0)  # created with one slot, released

    def test_writers_of_different_datasets_do_not_wait(self, tmp_path: Path, key: str) -> None:
        store = str(tmp_path / "store.zarr")
        # Each section waits at the barrier for the other: serialised runs would break it.
        barrier = threading.Barrier(2, timeout=WAIT_S / 2)
        _SECTIONS[key] = barrier.wait
        results = run_in_threads(lambda: writer(store, "first", key),
                                 lambda: writer(store, "second", key))
        assert results == [None, None]
        (_, _, leave1), (_, enter2, _) = sorted(_INTERVALS[key], key=lambda r: r[1])
        assert enter2 < leave1, "writers of different datasets did not overlap"

    def test_a_subflow_re_enters_the_slot_its_parent_holds(self, tmp_path: Path,
                                                           key: str) -> None:
        store = str(tmp_path / "store.zarr")
        nested_writer(store, "nested", key)  # would time out if the subflow waited
        assert [d for d, _, _ in _INTERVALS[key]] == ["nested"]

    def test_a_writer_that_cannot_wait_refuses_with_a_clear_message(self, tmp_path: Path,
                                                                    key: str) -> None:
        store = str(tmp_path / "store.zarr")
        name = write_limit_name(store, "busy")
        with dataset_write_slot(store, "busy"):  # held here; the writer runs in a thread
            [error] = run_in_threads(lambda: writer(store, "busy", key, timeout_seconds=1.0))
        with pytest.raises(TimeoutError,
                           match=rf"dataset 'busy' in store '{re.escape(store)}' is being "
                                 rf"written by another run: its write slot \(global "
                                 rf"concurrency limit '{re.escape(name)}'\) was not free "
                                 r"within 1\.0 s"):
            raise error
        assert key not in _INTERVALS
        assert read_limit(name).active_slots == 0

    def test_an_existing_limit_is_kept(self, tmp_path: Path) -> None:
        name = write_limit_name(str(tmp_path / "store.zarr"), "raised")
        assert ensure_write_limit(name).limit == 1
        set_limit(name, 2)
        assert ensure_write_limit(name).limit == 2  # an operator's setting stays

    def test_a_paused_dataset_refuses_with_a_clear_message(self, tmp_path: Path) -> None:
        store = str(tmp_path / "store.zarr")
        name = write_limit_name(store, "paused")
        ensure_write_limit(name)
        set_limit(name, 0)  # an operator stops writes to the dataset
        with pytest.raises(XraiError, match=rf"writes to dataset 'paused' in store "
                                            rf"'{re.escape(store)}' are paused: global "
                                            rf"concurrency limit '{re.escape(name)}' has 0 "
                                            r"slots \(set it to 1"), \
                dataset_write_slot(store, "paused"):
            pytest.fail("the section ran although writes are paused")


@pytest.mark.usefixtures("prefect_server")
def test_ingest_flow_waits_while_the_dataset_is_being_written(
        tmp_path: Path, phantom_source: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flows.ingest_flow import ingest_flow
    from pipeline.errors import StoreError
    from pipeline.store import DatasetStore

    src = shutil.copytree(phantom_source, tmp_path / "src")
    store = str(tmp_path / "store.zarr")
    caplog.set_level(logging.INFO)
    with dataset_write_slot(store, "Ph-Wait"):  # another writer holds the dataset
        ingest = Background(lambda: ingest_flow(
            str(src), store, "Ph-Wait", layout="brats", grid=GridOptions(shape=SHAPE),
            dask=DaskOptions(workers=1, processes=False)))
        wait_for_log(caplog, "waiting for the write slot of dataset 'Ph-Wait'", ingest)
        with pytest.raises(StoreError, match=r"no dataset 'Ph-Wait'"):
            DatasetStore.open(store, "Ph-Wait")  # nothing written while it waits
    result = ingest.join()
    assert len(result.ingested) == CASES, result


@pytest.mark.usefixtures("prefect_server")
def test_reprocess_deployments_enqueue_a_second_run(tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.deployments import build_deployments, deployment_name

    config = parse_config({"datasets": [
        {"name": "one-at-a-time", "source": {"kind": "phantom", "path": str(tmp_path / "p")},
         "store": str(tmp_path / "s.zarr"), "out_dir": str(tmp_path / "o"),
         "schedule": {"interval_seconds": 3600}}]})
    for deployment in build_deployments(config):
        deployment.apply()
    with get_client(sync_client=True) as client:
        applied = client.read_deployment_by_name(f"reprocess/{deployment_name('one-at-a-time')}")
    assert applied.global_concurrency_limit.limit == 1
    assert applied.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
