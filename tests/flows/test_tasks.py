"""Task bodies called directly (``task.fn``): no Prefect server."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from flows.config import DaskOptions
from flows.tasks import (
    case_stats,
    discover_cases,
    ingest_one,
    merge_stats,
    stats_plan,
    task_runner,
    worth_retrying,
    write_phantom_source,
)
from pipeline.download.errors import ChecksumError, DownloadError
from pipeline.errors import StoreError
from pipeline.ingest import ingest_session
from pipeline.store import DatasetStore, Grid

from .conftest import CASES, SHAPE, PlainRun


@pytest.mark.parametrize(("exc", "retry"), [
    (OSError("disk"), True), (TimeoutError("slow"), True), (RuntimeError("s3"), True),
    (StoreError("no committed case"), False), (ValueError("bad"), False),
    (DownloadError("s", "reset", retryable=True), True),
    (DownloadError("s", "403", retryable=False), False),
    (ChecksumError("f", "sha256 differs"), True),  # a mismatch in transit may pass
])
def test_only_io_failures_are_retried(exc: BaseException, retry: bool) -> None:
    assert worth_retrying(exc) is retry


def test_task_runner_local_or_address() -> None:
    local = task_runner(DaskOptions(workers=3, processes=False))
    assert local.address is None
    assert local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["processes"] is False
    remote = task_runner(DaskOptions(address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"


def test_phantom_source_is_written_once(tmp_path: Path) -> None:
    folder = write_phantom_source.fn(str(tmp_path / "p"), 2, 0, SHAPE)
    first = Path(folder, "XRAI-PHANTOM-00001-000", "XRAI-PHANTOM-00001-000-seg.nii.gz")
    mtime = first.stat().st_mtime_ns
    assert write_phantom_source.fn(folder, 2, 0, SHAPE) == folder
    assert first.stat().st_mtime_ns == mtime


def test_ingest_then_stats_are_keyed_by_content(tmp_path: Path, phantom_source: Path) -> None:
    layout, cases = discover_cases.fn(str(phantom_source), "auto")
    assert layout == "brats"
    assert len(cases) == CASES + 1
    store = str(tmp_path / "s.zarr")
    case = cases[0]
    with ingest_session([case], store, "t", grid=Grid(shape=SHAPE), collection=layout) as s:
        job, = s.jobs
        assert job.committed_hash is None
        assert ingest_one.fn(job).status == "ingested"
    with ingest_session([case], store, "t", grid=Grid(shape=SHAPE), collection=layout) as s:
        job, = s.jobs
        content_hash = DatasetStore.open(store, "t").committed()[case.case_id].content_hash
        assert job.committed_hash == content_hash
        assert ingest_one.fn(job).status == "unchanged"
        assert ingest_one.fn(job, recompute=True).status == "ingested"

    plan = stats_plan.fn(store, "t")
    assert plan.computed_ids == [case.case_id]
    assert plan.jobs[0].content_hash == content_hash
    partials = case_stats.fn(plan.jobs[0])
    assert (partials.case_id, partials.content_hash) == (case.case_id, content_hash)
    again = stats_plan.fn(store, "t")
    assert (again.computed_ids, again.reused_ids) == ([], [case.case_id])
    assert stats_plan.fn(store, "t", recompute=True).computed_ids == [case.case_id]
    out = tmp_path / "stats.json"
    stats = merge_stats.fn(plan, [partials], str(out))
    assert stats.cases == [case.case_id]
    assert out.is_file()


def test_ingest_session_keeps_slots_and_reports_committed(tmp_path: Path, plain_run: PlainRun,
                                                         phantom_source: Path) -> None:
    store = str(tmp_path / "copy.zarr")
    shutil.copytree(plain_run.store_url, store)
    committed = DatasetStore.open(store, plain_run.dataset).committed()
    # the run was compacted: its committed cases fill the first slots, the rest is free
    assert sorted(r.slot for r in committed.values()) == list(range(len(committed)))
    _, cases = discover_cases.fn(str(phantom_source), "auto")
    new = dataclasses.replace(cases[0], case_id="XRAI-NEW-1")
    known = [c for c in cases if c.case_id in committed]
    with ingest_session([*known, new], store, plain_run.dataset, grid=Grid(shape=SHAPE),
                        collection="brats") as session:
        jobs = {job.case.case_id: job for job in session.jobs}
    for cid, rec in committed.items():
        assert (jobs[cid].slot, jobs[cid].committed_hash) == (rec.slot, rec.content_hash)
    assert (jobs["XRAI-NEW-1"].slot, jobs["XRAI-NEW-1"].committed_hash) == (len(committed), None)
    with pytest.raises(StoreError, match=r"was created with grid"), \
            ingest_session(known, store, plain_run.dataset, grid=Grid(shape=(48, 48, 32))):
        pass


def test_issue12_task_runner_keeps_distributed_quiet_but_for_warnings(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    # As in a flow process: Prefect configured the root logger before distributed was
    # imported, so distributed's INFO messages (cluster start and stop) propagate to
    # Prefect's console handler.
    distributed = logging.getLogger("distributed")
    saved = distributed.level, distributed.propagate
    distributed.setLevel(logging.INFO)
    distributed.propagate = True
    try:
        runner = task_runner(DaskOptions(workers=1, processes=False))
        with caplog.at_level(logging.DEBUG), runner:
            runner.client  # noqa: B018 - starts the local cluster
            logging.getLogger("distributed.scheduler").info("cluster chatter")
            logging.getLogger("distributed.worker").warning("worker trouble")
        assert distributed.level == logging.INFO  # restored on exit
    finally:
        distributed.setLevel(saved[0])
        distributed.propagate = saved[1]
    seen = [(r.name, r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("distributed")]
    assert ("distributed.worker", logging.WARNING, "worker trouble") in seen
    assert [s for s in seen if s[1] < logging.WARNING] == []


def test_issue12_local_workers_report_to_the_flows_temporary_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PREFECT_API_URL, worker processes get the address of the temporary server
    the flow process started, instead of each starting one of its own."""
    from types import SimpleNamespace

    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.dask_runner import worker_environment

    client = SimpleNamespace(api_url="http://127.0.0.1:8564/api/")
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: SimpleNamespace(client=client)))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert worker_environment() == {"PREFECT_API_URL": "http://127.0.0.1:8564/api"}
        client.api_url = "http://ephemeral-prefect/api"  # an in-process app: unreachable
        assert worker_environment() == {}
    client.api_url = "http://127.0.0.1:8564/api/"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert worker_environment() == {}  # the workers inherit the environment's
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: None))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert worker_environment() == {}  # not in a flow run
