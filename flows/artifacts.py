"""Markdown and table artifacts the flows publish to the Prefect UI.

The builders (``*_markdown``, ``*_rows``) are plain functions of the pipeline's result
objects, tested without Prefect; `publish_markdown` and `publish_table` hand their
output to Prefect (``Artifacts`` tab of a flow run, and the ``Artifacts`` page by key,
where each key keeps its history across runs).

Keys are ``<kind>-<dataset>-<store id>`` (lower case, ``[a-z0-9-]``, Prefect's artifact
key alphabet ``^[a-z0-9-]*$``, `prefect.types.names`), where the store id is 12 hex
digits of the sha256 of the resolved store location (`store_id`; the same digits as the
store's write-limit name, `flows.concurrency.write_limit_name`). So the history of a key
is the history of one dataset of one store: ``phantom`` in two stores has two keys. Only
artifacts that describe no store (``download-summary``, keyed by the source collection)
and callers that do not yet pass the store keep ``<kind>-<dataset>``.

Pictures (`pipeline.report`) are embedded as markdown images with ``data:image/png``
URIs (`png_markdown`): the Prefect 3 UI renders a markdown image token as an ``<img>``
whose ``src`` is the token's URL, unsanitised, so a data URI shows offline on a loopback
server (checked in headless Chromium with Prefect 3.8.8, the v1 and v2 UIs; inline
``<svg>`` is not usable: the UI's DOMPurify configuration forbids ``style`` and the
shapes render black). The server stores artifact data as JSON without a length limit;
the pictures are palette PNGs of about 9-25 kB on the phantom (`MAX_IMAGE_BYTES`
bounds them).

The ``verdict`` artifact is published by the ``pipeline`` flow itself, so the pipeline
run's own Artifacts tab shows it: the chosen loss and one short row per rule (rule,
measured, threshold, decision), narrow enough for the UI's artifact pane at a 1400 px
window (`VERDICT_MAX_LINE`), with links to the full evidence (the ``loss-config``,
``transforms`` and ``statistics`` artifacts of the same run, by artifact id).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.concurrency import store_identity
from pipeline.ingest import CaseOutcome
from pipeline.store import DatasetStore
from stats.manifest import Manifest
from stats.rules import Decision
from stats.seen import seen_moments
from stats.summary import DatasetStats
from stats.transforms import make_transform

#: The artifact kinds, in the order a pipeline run publishes them.
KINDS: tuple[str, ...] = (
    "dataset-summary", "quarantine", "statistics", "transforms", "loss-config", "verdict",
    "training-summary", "training-cases", "training-paired", "training-comparison",
    "training-outliers", "training-curves", "training-overlays", "reprocess-report",
    "download-summary",
)
#: Hex digits of the store id in keys (as in the write-limit names).
STORE_ID_DIGITS = 12
#: Longest line of the verdict's rule table, in characters: at 1400 px the UI's artifact
#: pane is about 830 px wide, some 95 characters of its table font with cell padding.
VERDICT_MAX_LINE = 90
#: Longest cell of the verdict's table, in characters.
VERDICT_MAX_CELL = 40
#: Largest picture embedded in an artifact, in bytes of PNG (before base64).
MAX_IMAGE_BYTES = 150_000


def store_id(store: str) -> str:
    """12 hex digits of sha256 of the store's canonical location
    (`flows.concurrency.store_identity`): two spellings of one store give one id."""
    return hashlib.sha256(store_identity(store).encode("utf-8")).hexdigest()[:STORE_ID_DIGITS]


def artifact_key(kind: str, dataset: str, store: str | None = None) -> str:
    """``<kind>-<dataset>-<store id>`` folded to Prefect's key alphabet (``[a-z0-9-]``).

    Parameters
    ----------
    kind : str
        One of `KINDS`.
    dataset : str
        The dataset (or, for ``download-summary``, the source collection); lower-cased,
        every run of other characters replaced by one dash.
    store : str, optional
        The store path or URL; its `store_id` ends the key. None gives
        ``<kind>-<dataset>`` (artifacts about no store).

    Raises
    ------
    ValueError
        `kind` is not one of `KINDS`.

    Examples
    --------
    >>> artifact_key("statistics", "UPENN_GBM.v2", "s3://bucket/xrai.zarr/")
    'statistics-upenn-gbm-v2-f0e9b022a039'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {KINDS!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"{kind}-{slug}" + (f"-{store_id(store)}" if store is not None else "")


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
                        reused: Sequence[str] = (), picture: str = "") -> str:
    """Intensity moments per channel and region, label distributions, class frequencies.

    Skewness is the biased g1 and kurtosis Fisher's excess g2 (scipy's defaults).
    `picture` (markdown, `label_picture`) goes above the tables.
    """
    out = [f"# Statistics of `{stats.dataset}`\n",
           f"{stats.n_cases} cases; dataset content hash `{stats.content_hash[:16]}`; "
           f"skewness g1 and excess kurtosis g2 (scipy.stats defaults).\n"]
    if computed or reused:
        out.append(f"Per-case partials: {len(computed)} computed, {len(reused)} reused from "
                   "the store (unchanged content hash and engine).\n")
    if picture:
        out.append(picture)
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


