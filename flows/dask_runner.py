"""The flows' Dask task runner: quiet about the cluster, its workers on the flow's server.

Two things `prefect_dask.DaskTaskRunner` does not do on its own for ``make pipeline``:

- A local cluster logs a dozen INFO lines as it starts (scheduler and nanny addresses,
  workers registering, connections) and as many as it stops, per task runner, i.e. per
  stage. In the flow process they reach Prefect's console handler through the root
  logger, so ``LocalCluster(silence_logs=...)``, which only lowers the handlers attached
  to the ``distributed`` logger itself, does not stop them (it does quiet the worker
  processes). `FlowDaskTaskRunner` raises the ``distributed`` logger of the flow
  process to WARNING while the runner is open: warnings and errors (a worker that died,
  a lost connection) still show.
- Without ``PREFECT_API_URL`` (no ``make server`` running) the flow process starts a
  temporary Prefect server, and each worker process of a local cluster, not knowing it,
  started one more of its own (10-20 s each, on two cores) and reported its task runs
  there, where nobody sees them. The runner gives local worker processes the address of
  the flow's server instead (`worker_environment`).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from prefect_dask import DaskTaskRunner

#: Loggers of the flow process quieted while a task runner is open, and their level.
QUIET_LOGGERS = ("distributed",)
QUIET_LEVEL = logging.WARNING


def worker_environment() -> dict[str, str]:
    """``PREFECT_API_URL`` for local worker processes, when this process runs a flow on a
    temporary server on this host that the environment does not name; else nothing."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return {}  # the workers inherit it
    client = getattr(FlowRunContext.get(), "client", None)
    url = str(getattr(client, "api_url", "") or "").rstrip("/")
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
        return {}
    return {"PREFECT_API_URL": url}


class FlowDaskTaskRunner(DaskTaskRunner):
    """`prefect_dask.DaskTaskRunner` for the flows (see the module notes).

    Between ``__enter__`` and ``__exit__`` (cluster start and stop included) each of
    `QUIET_LOGGERS` is at `QUIET_LEVEL` at least; the previous levels come back on exit.
    A local cluster of worker processes gets `worker_environment` as their environment.
    """

    @property
    def name(self) -> str:
        """``dask``, as for `DaskTaskRunner` (Prefect names the runner's logger after it)."""
        return "dask"

    def __enter__(self) -> FlowDaskTaskRunner:
        if (self.address is None and self.cluster_kwargs.get("processes", True)
                and "env" not in self.cluster_kwargs):
            env = worker_environment()
            if env:
                self.cluster_kwargs = {**self.cluster_kwargs, "env": env}
        self._previous_levels = {}
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            self._previous_levels[name] = logger.level
            if logger.getEffectiveLevel() < QUIET_LEVEL:
                logger.setLevel(QUIET_LEVEL)
        try:
            super().__enter__()
        except BaseException:
            self._restore_levels()
            raise
        return self

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            self._restore_levels()

    def _restore_levels(self) -> None:
        for name, level in getattr(self, "_previous_levels", {}).items():
            logging.getLogger(name).setLevel(level)
        self._previous_levels = {}
