"""Prefect tasks: each one calls one plain function of `pipeline` or `stats`.

Work is keyed by content through the store, not through Prefect's result cache: a case
whose source files hash to its committed content hash is not re-ingested
(`pipeline.ingest.ingest_case` compares them), and a case whose persisted statistics
carry its content hash and the engine fingerprint is not recomputed
(`pipeline.stats_runner`). The store is the one record of what is done, so deleting or
moving it can never leave a stale cache that skips work; the tasks therefore use
``NO_CACHE``, and are idempotent.

Tasks that touch storage or the network retry with exponential backoff
(`STORAGE_RETRIES`, `NETWORK_RETRIES`); bad *data* never raises (the case is
quarantined), so a retry only repeats an I/O failure.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.config import DaskOptions, DownloadSource, TrainOptions
from pipeline.errors import XraiError
from pipeline.ingest import CaseJob, CaseOutcome
from pipeline.manifest_io import load_manifest, write_manifest
from pipeline.sources.base import CaseSource
from pipeline.stats_runner import StatsJob, StatsPlan
from pipeline.store import DatasetStore
from stats.dataset import CasePartials
from stats.manifest import Manifest, build_manifest
from stats.summary import DatasetStats

#: Retries of tasks that read or write the store (local disk or object storage).
STORAGE_RETRIES = 2
#: Retries of tasks that talk to a remote archive (on top of the HTTP client's own).
NETWORK_RETRIES = 3


def worth_retrying(exc: BaseException | None) -> bool:
    """Whether a task that raised `exc` may succeed when run again.

    An I/O failure (``OSError``, a remote store's client error) may pass; a condition
    of the pipeline (`XraiError`: no committed case, a grid mismatch) or a bad value
    will not, except a `DownloadError` marked ``retryable`` (timeouts, 5xx, truncation).
    """
    from pipeline.download.errors import DownloadError

    if isinstance(exc, DownloadError):
        return exc.retryable
    return not isinstance(exc, (XraiError, ValueError, TypeError, KeyError, LookupError))


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state carries no readable exception
        exc = err
    return worth_retrying(exc if isinstance(exc, BaseException) else None)


_STORAGE = {"retries": STORAGE_RETRIES,
            "retry_delay_seconds": exponential_backoff(backoff_factor=2),
            "retry_jitter_factor": 0.5, "retry_condition_fn": _retry_condition,
            "cache_policy": NO_CACHE}
_NETWORK = {"retries": NETWORK_RETRIES,
            "retry_delay_seconds": exponential_backoff(backoff_factor=10),
            "retry_jitter_factor": 0.5, "retry_condition_fn": _retry_condition,
            "cache_policy": NO_CACHE}


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, this module's logger outside one
    (a task body called with ``.fn`` in tests)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def task_runner(options: DaskOptions) -> Any:
    """The Dask task runner for per-case work: `options.address`, else a local cluster.

    The local cluster has `options.workers` single-threaded workers (processes unless
    ``processes=False``) and its dashboard on a free loopback port. Distributed's INFO
    messages (cluster start and stop) are silenced, its warnings and errors kept
    (`flows.dask_runner.FlowDaskTaskRunner`; ``silence_logs`` for the workers), and
    local worker processes report to the flow's Prefect server.
    """
    from flows.dask_runner import FlowDaskTaskRunner

    if options.address:
        return FlowDaskTaskRunner(address=options.address)
    return FlowDaskTaskRunner(cluster_kwargs={
        "n_workers": options.workers, "threads_per_worker": 1,
        "processes": options.processes, "dashboard_address": "127.0.0.1:0",
        "silence_logs": logging.WARNING})


# ------------------------------------------------------------------ sources
@task(**_STORAGE)
def write_phantom_source(out_dir: str, cases: int, seed: int,
                         shape: tuple[int, int, int]) -> str:
    """Write the phantom dataset into `out_dir` unless it is there already; return it.

    `write_phantom` is deterministic by seed, so an existing folder holding every case
    is left as it is (its files, hence its content hashes, would not change).
    """
    from pipeline.sources.phantom import case_id, write_phantom

    folder = Path(out_dir)
    if all((folder / case_id(i)).is_dir() for i in range(cases)):
        run_logger().info("phantom source %s already holds %d cases", folder, cases)
        return str(folder)
    write_phantom(folder, cases=cases, seed=seed, shape=shape)
    return str(folder)


@task(**_STORAGE)
def discover_cases(source_dir: str, layout: str) -> tuple[str, list[CaseSource]]:
    """`pipeline.sources.local.discover` on a folder; returns (layout used, cases)."""
    from pipeline.sources.local import detect_layout, discover

    chosen = detect_layout(Path(source_dir)) if layout == "auto" else layout
    return chosen, discover(Path(source_dir), layout=chosen)  # type: ignore[arg-type]


# ------------------------------------------------------------------ ingest
@task(task_run_name="ingest-{job.case.case_id}", **_STORAGE)
def ingest_one(job: CaseJob, recompute: bool = False) -> CaseOutcome:
    """`pipeline.ingest.CaseJob.run`: hash, skip if unchanged, standardize, commit."""
    outcome = job.run(recompute=recompute)
    run_logger().info("%s: %s %s", outcome.case_id, outcome.status, outcome.reason)
    return outcome


@task(**_STORAGE)
def quarantine_failed(store_url: str, dataset: str, case_id: str, reason: str) -> CaseOutcome:
    """Record a case whose task failed after its retries (e.g. a worker died)."""
    DatasetStore.open(store_url, dataset, writable=True).quarantine(case_id, reason)
    return CaseOutcome(case_id, "quarantined", reason)


# ------------------------------------------------------------------ statistics
@task(**_STORAGE)
def stats_plan(store_url: str, dataset: str, recompute: bool = False) -> StatsPlan:
    """`pipeline.stats_runner.plan_stats`: the engine configuration, the current persisted
    partials to reuse, and a `StatsJob` per case to compute."""
    from pipeline.stats_runner import plan_stats

    return plan_stats(DatasetStore.open(store_url, dataset), recompute=recompute)


@task(task_run_name="stats-{job.case_id}", **_STORAGE)
def case_stats(job: StatsJob) -> CasePartials:
    """`pipeline.stats_runner.StatsJob.run`: compute and persist one case's partials."""
    return job.run()


@task(**_STORAGE)
def merge_stats(plan: StatsPlan, computed: list[CasePartials], out_path: str) -> DatasetStats:
    """`pipeline.stats_runner.merge_stats` of the plan and its jobs' results; writes the
    statistics JSON (`write_stats`) and returns the statistics."""
    from pipeline import stats_runner

    stats = stats_runner.merge_stats(DatasetStore.open(plan.store_url, plan.dataset), plan,
                                     computed)
    stats_runner.write_stats(stats, out_path)
    return stats


# ------------------------------------------------------------------ manifest
@task(**_STORAGE)
def read_manifest(path: str) -> Manifest | None:
    """The manifest at `path`, or None when there is none (`ManifestError` if invalid)."""
    return load_manifest(path) if Path(path).is_file() else None


@task(cache_policy=NO_CACHE)
def make_manifest(stats: DatasetStats, seed: int) -> Manifest:
    """`stats.manifest.build_manifest` (pure: no retries)."""
    return build_manifest(stats, seed=seed)


@task(**_STORAGE)
def save_manifest(manifest: Manifest, path: str) -> str:
    """`pipeline.manifest_io.write_manifest` (atomic); returns the path."""
    return str(write_manifest(manifest, path))


# ------------------------------------------------------------------ training
@task(**_STORAGE)
def benchmark(manifest_path: str, store_url: str, dataset: str, out_dir: str,
              options: TrainOptions) -> tuple[str, list[dict[str, Any]], dict[str, str]]:
    """`pipeline.train.options.run_training` under the manifest's normalization: the
    same translation of the options as ``xrai train``'s.

    Returns (summary markdown, summary rows, failures). With ``resume`` (the default)
    a retry continues from the checkpoints already written. A line per epoch (loss,
    term weights, validation Dice, time left) goes to the run's log
    (`pipeline.train.progress.ProgressLog`).
    """
    from pipeline.train.benchmark import load_training_manifest
    from pipeline.train.options import run_training
    from pipeline.train.progress import ProgressLog

    store = DatasetStore.open(store_url, dataset)
    checked = load_training_manifest(manifest_path, store.channels)
    result = run_training(options, store_url=store_url, dataset=dataset, out_dir=out_dir,
                          plan=checked.plan, manifest_spec=checked.loss_spec,
                          manifest_path=manifest_path, progress=ProgressLog(run_logger()))
    return result.markdown(), result.summary, dict(result.failures)


# ------------------------------------------------------------------ download
def _http(source: DownloadSource | None = None) -> Any:
    """The HTTP client, with the token when XRAI_TCIA_TOKEN is set; it goes only to the
    archive hosts (`pipeline.download.http`), the source's base URL among them."""
    from pipeline.download.http import HttpClient

    client = HttpClient(token=os.environ.get("XRAI_TCIA_TOKEN") or None)
    if source is not None and source.base_url:
        client.allow_token_host(source.base_url)
    return client


def _fetcher(source: DownloadSource) -> Any:
    """The source's fetcher (`pipeline.download`), as ``xrai download`` builds it."""
    if source.service == "nbia":
        from pipeline.download.nbia import NbiaClient, NbiaFetcher

        return NbiaFetcher(NbiaClient(_http(), source.base_url))
    if source.service == "idc":
        from pipeline.download.idc import IdcFetcher

        return IdcFetcher(endpoint_url=source.s3_endpoint)
    from pipeline.download.filelist import FileListFetcher

    return FileListFetcher(_http(source))


@task(**_NETWORK)
def plan_download(source: DownloadSource) -> list[Any]:
    """The plan's items (`plan_nbia`, `plan_idc` or `plan_filelist`)."""
    if source.service == "nbia":
        from pipeline.download.nbia import NbiaClient, plan_nbia

        plan = plan_nbia(NbiaClient(_http(), source.base_url), source.collection,
                         patients=source.patients, modality=source.modality,
                         limit=source.limit)
    elif source.service == "idc":
        from pipeline.download.idc import plan_idc

        plan = plan_idc(source.collection, patients=source.patients,
                        modality=source.modality, limit=source.limit)
    else:
        from pipeline.download.filelist import plan_filelist

        plan = plan_filelist(source.collection, source.file_list or "", http=_http(source),
                             base_url=source.base_url, patients=source.patients,
                             limit=source.limit)
    run_logger().info("download plan: %s", plan.describe())
    return list(plan.items)


@task(task_run_name="download-{item.key}", **_NETWORK)
def download_item(source: DownloadSource, item: Any) -> Any:
    """Fetch one item unless complete (`run_plan` on it); raise on failure so that
    Prefect retries it with backoff."""
    from pipeline.download.errors import DownloadError
    from pipeline.download.plan import run_plan

    dest = Path(source.dest)
    dest.mkdir(parents=True, exist_ok=True)
    outcome = run_plan([item], _fetcher(source), dest).outcomes[0]
    if outcome.status == "failed":
        raise DownloadError(item.label, outcome.reason, retryable=True)
    return outcome
