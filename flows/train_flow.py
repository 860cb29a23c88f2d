"""The ``train`` flow: every named loss under one k-fold protocol (`run_benchmark`).

Publishes the training summary table (mean ± std over folds per loss).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from flows.artifacts import publish_markdown, training_markdown
from flows.config import TrainOptions
from flows.tasks import benchmark


class TrainResult(BaseModel):
    """The run folder, the summary rows (``run_benchmark``'s) and the failed folds."""

    model_config = ConfigDict(frozen=True)

    out_dir: str
    summary: list[dict]
    failures: dict[str, str]


@flow(name="train")
def train_flow(manifest_path: str, store: str, dataset: str, out_dir: str,
               options: TrainOptions = TrainOptions()) -> TrainResult:
    """Train `options.losses` on ``store/dataset`` with the manifest's normalization.

    Raises
    ------
    ManifestError
        The manifest does not validate or its loss does not build.
    ValueError
        An unknown loss name (with the registry's suggestion).
    """
    summary_md, summary, failures = benchmark(manifest_path, store, dataset, out_dir, options)
    publish_markdown("training-summary", dataset, training_markdown(summary_md, failures, out_dir),
                     f"{dataset}: validation metrics per loss, mean ± std over folds")
    for key, reason in failures.items():
        get_run_logger().warning("%s failed: %s", key, reason)
    return TrainResult(out_dir=out_dir, summary=summary, failures=failures)
