"""Ingest: find cases, read, standardize and commit each one to the store, in parallel.

Each case is one unit of work done entirely by one worker: read and hash its source
files, skip it when the hash equals the committed one, otherwise decode them,
standardize, write its slot and commit. Each source file is read from disk once: its
bytes are hashed and decoded from memory (`CaseSource.read_files`; DICOM files, which
SimpleITK and pydicom read from their paths, are hashed and then read again from the
page cache), and an unchanged case is told from its hashes alone, without decoding. A
case that cannot be used is quarantined with a reason naming the file and the value;
the others go on. The parent only discovers cases and assigns slots.

Exit codes of ``xrai ingest`` (see `IngestReport.exit_code`):

====  ====================================================================
0     every case ingested or unchanged
1     failure: no case is usable (all quarantined, or nothing found)
2     usage error (bad option or source folder; typer's code)
3     partial success: some cases quarantined, the others committed
====  ====================================================================
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pipeline import code_version
from pipeline.errors import CaseRejected, StoreFull, VolumeError, XraiError
from pipeline.lease import WriterLease, writer_lease
from pipeline.sources.base import CHANNELS, IN_MEMORY_KINDS, CaseSource, VolumeRef
from pipeline.standardize import Loaded, standardize_case
from pipeline.store import DatasetStore, Grid

log = logging.getLogger(__name__)

Status = Literal["ingested", "unchanged", "quarantined"]

# Out of space, over quota, over the file-size limit (ulimit -f): the store is full, and
# every later case would fail the same way, so the run stops instead of quarantining.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# The pid of the parent of a worker process (None in the parent itself).
_PARENT: int | None = None


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case."""

    case_id: str
    status: Status
    reason: str = ""
    path: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class IngestReport:
    """Summary of one ingest run."""

    dataset: str
    store: str
    outcomes: tuple[CaseOutcome, ...] = field(default_factory=tuple)

    def by_status(self, status: Status) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def exit_code(self) -> int:
        bad = self.by_status("quarantined")
        good = len(self.outcomes) - len(bad)
        if good == 0:
            return 1
        return 3 if bad else 0



def read_case(case: CaseSource, data: Mapping[Path, bytes] | None = None,
              ) -> tuple[dict[str, Loaded], Loaded | None]:
    """Read every channel and the label of a case (``VolumeError`` names the file).

    ``data`` holds the bytes of files already read (`CaseSource.read_files`); those
    volumes are decoded from them without opening the files again.
    """
    from pipeline.io import read_image, read_label  # SimpleITK-heavy; imported in workers

    data = data or {}

    def blob(ref: VolumeRef) -> bytes | None:
        return data.get(ref.paths[0]) if ref.kind in IN_MEMORY_KINDS else None

    images = {name: Loaded(read_image(ref, data=blob(ref)), ref.path)
              for name, ref in case.images.items()}
    label = None
    if case.label is not None:
        # A DICOM SEG is painted on the grid of the series it references; discovery
        # records that series' channel as the flag "seg-reference:<channel>".
        ref_channel = next((f.split(":", 1)[1] for f in case.flags
                            if f.startswith("seg-reference:")), CHANNELS[0])
        reference = images[ref_channel].image if ref_channel in images else None
        label = Loaded(read_label(case.label, reference=reference, data=blob(case.label)),
                       case.label.path)
    return images, label


def ingest_case(store_url: str, dataset: str, case: CaseSource, slot: int,
                committed_hash: str | None, *, recompute: bool = False,
                storage_options: Mapping[str, Any] | None = None) -> CaseOutcome:
    """Do all the work for one case; never raises for bad data (quarantines instead).

    Each source file is read once (`CaseSource.read_files`): the content hash comes
    from its bytes, and only a changed case is decoded, from those same bytes. A case
    quarantined earlier with the same content hash is reported again from its
    quarantine record without decoding its volumes (``recompute`` decodes it).
    """
    t0 = time.perf_counter()
    store = DatasetStore.open(store_url, dataset, writable=True, storage_options=storage_options)
    cid = case.case_id

    def reject(reason: str, path: Path | str | None, content_hash: str | None = None) -> CaseOutcome:
        store.quarantine(cid, reason, None if path is None else str(path), content_hash)
        log.warning("quarantined %s: %s", cid, reason)
        return CaseOutcome(cid, "quarantined", reason, None if path is None else str(path),
                           time.perf_counter() - t0)

    if case.missing:
        return reject("missing " + "; ".join(case.missing), case.missing[0].split(": ", 1)[-1])
    try:
        sources = case.read_files()
        hashes = sources.hashes
        content_hash = case.content_hash(hashes)
    except OSError as err:
        return reject(f"cannot read source file: {err}", getattr(err, "filename", None))
    if committed_hash == content_hash and not recompute:
        return CaseOutcome(cid, "unchanged", seconds=time.perf_counter() - t0)
    earlier = store.quarantine_record(cid)
    if earlier is not None and earlier.get("content_hash") == content_hash and not recompute:
        return CaseOutcome(cid, "quarantined", str(earlier["reason"]), earlier.get("path"),
                           time.perf_counter() - t0)
    try:
        images, label = read_case(case, sources.data)
        del sources  # the bytes are decoded: free them before standardizing
        std = standardize_case(cid, images, label, grid=store.grid, channels=store.channels,
                               label_map=case.label_map, annotated_slices=case.annotated_slices)
    except VolumeError as err:
        return reject(str(err), err.path, content_hash)
    except CaseRejected as err:
        return reject(err.reason, err.path, content_hash)
    except (RuntimeError, ValueError, OSError) as err:
        # SimpleITK raises RuntimeError for files it cannot parse; keep the dataset going.
        return reject(f"{type(err).__name__}: {err}", None, content_hash)

    _exit_if_orphaned()
    try:
        store.uncommit(cid)
        checksums = store.write_case(slot, image=std.image, label=std.label, brain=std.brain,
                                     annotated=std.annotated)
        record = {
            "case_id": cid,
            "sources": [{"file": str(p), "sha256": sha} for p, sha in hashes.items()],
            "flags": list(case.flags) + list(std.info.pop("flags", [])),
            **std.info,
            "checksums": checksums,
            "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
        }
        _exit_if_orphaned()  # the parent's lease died with it: commit nothing more
        store.commit(cid, slot, content_hash, record)
    except OSError as err:
        if err.errno in _FULL:
            raise StoreFull(
                f"the store {store_url!r} is full ({os.strerror(err.errno)}) while writing "
                f"case {cid!r}; the case is not committed, the cases committed before it "
                "are intact; free space and re-run to continue"
            ) from None
        raise
    return CaseOutcome(cid, "ingested", seconds=time.perf_counter() - t0)


