"""Dataset statistics over the store: per-case partials as Dask tasks, persisted, merged.

Each case is one Dask task that reads the case's chunks once (`DatasetStore.read_case`),
computes its `stats.dataset.CasePartials`, and persists them in the store under
``_xrai/stats/<case_id>`` (a small compressed array whose attributes hold the case's
content hash and the engine fingerprint). A later run reuses every persisted partial
whose content hash and engine fingerprint still match, so adding or changing a case
reads that case only; ``recompute=True`` ignores what is stored.

Schedulers: ``None`` starts a local Dask cluster (processes, one thread each: the
kernel is single-threaded numpy and BLAS threads only contend); ``"synchronous"`` or
``"threads"`` use Dask's local schedulers (tests, debugging); anything else is the
address of an existing Dask scheduler (``tcp://host:8786``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline import code_version
from pipeline.errors import StoreError
from pipeline.lease import writer_lease
from pipeline.store import DatasetStore, store_key
from stats.dataset import (
    DEFAULT_BINS,
    CasePartials,
    EngineConfig,
    case_partials,
    class_frequencies,
    dataset_hash,
    intensity_distributions,
    label_distributions,
    nice_upper,
)
from stats.summary import DatasetStats

log = logging.getLogger(__name__)
_STATS = "_xrai/stats"



def engine_config(store: DatasetStore, *, bins: int = DEFAULT_BINS) -> EngineConfig:
    """The engine configuration for a store, from its attributes and case records only.

    The histogram upper edge of each channel, and the scale of its candidate transforms
    (the channel's largest value, so that the choice of transform does not depend on
    the units), come from the per-case intensity ranges recorded at ingest, so no voxel
    is read to fix them.
    """
    records = store.committed()
    upper, scale = {}, {}
    for ci, ch in enumerate(store.channels):
        highs = []
        for rec in records.values():
            high = rec.attrs.get("intensity_range", {}).get(ch, [math.nan, math.nan])[1]
            if high is None or not math.isfinite(float(high)):
                # a case committed without its range (written by other tools): one read
                high = float(np.nanmax(store.group["image"][rec.slot, ci]))
            highs.append(float(high))
        top = max(highs, default=1.0)
        upper[ch] = nice_upper(top)
        scale[ch] = top if math.isfinite(top) and top > 0 else 1.0
    return EngineConfig(channels=store.channels, upper=upper, voxel_ml=store.grid.voxel_ml,
                        bins=bins, scale=scale)


def load_persisted(store: DatasetStore, case_id: str) -> CasePartials | None:
    """The persisted partials of a case, or None."""
    group = store.group.get(_STATS)
    key = store_key(case_id)
    if group is None or key not in group:
        return None
    arr = group[key]
    try:
        return CasePartials.from_dict(json.loads(zlib.decompress(arr[:].tobytes())))
    except (ValueError, KeyError, zlib.error) as err:
        log.warning("ignoring unreadable persisted statistics of %s: %s", case_id, err)
        return None


def persisted_is_current(store: DatasetStore, case_id: str, content_hash: str,
                         fingerprint: str) -> bool:
    """Whether the persisted partials of a case match its content and the engine.

    Reads only the attributes of the persisted array, not the partials themselves.
    """
    group = store.group.get(_STATS)
    key = store_key(case_id)
    if group is None or key not in group:
        return False
    attrs = group[key].attrs
    return attrs.get("content_hash") == content_hash and attrs.get("config") == fingerprint


def persist(store: DatasetStore, partials: CasePartials) -> None:
    """Write a case's partials (one atomic array write, then its attributes)."""
    blob = np.frombuffer(zlib.compress(json.dumps(partials.to_dict()).encode(), 6), dtype=np.uint8)
    group = store.group.require_group(_STATS)
    arr = group.create_array(store_key(partials.case_id), shape=blob.shape, dtype="uint8",
                             chunks=(max(1, blob.size),), overwrite=True, compressors=None)
    arr[:] = blob
    arr.attrs.update({"content_hash": partials.content_hash, "config": partials.config})


def compute_case(store_url: str, dataset: str, case_id: str, content_hash: str,
                 config: EngineConfig, storage_options: Mapping[str, Any] | None = None,
                 persist_result: bool = True) -> CasePartials:
    """One Dask task: read the case once, compute and persist its partials."""
    store = DatasetStore.open(store_url, dataset, writable=persist_result,
                              storage_options=storage_options)
    partials = case_partials(case_id, content_hash, store.read_case(case_id), config)
    if persist_result:
        persist(store, partials)
    return partials


