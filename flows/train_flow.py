"""The ``train`` flow: every named loss under one k-fold protocol (`run_benchmark`).

Publishes the training summary (mean ± std over folds per loss, ``training-summary``)
and the training artifacts of `flows.train_artifacts`: the case × loss table with the
paired differences, the paired comparison (interval, Wilcoxon p, verdict), the per-case
outliers, the curves with the adaptive weights, and the overlays. Progress goes to the
run's log, one line per epoch (`pipeline.train.progress`).

It runs inside ``pipeline`` and ``reprocess`` (the ``train:`` block of a dataset) and as
the ``train-<dataset>`` deployment (`flows.deployments`), which a researcher starts
from the UI with their own losses, folds, epochs, dimension and device. A deployment
run writes into a folder of its own (``run_folder``), so changing the options never
resumes from another run's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from flows.artifacts import publish_markdown, training_markdown
from flows.config import TrainOptions
from flows.tasks import benchmark
from flows.train_artifacts import publish_training_artifacts


class TrainResult(BaseModel):
    """The run folder, the summary rows (``run_benchmark``'s), the failed folds and the
    keys of the training artifacts."""

    model_config = ConfigDict(frozen=True)

    out_dir: str
    summary: list[dict]
    failures: dict[str, str]
    artifacts: dict[str, str] = {}


def run_folder_name() -> str:
    """The flow run's name (``prefect.runtime``), or ``"run"`` outside a flow run."""
    from prefect.runtime import flow_run

    return str(flow_run.name or "run")


@flow(name="train")
def train_flow(manifest_path: str, store: str, dataset: str, out_dir: str,
               options: TrainOptions = TrainOptions(), run_folder: bool = False
               ) -> TrainResult:
    """Train `options.losses` on ``store/dataset`` with the manifest's normalization.

    Parameters
    ----------
    manifest_path : str
        The loss manifest (``manifest.json`` of the dataset's pipeline run).
    store : str
        Zarr store path or fsspec URL.
    dataset : str
        Dataset (group) in the store; every committed case takes part.
    out_dir : str
        Run folder (results, plots, checkpoints).
    options : TrainOptions
        Losses, folds, epochs, 2d/3d, device and the rest of ``xrai train``'s options.
    run_folder : bool
        Write into ``out_dir/<flow run name>``, a fresh folder per run.

    Raises
    ------
    ManifestError
        The manifest does not validate or its loss does not build.
    ValueError
        An unknown loss name (with the registry's suggestion).
    """
    if run_folder:
        out_dir = str(Path(out_dir) / run_folder_name())
    summary_md, summary, failures = benchmark(manifest_path, store, dataset, out_dir, options)
    publish_markdown("training-summary", dataset, training_markdown(summary_md, failures, out_dir),
                     f"{dataset}: validation metrics per loss, mean ± std over folds",
                     store=store)
    keys = publish_training_artifacts(out_dir, dataset, store)
    logger = get_run_logger()
    for key, reason in failures.items():
        logger.warning("%s failed: %s", key, reason)
    logger.info("training artifacts: %s; run folder %s", ", ".join(keys.values()), out_dir)
    return TrainResult(out_dir=out_dir, summary=summary, failures=failures, artifacts=keys)
