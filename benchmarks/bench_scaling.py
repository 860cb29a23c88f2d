"""The scaling model of the statistics stage, measured on a real multi-process Dask cluster.

    make bench-scaling        # or: .venv/bin/python -m benchmarks.bench_scaling

On the cached store of `benchmarks.bench_stats` (16 phantom cases of 4x240x240x155), it
measures the terms of a cost model and checks the model against wall times at 1 and 2
workers, all in one run:

- ``read``: reading and decompressing one case in this process (the floor);
- ``case``: one case's statistics in this process (`StatsJob.run`: read, kernel,
  persist the partials), the unit of work a worker does;
- ``task``: the scheduler's overhead per task, from 400 empty tasks on the cluster;
- ``start``: a ``dask scheduler`` and W ``dask worker`` processes from spawn to ready;
- ``s3``: reading one case from a loopback S3 server (moto) against the local read;
- wall time of `run_jobs` for all cases on W = 1 and 2 workers (warm workers).

The model (`benchmarks.scaling_doc.model`): a run of n cases on W single-threaded
workers on a machine with C cores takes

    T(n, W) = start(W) + max(ceil(n / W) * (case + task), n * cpu / C)

(each worker runs its cases one after another; together they use at most C cores, and
one worker alone uses more than one, since a case's chunks are decoded on several
threads), with ``case`` and ``cpu`` (its CPU time, all threads) measured in one process (so the workers' contention for memory bandwidth
and the page cache is what the check against the measured walls shows). With
``--write-doc`` it writes docs/scaling.md from the numbers of this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_stats import _prepare
from benchmarks.scaling_doc import model
from pipeline.malloc import environ as malloc_environ

CORPUS_CASES = 1531  # the seeds' corpus (UPENN-GBM, UCSF-PDGM, BraTS-Africa, LGG, ReMIND)
_DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and ``workers`` single-threaded worker processes on loopback."""

    def __init__(self, workers: int, *, tuned: bool = True) -> None:
        from distributed import Client

        port = _free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        t0 = time.perf_counter()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.procs = [subprocess.Popen([_DASK, "scheduler", "--host", "127.0.0.1", "--port",
                                        str(port), "--no-dashboard"], **quiet)]
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        # As `pipeline.stats_runner.local_cluster` does (`pipeline.malloc`): without it
        # the nanny freezes glibc's mmap threshold at 128 KiB; docs/scaling.md tells how
        # to start workers this way. The variables go in the worker command's own
        # environment: the nanny passes them on (it prefers them to its config), while
        # DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__... would reach the worker in
        # lower case (Dask lower-cases configuration keys), which glibc ignores.
        env = {k: v for k, v in os.environ.items() if k not in malloc_environ()}
        if tuned:
            env.update(malloc_environ())
        self.procs += [subprocess.Popen([_DASK, "worker", self.address, "--nworkers", "1",
                                         "--nthreads", "1", "--no-dashboard"], env=env, **quiet)
                       for _ in range(workers)]
        self.client = Client(self.address, timeout=120)
        self.client.wait_for_workers(workers, timeout=300)
        self.start_s = time.perf_counter() - t0

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


def _noop(i: int) -> int:
    return i


def task_overhead(cluster: Cluster, n: int = 400) -> float:
    """Seconds per empty task, submitted at once and gathered."""
    cluster.client.gather(cluster.client.map(_noop, range(20), pure=False))  # warm
    t0 = time.perf_counter()
    cluster.client.gather(cluster.client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - t0) / n


