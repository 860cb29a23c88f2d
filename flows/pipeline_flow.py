"""The ``pipeline`` flow, end to end: source → ingest → stats → manifest → (train).

The source is the phantom (written once), a local folder, or a TCIA collection fetched
first by the ``download`` flow; every stage is its own subflow, so each appears in the
UI with its artifacts. Outputs go to ``config.out_dir``: ``stats.json``,
``manifest.json`` and ``train/``.

From ingest to the manifest a run holds the dataset's write slot
(`flows.concurrency.dataset_write_slot`), so two runs on one dataset take turns
there instead of interleaving their stages.

After the manifest, the run itself (``pipeline``, or ``reprocess`` through `run_stages`)
publishes the ``verdict`` artifact (`flows.artifacts.verdict_markdown`, key
``verdict-<dataset>-<store id>``): the chosen loss, one short row per rule and a small
picture of R1, R2 and R5 against their thresholds, with links to the subflows'
``loss-config``, ``transforms`` and ``statistics`` artifacts of the same run. It sits
on the parent run, so the run's own Artifacts tab is not empty.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from flows.artifacts import (
    Published,
    artifact_url,
    publish_markdown,
    rules_picture,
    verdict_markdown,
)
from flows.concurrency import dataset_write_slot
from flows.config import DatasetConfig, DownloadSource, LocalSource, PhantomSource
from flows.download_flow import download_flow
from flows.ingest_flow import IngestResult, ingest_flow
from flows.manifest_flow import ManifestResult, manifest_flow
from flows.stats_flow import StatsResult, stats_flow
from flows.tasks import write_phantom_source
from flows.train_flow import TrainResult, train_flow
from pipeline.errors import XraiError
from pipeline.manifest_io import load_manifest
from pipeline.stats_runner import read_stats

STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.json"
TRAIN_DIR = "train"


class PipelineResult(BaseModel):
    """The results of every stage of one run."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    ingest: IngestResult
    stats: StatsResult
    manifest: ManifestResult
    train: TrainResult | None = None


def source_folder(source: PhantomSource | LocalSource | DownloadSource) -> tuple[str, str]:
    """Make the source available locally (inside a flow); return (folder, layout)."""
    if isinstance(source, PhantomSource):
        folder = write_phantom_source(source.path, source.cases, source.seed, source.shape)
        return folder, "brats"
    if isinstance(source, DownloadSource):
        return download_flow(source).dest, source.layout
    return source.path, source.layout


def run_stages(config: DatasetConfig, *, recompute: bool, only_if_changed: bool,
               train: bool | None = None) -> PipelineResult:
    """Ingest, statistics, manifest and optionally training of one dataset (in a flow).

    `train` None trains when ``config.train`` is set; True or False decides (True
    needs ``config.train``). Ingest, statistics and manifest run under the dataset's
    write slot (`flows.concurrency.dataset_write_slot`); training, which only reads
    the store, runs after it is released.
    """
    logger = get_run_logger()
    folder, layout = source_folder(config.source)
    out = Path(config.out_dir)
    with dataset_write_slot(config.store, config.name):  # the subflows re-enter it
        ingested = ingest_flow(folder, config.store, config.name, layout=layout,
                               grid=config.grid_options(), dask=config.dask,
                               recompute=recompute)
        if ingested.exit_code == 1:
            raise XraiError(f"no case of {folder!r} could be ingested into {config.name!r}: "
                            f"{ingested.quarantined}")
        stats = stats_flow(config.store, config.name, str(out / STATS_FILE), dask=config.dask,
                           recompute=recompute)
        manifest = manifest_flow(stats.path, str(out / MANIFEST_FILE), seed=config.seed,
                                 only_if_changed=only_if_changed)
    publish_verdict(config, stats, manifest)
    trained = None
    if config.train is not None and (train is None or train):
        trained = train_flow(manifest.path, config.store, config.name, str(out / TRAIN_DIR),
                             options=config.train)
    logger.info("%s: %d cases committed; loss %s", config.name,
                len(ingested.ingested) + len(ingested.unchanged), manifest.loss)
    return PipelineResult(dataset=config.name, ingest=ingested, stats=stats,
                          manifest=manifest, train=trained)


def publish_verdict(config: DatasetConfig, stats: StatsResult,
                    manifest: ManifestResult) -> Published:
    """The ``verdict`` artifact of the current flow run (see the module notes)."""
    shown = load_manifest(manifest.path)
    ids = {"loss-config": manifest.artifacts.get("loss-config"),
           "transforms": manifest.artifacts.get("transforms"), "statistics": stats.artifact}
    text = {"loss-config": "rules and loss (loss-config)", "transforms": "transforms",
            "statistics": "statistics"}
    links = {text[k]: artifact_url(v) for k, v in ids.items() if v}
    md = verdict_markdown(shown, store=config.store, links=links, written=manifest.written,
                          picture=rules_picture(read_stats(stats.path)))
    return publish_markdown("verdict", config.name, md,
                            f"{config.name}: chosen loss and the decision of every rule",
                            store=config.store)


@flow(name="pipeline")
def pipeline_flow(config: DatasetConfig, recompute: bool = False) -> PipelineResult:
    """Run every stage for one dataset; the manifest is always (re)written.

    Parameters
    ----------
    config : DatasetConfig
        Source, store, output folder, grid, Dask options and (optional) training.
    recompute : bool, default False
        Re-ingest and recompute unchanged cases too.
    """
    return run_stages(config, recompute=recompute, only_if_changed=False)
