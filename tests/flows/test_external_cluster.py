"""Statistics on a real multi-process Dask cluster: a ``dask scheduler`` and two
``dask worker`` processes on loopback, as a lab would start them on its own machines.

``xrai stats --scheduler tcp://…`` and the statistics flow run against it; their results
equal those of the in-process run, to the bit (the partials are merged in the store's
case order whatever the order the workers finish in).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.config import DaskOptions
from pipeline.ingest import ingest
from pipeline.malloc import environ as malloc_environ
from pipeline.sources.phantom import write_phantom
from pipeline.stats_runner import run_stats
from pipeline.store import Grid

GRID = Grid(spacing=(1.5, 1.5, 1.5), shape=(48, 48, 32))
_DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two single-threaded workers, each its own process."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    procs = [subprocess.Popen([_DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=(logs / "scheduler.log").open("w"))]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        # as docs/scaling.md says to start them: the allocator settings in the worker
        # command's environment
        env = {**{k: v for k, v in os.environ.items() if k not in malloc_environ()},
               **malloc_environ()}
        for i in range(2):
            procs.append(subprocess.Popen(
                [_DASK, "worker", address, "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard", "--name", f"w{i}"], stdout=subprocess.DEVNULL,
                stderr=(logs / f"worker{i}.log").open("w"), env=env))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cluster")
    write_phantom(root / "src", cases=5, seed=13, shape=(64, 64, 40))
    url = str(root / "s.zarr")
    assert ingest(root / "src", url, "d", grid=GRID).exit_code == 0
    return url


def _comparable(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("created_at", "store")}


def test_cli_stats_on_an_external_cluster_equal_the_local_run(scheduler: str, dataset: str,
                                                              tmp_path: Path) -> None:
    local = json.loads(run_stats(dataset, "d", scheduler="synchronous",
                                 recompute=True).model_dump_json())
    out = tmp_path / "stats.json"
    xrai = str(Path(sys.executable).with_name("xrai"))
    done = subprocess.run([xrai, "stats", "--store", dataset, "--dataset", "d", "--scheduler",
                           scheduler, "--recompute", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _comparable(json.loads(out.read_text())) == _comparable(local)


def test_stats_flow_on_an_external_cluster_equals_the_local_run(scheduler: str, dataset: str,
                                                                tmp_path: Path,
                                                                prefect_server: str) -> None:
    from flows.stats_flow import stats_flow

    local = json.loads(run_stats(dataset, "d", scheduler="synchronous",
                                 recompute=True).model_dump_json())
    out = tmp_path / "flow.json"
    result = stats_flow(dataset, "d", str(out), dask=DaskOptions(address=scheduler),
                        recompute=True)
    assert sorted(result.computed) == sorted(local["cases"])
    assert _comparable(json.loads(out.read_text())) == _comparable(local)


def test_workers_started_as_documented_run_with_the_allocator_settings(scheduler: str) -> None:
    """docs/scaling.md's way of starting workers: glibc's variables reach the worker
    processes by their own names (set through DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__
    they arrived lower-cased, and glibc ignored them), and the nanny does not put its own
    trim threshold over them."""
    from distributed import Client

    with Client(scheduler, timeout=60) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in malloc_environ()})
    assert len(seen) == 2
    assert all(values == malloc_environ() for values in seen.values())