def local_cluster(n_workers: int | None = None):
    """A local Dask cluster for the engine: worker processes with one thread each.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` in its workers, which freezes glibc's
    mmap threshold at 128 KiB: every block-sized temporary of the kernel is then mapped
    and unmapped, page faults included, and the engine ran about 2x slower than in a
    plain process (seen with ``make bench-stats``). Raising the mmap threshold back to
    32 MiB keeps those temporaries on the heap.
    """
    import os

    import dask
    from distributed import LocalCluster

    workers = n_workers or min(2, os.cpu_count() or 1)
    with dask.config.set({
        "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    }):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=None, silence_logs=logging.ERROR)


def _run_tasks(jobs: list[tuple], scheduler: str | None,
               on_done: Callable[[str], None] | None) -> list[CasePartials]:
    if not jobs:
        return []
    if scheduler in ("synchronous", "threads", "sync", "single-threaded"):
        out = []
        for job in jobs:  # one case at a time: the kernel is memory-bound per volume
            out.append(compute_case(*job))
            if on_done:
                on_done(job[2])
        return out

    from distributed import Client, as_completed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(local_cluster())
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(Client(scheduler))
        futures = [client.submit(compute_case, *job, key=f"case-stats-{job[2]}-{job[3][:12]}",
                                 pure=False) for job in jobs]
        results = []
        for fut in as_completed(futures):
            part = fut.result()
            results.append(part)
            if on_done:
                on_done(part.case_id)
        return results


def run_stats(store_url: str, dataset: str, *, scheduler: str | None = None,
              recompute: bool = False, bins: int = DEFAULT_BINS,
              storage_options: Mapping[str, Any] | None = None,
              on_start: Callable[[int, int], None] | None = None,
              on_done: Callable[[str], None] | None = None,
              wait: float = 0.0, lease: bool = True) -> DatasetStats:
    """Statistics of one dataset of the store (see module notes).

    Parameters
    ----------
    on_start : callable, optional
        Called with (cases to compute, cases reused) before computing.
    on_done : callable, optional
        Called with each case id as its partials finish.
    wait : float
        Seconds to wait for another writer of the dataset (the run persists partials,
        so it holds the writer lease, `pipeline.lease`); 0 refuses at once.
    lease : bool
        False when the caller already holds the lease (a flow).

    Raises
    ------
    StoreError
        No committed case in the dataset, or a committed case has lost a chunk.
    StoreBusy
        Another process is writing the dataset.
    CaseDamaged
        A chunk of a case cannot be decoded (the message names the case and the chunk).
    """
    with (writer_lease(store_url, dataset, wait=wait, storage_options=storage_options)
          if lease else contextlib.nullcontext()):
        return _run_stats(store_url, dataset, scheduler=scheduler, recompute=recompute,
                          bins=bins, storage_options=storage_options, on_start=on_start,
                          on_done=on_done)


def _run_stats(store_url: str, dataset: str, *, scheduler: str | None, recompute: bool,
               bins: int, storage_options: Mapping[str, Any] | None,
               on_start: Callable[[int, int], None] | None,
               on_done: Callable[[str], None] | None) -> DatasetStats:
    store = DatasetStore.open(store_url, dataset, storage_options=storage_options)
    records = store.committed()
    if not records:
        raise StoreError(f"dataset {dataset!r} in {store_url!r} has no committed case")
    damaged = store.missing_chunks(records.values())
    if damaged:
        listed = "; ".join(f"case {cid!r}: chunk {keys[0]!r} is missing"
                           for cid, keys in list(damaged.items())[:5])
        raise StoreError(
            f"{len(damaged)} committed case(s) of dataset {dataset!r} in {store_url!r} have "
            f"lost data ({listed}); `xrai verify` lists every damaged case, and re-running "
            "`xrai ingest` on the source re-ingests cases with missing chunks"
        )
    config = engine_config(store, bins=bins)
    fingerprint = config.fingerprint()
    reused: list[CasePartials] = []
    jobs = []
    for cid, rec in records.items():
        current = not recompute and persisted_is_current(store, cid, rec.content_hash,
                                                         fingerprint)
        cached = load_persisted(store, cid) if current else None
        if cached is not None:
            reused.append(cached)
        else:
            jobs.append((store_url, dataset, cid, rec.content_hash, config,
                         dict(storage_options or {}) or None))
    if on_start:
        on_start(len(jobs), len(reused))
    computed = _run_tasks(jobs, scheduler, on_done)
    by_id = {p.case_id: p for p in [*reused, *computed]}
    cases = [by_id[cid] for cid in records]  # store order, whatever order tasks finished
    grid = store.grid
    return DatasetStats(
        dataset=dataset,
        store=store_url,
        content_hash=dataset_hash((cid, r.content_hash) for cid, r in records.items()),
        n_cases=len(cases),
        cases=list(records),
        channels=list(store.channels),
        spacing_mm=[float(s) for s in grid.spacing],
        voxel_ml=grid.voxel_ml,
        label_scheme=dict(store.group.attrs["label_scheme"]),
        intensity=intensity_distributions(cases, config),
        labels=label_distributions(cases, grid.voxel_ml),
        class_frequencies=class_frequencies(cases),
        per_case={c.case_id: c.labels for c in cases},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version=code_version(),
        histogram_bins=bins,
    )


def write_stats(stats: DatasetStats, path: str) -> None:
    """Write the statistics JSON atomically (NaN written as null)."""
    from stats.manifest import write_text_atomic

    write_text_atomic(path, stats.model_dump_json(indent=2) + "\n")


def read_stats(path: str) -> DatasetStats:
    """Read a statistics JSON written by `write_stats`.

    Raises
    ------
    FileNotFoundError, ManifestError
        A missing file, or one that does not validate (file, field path, value).
    """
    from stats.manifest import load_stats

    return load_stats(path)
