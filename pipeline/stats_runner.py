"""Dataset statistics over the store: plan, per-case partials, merge.

The stage has three plain functions, which ``xrai stats`` (`run_stats`) and the Prefect
``stats`` flow (`flows.stats_flow`) both call:

1. `plan_stats` fixes the engine configuration from the store's attributes and case
   records (`engine_config`), refuses a dataset whose committed cases have lost a chunk,
   and splits the committed cases into partials to reuse and one `StatsJob` per case
   to compute.
2. `StatsJob.run` (in any process: a Dask worker, a Prefect task) reads the case's
   chunks once (`DatasetStore.read_case`), computes its `stats.dataset.CasePartials`
   and persists them in the store (`DatasetStore.write_partials`, under
   ``_xrai/stats/<case key>``, with the case's content hash and the engine fingerprint).
3. `merge_stats` merges the reused and the computed partials into `DatasetStats`, with
   the plan's configuration and records: nothing is recomputed or read again.

A later run reuses every persisted partial whose content hash and engine fingerprint
still match, so adding or changing a case reads that case only; ``recompute=True``
ignores what is stored. The serialisation of the partials (zlib-compressed JSON of
`CasePartials.to_dict`) lives here; where they are kept is the store's business.

Schedulers of `run_stats`: ``None`` chooses by the size of the job (`choose_scheduler`):
in this process when the voxels to read are few enough that a local cluster's start-up
would cost more than it saves, else a local Dask cluster; ``"local"`` always starts the
local cluster (processes, one thread each: the kernel is single-threaded and BLAS
threads only contend); ``"synchronous"`` or ``"threads"`` run the jobs one at a time in
this process (tests, debugging); anything else is the address of an existing Dask
scheduler (``tcp://host:8786``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline import aot, code_version
from pipeline.errors import StoreError
from pipeline.lease import writer_lease
from pipeline.store import CaseRecord, DatasetStore
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
    prepare,
)
from stats.summary import DatasetStats

log = logging.getLogger(__name__)


def engine_config(store: DatasetStore, *, bins: int = DEFAULT_BINS,
                  records: Mapping[str, CaseRecord] | None = None) -> EngineConfig:
    """The engine configuration for a store, from its attributes and case records only.

    The histogram upper edge of each channel, and the scale of its candidate transforms
    (the channel's largest value, so that the choice of transform does not depend on
    the units), come from the per-case intensity ranges recorded at ingest, so no voxel
    is read to fix them.

    Parameters
    ----------
    records : mapping, optional
        The committed cases (`DatasetStore.committed`), when the caller holds them.
    """
    if records is None:
        records = store.committed()
    upper, scale = {}, {}
    for ch in store.channels:
        highs = []
        for cid, rec in records.items():
            high = rec.attrs.get("intensity_range", {}).get(ch, [math.nan, math.nan])[1]
            if high is None or not math.isfinite(float(high)):
                # a case committed without its range (written by other tools): one read
                high = float(np.nanmax(store.read_image(cid, ch, record=rec)))
            highs.append(float(high))
        top = max(highs, default=1.0)
        upper[ch] = nice_upper(top)
        scale[ch] = top if math.isfinite(top) and top > 0 else 1.0
    return EngineConfig(channels=store.channels, upper=upper, voxel_ml=store.grid.voxel_ml,
                        bins=bins, scale=scale)


def load_persisted(store: DatasetStore, case_id: str, content_hash: str | None = None,
                   fingerprint: str | None = None) -> CasePartials | None:
    """The persisted partials of a case, or None (none, unreadable, or computed from
    other content or with another engine than ``content_hash`` and ``fingerprint``,
    when given: logged)."""
    blob = store.read_partials(case_id)
    if blob is None:
        return None
    try:
        partials = decode_partials(blob)
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        log.warning("ignoring unreadable persisted statistics of %s: %s", case_id, err)
        return None
    expected = (case_id, content_hash or partials.content_hash, fingerprint or partials.config)
    if (partials.case_id, partials.content_hash, partials.config) != expected:
        log.warning("ignoring persisted statistics of %s: they were computed for case %r, "
                    "content %s, engine %s", case_id, partials.case_id,
                    partials.content_hash[:12], partials.config[:12])
        return None
    return partials


def encode_partials(partials: CasePartials) -> bytes:
    """The partials as zlib-compressed JSON: what the store keeps and what a worker sends
    back (about 20 kB a case, against about 1 MB pickled: the histograms are mostly
    empty bins). JSON keeps every float exactly (shortest round-trip repr)."""
    # level 1: a quarter of level 6's time (about 1 ms against 3.5 ms on a case of
    # 4 x 160x160x100) for blobs about 20 % larger
    return zlib.compress(json.dumps(partials.to_dict()).encode(), 1)


def decode_partials(blob: bytes) -> CasePartials:
    """The inverse of `encode_partials`."""
    return CasePartials.from_dict(json.loads(zlib.decompress(blob)))


def persist(store: DatasetStore, partials: CasePartials) -> None:
    """Write a case's partials to the store (`DatasetStore.write_partials`)."""
    store.write_partials(partials.case_id, encode_partials(partials),
                         content_hash=partials.content_hash, fingerprint=partials.config)