# ------------------------------------------------------------------ pictures
def _has_histograms(stats: DatasetStats, channels: Iterable[str]) -> bool:
    return all(stats.intensity.get(ch, {}).get("brain") is not None
               and stats.intensity[ch]["brain"].histogram is not None for ch in channels)


def label_picture(stats: DatasetStats) -> str:
    """`pipeline.report.label_figure` as a markdown image (600-700 px wide)."""
    from pipeline.report import figure_png, label_figure

    return png_markdown(figure_png(label_figure(stats)),
                        "label distributions with the thresholds of R1, R2, R5")


def rules_picture(stats: DatasetStats) -> str:
    """`pipeline.report.rules_figure` (R1, R2, R5 against their thresholds), small."""
    from pipeline.report import figure_png, rules_figure

    return png_markdown(figure_png(rules_figure(stats)), "R1, R2, R5 against their thresholds")


def intensity_picture(stats: DatasetStats, manifest: Manifest) -> str:
    """`pipeline.report.intensity_figure` as a markdown image, or a line saying why there
    is none (statistics written without brain histograms)."""
    from pipeline.report import figure_png, intensity_figure

    if not _has_histograms(stats, manifest.normalization):
        return ("_No picture: these statistics carry no brain-intensity histograms "
                "(written by an engine without them)._\n")
    return png_markdown(figure_png(intensity_figure(stats, manifest)),
                        "brain intensities before and after the chosen transform")


def png_markdown(png: bytes | str | Path, alt: str) -> str:
    """A markdown image of a PNG (bytes or a file) as a ``data:image/png;base64`` URI (the
    Prefect UI shows it inline, offline; see the module notes).

    Raises
    ------
    FileNotFoundError
        A file that does not exist.
    ValueError
        `png` is not a PNG, or is larger than `MAX_IMAGE_BYTES`.
    """
    if not isinstance(png, bytes):
        png = Path(png).read_bytes()
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"picture {alt!r} is not a PNG (starts with {png[:8]!r})")
    if len(png) > MAX_IMAGE_BYTES:
        raise ValueError(f"picture {alt!r} has {len(png)} bytes, more than the "
                         f"{MAX_IMAGE_BYTES} an artifact embeds; draw it smaller")
    alt = re.sub(r"[\[\]\n]", " ", alt)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})\n"


def _gk(skew: float, kurt: float) -> str:
    return f"{fmt(skew)} / {fmt(kurt)}"


