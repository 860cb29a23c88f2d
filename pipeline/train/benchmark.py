"""Every named loss under one protocol: k-fold training, metrics, tables and plots.

``run_benchmark`` trains each loss on the same folds (same split, same seeds, same
sampling and schedule) and writes the run directory::

    RUN_DIR/config.json             resolved configuration (losses, folds, training, plan,
                                    device, package versions, manifest path and hash)
    RUN_DIR/metrics_per_case.csv    one row per (loss, fold, validation case)   (+ .json)
    RUN_DIR/metrics_per_fold.csv    one row per (loss, fold): means over its cases (+ .json)
    RUN_DIR/summary.md              mean ± std over folds per loss (also summary.json)
    RUN_DIR/paired.md               the first loss against each other one, paired by
                                    validation case (also paired.json, paired_dice.png)
    RUN_DIR/curves.png              training loss and validation Dice per epoch
    RUN_DIR/adaptive.png            manifest term weights and adaptive-Tversky alpha/beta
    RUN_DIR/overlays.png            prediction overlays of a few validation cases
    RUN_DIR/<loss>/fold<k>/         checkpoint (last.pt), result.json, overlays.npz

Aggregation (the thesis's tables, Hun 2021, section 8.4): per fold, each metric is
averaged over the fold's validation cases (``hd``/``hd95`` over the cases where they are
defined, the others counted in ``hd_undefined``); the summary gives the mean and the
sample standard deviation (ddof = 1) of those fold means. Ratios are shown in percent,
distances in mm.

Paired comparison (``paired_table``): every case is validated exactly once across the k
folds, so two losses trained on the same split give two values per case. The first loss
listed (A, the manifest's in ``make demo``) is compared with each other loss (B) on the
cases both have: mean of A − B with a 95 % percentile-bootstrap interval and the Wilcoxon
signed-rank p-value (`stats.paired.paired_comparison`), and `stats.paired.verdict`'s
sentence. Ratio differences are shown in percentage points, distances in mm.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from pipeline.errors import ManifestError
from pipeline.fsio import open_atomic, write_text_atomic
from pipeline.report import save_figure
from pipeline.store import DatasetStore
from pipeline.train.loop import (
    FoldResult,
    Progress,
    TrainConfig,
    TrainingDiverged,
    amp_mode,
    kfold_split,
    select_device,
    train_fold,
)
from pipeline.train.losses import LOSSES, build_loss
from pipeline.train.metrics import DISTANCE_METRICS, METRIC_NAMES
from pipeline.train.normalize import NormalizationPlan
from stats.paired import MIN_PAIRS, PairedComparison, paired_comparison, verdict

log = logging.getLogger(__name__)

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Acc"), ("dice", "Dice"), ("f2", "F2"), ("iou", "IoU"),
    ("precision", "Precision"), ("recall", "Recall"), ("specificity", "Spec"),
    ("hd95", "HD95 (mm)"), ("hd", "HD (mm)"),
)
"""Summary columns in the thesis's order (Acc, Dice, F2, IoU, Precision, Recall, HD)."""

OPTIONAL_OUTPUTS: tuple[str, ...] = ("paired.md", "paired.json", "paired_dice.png",
                                      "adaptive.png", "overlays.png")
"""Files of the run directory that only some runs write; `run_benchmark` removes them
first, so the folder never shows one from an earlier run beside this run's results."""

#: The per-case outlier rule (`case_outliers`): a loss fails a case another loss gets
#: right when the other's Dice is above 0.5 and this one's is below 0.1 or below half of
#: the other's.
OUTLIER_FAIL_BELOW = 0.1
OUTLIER_RATIO = 0.5
OUTLIER_SUCCEED_ABOVE = 0.5

PAIRED_METRICS: tuple[str, ...] = ("dice", "hd95", "precision", "recall")
"""Metrics of the paired table, in its order."""

PAIRED_MARGINS: Mapping[str, float] = MappingProxyType({
    **dict.fromkeys((m for m in METRIC_NAMES if m not in DISTANCE_METRICS), 0.01),
    **dict.fromkeys(DISTANCE_METRICS, 1.0),
})
"""Non-inferiority margins of the paired verdict: one percentage point for ratios, 1 mm
for distances (one voxel of the 1 mm grid). A reading convention, not a finding; an
evidence study should state its own."""


