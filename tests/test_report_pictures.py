"""pipeline.report's dataset pictures (issue 13): per-channel intensity histograms before
and after the chosen transform, label distributions with the thresholds of R1, R2, R5.

The statistics come from three tiny phantom cases ingested on the fly; the thresholds are
checked against the constants of `stats.rules` and the measured values against the
manifest's decisions (the same functions compute both).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.report import (
    figure_png,
    intensity_figure,
    label_figure,
    rule_measures,
    rules_figure,
)
from stats.rules import ADAPT_CV_THRESHOLD, FOCAL_SKEW_THRESHOLD, IMBALANCE_MILD

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (40, 40, 32)  # the phantom's smallest field of view: fast to ingest


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from pipeline.ingest import ingest
    from pipeline.sources.phantom import write_phantom
    from pipeline.stats_runner import run_stats
    from pipeline.store import Grid
    from stats.manifest import build_manifest

    root = tmp_path_factory.mktemp("pictures")
    write_phantom(root / "src", cases=3, seed=0, shape=SHAPE)
    store = str(root / "store.zarr")
    ingest(root / "src", store, "ph", layout="brats",
           grid=Grid(spacing=(1.0, 1.0, 1.0), shape=SHAPE))
    stats = run_stats(store, "ph", scheduler="synchronous")
    return SimpleNamespace(stats=stats, manifest=build_manifest(stats, seed=0))


def by_gid(fig, gid: str) -> list:
    return fig.findobj(lambda a: a.get_gid() == gid)


def xs(artist) -> list[float]:
    """The distinct x positions of a line (an axvline has the same x twice)."""
    return sorted({float(x) for x in np.atleast_1d(artist.get_xdata())})


def decision(phantom: SimpleNamespace, rule: str):
    return next(d for d in phantom.manifest.loss.decisions if d.rule == rule)


class TestIntensityFigure:
    def test_one_row_per_channel_before_and_after(self, phantom: SimpleNamespace) -> None:
        fig = intensity_figure(phantom.stats, phantom.manifest)
        axes = fig.get_axes()
        channels = list(phantom.manifest.normalization)
        assert len(axes) == 2 * len(channels)
        for i, ch in enumerate(channels):
            raw, after = axes[2 * i], axes[2 * i + 1]
            assert raw.get_xlabel().startswith(f"{ch} brain intensity (raw")
            assert raw.get_ylabel() == "voxels"
            assert after.get_xlabel().startswith(ch)
            for ax in (raw, after):
                text = " ".join(t.get_text() for t in ax.get_legend().get_texts())
                assert "g1" in text
                assert "g2" in text

    def test_legends_carry_the_manifest_evidence(self, phantom: SimpleNamespace) -> None:
        fig = intensity_figure(phantom.stats, phantom.manifest)
        ch = next(iter(phantom.manifest.normalization))
        sel = phantom.manifest.transforms[f"intensity/{ch}/brain"]
        row = next(e for e in sel.evidence if e.candidate == sel.chosen)
        raw_legend = [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]
        assert raw_legend == [f"raw: g1 {row.skewness_before:.2f}, g2 {row.kurtosis_before:.2f}"]

    def test_clip_bounds_drawn_at_the_plan(self, phantom: SimpleNamespace) -> None:
        fig = intensity_figure(phantom.stats, phantom.manifest)
        for ch, norm in phantom.manifest.normalization.items():
            lines = by_gid(fig, f"clip-{ch}")
            assert sorted(x for line in lines for x in xs(line)) == pytest.approx(
                [norm.clip_low, norm.clip_high])

    def test_issue_13_top_bin_stays_in_arcsin_domain(self, phantom: SimpleNamespace) -> None:
        # arcsin-sqrt's scale is the channel maximum; the top bin's centre and the overflow
        # lie above it and count as the maximum (stats.dataset.clamped), not as an error
        from stats.manifest import TransformSpec

        m = phantom.manifest
        ch = next(iter(m.normalization))
        top = phantom.stats.intensity[ch]["brain"].moments.maximum
        norm = m.normalization[ch].model_copy(update={"transform": TransformSpec(
            name="arcsin_sqrt", params={"scale": top})})
        manifest = m.model_copy(update={"normalization": {**m.normalization, ch: norm}})
        fig = intensity_figure(phantom.stats, manifest)
        bars = fig.get_axes()[1].patches
        assert max(b.get_x() + b.get_width() for b in bars) == pytest.approx(math.pi / 2)

    def test_missing_histogram_is_named(self, phantom: SimpleNamespace) -> None:
        stats = phantom.stats
        ch = stats.channels[0]
        brain = stats.intensity[ch]["brain"].model_copy(update={"histogram": None})
        intensity = {**stats.intensity, ch: {**stats.intensity[ch], "brain": brain}}
        broken = stats.model_copy(update={"intensity": intensity})
        with pytest.raises(ValueError, match=rf"field intensity\.{ch}\.brain\.histogram is "
                                             r"missing"):
            intensity_figure(broken, phantom.manifest)


class TestLabelFigure:
    def test_thresholds_are_lines_at_the_rule_constants(self, phantom: SimpleNamespace) -> None:
        for fig in (label_figure(phantom.stats), rules_figure(phantom.stats)):
            (r1,) = by_gid(fig, "R1-threshold")
            assert xs(r1) == [pytest.approx(100 * IMBALANCE_MILD)]  # axis in percent
            (r2,) = by_gid(fig, "R2-threshold")
            assert xs(r2) == [pytest.approx(FOCAL_SKEW_THRESHOLD)]
            (r5,) = by_gid(fig, "R5-threshold")
            assert xs(r5) == [pytest.approx(ADAPT_CV_THRESHOLD)]

    def test_measured_values_equal_the_decisions(self, phantom: SimpleNamespace) -> None:
        fig = label_figure(phantom.stats)
        (r1,) = by_gid(fig, "R1-measured")
        assert xs(r1) == [pytest.approx(100 * decision(phantom, "R1").measured)]
        (g1,) = by_gid(fig, "R2-g1")
        assert xs(g1) == [pytest.approx(decision(phantom, "R2").measured)]
        (r5,) = by_gid(fig, "R5-measured")
        assert xs(r5) == [pytest.approx(decision(phantom, "R5").measured)]

    def test_r2_bound_needs_eight_cases(self, phantom: SimpleNamespace) -> None:
        m = rule_measures(phantom.stats)
        assert m.n_volumes == 3
        assert math.isnan(m.volume_skew_lower_bound)  # SKEW_MIN_N = 8
        assert by_gid(label_figure(phantom.stats), "R2-measured") == []

    def test_axes_are_labelled(self, phantom: SimpleNamespace) -> None:
        fig = label_figure(phantom.stats)
        labels = [ax.get_xlabel() for ax in fig.get_axes()]
        assert labels == ["tumour fraction of brain voxels per case (%)", "mL",
                          "skewness of tumour volume", "% of the slice's brain voxels",
                          "CV of per-slice tumour fraction per case"]
        assert all(ax.get_title(loc="left") for ax in fig.get_axes())


class TestPng:
    @pytest.mark.parametrize(("name", "limit"), [("intensity", 60_000), ("labels", 40_000),
                                                 ("rules", 25_000)])
    def test_small_palette_png(self, phantom: SimpleNamespace, name: str, limit: int) -> None:
        from PIL import Image

        fig = {"intensity": lambda: intensity_figure(phantom.stats, phantom.manifest),
               "labels": lambda: label_figure(phantom.stats),
               "rules": lambda: rules_figure(phantom.stats)}[name]()
        png = figure_png(fig)
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) < limit
        with Image.open(io.BytesIO(png)) as img:
            assert img.mode == "P"
            w, h = img.size
            # Agg truncates the pixel size (2.4 in at 64 dpi: 153.6 -> 153)
            assert (w, h) == (int(fig.get_figwidth() * fig.dpi),
                              int(fig.get_figheight() * fig.dpi))
            assert w <= 700  # fits the UI's artifact pane (about 830 px at 1400 px)

    def test_png_can_be_saved(self, phantom: SimpleNamespace, tmp_path: Path) -> None:
        out = tmp_path / "r.png"
        out.write_bytes(figure_png(rules_figure(phantom.stats)))
        assert out.read_bytes()[:8] == PNG_SIGNATURE
