"""Deployments of the installation: one scheduled ``reprocess`` deployment per dataset.

`build_deployments` turns the configuration file (`flows.config`) into Prefect
``RunnerDeployment`` objects named ``reprocess-<dataset>``, each with its dataset's
configuration as the flow parameter and its interval or cron schedule; `serve_config`
serves them (``make serve``): the process polls the server for scheduled runs and
executes them. Schedules fire only against a running server (``make server``).

Each deployment allows one active run (limit 1, collision strategy ``ENQUEUE``): a
scheduled run that fires while the previous one still runs waits in the
``AwaitingConcurrencySlot`` state. Runs of *any* flow that write one dataset (two
deployments on one store and dataset, a ``make pipeline`` beside a schedule) are
serialised by the dataset's write slot (`flows.concurrency`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from flows.config import DatasetConfig, InstallationConfig, load_config
from flows.reprocess_flow import reprocess_flow

#: Default configuration file (``make serve CONFIG=...`` overrides it).
DEFAULT_CONFIG = "xrai-deployments.yaml"


def deployment_name(dataset: str) -> str:
    """``reprocess-<dataset>``."""
    return f"reprocess-{dataset}"


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
    """One ``RunnerDeployment`` per dataset: ``reprocess`` with its config and schedule,
    at most one run at a time (`one_run_at_a_time`)."""
    return [reprocess_flow.to_deployment(
        name=deployment_name(ds.name),
        parameters={"config": ds.model_dump(mode="json")},
        description=f"Reprocess dataset {ds.name!r} from its {ds.source.kind} source",
        tags=["xrai", ds.name],
        concurrency_limit=one_run_at_a_time(),
        **schedule_kwargs(ds)) for ds in config.datasets]


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