@dataclass(frozen=True)
class StatsJob:
    """One case's partials to compute: where the case is, its record, the engine.

    Small and picklable: it goes to a Dask worker or a Prefect task as it is.
    """

    store_url: str
    dataset: str
    record: CaseRecord
    config: EngineConfig
    storage_options: Mapping[str, Any] | None = None

    @property
    def case_id(self) -> str:
        return self.record.case_id

    @property
    def content_hash(self) -> str:
        return self.record.content_hash

    @property
    def key(self) -> str:
        """A name for the job's task: the case id and the start of its content hash."""
        return f"case-stats-{self.case_id}-{self.content_hash[:12]}"

    def run(self, *, persist_result: bool = True) -> CasePartials:
        """Read the case once, compute its partials and persist them (in any process).

        Raises
        ------
        CaseDamaged
            A chunk of the case is absent or cannot be decoded.
        """
        return self.compute(self.read(), persist_result=persist_result)

    def read(self) -> dict[str, Any]:
        """The case's arrays (`DatasetStore.read_case`: each chunk read and checked once)."""
        store = DatasetStore.open(self.store_url, self.dataset,
                                  storage_options=self.storage_options)
        return store.read_case(self.case_id, record=self.record)

    def compute(self, arrays: Mapping[str, Any], *, persist_result: bool = True) -> CasePartials:
        """The partials of the arrays `read` returned, persisted unless told not to."""
        aot.install()  # the compiled kernels, in whichever process runs the job
        partials = case_partials(self.case_id, self.content_hash, dict(arrays), self.config)
        if persist_result:
            self.persist(partials)
        return partials

    def persist(self, partials: CasePartials) -> None:
        """Write the partials `compute` returned to the store (`persist`)."""
        store = DatasetStore.open(self.store_url, self.dataset, writable=True,
                                  storage_options=self.storage_options)
        persist(store, partials)


@dataclass(frozen=True)
class StatsPlan:
    """What a statistics run does: the engine, the cases, what to reuse and compute.

    Attributes
    ----------
    store_url, dataset : str
    config : EngineConfig
        The engine configuration (`engine_config`) every partial is computed with.
    records : mapping of str to CaseRecord
        The committed cases, in store order (the order of the statistics' cases).
    jobs : tuple of StatsJob
        The cases whose partials are computed, in store order.
    reused : mapping of str to CasePartials
        The persisted partials that are current (content hash and engine fingerprint
        match), already read; by case id, in store order.
    pending : tuple of str
        Cases whose persisted partials are current but not read yet (``plan_stats(...,
        defer_reused=True)``; `read_reused` reads them).
    """

    store_url: str
    dataset: str
    config: EngineConfig
    records: Mapping[str, CaseRecord]
    jobs: tuple[StatsJob, ...]
    reused: Mapping[str, CasePartials]
    pending: tuple[str, ...] = ()

    @property
    def computed_ids(self) -> list[str]:
        """Case ids of the jobs, in store order."""
        return [job.case_id for job in self.jobs]

    @property
    def reused_ids(self) -> list[str]:
        """Case ids whose persisted partials are reused, in store order."""
        return list(self.reused)