def transforms_markdown(manifest: Manifest, stats: DatasetStats | None = None, *,
                        picture: str = "") -> str:
    """The transform in use for each channel: one row per channel, no candidate tables.

    Columns: the transform, g1 / g2 (skewness, excess kurtosis) of the raw brain
    intensities, after the transform, and (with `stats`, from its histograms,
    `stats.seen.seen_moments`) after the transform and the plan's percentile clip, which
    is what the network sees; then the clip. `picture` (markdown, `png_markdown`) is
    placed under the table. The candidates' evidence stays in the manifest
    (``transforms.*.evidence``).
    """
    rows = []
    for key, sel in manifest.transforms.items():
        ch = key.split("/")[1] if key.startswith("intensity/") else key
        row = next((e for e in sel.evidence if e.candidate == sel.chosen), None)
        before = _gk(row.skewness_before, row.kurtosis_before) if row else "–"
        after = _gk(row.skewness_after, row.kurtosis_after) if row else "–"
        norm = manifest.normalization.get(ch)
        seen, clip = "–", "–"
        if norm is not None:
            clip = f"p{norm.percentiles[0]:g}–p{norm.percentiles[1]:g}"
            dist = stats.intensity.get(ch, {}).get("brain") if stats is not None else None
            if dist is not None and dist.histogram is not None:
                m = seen_moments(dist.histogram, make_transform(norm.transform.name,
                                                                norm.transform.params),
                                 norm.percentiles)
                seen = _gk(m.skewness, m.kurtosis)
        rows.append((ch, sel.expression if sel.chosen != "identity" else "identity",
                     before, after, seen, clip))
    out = [f"# Transforms in use for `{manifest.dataset.name}`\n",
           "g1 / g2: skewness / excess kurtosis (scipy defaults) of the brain intensities; "
           "chosen by skew² + kurt²/4, ties keep identity.\n",
           markdown_table(("channel", "transform", "raw g1 / g2", "transformed",
                           "after clip", "clip"), rows)]
    if picture:
        out.append("\n" + picture)
    return "\n".join(out)


def _short(text: str, width: int = VERDICT_MAX_CELL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.3g} %"


