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


#: Python lines that define ``arrays`` (one small two-channel case) and ``config`` (its
#: engine configuration), for tests that compute a case's partials in a fresh process.
ENGINE_CASE_CODE = """
import numpy as np
from stats.dataset import N_CODES, EngineConfig
rng = np.random.default_rng(3)
image = rng.gamma(2.0, 50.0, size=(2, 16, 17, 18)).astype(np.float32)
label = rng.integers(0, N_CODES - 1, size=(16, 17, 18)).astype(np.uint8)
arrays = {"image": image, "label": label, "brain": np.ones((16, 17, 18), bool),
          "annotated": np.ones(16, bool)}
config = EngineConfig(channels=("t1", "t2"), upper={"t1": 1000.0, "t2": 1000.0},
                      voxel_ml=0.001, bins=64, scale={"t1": 900.0, "t2": 900.0})
"""
