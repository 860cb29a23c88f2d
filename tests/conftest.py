"""Shared fixtures: tiny volumes built on the fly; nothing downloads."""

from __future__ import annotations

import os

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