def resolve_loss_specs(names: Sequence[str], manifest_spec: Mapping[str, Any] | None = None,
                       ) -> dict[str, dict[str, Any]]:
    """Loss name -> ``build_loss`` spec; ``"manifest"`` takes the manifest's spec.

    Every spec is built once here, so a bad name fails before any training.

    Raises
    ------
    ValueError
        Empty or repeated names, an unknown name (with the registry's suggestion), or
        ``"manifest"`` without a manifest.
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no loss named; give --losses, e.g. manifest,bce,dice,focal")
    if len(set(names)) != len(names):
        raise ValueError(f"loss names repeat: {names!r}")
    specs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "manifest":
            if manifest_spec is None:
                raise ValueError("loss 'manifest' needs a manifest (--manifest)")
            spec = dict(manifest_spec)
        else:
            spec = {"name": name}
        build_loss(spec)
        specs[name] = spec
    return specs


@dataclass(frozen=True)
class TrainingManifest:
    """A manifest checked for training, parsed once.

    Attributes
    ----------
    path : str
        The file it came from (named in every later error).
    manifest : stats.manifest.Manifest
        The validated document.
    loss_spec : dict
        Its loss, as `build_loss` takes it (built once to check it).
    plan : NormalizationPlan
        Its normalization, in the store's channel order.
    """

    path: str
    manifest: Any
    loss_spec: dict[str, Any]
    plan: NormalizationPlan


def load_training_manifest(path: str | Path, channels: Sequence[str], *,
                           manifest: Any = None) -> TrainingManifest:
    """Load and check a manifest for training (see `TrainingManifest`).

    The check is ``pipeline.manifest_io.load_manifest``, the same as ``xrai manifest validate``'s
    (schema, non-finite numbers, every loss and weighting parameter against what the
    constructors here accept); then the loss is built and the normalization plan matched
    to the store's channels.

    Parameters
    ----------
    path : str or Path
        The manifest file.
    channels : sequence of str
        The store's channels, in order.
    manifest : stats.manifest.Manifest, optional
        ``path`` as ``load_manifest`` already returned it (the file is not read again).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    pipeline.errors.ManifestError
        If it does not validate, its loss does not build (the registry's message, with
        the field ``loss.terms[i]``), or its normalization plan lacks a store channel;
        every message names the file and the field.
    """
    from pipeline.manifest_io import load_manifest

    if manifest is None:
        manifest = load_manifest(path)
    spec = manifest.loss_spec()
    try:
        build_loss(spec)
    except ValueError as err:
        raise ManifestError(f"{path}: field loss.{err}") from err
    plan = NormalizationPlan.from_manifest(manifest, channels, source=str(path))
    return TrainingManifest(path=str(path), manifest=manifest, loss_spec=spec, plan=plan)


@dataclass(frozen=True)
class PairedRow:
    """One line of the paired table: loss A against loss B on one metric, per case.

    Attributes
    ----------
    loss, other : str
        A (the reference, first listed) and B; differences are A − B.
    metric : str
        A key of the per-case rows (``"dice"``, ``"hd95"``, ...).
    higher_is_better : bool
        False for distances (lower is better).
    margin : float
        Non-inferiority margin of ``verdict``, in the metric's units.
    comparison : PairedComparison
        Over the cases validated for both losses (NaN pairs dropped and counted there).
    verdict : str
        `stats.paired.verdict` for A: "better", "worse", "not worse than by more than
        <margin>" or "cannot separate at n=<n>".
    n_unmatched : int
        Cases validated for only one of the two losses (a fold that failed).
    """

    loss: str
    other: str
    metric: str
    higher_is_better: bool
    margin: float
    comparison: PairedComparison
    verdict: str
    n_unmatched: int = 0

    @property
    def separated(self) -> bool:
        """Interval excludes 0, Wilcoxon p < 1 − confidence, and n >= ``MIN_PAIRS``.

        At small n the percentile interval is too narrow and the exact Wilcoxon p-value
        coarse, so the two can disagree; a difference counts as evidence only if both
        reject.
        """
        c = self.comparison
        return (c.n >= MIN_PAIRS and (c.ci_low > 0 or c.ci_high < 0)
                and c.p_value < 1.0 - c.confidence)

    def verdict_text(self) -> str:
        """``verdict``, flagged when the interval separates but the Wilcoxon test does not."""
        if self.verdict in ("better", "worse") and not self.separated:
            return f"{self.verdict}? (interval only)"
        return self.verdict

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "separated": self.separated}


@dataclass(frozen=True)
class BenchmarkResult:
    """The results of a benchmark run and where they were written.

    ``paired`` holds the first loss against each other one (`paired_table`); it is
    empty when fewer than two losses produced results.
    """

    out_dir: Path
    folds: list[FoldResult]
    failures: dict[str, str]
    summary: list[dict[str, Any]]
    paired: tuple[PairedRow, ...] = ()

    def markdown(self) -> str:
        return summary_markdown(self.summary)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("xrai-pipeline", "torch", "monai", "numpy", "scipy", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fold_means(result: FoldResult) -> dict[str, Any]:
    """Means over one fold's validation cases (distances over defined cases only)."""
    row: dict[str, Any] = {"loss": result.loss, "fold": result.fold, "n_cases": len(result.cases)}
    for m in METRIC_NAMES:
        values = np.array([c[m] for c in result.cases], dtype=np.float64)
        defined = values[~np.isnan(values)]
        row[m] = float(defined.mean()) if defined.size else math.nan
    row["hd_undefined"] = int(sum(math.isnan(c["hd"]) for c in result.cases))
    row["train_seconds"] = result.train_seconds
    row["voxels_per_s"] = result.voxels_per_s
    return row


