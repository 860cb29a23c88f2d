"""The ``stats`` flow: the statistics stage of `pipeline.stats_runner` as Prefect tasks.

The same stage as ``xrai stats``: `flows.tasks.stats_plan` plans it
(`pipeline.stats_runner.plan_stats`: the engine configuration, the persisted partials
still current for each case's content hash and the engine fingerprint, one `StatsJob`
per case to compute); each job is one `flows.tasks.case_stats` task on the Dask task
runner (`StatsJob.run`: compute and persist the case's partials); `flows.tasks.merge_stats`
merges the reused and the computed partials (`pipeline.stats_runner.merge_stats`) and
writes the statistics JSON. The flow adds the tasks, their retries and the statistics
artifact it publishes (tables and the label distributions with the rule thresholds,
`flows.artifacts.label_picture`; key ``statistics-<dataset>-<store id>``).

From the plan to the statistics JSON the flow holds the dataset's write slot
(`flows.concurrency.dataset_write_slot`) and the store's writer lease
(`pipeline.lease`, which also keeps ``xrai`` commands out): the per-case partials it
persists are writes to the dataset, and the plan must not change under it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict

from flows.artifacts import label_picture, publish_markdown, statistics_markdown
from flows.concurrency import dataset_write_slot
from flows.config import DaskOptions
from flows.ingest_flow import LEASE_WAIT
from flows.tasks import case_stats, merge_stats, stats_plan, task_runner
from pipeline.lease import writer_lease
from stats.dataset import CasePartials


class StatsResult(BaseModel):
    """Where the statistics were written and which cases were computed or reused."""

    model_config = ConfigDict(frozen=True)

    path: str
    dataset: str
    content_hash: str
    computed: list[str]
    reused: list[str]
    artifact: str | None = None  # id of the statistics artifact


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
        plan = stats_plan(store, dataset, recompute)
        computed: list[CasePartials] = []
        if plan.jobs:
            with task_runner(dask) as runner:
                futures = runner.map(case_stats, {"job": list(plan.jobs)})
                computed = [f.result() for f in futures]
        logger.info("statistics of %s: %d cases computed, %d reused", dataset,
                    len(plan.jobs), len(plan.reused))
        # quote: the partials go to the task as they are, without Prefect walking them
        stats = merge_stats(quote(plan), quote(computed), out_path)
    computed_ids, reused_ids = plan.computed_ids, plan.reused_ids
    published = publish_markdown(
        "statistics", dataset,
        statistics_markdown(stats, computed=computed_ids, reused=reused_ids,
                            picture=label_picture(stats)),
        f"Statistics of {dataset}: intensity moments and label distributions", store=store)
    return StatsResult(path=out_path, dataset=dataset, content_hash=stats.content_hash,
                       computed=computed_ids, reused=reused_ids, artifact=published.id)
