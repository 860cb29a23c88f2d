"""The flows on phantom data under Prefect's test harness (one server for the session).

Per-case work runs on the Dask task runner with one thread worker (no extra process
per worker), except where a test says otherwise.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.config import (
    DaskOptions,
    DatasetConfig,
    DownloadSource,
    GridOptions,
    LocalSource,
    PhantomSource,
    TrainOptions,
    parse_config,
)
from pipeline.errors import StoreError

from .conftest import CASES, SHAPE

pytestmark = pytest.mark.usefixtures("prefect_server")

THREADS = DaskOptions(workers=1, processes=False)
BROKEN = "XRAI-PHANTOM-00099-000"


def artifacts(key: str) -> list:
    """Every artifact with this key, newest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC)


def key(kind: str, run: SimpleNamespace) -> str:
    """The artifact key of a run's dataset: ``<kind>-<dataset>-<store id>``."""
    from flows.artifacts import artifact_key

    return artifact_key(kind, run.config.name, run.config.store)


def flow_run(run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        return SimpleNamespace(run=run, flow=client.read_flow(run.flow_id))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, phantom_source: Path) -> SimpleNamespace:
    """The pipeline flow on a copy of the phantom source (3 good cases, 1 broken)."""
    from flows.pipeline_flow import pipeline_flow

    root = tmp_path_factory.mktemp("flows")
    src = shutil.copytree(phantom_source, root / "src")
    config = DatasetConfig(name="Ph-Flow", source=LocalSource(path=str(src)),
                           store=str(root / "store.zarr"), out_dir=str(root / "out"),
                           grid=GridOptions(shape=SHAPE), dask=THREADS)
    state = pipeline_flow(config, return_state=True)
    return SimpleNamespace(root=root, src=src, config=config, state=state,
                           result=state.result())


class TestPipeline:
    def test_run_completes_with_every_stage(self, first_run: SimpleNamespace) -> None:
        assert first_run.state.is_completed()
        r = first_run.result
        assert len(r.ingest.ingested) == CASES
        assert r.ingest.unchanged == []
        assert list(r.ingest.quarantined) == [BROKEN]
        assert r.ingest.exit_code == 3
        assert sorted(r.stats.computed) == sorted(r.ingest.ingested)
        assert r.stats.reused == []
        assert r.manifest.written
        assert r.manifest.changes is None
        assert Path(r.manifest.path).is_file()
        assert Path(r.stats.path).is_file()
        assert r.train is None

    def test_outputs_equal_the_plain_functions(self, first_run: SimpleNamespace) -> None:
        from pipeline.manifest_io import load_manifest
        from pipeline.stats_runner import read_stats, run_stats
        from stats.manifest import build_manifest, decisions_table, stats_fingerprint

        cfg = first_run.config
        stats = read_stats(first_run.result.stats.path)
        direct = run_stats(cfg.store, cfg.name, scheduler="synchronous", recompute=True)
        # sha256 of the canonical JSON without created_at (NaN written as null)
        assert stats_fingerprint(stats) == stats_fingerprint(direct)
        manifest = load_manifest(first_run.result.manifest.path)
        assert decisions_table(manifest) == decisions_table(build_manifest(direct))

    @pytest.mark.parametrize(("kind", "flow_name"), [
        ("dataset-summary", "ingest"), ("quarantine", "ingest"), ("statistics", "stats"),
        ("transforms", "manifest"), ("loss-config", "manifest"), ("verdict", "pipeline")])
    def test_artifact_published_by_its_flow(self, first_run: SimpleNamespace, kind: str,
                                            flow_name: str) -> None:
        found = artifacts(key(kind, first_run))
        assert found, f"no artifact {key(kind, first_run)}"
        assert re.fullmatch(rf"{kind}-ph-flow-[0-9a-f]{{12}}", found[0].key)
        owner = flow_run(found[0].flow_run_id)
        assert owner.flow.name == flow_name
        assert owner.run.state.is_completed()

    def test_issue_13_verdict_is_on_the_pipeline_run(self, first_run: SimpleNamespace) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        from flows.artifacts import MAX_IMAGE_BYTES, VERDICT_MAX_LINE, artifact_url
        from tests.flows.test_artifacts import decode_images

        with get_client(sync_client=True) as client:
            own = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[first_run.state.state_details
                                                          .flow_run_id])))
        assert [a.key for a in own] == [key("verdict", first_run)]
        md = own[0].data
        table = [line for line in md.splitlines() if line.startswith("|")]
        assert len(table) == 2 + 5  # header, rule line, R1 R2 R3 R5 R4
        assert max(len(line) for line in table) <= VERDICT_MAX_LINE
        assert f"**Loss: {first_run.result.manifest.loss}**" in md
        for kind in ("loss-config", "transforms", "statistics"):  # links to this run's
            assert artifact_url(str(artifacts(key(kind, first_run))[0].id)) in md
        images = decode_images(md)
        assert len(images) == 1
        assert len(images[0]) < min(MAX_IMAGE_BYTES, 25_000)

    def test_artifact_contents(self, first_run: SimpleNamespace) -> None:
        from pipeline.manifest_io import load_manifest

        summary = artifacts(key("dataset-summary", first_run))[0]
        assert summary.type == "markdown"
        for cid in first_run.result.ingest.ingested:
            assert f"| {cid} | ingested |" in summary.data
        quarantine = artifacts(key("quarantine", first_run))[0]
        assert quarantine.type == "table"
        assert BROKEN in quarantine.data
        assert "missing label" in quarantine.data
        from tests.flows.test_artifacts import decode_images

        stats = artifacts(key("statistics", first_run))[0].data
        assert all(f"| {ch} | brain |" in stats for ch in ("t1n", "t1c", "t2w", "t2f"))
        assert len(decode_images(stats)) == 1
        manifest = load_manifest(first_run.result.manifest.path)
        transforms = artifacts(key("transforms", first_run))[0].data
        for k, sel in manifest.transforms.items():
            expr = sel.expression if sel.chosen != "identity" else "identity"
            assert f"| {k.split('/')[1]} | {expr} |" in transforms
        assert len(decode_images(transforms)) == 1
        loss = artifacts(key("loss-config", first_run))[0].data
        assert all(t.reason in loss for t in manifest.loss.terms)


