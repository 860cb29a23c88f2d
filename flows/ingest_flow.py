"""The ``ingest`` flow: discover the cases of a folder and ingest them, one Dask task each.

The parent discovers the cases, creates the dataset and assigns slots
(`DatasetStore.allocate`, parent only); each case is then one `flows.tasks.ingest_one`
task (`pipeline.ingest.ingest_case`) on the Dask task runner, which skips a case whose
source files hash to its committed content hash. A case whose task fails after its
retries (a worker died) is quarantined with the failure as its reason, as
`pipeline.ingest.ingest_cases` does. Publishes the dataset summary and the quarantine
list.
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
from flows.config import DaskOptions, GridOptions
from flows.tasks import discover_cases, ingest_one, prepare_store, quarantine_failed, task_runner
from pipeline.errors import XraiError
from pipeline.ingest import CaseOutcome, IngestReport
from pipeline.store import DatasetStore


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
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise XraiError(f"case ids {dup} occur more than once in {source_dir!r}")
    logger.info("%d %s cases in %s", len(cases), chosen, source_dir)
    slots = prepare_store(store, dataset, grid.to_grid(), chosen, ids)
    outcomes: list[CaseOutcome] = []
    with task_runner(dask) as runner:
        futures = runner.map(ingest_one, {
            "store_url": unmapped(store), "dataset": unmapped(dataset), "case": cases,
            "slot": [slots[i][0] for i in ids], "committed_hash": [slots[i][1] for i in ids],
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
                     f"Dataset {dataset}: grid, channels, cases and what this run did")
    publish_table("quarantine", dataset, quarantine_rows(ds),
                  f"Quarantined cases of {dataset} with the reason and the file at fault")
    result = IngestResult(
        dataset=dataset, store=store, layout=chosen,
        ingested=[o.case_id for o in report.by_status("ingested")],
        unchanged=[o.case_id for o in report.by_status("unchanged")],
        quarantined={o.case_id: o.reason for o in report.by_status("quarantined")},
        exit_code=report.exit_code)
    logger.info("ingest of %s: %d ingested, %d unchanged, %d quarantined", dataset,
                len(result.ingested), len(result.unchanged), len(result.quarantined))
    return result
