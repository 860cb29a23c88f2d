"""The ``stats`` flow: per-case partial statistics as Dask tasks, then one merge.

Each committed case is one `flows.tasks.case_stats` task, which reuses the partials
persisted in the store when they carry the case's content hash and the engine
fingerprint and computes them otherwise (`pipeline.stats_runner.compute_case`); the
parent then merges the persisted partials (`pipeline.stats_runner.run_stats` with
nothing left to compute) and writes the statistics JSON. Publishes the statistics table.

From the plan to the statistics JSON the flow holds the dataset's write slot
(`flows.concurrency.dataset_write_slot`) and the store's writer lease
(`pipeline.lease`, which also keeps ``xrai`` commands out): the per-case partials it
persists are writes to the dataset, and the plan must not change under it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from pydantic import BaseModel, ConfigDict

from flows.artifacts import publish_markdown, statistics_markdown
from flows.concurrency import dataset_write_slot
from flows.config import DaskOptions
from flows.ingest_flow import LEASE_WAIT
from flows.tasks import case_stats, merge_stats, stats_plan, task_runner
from pipeline.lease import writer_lease


class StatsResult(BaseModel):
    """Where the statistics were written and which cases were computed or reused."""

    model_config = ConfigDict(frozen=True)

    path: str
    dataset: str
    content_hash: str
    computed: list[str]
    reused: list[str]


@flow(name="stats")
def stats_flow(store: str, dataset: str, out_path: str, dask: DaskOptions = DaskOptions(),
               recompute: bool = False) -> StatsResult:
    """Statistics of ``store/dataset`` written to `out_path` (incremental per case).

    Parameters
    ----------
    store, dataset : str
    out_path : str
        The statistics JSON (`pipeline.stats_runner.write_stats`).
    dask : DaskOptions
    recompute : bool, default False
        Ignore the persisted per-case partials.

    Raises
    ------
    StoreError
        The dataset has no committed case.
    """
    logger = get_run_logger()
    with dataset_write_slot(store, dataset), \
            writer_lease(store, dataset, wait=LEASE_WAIT):
        config, hashes = stats_plan(store, dataset)
        ids = list(hashes)
        status: list[str] = []
        if ids:
            with task_runner(dask) as runner:
                futures = runner.map(case_stats, {
                    "store_url": unmapped(store), "dataset": unmapped(dataset), "case_id": ids,
                    "content_hash": [hashes[i] for i in ids], "config": unmapped(config),
                    "recompute": unmapped(recompute)})
                status = [f.result() for f in futures]
        computed = [i for i, s in zip(ids, status, strict=True) if s == "computed"]
        reused = [i for i, s in zip(ids, status, strict=True) if s == "reused"]
        logger.info("statistics of %s: %d cases computed, %d reused", dataset, len(computed),
                    len(reused))
        stats = merge_stats(store, dataset, out_path)
    publish_markdown("statistics", dataset,
                     statistics_markdown(stats, computed=computed, reused=reused),
                     f"Statistics of {dataset}: intensity moments and label distributions")
    return StatsResult(path=out_path, dataset=dataset, content_hash=stats.content_hash,
                       computed=computed, reused=reused)