def s3_read_ratio(work: Path) -> dict[str, float]:
    """Reading one case from a loopback S3 (moto) server against the local store."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return {}
    import logging

    from pipeline.ingest import ingest
    from pipeline.sources.phantom import write_phantom
    from pipeline.store import DatasetStore, Grid

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        opts = {"key": "t", "secret": "t", "endpoint_url": endpoint,
                "client_kwargs": {"region_name": "us-east-1"}}
        src = work / "s3-source"
        if not src.exists():
            write_phantom(src, cases=2, seed=9, shape=(240, 240, 155))
        grid = Grid(shape=(240, 240, 155))
        local = str(work / "s3-local.zarr")
        ingest(src, local, "d", grid=grid)
        ingest(src, "s3://bench/s.zarr", "d", grid=grid, storage_options=opts)
        a = DatasetStore.open(local, "d")
        b = DatasetStore.open("s3://bench/s.zarr", "d", storage_options=opts)
        cid = next(iter(a.committed()))
        times = {"local": [], "s3": []}
        for _ in range(3):
            for name, store in (("local", a), ("s3", b)):
                t0 = time.perf_counter()
                store.read_case(cid)
                times[name].append(time.perf_counter() - t0)
        return {k: min(v) for k, v in times.items()}
    finally:
        server.stop()


def case_bytes(url: str, dataset: str) -> float:
    """Mean compressed bytes of one case in the local store (every chunk of its slot)."""
    from pipeline.store import DatasetStore

    slots = [r.slot for r in DatasetStore.open(url, dataset).committed().values()]
    root = Path(url) / dataset
    total = 0
    for slot in slots:
        for name in ("image", "label", "brain", "annotated"):
            folder = root / name / "c" / str(slot)
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total / max(1, len(slots))


def in_process(url: str, dataset: str, repeats: int) -> dict[str, float]:
    """Median seconds per case of the read floor and of one statistics job (wall), and
    the job's CPU seconds (all the process's threads: zarr decodes a case's chunks on
    several). The reads and the jobs take turns over different cases, each case read
    once, as a worker reads it (a job right after reading its own case would find it
    warm, and flatter the model)."""
    from pipeline.stats_runner import plan_stats
    from pipeline.store import DatasetStore

    store = DatasetStore.open(url, dataset, writable=True)
    plan = plan_stats(store, recompute=True)
    reads, cases, cpus = [], [], []
    jobs = plan.jobs[: 2 * repeats]
    for read_job, job in zip(jobs[0::2], jobs[1::2], strict=False):
        t0 = time.perf_counter()
        store.read_case(read_job.case_id)
        reads.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        job.run()  # persisting included, as on a worker
        cases.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"read": statistics.median(reads), "case": statistics.median(cases),
            "cpu": statistics.median(cpus)}


def cluster_run(url: str, dataset: str, workers: int, *, tuned: bool = True,
                passes: int = 3) -> dict[str, float]:
    """Start a cluster of ``workers``, warm it with one pass, time ``passes`` full passes
    (the median: one pass of a few seconds on this shared machine varies by tens of %).

    ``run_jobs`` connects a client of its own to the scheduler (as ``xrai stats
    --scheduler`` does, once a call); that connection is timed apart (``connect``,
    median of 3) and taken out of ``wall``: it is part of a call's start, not of its
    cases.
    """
    from distributed import Client

    from pipeline.stats_runner import plan_stats, run_jobs
    from pipeline.store import DatasetStore

    plan = plan_stats(DatasetStore.open(url, dataset), recompute=True)
    cluster = Cluster(workers, tuned=tuned)
    try:
        run_jobs(plan.jobs[:workers], cluster.address)  # imports, page cache
        task = task_overhead(cluster)
        connects = []
        for _ in range(3):
            t0 = time.perf_counter()
            Client(cluster.address).close()
            connects.append(time.perf_counter() - t0)
        connect = statistics.median(connects)
        walls = []
        for _ in range(passes):
            t0 = time.perf_counter()
            run_jobs(plan.jobs, cluster.address)
            walls.append(time.perf_counter() - t0 - connect)
        wall = statistics.median(walls)
    finally:
        cluster.close()
    return {"start": cluster.start_s, "task": task, "wall": wall, "n": len(plan.jobs),
            "connect": connect}


def main() -> None:
    parser = argparse.ArgumentParser(description="scaling model of the statistics stage")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/stats"))
    parser.add_argument("--repeats", type=int, default=16, help="cases read, and as many computed, in process (other cases each)")
    parser.add_argument("--write-doc", type=Path, default=None,
                        help="write the scaling document (docs/scaling.md) from this run")
    args = parser.parse_args()
    from pipeline.malloc import tune_this_process

    tune_this_process()  # in-process as the workers run: with the allocator settings
    url, _ = _prepare(args.workdir, args.cases)
    dataset = "bench16"
    cores = os.cpu_count() or 1
    from pipeline.store import DatasetStore

    store = DatasetStore.open(url, dataset)
    for cid in store.committed():  # every case in the page cache before anything is timed
        store.read_case(cid)
    one = in_process(url, dataset, args.repeats)
    one["bytes"] = case_bytes(url, dataset)
    print(f"in process, per case: read {one['read']:.3f} s, statistics {one['case']:.3f} s "
          f"({one['case'] / one['read']:.2f}x the read), {one['cpu']:.3f} s of CPU", flush=True)
    runs = {w: cluster_run(url, dataset, w) for w in (1, 2)}
    untuned = cluster_run(url, dataset, 2, tuned=False)
    print(f"2 workers started without the allocator settings: {untuned['wall']:.2f} s "
          f"({untuned['wall'] / runs[2]['wall']:.2f}x the tuned run)", flush=True)
    rows = []
    for w, r in runs.items():
        predicted = model(r["n"], w, cores, one["case"], one["cpu"], r["task"])
        rows.append((w, r["start"], r["task"], r["wall"], predicted))
        print(f"{w} worker(s): start {r['start']:.1f} s, client connection {r['connect']:.2f} s, "
              f"task overhead {r['task'] * 1e3:.2f} ms, "
              f"{r['n']} cases in {r['wall']:.2f} s, model {predicted:.2f} s "
              f"(measured/model {r['wall'] / predicted:.2f})", flush=True)
    s3 = s3_read_ratio(args.workdir)
    if s3:
        print(f"one case from loopback S3 (moto): {s3['s3']:.3f} s against {s3['local']:.3f} s "
              f"locally ({s3['s3'] / s3['local']:.1f}x)", flush=True)
    # The per-case cost on W workers, from the measured wall of the largest run.
    w_max = max(runs)
    per_case_cluster = runs[w_max]["wall"] / math.ceil(runs[w_max]["n"] / min(w_max, cores))
    result = {"cores": cores, "in_process": one, "clusters": {str(k): v for k, v in runs.items()},
              "untuned_2": untuned,
              "s3": s3, "per_case_on_cluster_s": per_case_cluster}
    out = args.workdir / "scaling.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"numbers written to {out}")
    if args.write_doc:
        from benchmarks.scaling_doc import render
        from pipeline.fsio import write_text_atomic

        write_text_atomic(args.write_doc, render(result, corpus=CORPUS_CASES))
        print(f"wrote {args.write_doc}")


if __name__ == "__main__":
    main()
