"""Statistics engine against the floor and the usual tools, measured in one run.

    make bench-stats        # or: .venv/bin/python -m benchmarks.bench_stats

First the command line as users run it (issue 14), on two case sizes, 4 x 160x160x100 and
4 x 240x240x155 (stores of 4 and 16 phantom cases each, cached under .bench/stats): the
marginal cost of ``xrai stats --recompute`` per case against reading the same chunks in
one process (per pair of runs, median over pairs), the fixed cost of a call, and what
adding one case to a dataset costs through ``xrai stats``.

    .venv/bin/python -m benchmarks.bench_stats --cli-only   # that part only

Then, on a cached store of 16 phantom cases of 4x240x240x155, on one Dask LocalCluster
(2 worker processes, 1 thread each, the engine's own `local_cluster`), after a warm-up
run:

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
- the incremental path on the cluster: adding one case to the 16-case dataset, as a ratio
  to a full run;
- the per-case kernel (issue 14): in this process, per case, the floor (`read_case`: read
  and decompress every chunk), `case_partials` with the fused compiled kernel
  (`XRAI_STATS_KERNEL=numba`) and with the numpy fallback (`XRAI_STATS_KERNEL=numpy`),
  interleaved, best of ``--repeats``, as ratios to the floor measured in the same run.

Before all of it: what the engine's first call costs in a fresh process (numba's set-up
and the kernel: compiling with an empty cache, loading the cached machine code, what each
run and each Dask worker pays once; the in-process run overlaps it with reading the first
case).

    .venv/bin/python -m benchmarks.bench_stats --kernel-only   # CLI and per-case tables
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
SMALL_SHAPE = (160, 160, 100)


def _cached_store(src: Path, url: str, marker: Path, shape: tuple[int, int, int], n: int,
                  seed: int, datasets: dict[str, int]) -> list:
    """Phantom sources of ``n + 1`` cases of 4 x ``shape`` under ``src`` and, in the store
    at ``url``, each dataset of ``datasets`` (name: its first cases), made once: ``marker``
    is written last. Returns the source cases."""
    from pipeline.fsio import write_text_atomic
    from pipeline.ingest import ingest_cases
    from pipeline.sources.local import discover
    from pipeline.sources.phantom import write_phantom
    from pipeline.store import Grid

    if not marker.exists():
        tag = "x".join(map(str, shape))
        print(f"generating {n + 1} phantom cases of {tag} and ingesting them (cached) ...",
              flush=True)
        write_phantom(src, cases=n + 1, seed=seed, shape=shape)
        cases = discover(src, layout="brats")
        for name, count in datasets.items():
            ingest_cases(cases[:count], url, name, grid=Grid(shape=shape), workers=2)
        write_text_atomic(marker, "ok")
    return discover(src, layout="brats")


def _prepare(work: Path, n: int) -> tuple[str, list]:
    url = str(work / "bench.zarr")
    cases = _cached_store(work / "source", url, work / f".complete-{n}", GRID_SHAPE, n, 5,
                          {"bench16": n, "bench8": n // 2})
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


def _first_call_cost() -> tuple[float, float, float]:
    """Seconds of the engine's first call in a fresh process (`pipeline.aot.install`, then
    `stats.dataset.prepare`): numba's JIT with an empty cache (compile) and with the cache
    the first process wrote (load), then the ahead-of-time build (nan when there is none)."""
    code = ("import time\nfrom pipeline import aot\nfrom stats.dataset import prepare\n"
            "t = time.perf_counter()\naot.install()\nprepare()\n"
            "print(time.perf_counter() - t)\n")  # the imports are not counted

    def run(env: dict[str, str]) -> float:
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                    text=True, check=True, env=env).stdout.split()[-1])

    from pipeline import aot

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, aot.ENV_VAR: "0"}
        compile_s, load_s = run(env), run(env)
    ahead = run(dict(os.environ)) if aot.find()[0] is not None else float("nan")
    return compile_s, load_s, ahead


def _cli_peak_mib(xrai: str, url: str, dataset: str) -> float:
    """Max RSS (MiB) of ``xrai stats --recompute`` and its children, in a fresh waiter
    process (RUSAGE_CHILDREN of this process would carry earlier runs' peaks)."""
    code = ("import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL,"
            " stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, xrai, "stats", "--store", url,
                              "--dataset", dataset, "--recompute", "--out",
                              str(Path(tmp) / "s.json")],
                             capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024.0


def _resident_by_case(url: str, dataset: str) -> list[float]:
    """Resident memory (MiB) of a fresh process after each case of ``run_stats`` (the
    engine ``xrai stats`` runs, with its allocator settings): whether memory grows with
    the number of cases or levels off (the live cases plus what the allocator keeps)."""
    code = ("import sys\nfrom pipeline.malloc import tune_this_process\n"
            "tune_this_process()\nfrom pipeline.stats_runner import run_stats\n"
            "def rss():\n"
            "    with open('/proc/self/statm') as f:\n"
            "        return int(f.read().split()[1]) * 4096 / 2**20\n"
            "marks = []\n"
            "run_stats(sys.argv[1], sys.argv[2], recompute=True,"
            " on_done=lambda cid: marks.append(rss()))\n"
            "print(' '.join(f'{m:.1f}' for m in marks))\n")
    out = subprocess.run([sys.executable, "-c", code, url, dataset], capture_output=True,
                         text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def _cli_store(work: Path, shape: tuple[int, int, int], n: int) -> tuple[str, list]:
    """A store with datasets of 4 and of ``n`` cases of 4 x ``shape`` (cached), and the
    source cases (one more than ``n``, for the incremental run)."""
    tag = "x".join(map(str, shape))
    url = str(work / f"cli-{tag}.zarr")
    cases = _cached_store(work / f"cli-{tag}-source", url, work / f".complete-cli-{tag}-{n}",
                          shape, n, 7, {"many": n, "four": 4})
    return url, cases


def _stage_profile(url: str, dataset: str) -> dict[str, float]:
    """Where the time of ``xrai stats`` goes per case, stage by stage (issue 14).

    In this process, each case's stages run one after the other and are timed alone
    (wall and the process's CPU, all threads; the median over the cases, each case read
    once, as a run reads it: re-reading a case at once finds it warm and flatters every
    stage): the read (`StatsJob.read`), the region codes, the fused kernel over the
    channels, the label statistics, the partials' encoding and their write. Then the pipelined run as
    the command runs it (`run_jobs`, in-process: read-ahead and write-behind threads), and
    what two perfectly shared cores would allow, ``max(read, sum / 2)``.
    """
    import resource

    import stats.dataset as sd
    from pipeline.stats_runner import encode_partials, plan_stats, run_jobs
    from pipeline.store import DatasetStore

    store = DatasetStore.open(url, dataset, writable=True)
    plan = plan_stats(store, recompute=True)
    sd.prepare()
    run_jobs(plan.jobs[:1])  # warm-up
    rows = ("read (decompress every chunk)", "region codes", "fused kernel (all channels)",
            "label statistics", "encode partials (JSON + zlib)", "write partials")
    originals = {name: getattr(sd, name) for name in ("region_codes", "_channel_partials",
                                                       "label_stats")}
    row_of = {"region_codes": rows[1], "_channel_partials": rows[2], "label_stats": rows[3]}

    def clocks() -> tuple[float, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), r.ru_utime + r.ru_stime

    acc: dict[str, list[float]] = {}  # row -> [wall, cpu] within one case_partials call

    def timer(name: str):
        fn = originals[name]

        def wrapper(*args, **kwargs):
            w, c = clocks()
            try:
                return fn(*args, **kwargs)
            finally:
                w2, c2 = clocks()
                a = acc.setdefault(row_of[name], [0.0, 0.0])
                a[0] += w2 - w
                a[1] += c2 - c
        return wrapper

    times: dict[str, list[tuple[float, float]]] = {r: [] for r in rows}
    for job in plan.jobs[1:]:  # the first was read by the warm-up
        w, c = clocks()
        arrays = job.read()
        w2, c2 = clocks()
        times[rows[0]].append((w2 - w, c2 - c))
        acc.clear()
        for name in originals:
            setattr(sd, name, timer(name))
        try:
            partials = sd.case_partials(job.case_id, job.content_hash, arrays, job.config)
        finally:
            for name, fn in originals.items():
                setattr(sd, name, fn)
        for row, (aw, ac) in acc.items():
            times[row].append((aw, ac))
        del arrays
        w, c = clocks()
        blob = encode_partials(partials)
        w2, c2 = clocks()
        store.write_partials(job.case_id, blob, content_hash=partials.content_hash,
                             fingerprint=partials.config)
        w3, c3 = clocks()
        times[rows[4]].append((w2 - w, c2 - c))
        times[rows[5]].append((w3 - w2, c3 - c2))
    n = len(plan.jobs)
    w = time.perf_counter()
    run_jobs(plan.jobs)
    pipelined = (time.perf_counter() - w) / n
    per = {row: statistics.median(t[0] for t in times[row]) for row in rows}
    cpu = {row: statistics.median(t[1] for t in times[row]) for row in rows}
    read = per[rows[0]]
    total = sum(per.values())
    print(f"  where the time goes, per case, each stage alone (medians over {n - 1} cases, "
          f"each read once; ms wall / ms CPU of the process):")
    for row in rows:
        print(f"    {row:32s} {per[row] * 1e3:7.1f} {cpu[row] * 1e3:7.1f}")
    print(f"    {'sum of the stages':32s} {total * 1e3:7.1f}  = {total / read:.2f}x the read")
    print(f"    {'pipelined, as xrai stats runs':32s} {pipelined * 1e3:7.1f}  = "
          f"{pipelined / read:.2f}x the read; two perfectly shared cores would allow "
          f"{max(read, total / 2) * 1e3:.1f} ms = {max(read, total / 2) / read:.2f}x")
    return {"stages sum x read": total / read, "pipelined x read": pipelined / read,
            "one case alone s": total}



def _cli_path(work: Path, shape: tuple[int, int, int], n: int, pairs: int,
              first_call: float) -> dict[str, float]:
    """``xrai stats`` as a user runs it, on 4 and on ``n`` cases of 4 x ``shape`` (issue 14).

    Each pair runs ``xrai stats --recompute`` on the 4-case and on the ``n``-case dataset,
    then reads the ``n - 4`` extra cases' chunks in this process (the floor); the pair's
    ratio is (large - small) / read. The median ratio over ``pairs`` pairs is reported: the
    three measurements of a pair are taken within seconds, so the machine's drifting load
    weighs on them alike. The fixed cost is the 4-case run less reading its 4 cases.
    Then the incremental path as users meet it: ``xrai stats`` (no ``--recompute``) after
    ingesting one more case, then with nothing new, ``pairs`` times back to back; the
    median difference is what adding a case costs, set against one case's share of the
    marginal cost.
    """
    from pipeline.ingest import ingest_cases
    from pipeline.store import DatasetStore, Grid

    url, cases = _cli_store(work, shape, n)
    xrai = str(Path(sys.executable).with_name("xrai"))

    def cli(dataset: str, *extra: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([xrai, "stats", "--store", url, "--dataset", dataset, *extra,
                            "--out", str(Path(tmp) / "s.json")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - t0

    store = DatasetStore.open(url, "many")
    four = set(DatasetStore.open(url, "four").committed())
    records = store.committed()
    extra = [c for c in records if c not in four]

    def read(ids: list[str]) -> float:
        t0 = time.perf_counter()
        for cid in ids:
            store.read_case(cid, record=records[cid])
        return time.perf_counter() - t0

    cli("four", "--recompute")  # warm-up: page cache, numba's cache, imports
    small, large, floor, ratios = [], [], [], []
    for _ in range(pairs):
        small.append(cli("four", "--recompute"))
        large.append(cli("many", "--recompute"))
        floor.append(read(extra))
        ratios.append((large[-1] - small[-1]) / floor[-1])
    read_four = read(sorted(four))
    marginal = statistics.median(b - a for a, b in zip(small, large, strict=True))
    ratio = statistics.median(ratios)
    mvox = len(extra) * 4 * float(np.prod(shape)) / 1e6
    tag = "x".join(map(str, shape))
    print(f"CLI path, cases of 4x{tag} (xrai stats --recompute, default scheduler), "
          f"{pairs} pairs: 4 cases {statistics.median(small):.2f} s, {n} cases "
          f"{statistics.median(large):.2f} s (medians)")
    print(f"  the {len(extra)} extra cases ({mvox:.0f} Mvox): {marginal:.2f} s against "
          f"{statistics.median(floor):.2f} s to read them in one process; per pair "
          f"{', '.join(f'{r:.2f}' for r in ratios)}x the floor: median {ratio:.2f}x "
          f"({'meets' if ratio <= 1.25 else 'misses'} the <= 1.25x aim), "
          f"{mvox / marginal:.0f} Mvox/s")
    fixed = statistics.median(small) - read_four
    print(f"  fixed cost (4-case run less reading its 4 cases): {fixed:.2f} s")

    peak = {d: _cli_peak_mib(xrai, url, d) for d in ("four", "many")}
    print(f"  peak memory of xrai stats (max RSS of the command and its children): 4 cases "
          f"{peak['four']:.0f} MiB, {n} cases {peak['many']:.0f} MiB "
          f"(ratio {peak['many'] / peak['four']:.2f})")
    if Path("/proc/self/statm").exists():
        from pipeline.malloc import THRESHOLD

        rss = _resident_by_case(url, "many")
        half = len(rss) // 2
        print(f"  resident memory after each of the {len(rss)} cases (MiB): "
              f"{' '.join(f'{m:.0f}' for m in rss)}; the second half of the cases added "
              f"{rss[-1] - rss[half - 1]:+.0f} MiB (the first half {rss[half - 1] - rss[0]:+.0f}: "
              f"the allocator keeps up to {THRESHOLD >> 20} MiB of freed memory, "
              f"pipeline.malloc)")

    profile = _stage_profile(url, "many")
    alone = profile.pop("one case alone s")

    # incremental: one more case (the cached partials of the others), then nothing new;
    # in pairs taken back to back, so that the machine's drifting load weighs on both
    # (more pairs than above: the difference of two whole runs is noisier than a ratio)
    inc_pairs = 2 * pairs + 1
    cli("many")  # brings the stored partials up to date after the --recompute runs
    writable = DatasetStore.open(url, "many", writable=True)
    writable.drop_partials(cases[n].case_id)  # an earlier run's, else they are reused
    ingest_cases([cases[n]], url, "many", grid=Grid(shape=shape))
    try:
        cli("many")
        runs, noops = [], []
        for _ in range(inc_pairs):
            writable.drop_partials(cases[n].case_id)  # the added case computed anew
            runs.append(cli("many"))
            noops.append(cli("many"))  # its partials now stored: nothing to compute
        plus_one, noop = statistics.median(runs), statistics.median(noops)
        added = statistics.median(a - b for a, b in zip(runs, noops, strict=True))
    finally:
        writable.uncommit(cases[n].case_id)
        writable.drop_partials(cases[n].case_id)
    per_case = marginal / len(extra)
    print(f"  incremental ({inc_pairs} pairs): xrai stats after adding one case "
          f"{plus_one:.2f} s, with nothing new {noop:.2f} s (medians): the case costs "
          f"{added:.3f} s (median of the pairs' differences) = {added / alone:.2f}x one case's "
          f"work done alone ({alone:.3f} s: the sum of its stages above; aim <= 1.5x), "
          f"{added / per_case:.2f}x its share of the marginal cost of a run, where cases "
          f"overlap ({per_case:.3f} s). A lone case overlaps with nothing, and pays a fresh "
          f"process's first touch of its memory; the engine's first call is included "
          f"({first_call:.3f} s in a fresh process, which a run with nothing to compute does "
          f"not make)")
    return {f"cli {tag} ratio": ratio, **{f"cli {tag} {k}": v for k, v in profile.items()}, f"cli {tag} Mvox/s": mvox / marginal,
            f"cli {tag} fixed s": fixed, f"cli {tag} added case x alone": added / alone,
            f"cli {tag} added case x share": added / per_case,
            f"cli {tag} peak MiB ratio": peak["many"] / peak["four"]}


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
    parser.add_argument("--pairs", type=int, default=5, help="pairs of CLI runs per case size")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from pipeline.malloc import tune_this_process

    # the floors are read in this process: with the allocator settings xrai stats uses
    tune_this_process()
    compile_s, load_s, ahead_s = _first_call_cost()
    from pipeline import aot

    print(f"the engine's first call in a fresh process (once per process: each run, each "
          f"Dask worker): numba's JIT {compile_s:.2f} s with an empty cache (compile), "
          f"{load_s:.2f} s cached; the ahead-of-time build {ahead_s:.3f} s "
          f"({aot.find()[1]})")
    first_call = ahead_s if ahead_s == ahead_s else load_s  # what xrai stats pays here
    cli = {}
    for shape in (SMALL_SHAPE, GRID_SHAPE):
        cli.update(_cli_path(args.workdir, shape, args.cases, args.pairs, first_call))
    if args.cli_only:
        print(json.dumps({k: round(v, 3) for k, v in cli.items()}))
        return
    url, cases = _prepare(args.workdir, args.cases)
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
    print(json.dumps({k: round(v, 3) for k, v in {**cli, **results, **kernel}.items()}))


if __name__ == "__main__":
    main()
