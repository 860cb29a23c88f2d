"""Tables and plots of statistics and training results.

:func:`forest_plot` draws paired comparisons (:class:`stats.paired.PairedComparison`):
one row per comparison, the bootstrap interval of the mean difference as a horizontal
line, the mean difference as a marker, a vertical line at zero, rows under group
headings, and the numbers written out on the right. Plots use matplotlib's Agg backend
(no display needed).

The dataset pictures the Prefect artifacts embed (`flows.artifacts`) are built as
`matplotlib.figure.Figure` objects without pyplot (no global state, safe in flow
threads) and encoded by `figure_png`:

- `intensity_figure`: per channel, the brain-intensity histogram before and after the
  manifest's transform (the engine's fixed-edge histograms, `stats.summary.Histogram`),
  with skewness g1 and excess kurtosis g2 in the legends and the percentile clip of the
  normalization plan marked;
- `label_figure`: the per-case tumour fraction with rule R1's threshold, the tumour
  volume per case with its skewness and rule R2's bound against its threshold, and the
  per-slice tumour fraction with rule R5's per-case CV against its threshold;
- `rules_figure`: the three rule panels of `label_figure` alone, small (the verdict's).

Every threshold line carries a ``gid`` (``"R1-threshold"``, ``"R2-threshold"``,
``"R5-threshold"``) and every measured value's line or marker ``"R1-measured"`` etc.,
so tests (and readers of an SVG) find them. The measured values are computed from the
statistics by the same functions the rules use (`stats.rules`), so they equal the
``measured`` of the manifest's decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.fsio import open_atomic
from stats.manifest import Manifest
from stats.paired import PairedComparison
from stats.rules import (
    ADAPT_CV_THRESHOLD,
    FOCAL_SKEW_THRESHOLD,
    IMBALANCE_MILD,
    SKEW_MIN_N,
    skewness_lower_bound,
    slice_burden_cv,
)
from stats.seen import seen_moments
from stats.summary import DatasetStats, Histogram
from stats.transforms import make_transform

__all__ = [
    "ForestRow",
    "RuleMeasures",
    "figure_png",
    "forest_plot",
    "intensity_figure",
    "label_figure",
    "rule_measures",
    "rules_figure",
]


@dataclass(frozen=True)
class ForestRow:
    """One row of a forest plot.

    Attributes
    ----------
    label : str
        What is compared, e.g. ``"manifest − bce"``.
    comparison : PairedComparison
        Its mean difference and interval.
    group : str or None
        Heading the row is drawn under (e.g. a phantom family); rows of one group are
        drawn together, groups in the order they first appear.
    """

    label: str
    comparison: PairedComparison
    group: str | None = None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_row(row: ForestRow | tuple[str, PairedComparison]) -> ForestRow:
    if isinstance(row, ForestRow):
        return row
    if (isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], str)
            and isinstance(row[1], PairedComparison)):
        return ForestRow(row[0], row[1])
    raise TypeError(f"a forest-plot row must be a ForestRow or a (label, PairedComparison) "
                    f"pair, got {row!r}")


def _decimals(comparisons: Sequence[PairedComparison], scale: float) -> int:
    """Decimals that show the narrowest interval with two significant digits (0 to 6)."""
    widths = [abs(c.ci_high - c.ci_low) * scale for c in comparisons]
    widths = [w for w in widths if w > 0 and math.isfinite(w)]
    if not widths:
        return 2
    return min(6, max(0, 1 - math.floor(math.log10(min(widths)))))


def _numbers(cmp: PairedComparison, scale: float, decimals: int) -> str:
    if cmp.n == 0 or math.isnan(cmp.mean_diff):
        return f"undefined (n={cmp.n}, {cmp.n_dropped} dropped)"
    p = "p = –" if math.isnan(cmp.p_value) else f"p = {cmp.p_value:.2g}"
    f = f"+.{decimals}f"
    return (f"{cmp.mean_diff * scale:{f}} [{cmp.ci_low * scale:{f}}, "
            f"{cmp.ci_high * scale:{f}}]  {p}  n = {cmp.n}")


def forest_plot(rows: Sequence[ForestRow | tuple[str, PairedComparison]], path: str | Path,
                *, title: str, xlabel: str, scale: float = 1.0,
                favours: tuple[str, str] | None = None) -> Path:
    """Draw paired comparisons as a forest plot and save it as PNG.

    Parameters
    ----------
    rows : sequence of ForestRow or (label, PairedComparison)
        The comparisons, top to bottom: rows without a group first, then each group
        under its heading, groups in the order they first appear.
    path : str or Path
        Where to write the PNG (the folder must exist).
    title, xlabel : str
        Figure title and x-axis label (say the units and the direction, e.g.
        ``"Dice difference (percentage points), A − B"``).
    scale : float, default 1.0
        Factor applied to differences and intervals before drawing (100 for ratios shown
        in percentage points).
    favours : (str, str), optional
        Text under the left and right ends of the axis, e.g. ``("← favours B",
        "favours A →")``.

    Returns
    -------
    Path
        ``path``. The figure is 1000 px wide; its height grows by 32 px per row and per
        group heading.

    Raises
    ------
    TypeError
        If a row is neither a ForestRow nor a (label, PairedComparison) pair.
    ValueError
        If ``rows`` is empty.
    """
    items = [_as_row(r) for r in rows]
    if not items:
        raise ValueError(f"forest plot {str(path)!r} needs at least one row, got none")
    groups = list(dict.fromkeys(r.group for r in items))
    if None in groups:  # rows without a group go first, above every heading
        groups.remove(None)
        groups.insert(0, None)
    decimals = _decimals([r.comparison for r in items], scale)
    # y-axis lines, top to bottom: (text, row or None for a group heading)
    lines: list[tuple[str, ForestRow | None]] = []
    for g in groups:
        if g is not None:
            lines.append((g, None))
        lines.extend(("    " + r.label if g is not None else r.label, r)
                     for r in items if r.group == g)

    plt = _pyplot()
    dpi = 100
    height = 1.3 + 0.32 * len(lines) + (0.25 if favours else 0.0)
    fig, ax = plt.subplots(figsize=(10.0, height), dpi=dpi)
    # room for the longest label (about 0.072 in per character at the tick font size)
    left = min(0.4, max(0.2, 0.02 + 0.0072 * max(len(text) for text, _ in lines)))
    fig.subplots_adjust(left=left, right=0.62, top=1 - 0.55 / height,
                        bottom=(0.65 + (0.25 if favours else 0.0)) / height)
    ys = list(range(len(lines), 0, -1))
    for y, (_, row) in zip(ys, lines, strict=True):
        if row is None:
            continue
        cmp = row.comparison
        if not (math.isnan(cmp.ci_low) or math.isnan(cmp.ci_high)):
            ax.hlines(y, cmp.ci_low * scale, cmp.ci_high * scale, color="C0", linewidth=2)
        if not math.isnan(cmp.mean_diff):
            ax.plot(cmp.mean_diff * scale, y, "s", color="C0", markersize=6)
        ax.text(1.03, y, _numbers(cmp, scale, decimals), transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=9, family="monospace")
    ax.axvline(0.0, color="0.3", linewidth=1, linestyle="--")
    ax.set_yticks(ys)
    ax.set_yticklabels([text for text, _ in lines])
    for tick, (_, row) in zip(ax.get_yticklabels(), lines, strict=True):
        if row is None:
            tick.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(0.4, len(lines) + 0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left", fontsize=11)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.text(1.03, len(lines) + 0.6, "mean [interval]  p  n", transform=ax.get_yaxis_transform(),
            va="bottom", ha="left", fontsize=9, family="monospace", color="0.35")
    if favours:
        for x, text, ha in ((0.0, favours[0], "left"), (1.0, favours[1], "right")):
            ax.annotate(text, (x, 0), xycoords="axes fraction", xytext=(0, -38),
                        textcoords="offset points", ha=ha, va="top", fontsize=8, color="0.35")
    out = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return out


def save_figure(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Save a matplotlib figure atomically (`pipeline.fsio.open_atomic`), in the format
    its suffix names (``.png``, ``.pdf``, ``.svg``); return the path."""
    out = Path(path)
    with open_atomic(out, "wb") as fh:
        fig.savefig(fh, format=out.suffix.lstrip(".") or None, dpi=dpi)
    return out


