"""Shared fixtures: tiny volumes built on the fly; nothing downloads."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import SimpleITK as sitk

# Prefect must not phone home from tests.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_image(array_zyx: np.ndarray, *, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array with the given LPS geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    return img


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def race_for_lease(url: str, dataset: str, *, contenders: int = 8,
                   storage_options: dict | None = None) -> tuple[list, list[str]]:
    """``contenders`` threads released together each try to take one writer lease at once.

    Returns the leases taken (the caller releases them) and the refusal messages.
    """
    import threading

    from pipeline.lease import StoreBusy, WriterLease

    barrier = threading.Barrier(contenders)
    won: list = []
    busy: list[str] = []

    def contend() -> None:
        lease = WriterLease(url, dataset, storage_options=storage_options)
        barrier.wait()
        try:
            won.append(lease.acquire(0))
        except StoreBusy as err:
            busy.append(str(err))

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, busy


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak Python allocation (tracemalloc) while calling ``fn``; exceptions swallowed
    (the caller checks the error separately)."""
    tracemalloc.start()
    try:
        fn()
    except Exception:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak
