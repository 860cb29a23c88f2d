"""Issue 11 item 3: the dataset grid rejects non-finite and absurd values, and
``xrai ingest`` turns that into a usage error (exit 2) naming the option."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import Grid

# Values from the issue: `--spacing inf 1 1` used to ingest all-zero cases with exit 0.
BAD_VALUES = ["inf", "nan", "0", "-1", "1e-6", "1e6"]


def _plain(output: str) -> str:
    """The CLI's message without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


class TestGrid:
    @pytest.mark.parametrize(
        ("spacing", "shown"),
        [((np.inf, 1.0, 1.0), "x .* got inf"), ((1.0, np.nan, 1.0), "y .* got nan"),
         ((1.0, 1.0, 0.0), "z .* got 0.0"), ((-1.0, 1.0, 1.0), "x .* got -1.0"),
         ((1e-6, 1.0, 1.0), "x .* got 1e-06"), ((1.0, 1e6, 1.0), "y .* got 1000000.0"),
         ((0.049, 1.0, 1.0), "x .* got 0.049"), ((1.0, 1.0, 20.5), "z .* got 20.5")])
    def test_spacing_out_of_range_names_axis_and_value(self, spacing, shown):
        with pytest.raises(ValueError, match=rf"grid spacing {shown} \(spacing "):
            Grid(spacing=spacing)

    @pytest.mark.parametrize(
        ("shape", "shown"),
        [((0, 10, 10), "x .* got 0"), ((10, -1, 10), "y .* got -1"),
         ((10, 10, 2049), "z .* got 2049"), ((10, 1.5, 10), "y .* got 1.5"),
         ((10, 10, np.inf), "z .* got inf"), ((True, 10, 10), "x .* got True")])
    def test_shape_out_of_range_names_axis_and_value(self, shape, shown):
        with pytest.raises(ValueError, match=rf"grid shape {shown} \(shape "):
            Grid(shape=shape)

    def test_wrong_length(self):
        with pytest.raises(ValueError,
                           match=r"grid spacing must be three mm values .* got \(1\.0, 1\.0\)"):
            Grid(spacing=(1.0, 1.0))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("spacing", "shape"),
        [((0.05, 0.05, 0.05), (2048, 2048, 1)), ((20.0, 20.0, 20.0), (1, 1, 1)),
         ((1.0, 1.0, 1.0), (240.0, 240, 155)), ((np.float32(0.94), 0.94, 1.5), (96, 96, 64))])
    def test_the_bounds_themselves_are_accepted(self, spacing, shape):
        assert Grid(spacing=spacing, shape=shape).spacing == spacing


class TestIngestOptions:
    @pytest.mark.parametrize("value", BAD_VALUES)
    @pytest.mark.parametrize("axis", [0, 2])
    def test_bad_spacing_is_a_usage_error(self, tmp_path, value, axis):
        spacing = ["1", "1", "1"]
        spacing[axis] = value
        store = tmp_path / "s.zarr"
        result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--store", str(store),
                                          "--dataset", "ds", "--spacing", *spacing])
        assert result.exit_code == 2, result.output
        assert re.search(r"Invalid value for '--spacing': grid spacing [xyz] must be a finite "
                         rf"number of mm in \[0\.05, 20\], got {re.escape(repr(float(value)))}",
                         _plain(result.output)), result.output
        assert not store.exists()  # nothing written, not even the grid

    @pytest.mark.parametrize("value", BAD_VALUES)
    def test_bad_shape_is_a_usage_error(self, tmp_path, value):
        store = tmp_path / "s.zarr"
        result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--store", str(store),
                                          "--dataset", "ds", "--shape", "64", value, "48"])
        assert result.exit_code == 2, result.output
        # 0, -1 and 1000000 reach Grid; inf, nan and 1e-6 are not integers to typer
        assert "Invalid value for '--shape'" in _plain(result.output), result.output
        if value in ("0", "-1"):
            assert f"grid shape y must be a whole number of voxels in [1, 2048], got {value}" \
                in _plain(result.output)
        assert not store.exists()

    def test_large_integer_shape_names_the_value(self, tmp_path):
        result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--store",
                                          str(tmp_path / "s.zarr"), "--dataset", "ds",
                                          "--shape", "1000000", "64", "48"])
        assert result.exit_code == 2, result.output
        assert "grid shape x must be a whole number of voxels in [1, 2048], got 1000000" \
            in _plain(result.output)
