"""Tables and plots of statistics and training results.

:func:`forest_plot` draws paired comparisons (:class:`stats.paired.PairedComparison`):
one row per comparison, the bootstrap interval of the mean difference as a horizontal
line, the mean difference as a marker, a vertical line at zero, rows under group
headings, and the numbers written out on the right. Plots use matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsio import open_atomic
from stats.paired import PairedComparison

__all__ = ["ForestRow", "forest_plot"]


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