# ------------------------------------------------------------------ dataset pictures
#: Colours: measured values black, thresholds red, the clip grey.
_MEASURED, _THRESHOLD, _CLIP = "black", "tab:red", "0.45"


def _figure(width_in: float, height_in: float, dpi: int) -> Any:
    """A Figure on an Agg canvas, without pyplot's global figure manager."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any, *, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes, reduced to an adaptive 256-colour palette.

    Plots of a few flat colours lose nothing visible in the palette and shrink to about
    a third of the 8-bit RGBA file, which matters for pictures embedded in artifacts as
    ``data:`` URIs (`flows.artifacts`).
    """
    import io

    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=dpi or fig.dpi)
    raw.seek(0)
    with Image.open(raw) as img:
        pal = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out = io.BytesIO()
        pal.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _hist_points(hist: Histogram) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bin centres and counts, the underflow at the lower edge and the overflow at the
    upper edge (the convention of `stats.seen`); empty bins dropped."""
    counts = np.asarray(hist.counts, dtype=np.float64)
    edges = np.linspace(hist.low, hist.high, counts.size + 1)
    points = np.concatenate([[edges[0]], 0.5 * (edges[:-1] + edges[1:]), [edges[-1]]])
    weights = np.concatenate([[hist.underflow], counts, [hist.overflow]])
    keep = weights > 0
    return points[keep], weights[keep]


def _g(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.2f}"


def intensity_figure(stats: DatasetStats, manifest: Manifest, *, bins: int = 60,
                     width_in: float = 9.0, row_in: float = 1.7, dpi: int = 72) -> Any:
    """Brain-intensity histograms per channel, before and after the chosen transform.

    Parameters
    ----------
    stats : DatasetStats
        With the brain histogram of every channel (``intensity[ch]["brain"].histogram``).
    manifest : Manifest
        Built from `stats`: the chosen transform (``transforms["intensity/<ch>/brain"]``)
        and the clip (``normalization[ch]``) of each channel.
    bins : int, default 60
        Bars per histogram (the 4096 engine bins are regrouped; the moments are not
        recomputed from the bars).
    width_in, row_in : float
        Figure width and height per channel, inches.
    dpi : int, default 72

    Returns
    -------
    matplotlib.figure.Figure
        One row per channel: left the raw intensities (x: intensity), right the
        transformed ones (x: the transform's expression; negative values counted as 0
        and values above the channel's maximum as the maximum, the engine's rule,
        `stats.dataset.clamped`) with the plan's clip bounds as dashed lines (gid
        ``"clip-<ch>"``). Legends give g1 (biased skewness) and g2
        (Fisher excess kurtosis, scipy's defaults) before and after the transform, from
        the manifest's evidence, and after the transform and the clip (`stats.seen`,
        what the network sees and what rule R3 judges).

    Raises
    ------
    ValueError
        A channel of the manifest has no brain histogram in `stats`.
    """
    channels = list(manifest.normalization)
    fig = _figure(width_in, row_in * max(1, len(channels)) + 0.3, dpi)
    axes = fig.subplots(len(channels), 2, squeeze=False)
    for (ax_raw, ax_t), ch in zip(axes, channels, strict=True):
        dist = stats.intensity.get(ch, {}).get("brain")
        if dist is None or dist.histogram is None:
            raise ValueError(f"statistics of {stats.dataset!r}: field "
                             f"intensity.{ch}.brain.histogram is missing (needed to draw "
                             f"channel {ch!r})")
        sel = manifest.transforms[f"intensity/{ch}/brain"]
        norm = manifest.normalization[ch]
        row = next((e for e in sel.evidence if e.candidate == sel.chosen), None)
        transform = make_transform(norm.transform.name, norm.transform.params)
        seen = seen_moments(dist.histogram, transform, norm.percentiles)
        points, weights = _hist_points(dist.histogram)
        # raw: up to the 99.9th percentile (a few bright voxels would squash the rest)
        cum = np.cumsum(weights) / weights.sum()
        top = float(points[min(int(np.searchsorted(cum, 0.999)), points.size - 1)])
        low = float(points.min())
        ax_raw.hist(points, bins=bins, range=(low, max(top, low + 1e-9)),
                    weights=weights, color="tab:blue", alpha=0.8,
                    label=(f"raw: g1 {_g(row.skewness_before if row else math.nan)}, "
                           f"g2 {_g(row.kurtosis_before if row else math.nan)}"))
        ax_raw.set_xlabel(f"{ch} brain intensity (raw; axis cut at p99.9)")
        ax_raw.set_ylabel("voxels")
        ax_raw.legend(loc="upper right", fontsize=8, frameon=False)
        # the engine's rule for the candidates (`stats.dataset.clamped`): negative values
        # count as 0, values above the channel's maximum (bin centres, overflow) as it
        upper = float(dist.moments.maximum)
        if not math.isfinite(upper):
            upper = float(dist.histogram.high)
        if "scale" in norm.transform.params:  # arcsin-sqrt: domain [0, scale]
            upper = min(upper, float(norm.transform.params["scale"]))
        y = transform.forward(np.clip(points, 0.0, upper))
        ax_t.hist(y, bins=bins, range=(float(y.min()), float(y.max())), weights=weights,
                  color="tab:green", alpha=0.8,
                  label=(f"{sel.chosen}: g1 {_g(row.skewness_after if row else math.nan)}, "
                         f"g2 {_g(row.kurtosis_after if row else math.nan)}"))
        lo_q, hi_q = norm.percentiles
        for x in (norm.clip_low, norm.clip_high):
            ax_t.axvline(x, color=_CLIP, linestyle="--", linewidth=1, gid=f"clip-{ch}")
        ax_t.plot([], [], color=_CLIP, linestyle="--",
                  label=f"clip p{lo_q:g}/p{hi_q:g}: g1 {_g(seen.skewness)}, "
                        f"g2 {_g(seen.kurtosis)}")
        ax_t.set_xlabel(f"{ch} after {sel.expression}" if sel.chosen != "identity"
                        else f"{ch} (identity)")
        ax_t.legend(loc="upper right", fontsize=8, frameon=False)
        for ax in (ax_raw, ax_t):
            ax.tick_params(labelsize=8)
            ax.yaxis.get_offset_text().set_fontsize(7)
    fig.suptitle(f"{stats.dataset}: brain intensities before → after the chosen transform",
                 fontsize=10)
    return fig


@dataclass(frozen=True)
class RuleMeasures:
    """What rules R1, R2 and R5 measure, computed as `stats.rules` computes it."""

    case_fraction: NDArray[np.float64]
    median_fraction: float
    volumes: NDArray[np.float64]
    volume_skew: float
    volume_kurt: float
    volume_skew_adjusted: float
    volume_skew_lower_bound: float
    n_volumes: int
    slice_fractions: NDArray[np.float64]
    slice_cv: NDArray[np.float64]
    median_cv: float


def rule_measures(stats: DatasetStats) -> RuleMeasures:
    """The per-case values behind rules R1, R2, R5 and each rule's ``measured``.

    R1: the median per-case tumour fraction (``labels.tumour_fraction_case``'s median);
    R2: tumour volume's skewness g1 and the one-sided 95 % lower bound of G1
    (`stats.rules.skewness_lower_bound`); R5: the median over cases with tumour of the
    CV of the per-slice fraction within the tumour's extent (`stats.rules.slice_burden_cv`).
    """
    cases = list(stats.per_case.values())
    vol = stats.labels["tumour_volume_ml"].moments
    cvs = np.array([slice_burden_cv(c.slice_fractions) for c in cases], dtype=np.float64)
    cvs = cvs[~np.isnan(cvs)]
    slices = np.array([f for c in cases for f in c.slice_fractions if f > 0],
                      dtype=np.float64)
    return RuleMeasures(
        case_fraction=np.array([c.tumour_fraction for c in cases], dtype=np.float64),
        median_fraction=float(stats.labels["tumour_fraction_case"].percentiles["50"]),
        volumes=np.array([c.tumour_volume_ml for c in cases], dtype=np.float64),
        volume_skew=float(vol.skewness), volume_kurt=float(vol.kurtosis),
        volume_skew_adjusted=float(vol.skewness_unbiased),
        volume_skew_lower_bound=skewness_lower_bound(float(vol.skewness_unbiased), vol.n),
        n_volumes=int(vol.n), slice_fractions=slices, slice_cv=cvs,
        median_cv=float(np.median(cvs)) if cvs.size else math.nan)


def _vline(ax: Any, x: float, gid: str, label: str, *, threshold: bool) -> None:
    if math.isnan(x):
        return
    ax.axvline(x, color=_THRESHOLD if threshold else _MEASURED,
               linestyle="-" if threshold else "--", linewidth=1.5, gid=gid, label=label)


def _small(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(loc="upper right", fontsize=7, frameon=False)


def _r1_panel(ax: Any, m: RuleMeasures) -> None:
    ax.hist(m.case_fraction * 100, bins=max(5, min(30, m.case_fraction.size)),
            color="tab:blue", alpha=0.8)
    _vline(ax, m.median_fraction * 100, "R1-measured",
           f"median {100 * m.median_fraction:.3g} %", threshold=False)
    _vline(ax, IMBALANCE_MILD * 100, "R1-threshold", f"R1 threshold {100 * IMBALANCE_MILD:g} %",
           threshold=True)
    ax.set_ylabel("cases", fontsize=8)
    _small(ax, f"R1: Dice if median < {100 * IMBALANCE_MILD:g} %",
           "tumour fraction of brain voxels per case (%)")


def _r2_panel(ax: Any, m: RuleMeasures) -> None:
    lb, big = m.volume_skew_lower_bound, m.volume_skew_adjusted
    if not (math.isnan(lb) or math.isnan(big)):
        ax.hlines(0, lb, big, color=_MEASURED, linewidth=2, label="95 % lower bound … G1")
        ax.plot([lb], [0], "|", color=_MEASURED, markersize=14, gid="R2-measured")
    ax.plot([m.volume_skew], [0], "o", color="tab:blue", gid="R2-g1",
            label=f"g1 {_g(m.volume_skew)} (n={m.n_volumes})")
    _vline(ax, FOCAL_SKEW_THRESHOLD, "R2-threshold",
           f"R2 threshold {FOCAL_SKEW_THRESHOLD:g}", threshold=True)
    if math.isnan(lb):
        ax.text(0.02, 0.15, f"no bound: n < {SKEW_MIN_N} or undefined", fontsize=7,
                transform=ax.transAxes)
    ax.set_yticks([])
    xs = [v for v in (lb, big, m.volume_skew, FOCAL_SKEW_THRESHOLD) if not math.isnan(v)]
    ax.set_xlim(min(*xs, 0.0) - 0.5, max(xs) + 0.5)
    ax.set_ylim(-1, 1.6)
    _small(ax, f"R2: focal if lower bound > {FOCAL_SKEW_THRESHOLD:g}", "skewness of tumour volume")


def _r5_panel(ax: Any, m: RuleMeasures) -> None:
    if m.slice_cv.size:
        ax.hist(m.slice_cv, bins=max(5, min(30, m.slice_cv.size)), color="tab:purple",
                alpha=0.8)
    _vline(ax, m.median_cv, "R5-measured", f"median {_g(m.median_cv)}", threshold=False)
    _vline(ax, ADAPT_CV_THRESHOLD, "R5-threshold", f"R5 threshold {ADAPT_CV_THRESHOLD:.3g}",
           threshold=True)
    ax.set_ylabel("cases", fontsize=8)
    _small(ax, f"R5: heterogeneous if CV > {ADAPT_CV_THRESHOLD:.3g}",
           "CV of per-slice tumour fraction per case")


def label_figure(stats: DatasetStats, *, width_in: float = 9.0, height_in: float = 4.6,
                 dpi: int = 72) -> Any:
    """Tumour fraction, volume and per-slice fraction with the thresholds of R1, R2, R5.

    Parameters
    ----------
    stats : DatasetStats
    width_in, height_in : float
        Figure size, inches.
    dpi : int, default 72

    Returns
    -------
    matplotlib.figure.Figure
        Three columns, one per rule, each with the distribution on top and the rule's
        statistic below:

        - R1: per-case tumour fraction (%) with the threshold (`IMBALANCE_MILD`) and the
          measured median as vertical lines;
        - R2: tumour volume per case (mL), g1 and g2 in the legend; below, the skewness
          axis with g1, the adjusted G1, its one-sided 95 % lower bound (the rule's test)
          and the threshold `FOCAL_SKEW_THRESHOLD`;
        - R5: per-slice tumour fraction of the slices with tumour (pooled); below, the
          per-case CV within the tumour's extent with its median and the threshold
          `ADAPT_CV_THRESHOLD`.

    Notes
    -----
    R2 and R5 judge a statistic *of* the distribution (skewness, CV), so their thresholds
    are drawn on that statistic's axis, not on the volume or fraction axis.
    """
    m = rule_measures(stats)
    fig = _figure(width_in, height_in, dpi)
    grid = fig.add_gridspec(2, 3)
    _r1_panel(fig.add_subplot(grid[:, 0]), m)
    ax = fig.add_subplot(grid[0, 1])
    ax.hist(m.volumes, bins=max(5, min(30, m.volumes.size)), color="tab:orange", alpha=0.8,
            label=f"g1 {_g(m.volume_skew)}, g2 {_g(m.volume_kurt)}")
    ax.set_ylabel("cases", fontsize=8)
    _small(ax, "tumour volume per case", "mL")
    _r2_panel(fig.add_subplot(grid[1, 1]), m)
    ax = fig.add_subplot(grid[0, 2])
    if m.slice_fractions.size:
        ax.hist(m.slice_fractions * 100, bins=30, color="tab:purple", alpha=0.6,
                label=f"{m.slice_fractions.size} slices with tumour")
    ax.set_ylabel("slices", fontsize=8)
    _small(ax, "per-slice tumour fraction", "% of the slice's brain voxels")
    _r5_panel(fig.add_subplot(grid[1, 2]), m)
    fig.suptitle(f"{stats.dataset}: label distributions and the thresholds of R1, R2, R5",
                 fontsize=10)
    return fig


def rules_figure(stats: DatasetStats, *, width_in: float = 9.0, height_in: float = 2.4,
                 dpi: int = 64) -> Any:
    """The rule panels of `label_figure` (R1, R2, R5) in one small row (the verdict's)."""
    m = rule_measures(stats)
    fig = _figure(width_in, height_in, dpi)
    a1, a2, a5 = fig.subplots(1, 3)
    _r1_panel(a1, m)
    _r2_panel(a2, m)
    _r5_panel(a5, m)
    return fig
