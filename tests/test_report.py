"""pipeline.report: the forest plot is written as a PNG whose height follows the rows."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import ForestRow, forest_plot
from stats.paired import paired_comparison

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (PNG spec: signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def comparisons(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        b = rng.uniform(0.6, 0.9, 20)
        out.append(paired_comparison(b + rng.normal(0.01, 0.03, 20), b, n_resamples=200))
    return out


def test_png_written_and_height_grows(tmp_path: Path) -> None:
    heights = []
    for k in (1, 4, 10):
        rows = [(f"manifest − loss{i}", c) for i, c in enumerate(comparisons(k))]
        path = forest_plot(rows, tmp_path / f"forest{k}.png", title="Dice", xlabel="Δ Dice")
        assert path == tmp_path / f"forest{k}.png"
        width, height = png_size(path)
        assert width == 1000
        heights.append(height)
    assert heights[0] < heights[1] < heights[2]
    # 32 px per row at 100 dpi (0.32 in), give or take a pixel of rounding
    assert heights[2] - heights[1] == pytest.approx(6 * 32, abs=1)


def test_group_headings_add_lines(tmp_path: Path) -> None:
    cmps = comparisons(4)
    flat = forest_plot([ForestRow(f"r{i}", c) for i, c in enumerate(cmps)],
                       tmp_path / "flat.png", title="t", xlabel="x")
    grouped = forest_plot(
        [ForestRow(f"r{i}", c, group="imbalance" if i < 2 else "units")
         for i, c in enumerate(cmps)],
        tmp_path / "grouped.png", title="t", xlabel="x", scale=100.0,
        favours=("← favours B", "favours A →"))
    # two headings (32 px each) and the favours line (25 px)
    assert png_size(grouped)[1] - png_size(flat)[1] == pytest.approx(2 * 32 + 25, abs=1)


def test_undefined_comparison_is_drawn(tmp_path: Path) -> None:
    empty = paired_comparison([np.nan, np.nan], [1.0, 2.0])
    path = forest_plot([("hd95: no case defined", empty)], tmp_path / "e.png",
                       title="HD95", xlabel="Δ HD95 (mm)")
    assert png_size(path)[0] == 1000


def test_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs at least one row"):
        forest_plot([], tmp_path / "x.png", title="t", xlabel="x")
    with pytest.raises(TypeError, match="must be a ForestRow or a"):
        forest_plot([("label", 0.5)], tmp_path / "x.png", title="t", xlabel="x")
