"""The ``reprocess`` flow: what a schedule runs for one dataset.

Looks at the source again (downloading what is new), ingests only new or changed cases
(an unchanged case's files hash to its committed content hash and are skipped),
updates the statistics incrementally (only those cases are recomputed), rewrites the
manifest only when a decision changed and says which, and retrains (when the dataset
has a ``train`` section) only when the manifest changed or the data did. Publishes a
reprocessing report next to the stages' own artifacts.

The committed cases before the run and the stages up to the manifest are read and
written under the dataset's write slot (`flows.concurrency.dataset_write_slot`), so
an overlapping run of the same dataset (another deployment, a ``pipeline`` run)
waits for it; training runs after the slot is released.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from flows.artifacts import publish_markdown, reprocess_markdown
from flows.concurrency import dataset_write_slot
from flows.config import DatasetConfig
from flows.pipeline_flow import TRAIN_DIR, PipelineResult, run_stages
from flows.train_flow import train_flow
from pipeline.errors import StoreError
from pipeline.store import DatasetStore


class ReprocessResult(BaseModel):
    """The stages' results and what changed."""

    model_config = ConfigDict(frozen=True)

    run: PipelineResult
    changed: list[str]
    missing_at_source: list[str]
    decision_changes: list[str] | None
    retrained: bool


def _committed(store: str, dataset: str) -> set[str]:
    try:
        return set(DatasetStore.open(store, dataset).committed())
    except StoreError:  # no dataset yet: nothing committed
        return set()


@flow(name="reprocess")
def reprocess_flow(config: DatasetConfig) -> ReprocessResult:
    """Bring one dataset up to date with its source (see the module notes)."""
    logger = get_run_logger()
    with dataset_write_slot(config.store, config.name):  # run_stages re-enters it
        before = _committed(config.store, config.name)
        # Train after we know whether anything changed: run the stages without it first.
        run = run_stages(config, recompute=False, only_if_changed=True, train=False)
    changed = list(run.ingest.ingested)
    seen = set(run.ingest.ingested) | set(run.ingest.unchanged) | set(run.ingest.quarantined)
    missing = sorted(before - seen)
    manifest_changed = run.manifest.changes is None or bool(run.manifest.changes)
    retrain = config.train is not None and (bool(changed) or manifest_changed)
    if retrain:
        trained = train_flow(run.manifest.path, config.store, config.name,
                             str(Path(config.out_dir) / TRAIN_DIR), options=config.train)
        run = run.model_copy(update={"train": trained})
    publish_markdown("reprocess-report", config.name, reprocess_markdown(
        config.name, changed=changed, unchanged=len(run.ingest.unchanged),
        quarantined=run.ingest.quarantined, missing_at_source=missing,
        computed=run.stats.computed, reused=run.stats.reused,
        decision_changes=run.manifest.changes, manifest_written=run.manifest.written,
        trained=retrain), f"{config.name}: what reprocessing found and did", store=config.store)
    logger.info("reprocess %s: %d new or changed, decisions changed: %s, retrained: %s",
                config.name, len(changed), run.manifest.changes, retrain)
    return ReprocessResult(run=run, changed=changed, missing_at_source=missing,
                           decision_changes=run.manifest.changes, retrained=retrain)