def plan_stats(store: DatasetStore, *, recompute: bool = False,
               bins: int = DEFAULT_BINS, defer_reused: bool = False) -> StatsPlan:
    """Plan the statistics of a dataset: engine configuration, reuse, jobs.

    Reads the case records once, the attributes of each persisted partial, and the
    persisted partials that are current (an unreadable one is computed again).

    Parameters
    ----------
    store : DatasetStore
        The dataset; its `storage_options` go to the jobs.
    recompute : bool
        Compute every case, ignoring the persisted partials.
    bins : int
        Histogram bins per channel.
    defer_reused : bool
        True leaves the current partials unread (``pending``), so that a caller can
        start the jobs first and read them meanwhile (`read_reused`).

    Raises
    ------
    StoreError
        No committed case in the dataset, or a committed case has lost a chunk.
    """
    records = store.committed()
    where = f"dataset {store.dataset!r} in {store.url!r}"
    if not records:
        raise StoreError(f"{where} has no committed case")
    damaged = store.missing_chunks(records.values())
    if damaged:
        listed = "; ".join(f"case {cid!r}: chunk {keys[0]!r} is missing"
                           for cid, keys in list(damaged.items())[:5])
        raise StoreError(
            f"{len(damaged)} committed case(s) of {where} have lost data ({listed}); "
            "`xrai verify` lists every damaged case, and re-running `xrai ingest` on the "
            "source re-ingests cases with missing chunks"
        )
    config = engine_config(store, bins=bins, records=records)
    fingerprint = config.fingerprint()
    options = dict(store.storage_options) or None
    pending: list[str] = []
    jobs: list[StatsJob] = []
    for cid, rec in records.items():
        if not recompute and store.partials_current(cid, rec.content_hash, fingerprint):
            pending.append(cid)
        else:
            jobs.append(StatsJob(store.url, store.dataset, rec, config, options))
    plan = StatsPlan(store_url=store.url, dataset=store.dataset, config=config,
                     records=records, jobs=tuple(jobs), reused={}, pending=tuple(pending))
    return plan if defer_reused else read_reused(store, plan)


def read_reused(store: DatasetStore, plan: StatsPlan) -> StatsPlan:
    """The plan with its ``pending`` partials read into ``reused``; a partial that cannot
    be read, or names another case, content or engine (`load_persisted`), becomes a job
    (after the plan's own, which a caller may have started already)."""
    fingerprint = plan.config.fingerprint()
    options = dict(store.storage_options) or None
    reused = dict(plan.reused)
    late: list[StatsJob] = []
    for cid in plan.pending:
        rec = plan.records[cid]
        cached = load_persisted(store, cid, rec.content_hash, fingerprint)
        if cached is not None:
            reused[cid] = cached
        else:
            late.append(StatsJob(store.url, store.dataset, rec, plan.config, options))
    order = {cid: i for i, cid in enumerate(plan.records)}
    reused = dict(sorted(reused.items(), key=lambda kv: order[kv[0]]))
    return dataclasses.replace(plan, jobs=plan.jobs + tuple(late), reused=reused, pending=())


def merge_stats(store: DatasetStore, plan: StatsPlan,
                computed: Iterable[CasePartials]) -> DatasetStats:
    """Merge the plan's reused partials and the jobs' results into `DatasetStats`.

    Uses the plan's engine configuration and records; reads only the dataset's grid and
    label scheme from the store's attributes.

    Parameters
    ----------
    store : DatasetStore
        The dataset the plan is of.
    plan : StatsPlan
        From `plan_stats`.
    computed : iterable of CasePartials
        The results of the plan's jobs (`StatsJob.run`), in any order.

    Raises
    ------
    ValueError
        The store is not the plan's, a result is not one of the plan's jobs (another
        case, content hash or engine fingerprint), or a job has no result.
    """
    if (store.url, store.dataset) != (plan.store_url, plan.dataset):
        raise ValueError(f"the plan is of dataset {plan.dataset!r} in {plan.store_url!r}, "
                         f"not {store.dataset!r} in {store.url!r}")
    fingerprint = plan.config.fingerprint()
    jobs = {job.case_id: job for job in plan.jobs}
    by_id: dict[str, CasePartials] = dict(plan.reused)
    for part in computed:
        job = jobs.get(part.case_id)
        if job is None or part.case_id in by_id:
            raise ValueError(f"partials of case {part.case_id!r} are not a result of the plan's "
                             f"jobs (jobs: {sorted(jobs)!r})")
        if (part.content_hash, part.config) != (job.content_hash, fingerprint):
            raise ValueError(
                f"partials of case {part.case_id!r} were computed from content hash "
                f"{part.content_hash!r} with engine {part.config!r}; the plan has "
                f"{job.content_hash!r} and {fingerprint!r}")
        by_id[part.case_id] = part
    missing = [cid for cid in plan.records if cid not in by_id]
    if missing:
        raise ValueError(f"no partials for {len(missing)} planned case(s) of dataset "
                         f"{plan.dataset!r}: {missing[:5]!r}")
    cases = [by_id[cid] for cid in plan.records]  # store order, whatever order jobs finished
    grid = store.grid
    config = plan.config
    return DatasetStats(
        dataset=plan.dataset,
        store=plan.store_url,
        content_hash=dataset_hash((cid, r.content_hash) for cid, r in plan.records.items()),
        n_cases=len(cases),
        cases=list(plan.records),
        channels=list(config.channels),
        spacing_mm=[float(s) for s in grid.spacing],
        voxel_ml=grid.voxel_ml,
        label_scheme=store.label_scheme,
        intensity=intensity_distributions(cases, config),
        labels=label_distributions(cases, grid.voxel_ml),
        class_frequencies=class_frequencies(cases),
        per_case={c.case_id: c.labels for c in cases},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version=code_version(),
        histogram_bins=config.bins,
    )


