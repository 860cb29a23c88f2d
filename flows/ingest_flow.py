"""The ``ingest`` flow: discover the cases of a folder and ingest them, one Dask task each.

The same stage as ``xrai ingest``: the parent opens a `pipeline.ingest.ingest_session`
(the store's writer lease, the dataset created, a slot and a `CaseJob` per case, the
store compacted at the end); each job is then one `flows.tasks.ingest_one` task on the
Dask task runner, which skips a case whose source files hash to its committed content
hash. A case whose task fails after its retries (a worker died) is quarantined with the
failure as its reason, as `pipeline.ingest.ingest_cases` does. Publishes the dataset
summary and the quarantine list.

From slot allocation to the last commit or quarantine the flow holds the dataset's
write slot (`flows.concurrency.dataset_write_slot`): a second run writing the same
dataset waits for it in Prefect.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from pydantic import BaseModel, ConfigDict

from flows.artifacts import (
    dataset_summary_markdown,
    publish_markdown,
    publish_table,
    quarantine_rows,
)
from flows.concurrency import dataset_write_slot
from flows.config import DaskOptions, GridOptions
from flows.tasks import discover_cases, ingest_one, quarantine_failed, task_runner
from pipeline.ingest import CaseOutcome, IngestReport, ingest_session
from pipeline.store import DatasetStore

#: Seconds a flow waits for a writer outside Prefect (``xrai ingest`` in a terminal).
LEASE_WAIT = 3600.0


class IngestResult(BaseModel):
    """What one ingest run did, by case id."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    store: str
    layout: str
    ingested: list[str]
    unchanged: list[str]
    quarantined: dict[str, str]
    exit_code: int


@flow(name="ingest")
def ingest_flow(source_dir: str, store: str, dataset: str, layout: str = "auto",
                grid: GridOptions = GridOptions(), dask: DaskOptions = DaskOptions(),
                recompute: bool = False) -> IngestResult:
    """Ingest the cases of `source_dir` into ``store/dataset`` (incremental by content).

    Parameters
    ----------
    source_dir : str
        A folder in one of the layouts of `pipeline.sources.local`.
    store, dataset : str
        Zarr store path or fsspec URL, and the dataset (group) name.
    layout : str, default "auto"
    grid : GridOptions
        The dataset grid (must match an existing dataset's).
    dask : DaskOptions
        Scheduler address, or the size of the local cluster.
    recompute : bool, default False
        Re-ingest unchanged cases too.

    Returns
    -------
    IngestResult

    Raises
    ------
    XraiError
        Two cases share an id; `StoreError` when the dataset exists with another grid.
    """
    logger = get_run_logger()
    chosen, cases = discover_cases(source_dir, layout)
    logger.info("%d %s cases in %s", len(cases), chosen, source_dir)
    outcomes: list[CaseOutcome] = []
    with dataset_write_slot(store, dataset), \
            ingest_session(cases, store, dataset, grid=grid.to_grid(), collection=chosen,
                           wait=LEASE_WAIT) as session:
        ids = [job.case.case_id for job in session.jobs]
        with task_runner(dask) as runner:
            futures = runner.map(ingest_one, {"job": session.jobs,
                                              "recompute": unmapped(recompute)})
            futures.wait()
            for cid, fut in zip(ids, futures, strict=True):
                if fut.state.is_completed():
                    outcomes.append(fut.result())
                else:
                    reason = f"task failed: {fut.state.message}"
                    outcomes.append(quarantine_failed(store, dataset, cid, reason))
    report = IngestReport(dataset=dataset, store=store, outcomes=tuple(outcomes))
    ds = DatasetStore.open(store, dataset)
    publish_markdown("dataset-summary", dataset, dataset_summary_markdown(ds, dataset, outcomes),
                     f"Dataset {dataset}: grid, channels, cases and what this run did",
                     store=store)
    publish_table("quarantine", dataset, quarantine_rows(ds),
                  f"Quarantined cases of {dataset} with the reason and the file at fault",
                  store=store)
    result = IngestResult(
        dataset=dataset, store=store, layout=chosen,
        ingested=[o.case_id for o in report.by_status("ingested")],
        unchanged=[o.case_id for o in report.by_status("unchanged")],
        quarantined={o.case_id: o.reason for o in report.by_status("quarantined")},
        exit_code=report.exit_code)
    logger.info("ingest of %s: %d ingested, %d unchanged, %d quarantined", dataset,
                len(result.ingested), len(result.unchanged), len(result.quarantined))
    return result
