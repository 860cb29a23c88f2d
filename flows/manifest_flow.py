"""The ``manifest`` flow: transforms and the loss configuration, decided from the statistics.

Builds the manifest (`stats.manifest.build_manifest`), compares its decisions with the
manifest already at `out_path` (`stats.manifest.decision_changes`) and writes it
(always, or with ``only_if_changed`` only when a decision changed or there was none).
Publishes the transforms in use (one row per channel, with the histograms before and
after, `flows.artifacts.intensity_picture`) and the loss configuration with the full
evidence of every rule, keyed ``<kind>-<dataset>-<store id>`` (the store the statistics
name); their ids are returned for the pipeline's verdict to link to.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from flows.artifacts import (
    intensity_picture,
    loss_markdown,
    loss_text,
    publish_markdown,
    transforms_markdown,
)
from flows.tasks import make_manifest, read_manifest, save_manifest
from pipeline.stats_runner import read_stats
from stats.manifest import decision_changes


class ManifestResult(BaseModel):
    """The manifest path, whether it was written, and the decisions that changed.

    ``changes`` is None when there was no earlier manifest to compare with.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    written: bool
    changes: list[str] | None
    loss: str
    artifacts: dict[str, str] = {}  # kind -> artifact id (transforms, loss-config)


@flow(name="manifest")
def manifest_flow(stats_path: str, out_path: str, seed: int = 0,
                  only_if_changed: bool = False) -> ManifestResult:
    """Build the manifest from `stats_path` and write it to `out_path`.

    Parameters
    ----------
    stats_path : str
        Statistics JSON from the ``stats`` flow.
    out_path : str
        The manifest JSON; an existing one is compared with the new one.
    seed : int, default 0
        The training seed recorded in the manifest.
    only_if_changed : bool, default False
        Keep an existing manifest whose decisions are all unchanged.

    Raises
    ------
    ManifestError
        An existing manifest at `out_path` does not validate.
    ValueError
        The statistics lack what a rule needs (the message names the field).
    """
    logger = get_run_logger()
    stats = read_stats(stats_path)
    old = read_manifest(out_path)
    new = make_manifest(stats, seed)
    changes = None if old is None else decision_changes(old, new)
    write = old is None or not only_if_changed or bool(changes)
    if write:
        save_manifest(new, out_path)
    shown = new if write else old
    for change in changes or ():
        logger.info("decision changed: %s", change)
    logger.info("manifest %s %s", out_path, "written" if write else "kept (no decision changed)")
    name, store = stats.dataset, stats.store
    transforms = publish_markdown(
        "transforms", name,
        transforms_markdown(shown, stats, picture=intensity_picture(stats, shown)),
        f"{name}: transform in use per channel, before and after", store=store)
    loss = publish_markdown("loss-config", name, loss_markdown(shown),
                            f"{name}: loss terms, weighting and the evidence of every rule",
                            store=store)
    return ManifestResult(path=out_path, written=write, changes=changes,
                          loss=loss_text(shown),
                          artifacts={"transforms": transforms.id, "loss-config": loss.id})