def local_cluster(n_workers: int | None = None):
    """A local Dask cluster for the engine: worker processes with one thread each.

    The workers start with the allocator settings of `pipeline.malloc` (Dask's nanny
    would otherwise freeze glibc's mmap threshold at 128 KiB; see that module for what
    they changed here).
    """
    import os

    import dask
    from distributed import LocalCluster

    from pipeline.malloc import environ

    workers = n_workers or min(2, os.cpu_count() or 1)
    env = environ()
    # Dask lets this process's environment override its config for these variables, and
    # a nanny started earlier in this process left its own values there (Dask's default
    # trim threshold): set ours for the time the workers are spawned, then put back.
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{key}": value
                              for key, value in env.items()}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                dashboard_address=None, silence_logs=logging.ERROR)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_job(job: StatsJob) -> bytes:
    """On a worker: the job, its partials sent back encoded (`encode_partials`)."""
    return encode_partials(job.run())


#: Image voxels (cases x channels x grid) up to which ``scheduler=None`` computes in this
#: process whatever the machine: a local cluster costs about 1 s to start (``make
#: bench-scaling``; its workers then load the kernels built ahead of time in
#: milliseconds, or numba's JIT in 0.4-0.6 s), which a job below ~1 Gvox (about 30 BraTS
#: cases) does not earn back.
IN_PROCESS_MAX_VOXELS = 2**30
#: Cores the in-process engine keeps busy (reading, reducing and writing overlap; see
#: `run_jobs`). On a machine with no more than these, a local cluster adds nothing but
#: its start-up: on 2 cores its two workers reduced 16 cases of 4 x 240x240x155 in
#: 105 ms a case, the in-process engine in 107 ms (``make bench-stats``).
IN_PROCESS_CORES = 2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells it)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def choose_scheduler(scheduler: str | None, n_jobs: int, voxels_per_job: int,
                     cores: int | None = None) -> str | None:
    """The scheduler `run_jobs` uses: ``scheduler`` itself unless it is None (automatic).

    Automatic: ``"synchronous"`` (this process) when ``n_jobs * voxels_per_job`` is at
    most `IN_PROCESS_MAX_VOXELS` or the machine has no more than `IN_PROCESS_CORES`
    cores (``cores``, default `available_cores`), else ``None`` (a local cluster).
    ``"local"`` means the local cluster whatever the size.

    Examples
    --------
    >>> choose_scheduler(None, 4, 4 * 240 * 240 * 155, cores=16)
    'synchronous'
    >>> choose_scheduler(None, 1500, 4 * 240 * 240 * 155, cores=16) is None
    True
    >>> choose_scheduler(None, 1500, 4 * 240 * 240 * 155, cores=2)
    'synchronous'
    >>> choose_scheduler("tcp://10.0.0.1:8786", 1, 1)
    'tcp://10.0.0.1:8786'
    """
    if scheduler == "local":
        return None
    if scheduler is not None:
        return scheduler
    if n_jobs * voxels_per_job <= IN_PROCESS_MAX_VOXELS:
        return "synchronous"
    return "synchronous" if (cores or available_cores()) <= IN_PROCESS_CORES else None


#: Schedulers that `run_jobs` runs in this process (its three-stage pipeline).
_IN_PROCESS = frozenset({"synchronous", "threads", "sync", "single-threaded"})


