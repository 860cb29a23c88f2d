"""Statistics engine against the floor and the usual tools, measured in one run.

    make bench-stats        # or: .venv/bin/python -m benchmarks.bench_stats

On a cached store of 16 phantom cases of 4x240x240x155 (generated once under
.bench/stats), on one Dask LocalCluster (2 worker processes, 1 thread each, the engine's
own `local_cluster`), after a warm-up run, it prints:

- floor: reading every chunk of the cases (image, label, brain) and discarding it;
- ours: `run_stats(recompute=True)`: per case x channel x region (6 regions) exact
  moments of the raw values and of every transform candidate, 4096-bin histograms, and
  the label statistics, merged per dataset; then the same with the numpy fallback kernel
  (``XRAI_STATS_KERNEL=numpy`` in the workers);
- scipy: scipy.stats.skew + kurtosis per channel on the volumes already in memory
  (the load is not timed; float32 input, as stored);
- dask: dask.array.stats.skew + kurtosis per channel on the same Zarr arrays;
- ratios of each to the floor;
- peak memory (max RSS of a process running the engine synchronously) on 8 and 16 cases;
- the incremental path: adding one case to the 16-case dataset, as a ratio to a full run;
- the per-case kernel (issue 14): in this process, per case, the floor (`read_case`: read
  and decompress every chunk), `case_partials` with the fused compiled kernel
  (`XRAI_STATS_KERNEL=numba`) and with the numpy fallback (`XRAI_STATS_KERNEL=numpy`),
  interleaved, best of ``--repeats``, as ratios to the floor measured in the same run;
  and what numba's first call costs in a fresh process: compiling (empty cache) and
  loading the cached machine code (what each Dask worker pays once).

    .venv/bin/python -m benchmarks.bench_stats --kernel-only   # the per-case table only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRID_SHAPE = (240, 240, 155)


def _prepare(work: Path, n: int) -> tuple[str, list]:
    from pipeline.fsio import write_text_atomic
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
        write_text_atomic(marker, "ok")
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


def _kernel_table(url: str, dataset: str, repeats: int) -> dict[str, float]:
    """Per-case floor / fused / numpy times in this process (see the module notes)."""
    from pipeline.stats_runner import engine_config
    from pipeline.store import DatasetStore
    from stats import fused
    from stats.dataset import case_partials

    store = DatasetStore.open(url, dataset)
    records = store.committed()
    config = engine_config(store, records=records)
    saved = os.environ.get(fused.ENV_VAR)
    best: dict[str, list[float]] = {"floor": [], "fused": [], "numpy": []}

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    try:
        for cid, rec in records.items():
            arrays = store.read_case(cid, record=rec)
            os.environ[fused.ENV_VAR] = "numba"
            case_partials(cid, "h", arrays, config)  # compile or load once, untimed
            times = {k: [] for k in best}
            for _ in range(repeats):  # interleaved: the machine's load drifts alike
                times["floor"].append(timed(lambda c=cid, r=rec: store.read_case(c, record=r)))
                for kernel in ("fused", "numpy"):
                    os.environ[fused.ENV_VAR] = "numba" if kernel == "fused" else "numpy"
                    times[kernel].append(timed(
                        lambda c=cid, a=arrays: case_partials(c, "h", a, config)))
            for k, v in times.items():
                best[k].append(min(v))
    finally:
        if saved is None:
            os.environ.pop(fused.ENV_VAR, None)
        else:
            os.environ[fused.ENV_VAR] = saved
    n = len(records)
    floor, fz, npy = (sum(best[k]) / n for k in ("floor", "fused", "numpy"))
    shape = "x".join(str(d) for d in store.read_case(next(iter(records)))["image"].shape)
    print(f"per-case kernel, one process, {n} cases of {shape}, best of {repeats} "
          f"(interleaved):")
    print(f"  floor (read + decompress)  {floor * 1e3:8.1f} ms/case")
    print(f"  fused (numba)              {fz * 1e3:8.1f} ms/case  {fz / floor:5.2f}x floor")
    print(f"  numpy fallback             {npy * 1e3:8.1f} ms/case  {npy / floor:5.2f}x floor")
    print(f"  numpy / fused              {npy / fz:5.2f}x")
    return {"kernel floor ms": floor * 1e3, "kernel fused ms": fz * 1e3,
            "kernel numpy ms": npy * 1e3}


def _first_call_cost() -> tuple[float, float]:
    """Seconds of numba's first call in a fresh process: with an empty cache (compile)
    and with the cache the first process wrote (load)."""
    code = (
        "import time, numpy as np\nfrom stats import fused\n"
        "from stats.transforms import arcsin_sqrt, ln\n"
        "v = np.ones(64, np.float32); c = np.ones(64, np.uint8)\nt = time.perf_counter()\n"
        "fused.region_partials(v, c, 5, {'ln': ln(1.0), 'a': arcsin_sqrt(2.0)},"
        " edges=np.linspace(0.0, 2.0, 9), clamp=(0.0, 2.0))\n"
        "print(time.perf_counter() - t)\n")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = [float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                    text=True, check=True, env=env).stdout.split()[-1])
               for _ in range(2)]
    return out[0], out[1]


def _cli_path(url: str, cases: list, pairs: int) -> dict[str, float]:
    """``xrai stats --recompute`` as a user runs it, on 4 and on 16 cases (issue 14).

    The fixed cost is the 4-case run less reading those 4 cases; the marginal cost is the
    difference of the two runs (median over ``pairs`` interleaved pairs), set against
    reading the 12 extra cases' chunks in one process, measured in the same run.
    """
    from pipeline.errors import StoreError
    from pipeline.store import DatasetStore, Grid

    try:
        DatasetStore.open(url, "bench4")
    except StoreError:  # not made yet in this cached store
        from pipeline.ingest import ingest_cases

        ingest_cases(cases[:4], url, "bench4", grid=Grid(shape=GRID_SHAPE))
    xrai = str(Path(sys.executable).with_name("xrai"))

    def cli(dataset: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([xrai, "stats", "--store", url, "--dataset", dataset, "--recompute",
                            "--out", str(Path(tmp) / "s.json")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - t0

    small, large = [], []
    for _ in range(pairs):
        small.append(cli("bench4"))
        large.append(cli("bench16"))
    store = DatasetStore.open(url, "bench16")
    four = set(DatasetStore.open(url, "bench4").committed())
    extra = [c for c in store.committed() if c not in four]
    t0 = time.perf_counter()
    for cid in extra:
        store.read_case(cid)
    read_extra = time.perf_counter() - t0
    t0 = time.perf_counter()
    for cid in four:
        store.read_case(cid)
    read_four = time.perf_counter() - t0
    marginal = statistics.median(b - a for a, b in zip(small, large, strict=True))
    mvox = len(extra) * 4 * float(np.prod(GRID_SHAPE)) / 1e6
    out = {"cli_4": statistics.median(small), "cli_16": statistics.median(large),
           "marginal_12": marginal, "read_12": read_extra,
           "fixed": statistics.median(small) - read_four}
    print(f"CLI path (xrai stats --recompute, default scheduler), median of {pairs} pairs: "
          f"4 cases {out['cli_4']:.2f} s, 16 cases {out['cli_16']:.2f} s")
    print(f"  the {len(extra)} extra cases ({mvox:.0f} Mvox): {marginal:.2f} s against "
          f"{read_extra:.2f} s to read them in one process = {marginal / read_extra:.2f}x the "
          f"floor, {mvox / marginal:.0f} Mvox/s")
    print(f"  fixed cost (4-case run less reading its 4 cases): {out['fixed']:.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="statistics engine benchmark")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/stats"))
    parser.add_argument("--skip-dask", action="store_true", help="skip dask.array.stats (slow)")
    parser.add_argument("--kernel-only", action="store_true",
                        help="only the per-case kernel table (fused vs numpy vs floor)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per case (kernel table)")
    parser.add_argument("--cli-only", action="store_true",
                        help="only the CLI path (xrai stats on 4 and 16 cases)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of CLI runs")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    url, cases = _prepare(args.workdir, args.cases)
    _cli_path(url, cases, args.pairs)
    if args.cli_only:
        return
    compile_s, load_s = _first_call_cost()
    print(f"numba first call in a fresh process: compile {compile_s:.2f} s (empty cache), "
          f"load {load_s:.2f} s (cached, once per worker process)")
    kernel = _kernel_table(url, "bench16", args.repeats)
    if args.kernel_only:
        print(json.dumps({k: round(v, 3) for k, v in kernel.items()}))
        return

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

        # the same run with the numpy fallback kernel in the workers (issue 14)
        from stats.fused import ENV_VAR

        client.run(os.environ.__setitem__, ENV_VAR, "numpy")
        try:
            t0 = time.perf_counter()
            run_stats(url, "bench16", scheduler=cluster.scheduler_address, recompute=True)
            results["ours, numpy fallback kernel"] = time.perf_counter() - t0
        finally:
            client.run(os.environ.pop, ENV_VAR, None)

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
    records = store.committed()
    for c in range(4):
        x = np.stack([store.read_image(i, store.channels[c], record=records[i])
                      for i in ids]).ravel()
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
    print(json.dumps({k: round(v, 3) for k, v in {**results, **kernel}.items()}))


if __name__ == "__main__":
    main()
