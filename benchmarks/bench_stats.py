"""Statistics engine against the floor and the usual tools, measured in one run.

    make bench-stats        # or: .venv/bin/python -m benchmarks.bench_stats

On a cached store of 16 phantom cases of 4x240x240x155 (generated once under
.bench/stats), on one Dask LocalCluster (2 worker processes, 1 thread each, the engine's
own `local_cluster`), after a warm-up run, it prints:

- floor: reading every chunk of the cases (image, label, brain) and discarding it;
- ours: `run_stats(recompute=True)`: per case x channel x region (6 regions) exact
  moments of the raw values and of every transform candidate, 4096-bin histograms, and
  the label statistics, merged per dataset;
- scipy: scipy.stats.skew + kurtosis per channel on the volumes already in memory
  (the load is not timed; float32 input, as stored);
- dask: dask.array.stats.skew + kurtosis per channel on the same Zarr arrays;
- ratios of each to the floor;
- peak memory (max RSS of a process running the engine synchronously) on 8 and 16 cases;
- the incremental path: adding one case to the 16-case dataset, as a ratio to a full run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GRID_SHAPE = (240, 240, 155)


def _prepare(work: Path, n: int) -> tuple[str, list]:
    from pipeline.ingest import ingest_cases
    from pipeline.sources.local import discover
    from pipeline.sources.phantom import write_phantom
    from pipeline.store import Grid

    src = work / "source"
    url = str(work / "bench.zarr")
    marker = work / f".complete-{n}"
    cases = None
    if not marker.exists():
        print(f"generating {n + 1} phantom cases of 240x240x155 and ingesting them (cached) ...",
              flush=True)
        write_phantom(src, cases=n + 1, seed=5, shape=GRID_SHAPE)
        cases = discover(src, layout="brats")
        grid = Grid(shape=GRID_SHAPE)
        ingest_cases(cases[:n], url, "bench16", grid=grid, workers=2)
        ingest_cases(cases[: n // 2], url, "bench8", grid=grid, workers=2)
        marker.write_text("ok")
    if cases is None:
        cases = discover(src, layout="brats")
    return url, cases


def _read_case(url: str, dataset: str, case_id: str) -> int:
    from pipeline.store import DatasetStore

    arrays = DatasetStore.open(url, dataset).read_case(case_id)
    return int(sum(a.size for a in arrays.values()))


def _peak_rss_mb(url: str, dataset: str) -> float:
    # VmHWM of a fresh process (ru_maxrss would carry the parent's peak across exec)
    code = (
        "from pipeline.stats_runner import run_stats\n"
        f"run_stats({url!r}, {dataset!r}, scheduler='synchronous', recompute=True)\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description="statistics engine benchmark")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/stats"))
    parser.add_argument("--skip-dask", action="store_true", help="skip dask.array.stats (slow)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    url, cases = _prepare(args.workdir, args.cases)

    import dask
    import dask.array as da
    import dask.array.stats as dstats
    import scipy.stats
    import zarr
    from distributed import Client

    from pipeline.ingest import ingest_cases
    from pipeline.stats_runner import local_cluster, run_stats
    from pipeline.store import DatasetStore

    store = DatasetStore.open(url, "bench16")
    ids = list(store.committed())
    voxels = len(ids) * 4 * int(np.prod(GRID_SHAPE))
    print(f"store: {len(ids)} cases x 4 channels x 240x240x155 = {voxels / 1e6:.0f} Mvox of image")
    results: dict[str, float] = {}
    with local_cluster(2) as cluster, Client(cluster) as client:
        # warm-up (imports, zarr and numpy start-up in the workers) outside the timings
        run_stats(url, "bench8", scheduler=cluster.scheduler_address, recompute=True)
        t0 = time.perf_counter()
        client.gather(client.map(_read_case, [url] * len(ids), ["bench16"] * len(ids), ids,
                                 pure=False))
        results["floor (read every chunk)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        run_stats(url, "bench16", scheduler=cluster.scheduler_address, recompute=True)
        results["ours (xrai stats, full)"] = full = time.perf_counter() - t0

        if not args.skip_dask:
            group = zarr.open_group(url, path="bench16", mode="r")
            image = da.from_zarr(group["image"])[: len(ids)]
            t0 = time.perf_counter()
            with dask.config.set(scheduler=client):
                lazy = []
                for c in range(4):
                    x = image[:, c].reshape(-1)
                    lazy += [dstats.skew(x), dstats.kurtosis(x)]
                dask.compute(*lazy)
            results["dask.array.stats skew+kurtosis"] = time.perf_counter() - t0

        # incremental: add one case, time the re-run (reads that case only)
        extra = cases[args.cases]
        from pipeline.store import Grid

        ingest_cases([extra], url, "bench16", grid=Grid(shape=GRID_SHAPE))
        t0 = time.perf_counter()
        run_stats(url, "bench16", scheduler=cluster.scheduler_address)
        results["incremental (+1 case)"] = inc = time.perf_counter() - t0
        DatasetStore.open(url, "bench16", writable=True).uncommit(extra.case_id)

    # scipy on the volumes in memory (load not timed), one channel at a time
    scipy_time = 0.0
    for c in range(4):
        x = np.stack([store.group["image"][store.committed()[i].slot, c] for i in ids]).ravel()
        t0 = time.perf_counter()
        scipy.stats.skew(x)
        scipy.stats.kurtosis(x)
        scipy_time += time.perf_counter() - t0
        del x
    results["scipy.stats skew+kurtosis (in memory)"] = scipy_time

    floor = results["floor (read every chunk)"]
    print(f"{'what':42s} {'seconds':>8s} {'Mvox/s':>8s} {'x floor':>8s}")
    for name, sec in results.items():
        if name.startswith("incremental"):
            continue
        print(f"{name:42s} {sec:8.2f} {voxels / sec / 1e6:8.0f} {sec / floor:8.2f}")
    print(f"incremental: adding 1 case to {len(ids)}: {inc:.2f} s = {inc / full:.2f}x a full run")
    rss8 = _peak_rss_mb(url, "bench8")
    rss16 = _peak_rss_mb(url, "bench16")
    print(f"peak memory of the engine (synchronous, one process): 8 cases {rss8:.0f} MiB, "
          f"16 cases {rss16:.0f} MiB (ratio {rss16 / rss8:.2f})")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
