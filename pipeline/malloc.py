"""glibc's allocator settings for processes that allocate and free whole volumes, case after case.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and returns it
to the system when freed, so every case's arrays (tens to hundreds of MB) are faulted
in again page by page: with the default dynamic threshold (at most 32 MiB), a
4 x 240x240x155 case took 37,000 page faults and 75-100 ms of system time in ``xrai
stats``. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers, which also
freezes their mmap threshold at 128 KiB.

With both thresholds at `THRESHOLD`, arrays up to that size come from the heap and,
once freed, stay there for the next case (the heap keeps at most `THRESHOLD` of free
memory). Measured here, alternating runs on the same machine:

- ``xrai stats`` in one process, 4 x 240x240x155 cases: 37,000 page faults a case
  down to 12,000-16,000, system time 75-100 ms down to 47 ms;
- a one-worker local cluster, same cases: 200-240 ms a case down to 146-196 ms;
- ``make bench-ingest``: 0.64 s a case down to 0.54 s.

The ingest frees more at once than 256 MiB (a case's decoded sources, their SimpleITK
copies, the resampled channels and their stack: some 600 MB of 4 x 240x240x155), so at
`THRESHOLD` the heap's top was still trimmed after each case and refaulted by the
next: 25,000-34,000 page faults a case, against 100-1,400 with `INGEST_THRESHOLD`
(512 MiB), and 0.49-0.61 s a case against 0.40-0.46 s (the floor of ``make
bench-ingest``, in the same process, went from 8,700-9,200 faults to 100-900). An
ingest process then keeps up to 512 MiB of freed memory between cases.

Who uses them: ``xrai stats`` (`tune_this_process`), ``xrai ingest`` and the ingest's
worker processes (`tune_this_process` with `INGEST_THRESHOLD`), and the local
cluster's workers (through their environment,
`environ`: glibc reads the ``MALLOC_*_`` variables when a process starts). Nothing here
is needed for correctness; other C libraries ignore it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: Largest allocation served from the heap, and most free memory the heap keeps (bytes).
THRESHOLD = 256 * 2**20
#: The same for ingest processes, whose cases free more at once (see above).
INGEST_THRESHOLD = 512 * 2**20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def environ() -> dict[str, str]:
    """The variables that give a new process these settings (``MALLOC_*_``, glibc)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD)}


def tune_this_process(threshold: int = THRESHOLD) -> bool:
    """Apply the settings to this process (glibc's ``mallopt``); whether it took.

    Call it from a command's own process (``xrai stats``), not from a library call
    inside somebody else's program: the allocator is the whole process's. ``threshold``:
    `THRESHOLD`, or `INGEST_THRESHOLD` for an ingest.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                      threshold))
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
