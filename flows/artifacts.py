"""Markdown and table artifacts the flows publish to the Prefect UI.

The builders (``*_markdown``, ``*_rows``) are plain functions of the pipeline's result
objects, tested without Prefect; `publish_markdown` and `publish_table` hand their
output to Prefect (``Artifacts`` tab of a flow run, and the ``Artifacts`` page by key,
where each key keeps its history across runs).

Keys are ``<kind>-<dataset>`` (lower case, ``[a-z0-9-]``, as Prefect requires), so the
latest dataset summary of ``phantom`` is always ``dataset-summary-phantom``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.ingest import CaseOutcome
from pipeline.store import DatasetStore
from stats.manifest import Manifest, decisions_table
from stats.summary import DatasetStats

#: The artifact kinds, in the order a pipeline run publishes them.
KINDS: tuple[str, ...] = (
    "dataset-summary", "quarantine", "statistics", "transforms", "loss-config",
    "training-summary", "reprocess-report", "download-summary",
)


def artifact_key(kind: str, dataset: str) -> str:
    """``<kind>-<dataset>`` folded to Prefect's key alphabet (lower case, digits, dashes).

    Raises
    ------
    ValueError
        `kind` is not one of `KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {KINDS!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"{kind}-{slug}"


def fmt(v: Any) -> str:
    """A number for a table cell: 4 significant digits, '–' for NaN/None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    return f"{v:.3e}" if (a >= 1e5 or 0 < a < 1e-3) else f"{v:.4g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ builders
def dataset_summary_markdown(store: DatasetStore, dataset: str,
                             outcomes: Sequence[CaseOutcome] = ()) -> str:
    """Grid, channels, counts and one row per case (status of this run, source geometry).

    Reads the store's case records only (no voxels).
    """
    records = store.committed()
    quarantined = store.quarantined()
    grid = store.grid
    status = {o.case_id: o.status for o in outcomes}
    counts = {s: sum(1 for o in outcomes if o.status == s)
              for s in ("ingested", "unchanged", "quarantined")}
    head = (f"# Dataset `{dataset}`\n\n"
            f"- store: `{store.url}`\n"
            f"- grid: {'×'.join(str(int(s)) for s in grid.shape)} voxels at "
            f"{'×'.join(f'{s:g}' for s in grid.spacing)} mm (LPS)\n"
            f"- channels: {', '.join(store.channels)}\n"
            f"- committed cases: {len(records)}; quarantined: {len(quarantined)}\n")
    if outcomes:
        head += (f"- this run: {counts['ingested']} ingested, {counts['unchanged']} unchanged, "
                 f"{counts['quarantined']} quarantined\n")
    rows = []
    for cid, rec in records.items():
        vol = next(iter(rec.attrs.get("volumes", {}).values()), {})
        rows.append((cid, status.get(cid, "committed"), vol.get("orientation", "?"),
                     "×".join(f"{s:g}" for s in vol.get("spacing", [])) or "?",
                     "×".join(str(s) for s in vol.get("size", [])) or "?",
                     ", ".join(rec.attrs.get("flags", [])) or "",
                     rec.content_hash[:12]))
    table = markdown_table(("case", "this run", "source orientation", "source spacing (mm)",
                            "source size", "flags", "content hash"), rows)
    return head + "\n" + table


def quarantine_rows(store: DatasetStore) -> list[dict[str, str]]:
    """One row per quarantined case: id, reason, file at fault."""
    return [{"case": cid, "reason": str(info.get("reason", "")),
             "path": str(info.get("path") or "")}
            for cid, info in sorted(store.quarantined().items())]


def statistics_markdown(stats: DatasetStats, *, computed: Sequence[str] = (),
                        reused: Sequence[str] = ()) -> str:
    """Intensity moments per channel and region, label distributions, class frequencies.

    Skewness is the biased g1 and kurtosis Fisher's excess g2 (scipy's defaults).
    """
    out = [f"# Statistics of `{stats.dataset}`\n",
           f"{stats.n_cases} cases; dataset content hash `{stats.content_hash[:16]}`; "
           f"skewness g1 and excess kurtosis g2 (scipy.stats defaults).\n"]
    if computed or reused:
        out.append(f"Per-case partials: {len(computed)} computed, {len(reused)} reused from "
                   "the store (unchanged content hash and engine).\n")
    rows = []
    for ch, regions in stats.intensity.items():
        for region, d in regions.items():
            m = d.moments
            rows.append((ch, region, m.n, fmt(m.mean), fmt(m.std), fmt(m.skewness),
                         fmt(m.kurtosis), fmt(d.percentiles.get("0.5")),
                         fmt(d.percentiles.get("50")), fmt(d.percentiles.get("99.5"))))
    out.append("## Intensity\n")
    out.append(markdown_table(("channel", "region", "voxels", "mean", "std", "skew", "kurt",
                               "p0.5", "p50", "p99.5"), rows))
    rows = []
    for name, d in stats.labels.items():
        m = d.moments
        rows.append((name, d.unit, m.n, fmt(m.mean), fmt(m.std), fmt(m.skewness),
                     fmt(m.kurtosis), fmt(d.percentiles.get("5")),
                     fmt(d.percentiles.get("50")), fmt(d.percentiles.get("95"))))
    out.append("\n## Labels across cases / slices\n")
    out.append(markdown_table(("statistic", "unit", "n", "mean", "std", "skew", "kurt", "p5",
                               "median", "p95"), rows))
    freq = ", ".join(f"{k} {fmt(100 * v)} %" for k, v in stats.class_frequencies.items())
    out.append(f"\nClass frequencies over annotated brain voxels: {freq}\n")
    return "\n".join(out)


def transforms_markdown(manifest: Manifest) -> str:
    """The transform chosen for every distribution, with the evidence of every candidate."""
    out = [f"# Transforms chosen for `{manifest.dataset.name}`\n",
           "Score: skew² + excess-kurtosis²/4 (Jarque–Bera form); lower is closer to "
           "normal; ties keep identity.\n",
           markdown_table(("distribution", "chosen", "expression", "score identity",
                           "score chosen", "n"),
                          [(k, s.chosen, s.expression, fmt(s.score_identity),
                            fmt(s.score_chosen), s.n) for k, s in manifest.transforms.items()])]
    out.append("\n## Evidence\n")
    for key, sel in manifest.transforms.items():
        out.append(f"### {key}\n\n{sel.reason}\n")
        out.append(markdown_table(
            ("candidate", "skew before", "kurt before", "skew after", "kurt after", "score",
             "note"),
            [(e.candidate + (" (chosen)" if e.candidate == sel.chosen else ""),
              fmt(e.skewness_before), fmt(e.kurtosis_before), fmt(e.skewness_after),
              fmt(e.kurtosis_after), fmt(e.score), e.note) for e in sel.evidence]))
    return "\n".join(out)


def loss_markdown(manifest: Manifest) -> str:
    """The loss terms and weighting with their reasons, then every rule's decision."""
    loss = manifest.loss
    out = [f"# Loss configuration for `{manifest.dataset.name}`\n",
           markdown_table(("term", "weight", "parameters", "reason"),
                          [(t.name, fmt(t.weight),
                            ", ".join(f"{k}={v}" for k, v in t.params.items()), t.reason)
                           for t in loss.terms]),
           f"\nWeighting: **{loss.weighting.method}** "
           f"({', '.join(f'{k}={v}' for k, v in loss.weighting.params.items()) or 'no parameters'})"
           f": {loss.weighting.reason}\n",
           "\n## Decisions\n",
           markdown_table(("rule", "measured", "decision"), decisions_table(manifest))]
    return "\n".join(out)


def training_markdown(summary_md: str, failures: Mapping[str, str], out_dir: str) -> str:
    """The benchmark's summary table (mean ± std over folds), failures, the run folder."""
    out = ["# Training summary\n",
           "Mean ± sample std over folds of the per-fold means; ratios in %, distances "
           "in mm.\n", summary_md]
    if failures:
        out.append("\n## Failed folds\n")
        out += [f"- {k}: {v}" for k, v in failures.items()]
    out.append(f"\nRun folder: `{out_dir}` (config.json, metrics_per_case.csv, "
               "metrics_per_fold.csv, summary.md, curves.png).\n")
    return "\n".join(out)


def reprocess_markdown(dataset: str, *, changed: Sequence[str], unchanged: int,
                       quarantined: Mapping[str, str], missing_at_source: Sequence[str],
                       computed: Sequence[str], reused: Sequence[str],
                       decision_changes: Sequence[str] | None, manifest_written: bool,
                       trained: bool) -> str:
    """What a scheduled reprocessing run found and did."""
    lines = [f"# Reprocessing `{dataset}`\n",
             f"- new or changed cases ingested: {len(changed)}"
             + (f" ({', '.join(changed)})" if changed else ""),
             f"- unchanged cases skipped: {unchanged}",
             f"- quarantined: {len(quarantined)}"
             + "".join(f"\n  - {cid}: {why}" for cid, why in quarantined.items()),
             f"- committed but no longer at the source (kept): {len(missing_at_source)}"
             + (f" ({', '.join(missing_at_source)})" if missing_at_source else ""),
             f"- statistics: {len(computed)} cases computed, {len(reused)} reused"]
    if decision_changes is None:
        lines.append("- manifest: none before, written")
    elif decision_changes:
        lines.append("- manifest rewritten; decisions changed:")
        lines += [f"  - {c}" for c in decision_changes]
    else:
        lines.append("- manifest kept: no decision changed")
    lines.append(f"- retrained: {'yes' if trained else 'no'}")
    if not manifest_written and decision_changes:
        lines.append("- (manifest not written)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ publishing
def publish_markdown(kind: str, dataset: str, markdown: str, description: str) -> str:
    """Create a markdown artifact keyed ``<kind>-<dataset>``; return the key."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(kind, dataset)
    create_markdown_artifact(markdown=markdown, key=key, description=description)
    return key


def publish_table(kind: str, dataset: str, rows: list[dict[str, Any]], description: str) -> str:
    """Create a table artifact keyed ``<kind>-<dataset>``; return the key."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(kind, dataset)
    create_table_artifact(table=rows, key=key, description=description)
    return key