def _param_text(params: Mapping[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        if isinstance(v, list):
            v = "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def verdict_row(d: Decision) -> tuple[str, str, str, str]:
    """``(rule, measured, threshold, decision)`` of one decision, each cell at most
    `VERDICT_MAX_CELL` characters (longer text is cut with an ellipsis)."""
    t = d.thresholds
    decision = d.outcome
    if d.rule == "R1":
        measured, threshold = f"median fraction {_pct(d.measured)}", f"< {_pct(t['mild'])}"
    elif d.rule == "R2":
        low = d.params.get("lower_bound")
        measured = f"g1 {fmt(d.measured)}" + (f", bound {low:.3g}" if isinstance(
            low, (int, float)) else "")
        threshold = f"bound > {t['skewness']:g} (n ≥ {t['min_n']:g})"
        if "gamma" in d.params:
            decision += f" γ {d.params['gamma']:.3g}"
    elif d.rule == "R3":
        measured, threshold = f"max g2 {fmt(d.measured)}", f"> {t['kurtosis']:g}"
        if d.params:
            decision += " " + _param_text(d.params)
    elif d.rule == "R5":
        measured, threshold = f"median CV {fmt(d.measured)}", f"> {t['cv']:.3g}"
    elif d.rule == "R4":
        measured, threshold = f"{fmt(d.measured)} terms", "≥ 3 terms: cov"
    else:
        measured = fmt(d.measured)
        threshold = ", ".join(f"{k} {v:.3g}" for k, v in t.items()) or "–"
        if d.params:
            decision += " " + _param_text(d.params)
    decision = ("✔ " if d.fired else "") + decision
    return tuple(_short(c) for c in (f"{d.rule} {d.title}", measured, threshold,
                                     decision))  # type: ignore[return-value]


def loss_text(manifest: Manifest) -> str:
    """The loss as ``1·dice + 1·bce, weighting static``."""
    terms = " + ".join(f"{t.weight:g}·{t.name}" for t in manifest.loss.terms)
    return f"{terms}, weighting {manifest.loss.weighting.method}"


def verdict_markdown(manifest: Manifest, *, store: str | None = None,
                     links: Mapping[str, str] | None = None, picture: str = "",
                     written: bool | None = None) -> str:
    """One screen: the chosen loss, one short row per rule, links to the evidence.

    Parameters
    ----------
    manifest : Manifest
    store : str, optional
        The store, shown with its `store_id`.
    links : mapping of str to str, optional
        Link text → URL of the full evidence (the run's ``loss-config``, ``transforms``,
        ``statistics`` artifacts), in order.
    picture : str
        A small markdown image (`png_markdown`) under the table.
    written : bool, optional
        Whether this run wrote the manifest (None: not said).

    Notes
    -----
    Each table line is at most `VERDICT_MAX_LINE` characters and each cell at most
    `VERDICT_MAX_CELL`; ✔ marks a rule whose condition held.
    """
    ds = manifest.dataset
    where = f" · store `{store_id(store)}`" if store is not None else ""
    state = "" if written is None else (" · manifest written" if written
                                        else " · manifest kept (no decision changed)")
    out = [f"# Verdict for `{ds.name}`\n",
           f"**Loss: {loss_text(manifest)}**\n",
           f"{ds.n_cases} cases{where}{state}\n",
           markdown_table(("rule", "measured", "threshold", "decision"),
                          [verdict_row(d) for d in manifest.loss.decisions])]
    if links:
        out.append("Full evidence: " + " · ".join(f"[{text}]({url})"
                                                  for text, url in links.items()) + "\n")
    if picture:
        out.append(picture)
    return "\n".join(out)


def loss_markdown(manifest: Manifest) -> str:
    """The full evidence of the loss: terms with their reasons, the weighting, and per rule
    what it measured, its thresholds, its outcome, its sentence and its references.

    Written as sections and lists, not wide tables, so nothing scrolls sideways.
    """
    loss = manifest.loss
    out = [f"# Loss configuration for `{manifest.dataset.name}`\n",
           f"**{loss_text(manifest)}**\n", "## Terms\n"]
    for t in loss.terms:
        params = ", ".join(f"{k}={v}" for k, v in t.params.items()) or "no parameters"
        out.append(f"- **{t.name}** × {fmt(t.weight)} ({params}): {t.reason}")
    wparams = ", ".join(f"{k}={v}" for k, v in loss.weighting.params.items())
    out.append(f"\nWeighting: **{loss.weighting.method}** ({wparams or 'no parameters'}): "
               f"{loss.weighting.reason}\n")
    if loss.adaptation is not None:
        a = loss.adaptation
        out.append(f"Adaptation: {a.method} of term {a.term} ({', '.join(a.params)}), "
                   f"factors {a.factors}, every {a.every} steps: {a.reason}\n")
    out.append("## Decisions\n")
    for d in loss.decisions:
        value = "undefined" if math.isnan(d.measured) else f"{d.measured:.4g}"
        thresholds = ", ".join(f"{k} = {v:.4g}" for k, v in d.thresholds.items()) or "none"
        out += [f"### {d.rule} {d.title}\n",
                f"- measured: {d.measure} = {value}",
                f"- thresholds: {thresholds}",
                f"- outcome: **{d.outcome}**" + (" (condition held)" if d.fired else "")
                + (f"; {_param_text(d.params)}" if d.params else ""),
                f"- {d.text}",
                f"- references: {d.reference}\n"]
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
@dataclass(frozen=True)
class Published:
    """A created artifact: its key and its id (the UI shows it at
    ``/artifacts/artifact/<id>``, its key's history at ``/artifacts/key/<key>``)."""

    key: str
    id: str

    @property
    def url(self) -> str:
        """The artifact's page in the UI (`artifact_url`)."""
        return artifact_url(self.id)


def artifact_url(artifact_id: str) -> str:
    """An artifact's page in the UI, as a path from the server's root
    (``/artifacts/artifact/<id>``; a markdown link to it opens a new tab of the UI)."""
    return f"{_ui_base()}/artifacts/artifact/{artifact_id}"


def _ui_base() -> str:
    """The UI's base path ("" when it is served at the root, as by ``prefect server``)."""
    try:
        from prefect.settings import get_current_settings

        base = get_current_settings().server.ui.serve_base or ""
    except (ImportError, AttributeError):
        base = ""
    return base.rstrip("/")


def publish_markdown(kind: str, dataset: str, markdown: str, description: str, *,
                     store: str | None = None) -> Published:
    """Create a markdown artifact keyed `artifact_key` ``(kind, dataset, store)``."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(kind, dataset, store)
    uid = create_markdown_artifact(markdown=markdown, key=key, description=description)
    return Published(key=key, id=str(uid))


def publish_table(kind: str, dataset: str, rows: list[dict[str, Any]], description: str, *,
                  store: str | None = None) -> Published:
    """Create a table artifact keyed `artifact_key` ``(kind, dataset, store)``."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(kind, dataset, store)
    uid = create_table_artifact(table=rows, key=key, description=description)
    return Published(key=key, id=str(uid))
