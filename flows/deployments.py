"""Deployments of the installation: per dataset, a scheduled ``reprocess`` and a ``train``.

`build_deployments` turns the configuration file (`flows.config`) into Prefect
``RunnerDeployment`` objects, two per dataset:

``reprocess-<dataset>``
    The ``reprocess`` flow with the dataset's configuration as its parameter and its
    interval or cron schedule.
``train-<dataset>``
    The ``train`` flow (`flows.train_flow`), unscheduled: a researcher starts it from
    the UI (**Run → Custom run**) and edits the form: ``options`` holds the losses,
    folds, epochs, dim (2d/3d), device and every other option of ``xrai train``;
    ``manifest_path``, ``store``, ``dataset`` and ``out_dir`` default to the dataset's
    (``<out_dir>/manifest.json``, written by its pipeline or reprocess runs, and
    ``<out_dir>/train-runs``). The defaults of ``options`` are the dataset's ``train:``
    block, else `flows.config.quick_train_options`. Each run trains in a folder of its
    own (``<out_dir>/train-runs/<flow run name>``) and publishes the training artifacts.

`serve_config` serves them (``make serve``): the process polls the server for scheduled
and requested runs and executes them. Schedules fire only against a running server
(``make server``).

Each deployment allows one active run (limit 1, collision strategy ``ENQUEUE``): a
run that starts while the previous one still runs waits in the
``AwaitingConcurrencySlot`` state. Runs of *any* flow that write one dataset (two
deployments on one store and dataset, a ``make pipeline`` beside a schedule) are
serialised by the dataset's write slot (`flows.concurrency`); training only reads.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.config import DatasetConfig, InstallationConfig, load_config, quick_train_options
from flows.reprocess_flow import reprocess_flow
from flows.train_flow import train_flow

#: Default configuration file (``make serve CONFIG=...`` overrides it).
DEFAULT_CONFIG = "xrai-deployments.yaml"


#: The pipeline's manifest and the training runs' folder, under a dataset's ``out_dir``.
MANIFEST_FILE = "manifest.json"
TRAIN_RUNS_DIR = "train-runs"


def deployment_name(dataset: str) -> str:
    """``reprocess-<dataset>``."""
    return f"reprocess-{dataset}"


def train_deployment_name(dataset: str) -> str:
    """``train-<dataset>``."""
    return f"train-{dataset}"


def train_parameters(ds: DatasetConfig) -> dict[str, Any]:
    """The default parameters of a dataset's ``train`` deployment (the UI's form).

    The manifest the dataset's pipeline writes, its store and name, the folder of
    training runs (a fresh sub-folder per run), and its ``train:`` options or
    `quick_train_options`.
    """
    options = ds.train if ds.train is not None else quick_train_options()
    return {"manifest_path": str(Path(ds.out_dir) / MANIFEST_FILE), "store": ds.store,
            "dataset": ds.name, "out_dir": str(Path(ds.out_dir) / TRAIN_RUNS_DIR),
            "options": options.model_dump(mode="json"), "run_folder": True}


def schedule_kwargs(ds: DatasetConfig) -> dict[str, Any]:
    """The ``to_deployment`` schedule arguments of a dataset (empty when unscheduled)."""
    if ds.schedule is None:
        return {}
    if ds.schedule.cron is not None:
        from prefect.schedules import Cron

        return {"schedules": [Cron(ds.schedule.cron, timezone=ds.schedule.timezone)]}
    from prefect.schedules import Interval

    return {"schedules": [Interval(timedelta(seconds=ds.schedule.interval_seconds or 0),
                                   timezone=ds.schedule.timezone)]}


def one_run_at_a_time() -> Any:
    """The deployments' concurrency limit: one active run, later runs enqueued.

    A run that would exceed it waits in the ``AwaitingConcurrencySlot`` state (shown in
    the UI) and starts when the running one ends, instead of being cancelled.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployments(config: InstallationConfig) -> list[Any]:
    """Two ``RunnerDeployment`` objects per dataset, each at most one run at a time
    (`one_run_at_a_time`): ``reprocess-<dataset>`` with its config and schedule, and
    ``train-<dataset>`` with `train_parameters` (started from the UI)."""
    out = []
    for ds in config.datasets:
        out.append(reprocess_flow.to_deployment(
            name=deployment_name(ds.name),
            parameters={"config": ds.model_dump(mode="json")},
            description=f"Reprocess dataset {ds.name!r} from its {ds.source.kind} source",
            tags=["xrai", ds.name],
            concurrency_limit=one_run_at_a_time(),
            **schedule_kwargs(ds)))
        out.append(train_flow.to_deployment(
            name=train_deployment_name(ds.name),
            parameters=train_parameters(ds),
            description=(f"Train and compare losses on dataset {ds.name!r}: edit options "
                         "(losses, folds, epochs, dim, device) in Custom run; the run "
                         "publishes the case × loss table, the paired comparison, the "
                         "outliers, curves and overlays"),
            tags=["xrai", ds.name, "train"],
            concurrency_limit=one_run_at_a_time()))
    return out


def serve_config(path: str | os.PathLike[str] = DEFAULT_CONFIG, *,
                 limit: int | None = None) -> None:
    """Serve the deployments of a configuration file until interrupted (``make serve``).

    Raises
    ------
    FileNotFoundError, ConfigError
        The file is missing or invalid (the message names the file and the field).
    """
    from prefect import serve

    serve(*build_deployments(load_config(path)), limit=limit)