class TestReprocess:
    def test_unchanged_source_does_nothing(self, first_run: SimpleNamespace) -> None:
        from flows.reprocess_flow import reprocess_flow

        mtime = Path(first_run.result.manifest.path).stat().st_mtime_ns
        result = reprocess_flow(first_run.config)
        assert result.changed == []
        assert result.missing_at_source == []
        assert sorted(result.run.ingest.unchanged) == sorted(first_run.result.ingest.ingested)
        assert result.run.stats.computed == []
        assert result.decision_changes == []
        assert not result.run.manifest.written
        assert Path(first_run.result.manifest.path).stat().st_mtime_ns == mtime
        report = artifacts(key("reprocess-report", first_run))[0].data
        assert "new or changed cases ingested: 0" in report
        assert "manifest kept: no decision changed" in report

    def test_new_case_is_the_only_one_ingested_and_computed(
            self, first_run: SimpleNamespace) -> None:
        from flows.reprocess_flow import reprocess_flow
        from pipeline.sources.phantom import case_id
        from pipeline.stats_runner import engine_config
        from pipeline.store import DatasetStore

        # A copy of case 0 under a new id: its intensity range lies inside the dataset's,
        # so the engine fingerprint (histogram edges) stays and only the new case is computed.
        cfg = first_run.config
        before = engine_config(DatasetStore.open(cfg.store, cfg.name)).fingerprint()
        new = "XRAI-PHANTOM-00050-000"
        (first_run.src / new).mkdir()
        for f in (first_run.src / case_id(0)).iterdir():
            shutil.copy(f, first_run.src / new / f.name.replace(case_id(0), new))
        result = reprocess_flow(cfg)
        assert engine_config(DatasetStore.open(cfg.store, cfg.name)).fingerprint() == before
        assert result.changed == [new]
        assert result.run.stats.computed == [new]
        assert len(result.run.stats.reused) == CASES
        assert result.run.manifest.written == bool(result.decision_changes)
        report = artifacts(key("reprocess-report", first_run))[0].data
        assert f"new or changed cases ingested: 1 ({new})" in report
        assert f"statistics: 1 cases computed, {CASES} reused" in report


