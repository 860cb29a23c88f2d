"""The manifest schema (stats/, no torch) and the trainer's registry name the same things."""

from __future__ import annotations

import pytest

from pipeline.errors import ManifestError as PipelineManifestError
from pipeline.train.losses import LOSSES
from pipeline.train.weighting import WEIGHTINGS
from stats.errors import ManifestError, XraiError
from stats.rules import LOSS_NAMES, WEIGHTING_METHODS


def test_manifest_loss_enumeration_equals_the_registry():
    assert sorted(LOSS_NAMES) == sorted(LOSSES)


def test_manifest_weighting_methods_equal_the_trainer_weightings():
    assert sorted(WEIGHTING_METHODS) == sorted(WEIGHTINGS)


def test_one_manifest_error_type():
    assert PipelineManifestError is ManifestError
    with pytest.raises(ValueError, match="x"):
        raise ManifestError("x")
    with pytest.raises(XraiError, match="x"):  # issue 12, item 4: under the one root
        raise ManifestError("x")