def summarize(per_fold: Sequence[Mapping[str, Any]], losses: Sequence[str]) -> list[dict[str, Any]]:
    """Per loss: ``{metric: {"mean", "std", "n_folds"}}`` over its folds' means."""
    out = []
    for loss in losses:
        rows = [r for r in per_fold if r["loss"] == loss]
        entry: dict[str, Any] = {"loss": loss, "n_folds": len(rows)}
        for m in METRIC_NAMES:
            v = np.array([r[m] for r in rows], dtype=np.float64)
            v = v[~np.isnan(v)]
            entry[m] = {"mean": float(v.mean()) if v.size else math.nan,
                        "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                        "n_folds": int(v.size)}
        out.append(entry)
    return out


def format_cell(metric: str, stat: Mapping[str, float]) -> str:
    """``"95.11 ± 1.92"`` (ratios in %) or ``"3.20 ± 0.41"`` (mm); ``"–"`` if undefined."""
    mean, std = stat["mean"], stat["std"]
    if math.isnan(mean):
        return "–"
    scale = 1.0 if metric in DISTANCE_METRICS else 100.0
    s = f"{mean * scale:.2f}"
    return s + (f" ± {std * scale:.2f}" if not math.isnan(std) else "")


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a markdown table, one row per loss (mean ± std over folds)."""
    head = ["Loss", *(label for _, label in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [str(entry["loss"]), *(format_cell(m, entry[m]) for m, _ in TABLE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(per_case_rows: Sequence[Mapping[str, Any]], reference_loss: str,
                 metrics: Sequence[str] = PAIRED_METRICS, *,
                 others: Sequence[str] | None = None,
                 margins: Mapping[str, float] = PAIRED_MARGINS, confidence: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0) -> list[PairedRow]:
    """Compare ``reference_loss`` with each other loss, pairing per-case rows by case id.

    Parameters
    ----------
    per_case_rows : sequence of mapping
        Rows of ``metrics_per_case``: ``{"loss", "fold", "case", <metric>: value, ...}``,
        each (loss, case) at most once (k-fold validates every case once).
    reference_loss : str
        Loss A; every difference is A − B.
    metrics : sequence of str, default `PAIRED_METRICS`
        Metric keys to compare; those in `DISTANCE_METRICS` are lower-is-better.
    others : sequence of str, optional
        The losses B, in table order; default: every other loss in the rows, in order of
        first appearance. A loss without rows gives comparisons with ``n = 0``.
    margins : mapping, default `PAIRED_MARGINS`
        Non-inferiority margin per metric for the verdict (0 for a metric not in it).
    confidence, n_resamples, seed
        Passed to `stats.paired.paired_comparison` (the same seed for every line).

    Returns
    -------
    list of PairedRow
        For each loss in ``others``, one row per metric. Cases are paired on the ids both
        losses have, in sorted order (so the result does not depend on the fold order).

    Raises
    ------
    ValueError
        If ``reference_loss`` has no row, a (loss, case) repeats, or a row lacks a metric.

    Examples
    --------
    >>> rows = [{"loss": loss, "fold": 0, "case": f"c{i}", "dice": d + 0.1 * (loss == "m")}
    ...         for loss in ("m", "bce") for i, d in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 0.6])]
    >>> [(r.other, r.metric, r.verdict) for r in paired_table(rows, "m", ["dice"])]
    [('bce', 'dice', 'better')]
    """
    by_loss: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in per_case_rows:
        cases = by_loss.setdefault(str(row["loss"]), {})
        case = str(row["case"])
        if case in cases:
            raise ValueError(f"per-case rows repeat case {case!r} for loss {row['loss']!r} "
                             f"(folds {cases[case].get('fold')!r} and {row.get('fold')!r}); "
                             f"each case must be validated once per loss")
        for m in metrics:
            if m not in row:
                raise ValueError(f"per-case row of loss {row['loss']!r}, case {case!r} has "
                                 f"no metric {m!r}; it has {sorted(row)!r}")
        cases[case] = row
    if reference_loss not in by_loss:
        raise ValueError(f"reference loss {reference_loss!r} has no per-case row; losses "
                         f"with rows: {list(by_loss)!r}")
    if others is None:
        others = [name for name in by_loss if name != reference_loss]
    ref = by_loss[reference_loss]
    out: list[PairedRow] = []
    for other in others:
        theirs = by_loss.get(other, {})
        common = sorted(ref.keys() & theirs.keys())
        unmatched = len(ref.keys() ^ theirs.keys())
        for m in metrics:
            cmp = paired_comparison([float(ref[c][m]) for c in common],
                                    [float(theirs[c][m]) for c in common],
                                    confidence=confidence, n_resamples=n_resamples, seed=seed)
            higher = m not in DISTANCE_METRICS
            margin = float(margins.get(m, 0.0))
            out.append(PairedRow(reference_loss, other, m, higher, margin, cmp,
                                 verdict(cmp, margin=margin, higher_is_better=higher),
                                 unmatched))
    return out


def case_outliers(per_case_rows: Sequence[Mapping[str, Any]], *, metric: str = "dice",
                  fail_below: float = OUTLIER_FAIL_BELOW, ratio: float = OUTLIER_RATIO,
                  succeed_above: float = OUTLIER_SUCCEED_ABOVE) -> list[dict[str, Any]]:
    """Cases where one loss fails and another does not.

    For every validation case and every ordered pair of losses (A, B) with both values
    defined, A *fails where B does not* when

    ``dice_B > succeed_above and (dice_A < fail_below or dice_A < ratio * dice_B)``

    (defaults 0.5, 0.1, 0.5: B segments the case, A misses it or gets less than half of
    B's overlap). Such cases are where the mean differences come from, and the ones to
    look at first.

    Parameters
    ----------
    per_case_rows : sequence of mapping
        Rows of ``metrics_per_case`` (``loss``, ``fold``, ``case``, `metric`).
    metric : str, default "dice"
        A higher-is-better ratio metric.
    fail_below, ratio, succeed_above : float
        The rule's thresholds.

    Returns
    -------
    list of dict
        ``{"case", "fold", "failing", "failing_dice", "succeeding", "succeeding_dice",
        "difference"}`` (difference = succeeding − failing), sorted by case, then by
        difference (largest first).

    Examples
    --------
    >>> rows = [{"loss": "m", "fold": 0, "case": "c1", "dice": 0.05},
    ...         {"loss": "bce", "fold": 0, "case": "c1", "dice": 0.80},
    ...         {"loss": "m", "fold": 0, "case": "c2", "dice": 0.70},
    ...         {"loss": "bce", "fold": 0, "case": "c2", "dice": 0.60}]
    >>> [(o["case"], o["failing"], o["succeeding"]) for o in case_outliers(rows)]
    [('c1', 'm', 'bce')]
    """
    by_case: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in per_case_rows:
        by_case.setdefault(str(row["case"]), {})[str(row["loss"])] = row
    out: list[dict[str, Any]] = []
    for case in sorted(by_case):
        rows = by_case[case]
        found = []
        for a, ra in rows.items():
            for b, rb in rows.items():
                da, db = float(ra[metric]), float(rb[metric])
                if a == b or math.isnan(da) or math.isnan(db):
                    continue
                if db > succeed_above and (da < fail_below or da < ratio * db):
                    found.append({"case": case, "fold": ra.get("fold"), "failing": a,
                                  "failing_dice": da, "succeeding": b, "succeeding_dice": db,
                                  "difference": db - da})
        out += sorted(found, key=lambda o: -o["difference"])
    return out


def paired_caveat(rows: Sequence[PairedRow]) -> str | None:
    """A plain sentence when the paired table is not evidence; None when it all is.

    A line is evidence of a difference only if `PairedRow.separated`: its interval
    excludes 0, its Wilcoxon p is below 1 − confidence, and it has at least
    `stats.paired.MIN_PAIRS` pairs. No line separated: "n=<n> cases: too few to
    separate these losses; the differences above are not evidence." Some: how many.
    """
    if not rows:
        return None
    undecided = [r for r in rows if not r.separated]
    if not undecided:
        return None
    n = max(r.comparison.n for r in rows)
    if len(undecided) == len(rows):
        return (f"n={n} cases: too few to separate these losses; the differences above "
                f"are not evidence.")
    alpha = 1.0 - rows[0].comparison.confidence
    return (f"n={n} cases: {len(undecided)} of the {len(rows)} differences above cannot "
            f"be told from 0 (interval contains 0, Wilcoxon p >= {alpha:.2g}, or fewer "
            f"than {MIN_PAIRS} pairs); those are not evidence.")


def format_difference(metric: str, cmp: PairedComparison) -> str:
    """``"+1.23 [-0.40, +2.80]"``: mean difference and interval (ratios in percentage
    points, distances in mm); ``"–"`` if undefined."""
    if math.isnan(cmp.mean_diff):
        return "–"
    scale = 1.0 if metric in DISTANCE_METRICS else 100.0
    return (f"{cmp.mean_diff * scale:+.2f} [{cmp.ci_low * scale:+.2f}, "
            f"{cmp.ci_high * scale:+.2f}]")


def format_p(p: float) -> str:
    """``"0.031"``, ``"<0.001"``, or ``"–"`` when no p-value was computed."""
    if math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _metric_label(metric: str) -> str:
    labels = dict(TABLE_COLUMNS)
    return labels.get(metric, metric)


def paired_markdown(rows: Sequence[PairedRow]) -> str:
    """The paired table as markdown, with the caveat when it is not evidence."""
    if not rows:
        return ""
    conf = rows[0].comparison.confidence
    head = ["A − B", "Metric", "n", f"Mean A − B [{conf:.0%} CI]", "Wilcoxon p",
            "Verdict for A"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.comparison
        n = f"{c.n}" + (f" ({c.n_dropped} undefined)" if c.n_dropped else "")
        cells = [f"{r.loss} − {r.other}", _metric_label(r.metric), n,
                 format_difference(r.metric, c), format_p(c.p_value), r.verdict_text()]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nPaired by validation case; ratios in percentage points, distances in mm; "
            f"{conf:.0%} percentile-bootstrap interval of the mean difference "
            f"({rows[0].comparison.n_resamples} resamples of cases); two-sided Wilcoxon "
            f"signed-rank p (none below {MIN_PAIRS} pairs), not corrected for the "
            f"{len(rows)} comparisons. Verdict margins, in the "
            f"metric's own units: "
            + ", ".join(f"{_metric_label(r.metric)} {r.margin:g}"
                        for r in {r.metric: r for r in rows}.values()) + ".\n")
    caveat = paired_caveat(rows)
    return "\n".join(lines) + "\n" + note + (f"\n**{caveat}**\n" if caveat else "")


def write_paired(out_dir: Path, rows: Sequence[PairedRow]) -> None:
    """Write ``paired.md``, ``paired.json`` and (if Dice is compared) ``paired_dice.png``."""
    if not rows:
        return
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "paired.md", paired_markdown(rows))
    write_text_atomic(out_dir / "paired.json", json.dumps(
        {"reference": rows[0].loss, "min_pairs": MIN_PAIRS, "caveat": paired_caveat(rows),
         "rows": [r.to_dict() for r in rows]}, indent=1, allow_nan=True))
    dice = [r for r in rows if r.metric == "dice"]
    if dice:
        from pipeline.report import ForestRow, forest_plot

        forest_plot([ForestRow(f"{r.loss} − {r.other}", r.comparison) for r in dice],
                    out_dir / "paired_dice.png",
                    title=f"Dice per validation case: {dice[0].loss} against each loss",
                    xlabel="mean Dice difference A − B (percentage points), "
                           f"{dice[0].comparison.confidence:.0%} bootstrap interval",
                    scale=100.0, favours=("← favours B", f"favours {dice[0].loss} →"))


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_text_atomic(path.with_suffix(".json"), json.dumps(list(rows), indent=1,
                                                            allow_nan=True))
    if not rows:
        write_text_atomic(path, "")
        return
    with open_atomic(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


#: What a finished fold depends on besides its loss: a run folder whose config.json
#: differs in any of these is not resumed (its folds would answer another question).
RESUME_KEYS = ("store", "dataset", "folds", "train", "normalization", "manifest_sha256")


def _reusable_losses(previous_path: Path, config: Mapping[str, Any]) -> set[str]:
    """The losses whose folds in a run folder may be resumed under ``config``.

    None when the folder's ``config.json`` is missing, unreadable, or differs in
    `RESUME_KEYS`; otherwise the losses whose spec is unchanged. Differences are logged,
    so a re-run with new options says why it trains from scratch.
    """
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return set()
    now = json.loads(json.dumps(config))  # the same JSON types as the file
    changed = [k for k in RESUME_KEYS if previous.get(k) != now.get(k)]
    if changed:
        log.warning("%s was written with other %s; its folds are trained again, not resumed",
                    previous_path.parent, ", ".join(changed))
        return set()
    before = previous.get("losses") or {}
    redo = sorted(n for n, spec in now["losses"].items() if n in before and before[n] != spec)
    if redo:
        log.warning("%s: the loss %s changed; its folds are trained again",
                    previous_path.parent, ", ".join(redo))
    return {n for n, spec in now["losses"].items() if before.get(n) == spec}


def run_benchmark(store_url: str, dataset: str, losses: Sequence[str], *,
                  plan: NormalizationPlan, cfg: TrainConfig, folds: int, out_dir: Path,
                  manifest_spec: Mapping[str, Any] | None = None,
                  manifest_path: str | Path | None = None, resume: bool = True,
                  progress: Progress | None = None) -> BenchmarkResult:
    """Train every loss in ``losses`` on the same ``folds``-fold split; write RUN_DIR.

    Parameters
    ----------
    store_url, dataset : str
        The store and dataset (all committed cases take part).
    losses : sequence of str
        Registry names; ``"manifest"`` uses ``manifest_spec``.
    plan : NormalizationPlan
        Intensity normalization (the manifest's).
    cfg : TrainConfig
        The common protocol.
    folds : int
        k of the k-fold split (seeded by ``cfg.seed``).
    out_dir : Path
        The run directory.
    manifest_spec, manifest_path
        The manifest's loss spec, and the file it came from (recorded with its hash).
    resume : bool, default True
        Reuse finished folds and continue from checkpoints in ``out_dir``, for the losses
        whose spec is unchanged and only when the folder's ``config.json`` matches in
        `RESUME_KEYS` (split, training options, normalization, manifest); otherwise
        their folds are trained again, with a warning.
    progress : callable, optional
        Receives ``{"kind": "start", "losses", "folds", "epochs"}`` first, then the
        loop's progress events (`train_fold`) and ``{"kind": "fold_done", "loss",
        "fold", "dice"}`` after each fold.

    Returns
    -------
    BenchmarkResult
        A fold that diverged (NaN loss) is listed in ``failures`` and left out.
    """
    specs = resolve_loss_specs(losses, manifest_spec)
    store = DatasetStore.open(store_url, dataset)
    plan.check_channels(store.channels)
    case_ids = list(store.committed())
    splits = kfold_split(case_ids, folds, cfg.seed)
    device = select_device(cfg.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "store": store_url, "dataset": dataset, "losses": specs,
        "folds": [{"index": f.index, "train": list(f.train), "val": list(f.val)} for f in splits],
        "train": cfg.to_dict(), "normalization": plan.to_dict(), "device": str(device),
        "amp": amp_mode(device, cfg.amp).name, "spacing_xyz_mm": list(store.grid.spacing),
        "manifest": None if manifest_path is None else str(manifest_path),
        "manifest_sha256": (hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest()
                            if manifest_path is not None else None),
        "packages": _versions(), "created_at": datetime.now(timezone.utc).isoformat(),
        "registry": sorted(LOSSES),
    }
    reusable = _reusable_losses(out_dir / "config.json", config) if resume else set()
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=1))
    for stale in OPTIONAL_OUTPUTS:  # written only by some runs: never left from an earlier one
        (out_dir / stale).unlink(missing_ok=True)
    if progress:
        progress({"kind": "start", "losses": list(specs), "folds": len(splits),
                  "epochs": cfg.epochs})
    spacing_zyx = tuple(float(s) for s in store.grid.spacing[::-1])
    channels = list(store.channels)
    overlay_channel = channels.index("t2f") if "t2f" in channels else 0
    results: list[FoldResult] = []
    failures: dict[str, str] = {}
    for name, spec in specs.items():
        for fold in splits:
            try:
                res = train_fold(store_url, dataset, fold, name, spec, plan, cfg,
                                 out_dir / name / f"fold{fold.index}", spacing_zyx=spacing_zyx,
                                 resume=name in reusable, progress=progress,
                                 overlay_channel=overlay_channel)
            except TrainingDiverged as err:
                failures[f"{name}/fold{fold.index}"] = str(err)
                continue
            results.append(res)
            if progress:
                progress({"kind": "fold_done", "loss": name, "fold": fold.index,
                          "dice": float(np.mean([c["dice"] for c in res.cases]))})
    per_case = [{"loss": r.loss, "fold": r.fold, **c} for r in results for c in r.cases]
    per_fold = [fold_means(r) for r in results]
    summary = summarize(per_fold, list(specs))
    _write_rows(out_dir / "metrics_per_case.csv", per_case)
    _write_rows(out_dir / "metrics_per_fold.csv", per_fold)
    write_text_atomic(out_dir / "summary.json", json.dumps(
        {"summary": summary, "failures": failures}, indent=1, allow_nan=True))
    note = ("\nMean ± sample std over folds of the per-fold means; ratios in %, distances "
            "in mm (HD95, HD over cases where both masks are non-empty).\n")
    fail = "".join(f"\n- {k} failed: {v}" for k, v in failures.items())
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary) + note + fail + "\n")
    names = list(specs)
    paired: list[PairedRow] = []
    if len(names) >= 2 and any(r["loss"] == names[0] for r in per_case):
        paired = paired_table(per_case, names[0], others=names[1:])
        write_paired(out_dir, paired)
    plot_curves(results, out_dir / "curves.png")
    plot_adaptive(results, out_dir / "adaptive.png")
    plot_overlays(results, out_dir / "overlays.png")
    return BenchmarkResult(out_dir, results, failures, summary, tuple(paired))


# -- plots ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Resolution of the run's PNGs: readable, and small enough (well under 300 KB) to embed
#: in a Prefect artifact.
PLOT_DPI = 90


def _loss_colors(losses: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {loss: cmap(i % 10) for i, loss in enumerate(losses)}


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_curves(results: Sequence[FoldResult], path: Path) -> Path | None:
    """Training loss and validation Dice per epoch of every loss on one chart each.

    One colour per loss, one line style per fold (markers, so a one-epoch run shows
    points);
    the training losses are each on their own scale, so the left panel compares their
    shapes, the right one (validation Dice, 0-1) their results.
    """
    if not results:
        return None
    plt = _pyplot()
    losses = list(dict.fromkeys(r.loss for r in results))
    colors = _loss_colors(losses)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    styles = ("-", "--", ":", "-.")
    for r in results:
        ep = [h["epoch"] for h in r.history]
        ls = styles[r.fold % len(styles)]
        axes[0, 0].plot(ep, [h["train_loss"] for h in r.history], ls, marker="o", ms=3,
                        color=colors[r.loss])
        val = [(h["epoch"], h["val_dice"]) for h in r.history if "val_dice" in h]
        if val:
            axes[0, 1].plot(*zip(*val, strict=True), ls, marker="o", ms=4,
                            color=colors[r.loss])
    axes[0, 0].set_title("training loss (epoch mean)")
    axes[0, 0].set_ylabel("loss (each loss's own scale)")
    axes[0, 1].set_title("validation Dice (whole tumour)")
    axes[0, 1].set_ylabel("Dice")
    axes[0, 1].set_ylim(0, 1)
    for ax in axes[0]:
        _integer_epochs(ax)
    from matplotlib.lines import Line2D

    folds = sorted({r.fold for r in results})
    handles = [Line2D([], [], color=colors[loss], marker="o", label=loss) for loss in losses]
    handles += [Line2D([], [], color="gray", ls=styles[f % len(styles)], label=f"fold {f + 1}")
                for f in folds]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // 6), 1, 1))
    save_figure(fig, path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_adaptive(results: Sequence[FoldResult], path: Path) -> Path | None:
    """Effective term weights of manifest losses and adaptive-Tversky α/β per epoch."""
    series = [r for r in results if any(h.get("weights") for h in r.history)
              or any(h.get("alpha") is not None for h in r.history)]
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for r in series:
        ep = [h["epoch"] for h in r.history]
        w = [h["weights"] for h in r.history]
        if w and w[0]:
            for i, name in enumerate(r.term_names or [f"term {k}" for k in range(len(w[0]))]):
                axes[0, 0].plot(ep, [x[i] for x in w], marker="o", ms=3,
                                label=f"{r.loss} fold {r.fold + 1}: {name}")
        if any(h.get("alpha") is not None for h in r.history):
            axes[0, 1].plot(ep, [h["alpha"] for h in r.history], marker="o", ms=3,
                            label=f"{r.loss} fold {r.fold + 1}: α (false positives)")
            axes[0, 1].plot(ep, [h["beta"] for h in r.history], "--", marker="s", ms=3,
                            label=f"{r.loss} fold {r.fold + 1}: β (false negatives)")
    axes[0, 0].set_title("manifest loss: effective term weights")
    axes[0, 0].set_ylabel("weight (epoch mean)")
    axes[0, 1].set_title("Tversky α, β")
    axes[0, 1].set_ylabel("α, β (epoch mean)")
    for ax in axes[0]:
        _integer_epochs(ax)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "none in this run", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    save_figure(fig, path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_overlays(results: Sequence[FoldResult], path: Path, max_cases: int = 3) -> Path | None:
    """Axial slice of largest tumour area per case and loss: truth (green), prediction
    (red), and the case's whole-volume Dice in each panel's title."""
    losses = list(dict.fromkeys(r.loss for r in results))
    cases: list[str] = []
    for r in results:
        for key in r.overlays:
            cid = key.rsplit("/", 1)[0]
            if cid not in cases and len(cases) < max_cases:
                cases.append(cid)
    if not cases:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(cases), len(losses), figsize=(2.6 * len(losses),
                                                                2.7 * len(cases) + 0.5),
                             squeeze=False)
    for j, loss in enumerate(losses):
        by_case = {k.rsplit("/", 1)[0]: r for r in results if r.loss == loss for k in r.overlays}
        for i, cid in enumerate(cases):
            ax = axes[i, j]
            ax.axis("off")
            r = by_case.get(cid)
            if r is None:
                continue
            ax.imshow(r.overlays[f"{cid}/image"], cmap="gray")
            with warnings.catch_warnings():  # an empty mask has no contour
                warnings.simplefilter("ignore")
                ax.contour(r.overlays[f"{cid}/truth"].astype(float), levels=[0.5],
                           colors="lime", linewidths=0.8)
                ax.contour(r.overlays[f"{cid}/pred"].astype(float), levels=[0.5],
                           colors="red", linewidths=0.8)
            dice = next((c["dice"] for c in r.cases if c["case"] == cid), math.nan)
            ax.set_title(f"{loss}: Dice {dice:.2f}\n{cid}", fontsize=7)
    fig.legend(handles=[Line2D([], [], color="lime", label="truth"),
                        Line2D([], [], color="red", label="prediction")],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_png_palette(fig, path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def save_png_palette(fig: Any, path: Path, *, dpi: int, colors: int = 96) -> Path:
    """Save a figure as a palette PNG of `colors` colours, atomically.

    MR slices are noise to PNG's compression: a 3 × 3 overlay grid is about 450 kB in
    RGBA and 120 kB with a 96-colour palette, which keeps grey levels and contours
    visibly intact; small enough to embed in a Prefect artifact.
    """
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        with open_atomic(Path(path), "wb") as fh:
            small.save(fh, format="PNG", optimize=True)
    return Path(path)


__all__ = [
    "OPTIONAL_OUTPUTS",
    "OUTLIER_FAIL_BELOW",
    "OUTLIER_RATIO",
    "OUTLIER_SUCCEED_ABOVE",
    "PAIRED_MARGINS",
    "PAIRED_METRICS",
    "PLOT_DPI",
    "TABLE_COLUMNS",
    "BenchmarkResult",
    "PairedRow",
    "case_outliers",
    "fold_means",
    "format_cell",
    "format_difference",
    "format_p",
    "load_training_manifest",
    "paired_caveat",
    "paired_markdown",
    "paired_table",
    "plot_adaptive",
    "plot_curves",
    "plot_overlays",
    "resolve_loss_specs",
    "run_benchmark",
    "save_png_palette",
    "summarize",
    "summary_markdown",
    "write_paired",
]