def run_jobs(jobs: Sequence[StatsJob], scheduler: str | None = "synchronous",
             on_done: Callable[[str], None] | None = None,
             on_read: Callable[[str], None] | None = None) -> list[CasePartials]:
    """Run statistics jobs with a scheduler (see module notes); results in finishing order.

    Parameters
    ----------
    on_done : callable, optional
        Called with each case id as its partials finish.
    on_read : callable, optional
        In-process only: called with each case id once its arrays are read.
    """
    if not jobs:
        return []
    if scheduler in _IN_PROCESS:
        # One case at a time in three stages: the next case is read while this one is
        # reduced and the previous one's partials are written. Decompression (blosc) and
        # the fused kernel (numba, nogil) release the GIL, so on two cores they overlap.
        # At most two cases' arrays are in memory, and one write is pending.
        out: list[CasePartials] = []
        with ThreadPoolExecutor(1, thread_name_prefix="xrai-read-ahead") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="xrai-persist") as writer:
            upcoming = reader.submit(jobs[0].read)
            aot.install()
            prepare()  # the kernel's first-call cost, while the first case is read
            written: Future[None] | None = None
            done_id: str | None = None
            for i, job in enumerate(jobs):
                arrays = upcoming.result()
                if on_read:
                    on_read(job.case_id)
                if i + 1 < len(jobs):
                    upcoming = reader.submit(jobs[i + 1].read)
                partials = job.compute(arrays, persist_result=False)
                del arrays
                if written is not None:  # the previous case is done once it is stored
                    written.result()
                    if on_done:
                        on_done(done_id)
                written, done_id = writer.submit(job.persist, partials), job.case_id
                out.append(partials)
            written.result()
            if on_done:
                on_done(done_id)
        return out

    from distributed import Client, as_completed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(local_cluster())
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(Client(scheduler))
        futures = [client.submit(_run_job, job, key=job.key, pure=False) for job in jobs]
        results = []
        for fut in as_completed(futures):
            part = decode_partials(fut.result())
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
    """Statistics of one dataset of the store: `plan_stats`, the jobs, `merge_stats`.

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
        False when the caller already holds the lease.

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
        store = DatasetStore.open(store_url, dataset, storage_options=storage_options)
        plan = plan_stats(store, recompute=recompute, bins=bins, defer_reused=True)
        if on_start:
            on_start(len(plan.jobs), len(plan.pending))
        voxels = len(store.channels) * math.prod(store.grid.zyx)
        chosen = choose_scheduler(scheduler, len(plan.jobs), voxels)
        log.info("statistics of %d cases on scheduler %s", len(plan.jobs), chosen or "local")
        planned = len(plan.jobs)
        # In-process, the new cases are computed on a thread while this one reads the
        # other cases' stored partials (reading and the kernel release the GIL): adding
        # a case to a dataset then costs about that case, not the case plus reading
        # every other case's partials.
        ahead = plan.jobs if chosen in _IN_PROCESS and plan.pending else ()
        computed: list[CasePartials] = []
        if ahead:
            first_read = threading.Event()
            with ThreadPoolExecutor(1, thread_name_prefix="xrai-jobs") as pool:
                running = pool.submit(run_jobs, ahead, chosen, on_done,
                                      lambda case_id: first_read.set())
                # Reading the stored partials and reading a case both go through zarr's
                # one I/O thread and want the GIL: side by side each took twice as long
                # (16 stored partials and one 4 x 160x160x100 case: 136 and 71 ms, against
                # 68 and 30 alone). The first case is read first; its kernel and write
                # (which release the GIL) then overlap the reading of the partials.
                while not first_read.wait(0.05) and not running.done():
                    pass
                plan = read_reused(store, plan)
                computed = running.result()
        else:
            plan = read_reused(store, plan)
        if len(plan.jobs) != planned and on_start:  # stored partials that could not be read
            on_start(len(plan.jobs), len(plan.reused))
        computed += run_jobs(plan.jobs[len(ahead):], chosen, on_done)
        return merge_stats(store, plan, computed)


def write_stats(stats: DatasetStats, path: str) -> None:
    """Write the statistics JSON atomically (NaN written as null)."""
    from pipeline.fsio import write_text_atomic

    write_text_atomic(path, stats.model_dump_json(indent=2) + "\n")


def read_stats(path: str) -> DatasetStats:
    """Read a statistics JSON written by `write_stats`.

    Raises
    ------
    FileNotFoundError, ManifestError
        A missing file, or one that does not validate (file, field path, value).
    """
    from pipeline.manifest_io import load_stats

    return load_stats(path)