@pytest.fixture
def file_server(phantom_source: Path) -> Iterator[str]:
    """The phantom's good cases over HTTP on loopback."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(phantom_source))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_flow_fetches_verifies_and_skips(file_server: str, phantom_source: Path,
                                                  tmp_path: Path) -> None:
    from flows.download_flow import download_flow

    files = sorted(p for p in phantom_source.rglob("*.nii.gz") if BROKEN not in str(p))
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "sha256"])
        for p in files:
            writer.writerow([p.relative_to(phantom_source).as_posix(),
                             hashlib.sha256(p.read_bytes()).hexdigest()])
    source = DownloadSource(service="http", collection="phantom-files", file_list=str(listing),
                            base_url=file_server, dest=str(tmp_path / "dl"), layout="brats")
    first = download_flow(source)
    assert len(first.downloaded) == len(files)
    assert first.failed == {}
    for p in files:
        assert (tmp_path / "dl" / p.relative_to(phantom_source)).read_bytes() == p.read_bytes()
    again = download_flow(source)
    assert again.downloaded == []
    assert len(again.skipped) == len(files)
    summary = artifacts("download-summary-phantom-files")[0].data
    assert f"0 downloaded, {len(files)} already complete, 0 failed" in summary


def test_deployment_schedules_are_registered(tmp_path: Path) -> None:
    from prefect import get_client

    from flows.deployments import build_deployments, deployment_name

    config = parse_config({"datasets": [
        {"name": "every-hour", "source": {"kind": "phantom", "path": str(tmp_path / "p")},
         "store": str(tmp_path / "s.zarr"), "out_dir": str(tmp_path / "o"),
         "schedule": {"interval_seconds": 3600}},
        {"name": "nightly", "source": {"kind": "local", "path": str(tmp_path)},
         "store": str(tmp_path / "s.zarr"), "out_dir": str(tmp_path / "n"),
         "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}},
    ]})
    for deployment in build_deployments(config):
        deployment.apply()
    with get_client(sync_client=True) as client:
        hourly = client.read_deployment_by_name(f"reprocess/{deployment_name('every-hour')}")
        nightly = client.read_deployment_by_name(f"reprocess/{deployment_name('nightly')}")
    assert [s.schedule.interval.total_seconds() for s in hourly.schedules] == [3600.0]
    assert all(s.active for s in hourly.schedules)
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        ("0 3 * * *", "Europe/Berlin")]
    assert hourly.parameters["config"]["name"] == "every-hour"
    assert DatasetConfig.model_validate(nightly.parameters["config"]) == config.datasets[1]


def test_stats_flow_on_an_existing_dask_scheduler(first_run: SimpleNamespace,
                                                  tmp_path: Path) -> None:
    from distributed import LocalCluster

    from flows.stats_flow import stats_flow

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        result = stats_flow(first_run.config.store, first_run.config.name,
                            str(tmp_path / "stats.json"),
                            dask=DaskOptions(address=cluster.scheduler_address), recompute=True)
    from pipeline.store import DatasetStore

    committed = DatasetStore.open(first_run.config.store, first_run.config.name).committed()
    assert sorted(result.computed) == sorted(committed)
    assert result.reused == []


@pytest.mark.slow
def test_train_flow_publishes_the_summary_table(first_run: SimpleNamespace) -> None:
    from flows.train_flow import train_flow

    options = TrainOptions(losses=["manifest", "dice"], folds=2, epochs=1, batch_size=2,
                           batches_per_epoch=1, val_every=1, features=4, levels=3, workers=0,
                           device="cpu")
    out = first_run.root / "train"
    result = train_flow(first_run.result.manifest.path, first_run.config.store,
                        first_run.config.name, str(out), options=options)
    assert [e["loss"] for e in result.summary] == ["manifest", "dice"]
    assert (out / "summary.md").is_file()
    table = artifacts(key("training-summary", first_run))[0].data
    assert "| manifest |" in table
    assert "| dice |" in table
    assert "Dice" in table


def test_phantom_source_pipeline_in_one_call(tmp_path: Path) -> None:
    """The `make pipeline SOURCE=phantom` path: the phantom written by the flow itself."""
    from flows.pipeline_flow import pipeline_flow

    config = DatasetConfig(name="ph-direct", source=PhantomSource(
        path=str(tmp_path / "p"), cases=2, shape=SHAPE), store=str(tmp_path / "s.zarr"),
        out_dir=str(tmp_path / "o"), dask=THREADS)
    result = pipeline_flow(config)
    assert len(result.ingest.ingested) == 2
    assert result.ingest.exit_code == 0
    assert result.manifest.written


@pytest.mark.slow
def test_stats_flow_with_a_worker_process_reports_to_the_server(first_run: SimpleNamespace,
                                                                 tmp_path: Path) -> None:
    """A local cluster of one worker *process*: its task runs reach the same API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.stats_flow import stats_flow

    # recompute: reused cases are settled by the plan (issue 12), only computed ones
    # are per-case tasks, and these must run in the worker process
    state = stats_flow(first_run.config.store, first_run.config.name,
                       str(tmp_path / "stats.json"),
                       dask=DaskOptions(workers=1, processes=True), recompute=True,
                       return_state=True)
    assert state.is_completed()
    assert state.result().reused == []
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])))
    per_case = sorted(r.name for r in runs if r.name.startswith("stats-"))
    assert per_case == sorted(f"stats-{c}" for c in state.result().computed)
    assert all(r.state.is_completed() for r in runs)


@pytest.mark.parametrize(("error", "calls"), [(OSError("flaky disk"), 2),
                                              (StoreError("no committed case"), 1)])
def test_storage_tasks_retry_io_failures_only(first_run: SimpleNamespace,
                                              monkeypatch: pytest.MonkeyPatch,
                                              error: Exception, calls: int) -> None:
    from prefect import flow

    from flows import tasks

    seen = []
    real_open = tasks.DatasetStore.open

    def open_once_failing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 1:
            raise error
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tasks.DatasetStore, "open", open_once_failing)
    plan = tasks.stats_plan.with_options(retry_delay_seconds=0)

    @flow
    def probe() -> int:
        return len(plan(first_run.config.store, first_run.config.name).records)

    state = probe(return_state=True)
    assert len(seen) == calls
    assert state.is_completed() is (calls == 2)
