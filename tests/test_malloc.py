"""pipeline.malloc: the allocator settings of processes that read case after case."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from pipeline.malloc import THRESHOLD, environ, tune_this_process

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

_FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from pipeline.malloc import tune_this_process
    assert tune_this_process()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# a decompressed chunk: bytes from malloc (numpy's own arrays ask for huge pages)
b = bytearray(40_000_000); del b  # first touch: faulted in either way
before = faults()
for _ in range(20):  # allocated, written and freed again, case after case
    b = bytearray(40_000_000); del b
print(faults() - before)
"""


@glibc
def test_tuned_process_reuses_freed_volumes_instead_of_faulting_them_in_again():
    """40 MB buffers freed and allocated 20 times: by default glibc maps each anew (about
    10,000 page faults each); tuned, the heap keeps the memory (page-fault counts, not
    times: deterministic on a shared machine)."""
    runs = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
            for mode in ("default", "tuned")}
    assert runs["default"] > 20 * 5_000
    assert runs["tuned"] < runs["default"] / 20


_BURST = """
import resource, sys
from pipeline.malloc import INGEST_THRESHOLD, THRESHOLD, tune_this_process
assert tune_this_process(INGEST_THRESHOLD if sys.argv[1] == "ingest" else THRESHOLD)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def case():  # 400 MB held at once, then freed together: an ingest's case
    held = [bytearray(40_000_000) for _ in range(10)]
    del held
case()
before = faults()
for _ in range(5):
    case()
print(faults() - before)
"""


@glibc
def test_ingest_threshold_keeps_a_whole_case_freed_at_once():
    """A case that frees 400 MB at once: above `THRESHOLD` the heap's top is returned to
    the system and faulted in again by the next case; `INGEST_THRESHOLD` keeps it."""
    runs = {mode: int(subprocess.run([sys.executable, "-c", _BURST, mode], check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
            for mode in ("stats", "ingest")}
    assert runs["stats"] > 5 * 10_000
    assert runs["ingest"] < runs["stats"] / 20


@glibc
def test_tune_this_process_takes():
    assert tune_this_process()


def test_environ_names_both_thresholds():
    assert environ() == {"MALLOC_MMAP_THRESHOLD_": str(THRESHOLD),
                         "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD)}


@glibc
def test_local_cluster_workers_start_with_the_settings():
    """Also after a plain Dask cluster in the same process (its nanny leaves Dask's own
    trim threshold in this process's environment, which Dask then prefers to config)."""
    import logging
    import os

    from distributed import Client, LocalCluster

    from pipeline.stats_runner import local_cluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR):
        pass
    before = {k: os.environ.get(k) for k in environ()}
    with local_cluster(1) as cluster, Client(cluster) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in environ()})
    assert list(seen.values()) == [environ()]
    assert {k: os.environ.get(k) for k in environ()} == before  # this process's put back