def _exit_if_orphaned() -> None:
    """In a worker whose parent died (kill -9), exit at once without writing."""
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(70)


def _watch_parent(period: float = 0.2) -> None:
    while True:
        _exit_if_orphaned()
        time.sleep(period)


def _init_worker(threads: int, parent: int) -> None:
    import SimpleITK as sitk

    from pipeline.malloc import INGEST_THRESHOLD, tune_this_process

    global _PARENT
    tune_this_process(INGEST_THRESHOLD)  # our own worker: it standardizes case after case
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # A worker outlives a parent killed with SIGKILL (nothing tells it); it would go on
    # committing cases with no lease held. It watches its parent id and exits within
    # 0.2 s of being re-parented.
    _PARENT = parent
    threading.Thread(target=_watch_parent, name="xrai-watch-parent", daemon=True).start()


def ingest_cases(
    cases: Sequence[CaseSource],
    store_url: str,
    dataset: str,
    *,
    grid: Grid = Grid(),
    workers: int = 1,
    recompute: bool = False,
    skull_stripped: bool = True,
    collection: str = "",
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[CaseOutcome], None] | None = None,
    wait: float = 0.0,
) -> IngestReport:
    """Ingest already discovered cases into ``store_url/dataset``.

    Runs the jobs of an `ingest_session` (writer lease held for the whole run, the store
    compacted at its end) in this process or in worker processes.

    Parameters
    ----------
    cases : sequence of CaseSource
        From a source's ``discover``.
    workers : int
        Worker processes; 1 runs in this process.
    recompute : bool
        Re-ingest cases whose sources are unchanged.
    progress : callable, optional
        Called with each case's outcome as it finishes.
    wait : float
        Seconds to wait for another writer of the dataset; 0 refuses at once.

    Raises
    ------
    StoreError
        The store exists with another grid (nothing is written then).
    StoreBusy
        Another process is writing the dataset (nothing is written then).
    StoreFull
        The store filled up; the run stopped after cancelling the cases not started.
    """
    outcomes: list[CaseOutcome] = []

    def done(outcome: CaseOutcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    with ingest_session(cases, store_url, dataset, grid=grid, skull_stripped=skull_stripped,
                        collection=collection, storage_options=storage_options,
                        wait=wait) as session:
        _run_jobs(session.jobs, workers, recompute, session.store, done, session.lease.check,
                  planned=len(cases))
    order = {c.case_id: i for i, c in enumerate(cases)}
    outcomes.sort(key=lambda o: order[o.case_id])
    return IngestReport(dataset=dataset, store=store_url, outcomes=tuple(outcomes))


@dataclass(frozen=True)
class CaseJob:
    """One case's unit of work: where it goes and what is committed there now."""

    store_url: str
    dataset: str
    case: CaseSource
    slot: int
    committed_hash: str | None
    storage_options: Mapping[str, Any] | None = None

    def run(self, *, recompute: bool = False) -> CaseOutcome:
        """`ingest_case` on this job (in any process)."""
        return ingest_case(self.store_url, self.dataset, self.case, self.slot,
                           self.committed_hash, recompute=recompute,
                           storage_options=self.storage_options)


@dataclass
class IngestSession:
    """An open ingest: the writer lease held, the dataset created, every case planned."""

    store: DatasetStore
    lease: WriterLease
    jobs: list[CaseJob]


@contextlib.contextmanager
def ingest_session(cases: Sequence[CaseSource], store_url: str, dataset: str, *,
                   grid: Grid = Grid(), skull_stripped: bool = True, collection: str = "",
                   storage_options: Mapping[str, Any] | None = None,
                   wait: float = 0.0) -> Iterator[IngestSession]:
    """Plan an ingest and hold the dataset for it; compact the store when the block ends.

    The stage every ingest goes through (`ingest_cases`, the Prefect ingest flow): check
    the case ids, take the writer lease (`pipeline.lease`), create or reopen the dataset,
    give every case a slot, and plan one `CaseJob` per case. A committed case that has
    lost a chunk is planned for re-ingest whatever its content hash. The caller runs the
    jobs (`CaseJob.run`, in any process); on leaving the block the store is compacted
    (`DatasetStore.compact`) and the lease released.

    Raises
    ------
    XraiError
        Two cases share an id.
    StoreError
        The dataset exists with another grid (nothing is written then).
    StoreBusy
        Another process is writing the dataset (nothing is written then).
    StoreFull
        The store filled up while the jobs ran (raised through the block) or while
        compacting; every committed case is intact.
    """
    ids = [c.case_id for c in cases]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise XraiError(f"case ids {dup} occur more than once in the source")
    with writer_lease(store_url, dataset, wait=wait, storage_options=storage_options) as lease:
        store = DatasetStore.create(store_url, dataset, grid=grid, skull_stripped=skull_stripped,
                                    collection=collection, storage_options=storage_options)
        slots = store.allocate(ids)
        records = store.committed()
        damaged = store.missing_chunks(r for cid, r in records.items() if cid in slots)
        for cid, keys in damaged.items():
            log.warning("case %s has lost chunk %s; re-ingesting it", cid, keys[0])
        committed = {cid: rec.content_hash for cid, rec in records.items() if cid not in damaged}
        options = dict(storage_options or {}) or None
        jobs = [CaseJob(store_url, dataset, c, slots[c.case_id], committed.get(c.case_id),
                        options) for c in cases]
        yield IngestSession(store=store, lease=lease, jobs=jobs)
        try:
            store.compact()
        except OSError as err:
            if err.errno not in _FULL:
                raise
            raise StoreFull(f"the store {store_url!r} is full ({os.strerror(err.errno)}) "
                            "while compacting; every committed case is intact") from None


def _run_jobs(jobs: list[CaseJob], workers: int, recompute: bool, store: DatasetStore,
              done: Callable[[CaseOutcome], None], check_lease: Callable[[], None], *,
              planned: int) -> None:
    """Run every case job, in this process or in ``workers`` worker processes.

    Raises `StoreFull` when the store fills up, after cancelling the jobs not started
    and saying how many were done.
    """
    finished = 0

    def record(outcome: CaseOutcome) -> None:
        nonlocal finished
        finished += 1
        done(outcome)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                check_lease()
                record(job.run(recompute=recompute))
            return
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: zarr runs an asyncio thread and SimpleITK a thread pool,
        # neither of which survives a fork safely.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, os.getpid())) as pool:
            futures = {pool.submit(_run_job, job, recompute): job.case.case_id for job in jobs}
            try:
                for fut in as_completed(futures):
                    try:
                        record(fut.result())
                    except StoreFull:
                        raise
                    except Exception as err:  # a worker died (e.g. out of memory)
                        cid = futures[fut]
                        reason = f"worker failed: {type(err).__name__}: {err}"
                        store.quarantine(cid, reason)
                        record(CaseOutcome(cid, "quarantined", reason))
                    check_lease()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except StoreFull as err:
        raise StoreFull(f"{err} ({finished} of {planned} cases done, {planned - finished} "
                        "not attempted)") from None


def _run_job(job: CaseJob, recompute: bool) -> CaseOutcome:
    return job.run(recompute=recompute)


def ingest(
    source_dir: Path,
    store_url: str,
    dataset: str,
    *,
    layout: str = "auto",
    grid: Grid = Grid(),
    workers: int = 1,
    recompute: bool = False,
    discover_options: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[CaseOutcome], None] | None = None,
    on_discovered: Callable[[int], None] | None = None,
    wait: float = 0.0,
) -> IngestReport:
    """Discover the cases of a local folder and ingest them (see `ingest_cases`)."""
    from pipeline.sources.local import detect_layout, discover

    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {str(source_dir)!r} does not exist")
    chosen = detect_layout(source_dir) if layout == "auto" else layout
    cases = discover(source_dir, layout=chosen, **dict(discover_options or {}))
    if on_discovered is not None:
        on_discovered(len(cases))
    return ingest_cases(cases, store_url, dataset, grid=grid, workers=workers,
                        recompute=recompute, collection=chosen,
                        storage_options=storage_options, progress=progress, wait=wait)


def summarize(outcomes: Iterable[CaseOutcome]) -> dict[str, int]:
    """Counts per status."""
    counts = {"ingested": 0, "unchanged": 0, "quarantined": 0}
    for o in outcomes:
        counts[o.status] += 1
    return counts
