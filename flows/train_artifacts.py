"""The training artifacts: per-case table, paired comparison, outliers and pictures.

Built from the run folder that `pipeline.train.benchmark.run_benchmark` writes (the
task that trained returns its path only), and published by the ``train`` flow:

================================  ======  ================================================
key (+ -<store id>)              type    content
================================  ======  ================================================
``training-cases-<dataset>``      table   one row per validation case: fold, Dice of
                                          each loss, and the first loss's paired
                                          difference A − B to each other loss
``training-paired-<dataset>``     table   `paired_rows`: A − B per metric, its bootstrap
                                          interval, Wilcoxon p, verdict, separated
                                          (percentage points, mm)
``training-comparison-<dataset>`` md      the paired table as ``paired.md`` has it, its
                                          caveat, and the Dice forest plot
``training-outliers-<dataset>``   table   `case_outliers`: cases one loss fails and
                                          another does not (the rule is in its text)
``training-curves-<dataset>``     md      training loss and validation Dice of every
                                          loss; term weights and Tversky α/β
``training-overlays-<dataset>``   md      prediction overlays with each panel's Dice
================================  ======  ================================================

Pictures are embedded as PNG data URIs (`flows.artifacts.png_markdown`), so an
artifact is complete without access to the run folder; the trainer writes them at
`PLOT_DPI`, under `flows.artifacts.MAX_IMAGE_BYTES` each. A picture larger than that is
linked by its path instead. Keys are `flows.artifacts.artifact_key`'s: kind, dataset and
the store's id, so a key's history is one dataset's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.artifacts import MAX_IMAGE_BYTES, artifact_key, png_markdown

#: The artifact kinds the train flow publishes (besides ``training-summary``).
TRAIN_KINDS: tuple[str, ...] = (
    "training-cases", "training-paired", "training-comparison", "training-outliers",
    "training-curves", "training-overlays",
)


def picture(path: Path, alt: str) -> str:
    """`png_markdown` of `path`, or a line naming it when it exceeds `MAX_IMAGE_BYTES`;
    empty when the file does not exist (the run drew no such picture)."""
    if not path.is_file():
        return ""
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return f"*{alt}: `{path}` ({size // 1000} kB, too large to embed)*"
    return png_markdown(path, alt).rstrip("\n")


def fmt(v: Any) -> str:
    """A number for a table cell: 4 significant digits, '–' for NaN or None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.4g}"


# ------------------------------------------------------------------ the run folder
def run_losses(out_dir: str | Path) -> list[str]:
    """The losses of the run in `out_dir`, in its order (from ``config.json``)."""
    config = json.loads((Path(out_dir) / "config.json").read_text())
    return list(config["losses"])


def per_case_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """``metrics_per_case.json``: one row per (loss, fold, validation case)."""
    return json.loads((Path(out_dir) / "metrics_per_case.json").read_text())


def paired_document(out_dir: str | Path) -> dict[str, Any] | None:
    """``paired.json`` (reference loss, caveat, rows), or None when the run had fewer
    than two losses with results."""
    path = Path(out_dir) / "paired.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------ builders
def case_rows(rows: Sequence[Mapping[str, Any]], losses: Sequence[str]) -> list[dict[str, Any]]:
    """One row per validation case: ``case``, ``fold``, ``dice <loss>`` for each loss and
    ``<A> − <B>`` (Dice difference, A the first loss) for each other loss B.

    A loss without a value for the case (its fold failed) gets an empty cell.
    """
    by_case: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(str(r["case"]), {})[str(r["loss"])] = r
    out = []
    ref = losses[0] if losses else None
    for case in sorted(by_case):
        mine = by_case[case]
        fold = next(iter(mine.values())).get("fold")
        row: dict[str, Any] = {"case": case, "fold": fold}
        for loss in losses:
            row[f"dice {loss}"] = fmt(mine[loss]["dice"]) if loss in mine else ""
        for other in losses[1:]:
            if ref in mine and other in mine:
                d = float(mine[ref]["dice"]) - float(mine[other]["dice"])
                row[f"{ref} − {other}"] = "" if math.isnan(d) else f"{d:+.4f}"
            else:
                row[f"{ref} − {other}"] = ""
        out.append(row)
    return out


def paired_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``paired.json``'s rows as table rows, in ``paired.md``'s units (ratios in
    percentage points, distances in mm): comparison, metric, unit, n, mean A − B and its
    interval, Wilcoxon p, the verdict as ``paired.md`` words it (``better? (interval
    only)`` when the Wilcoxon test does not agree), and whether the line is evidence
    (``separated``)."""
    from pipeline.train.metrics import DISTANCE_METRICS

    out = []
    for r in document.get("rows", []):
        c = r["comparison"]
        mm = r["metric"] in DISTANCE_METRICS
        scale = 1.0 if mm else 100.0
        verdict = r["verdict"]
        if verdict in ("better", "worse") and not r.get("separated"):
            verdict = f"{verdict}? (interval only)"
        out.append({"comparison": f"{r['loss']} − {r['other']}", "metric": r["metric"],
                    "unit": "mm" if mm else "percentage points", "n": c["n"],
                    "mean A − B": fmt(c["mean_diff"] * scale),
                    "CI low": fmt(c["ci_low"] * scale), "CI high": fmt(c["ci_high"] * scale),
                    "confidence": fmt(c["confidence"]), "Wilcoxon p": fmt(c["p_value"]),
                    "verdict for A": verdict, "separated": bool(r.get("separated"))})
    return out


def outlier_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`pipeline.train.benchmark.case_outliers` as table rows (Dice to 3 decimals)."""
    from pipeline.train.benchmark import case_outliers

    return [{"case": o["case"], "fold": o["fold"], "fails": o["failing"],
             "its Dice": f"{o['failing_dice']:.3f}", "succeeds": o["succeeding"],
             "their Dice": f"{o['succeeding_dice']:.3f}",
             "difference": f"{o['difference']:+.3f}"} for o in case_outliers(rows)]


def outlier_rule() -> str:
    """The outlier rule in words (the table artifact's description)."""
    from pipeline.train.benchmark import (
        OUTLIER_FAIL_BELOW,
        OUTLIER_RATIO,
        OUTLIER_SUCCEED_ABOVE,
    )

    return (f"cases where one loss fails and another does not: the other's Dice > "
            f"{OUTLIER_SUCCEED_ABOVE:g} and this loss's Dice < {OUTLIER_FAIL_BELOW:g} or "
            f"< {OUTLIER_RATIO:g} × the other's")


def comparison_markdown(out_dir: str | Path, document: Mapping[str, Any] | None,
                        losses: Sequence[str]) -> str:
    """The paired comparison as ``paired.md`` writes it, with the Dice forest plot."""
    out_dir = Path(out_dir)
    head = [f"# Paired comparison: {losses[0] if losses else '?'} against each loss\n"]
    if document is None:
        head.append("Fewer than two losses produced results: nothing to compare.\n")
        return "\n".join(head)
    md = out_dir / "paired.md"
    if md.is_file():
        head.append(md.read_text())
    head.append(picture(out_dir / "paired_dice.png",
                        "Dice difference per comparison with its bootstrap interval"))
    return "\n".join(h for h in head if h) + "\n"


def curves_markdown(out_dir: str | Path) -> str:
    """Training curves of every loss; term weights and Tversky α/β when the run has them."""
    out_dir = Path(out_dir)
    parts = ["# Training curves\n",
             "Training loss (each loss on its own scale) and validation Dice per epoch; "
             "one colour per loss, one line style per fold.\n",
             picture(out_dir / "curves.png", "training loss and validation Dice per epoch")]
    adaptive = picture(out_dir / "adaptive.png",
                       "manifest term weights and Tversky alpha, beta per epoch")
    if adaptive:
        parts += ["\n## Adaptive weights\n", "Effective term weights of the manifest loss "
                  "and the Tversky α (false positives) and β (false negatives), epoch "
                  "means.\n", adaptive]
    return "\n".join(parts) + "\n"


def overlays_markdown(out_dir: str | Path) -> str:
    """The overlays: truth in green, prediction in red, each panel with its case's Dice."""
    img = picture(Path(out_dir) / "overlays.png",
                  "validation overlays: truth green, prediction red, Dice per panel")
    return ("# Validation overlays\n\nAxial slice of largest tumour area per case; truth "
            "green, prediction red; the title gives the case's whole-volume Dice.\n\n"
            + (img or "No overlays in this run.") + "\n")


# ------------------------------------------------------------------ publishing
def publish_training_artifacts(out_dir: str | Path, dataset: str,
                               store: str | None = None) -> dict[str, str]:
    """Publish every training artifact of the run in `out_dir`; return ``{kind: key}``.

    Call inside a flow or task run (Prefect's artifact API).
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    losses = run_losses(out_dir)
    rows = per_case_rows(out_dir)
    document = paired_document(out_dir)
    keys = {kind: artifact_key(kind, dataset, store) for kind in TRAIN_KINDS}
    create_table_artifact(
        table=case_rows(rows, losses), key=keys["training-cases"],
        description=f"{dataset}: validation Dice per case and loss, and the paired "
                    f"differences {losses[0]} − each loss")
    create_table_artifact(
        table=paired_rows(document or {}), key=keys["training-paired"],
        description=f"{dataset}: {losses[0]} − each loss per validation case: mean, "
                    "bootstrap interval, Wilcoxon p, verdict")
    create_markdown_artifact(
        markdown=comparison_markdown(out_dir, document, losses),
        key=keys["training-comparison"],
        description=f"{dataset}: paired comparison of the losses, with its caveat")
    create_table_artifact(table=outlier_rows(rows), key=keys["training-outliers"],
                          description=f"{dataset}: {outlier_rule()}")
    create_markdown_artifact(markdown=curves_markdown(out_dir), key=keys["training-curves"],
                             description=f"{dataset}: training curves and adaptive weights")
    create_markdown_artifact(markdown=overlays_markdown(out_dir),
                             key=keys["training-overlays"],
                             description=f"{dataset}: validation overlays with Dice")
    return keys


__all__ = [
    "TRAIN_KINDS",
    "case_rows",
    "comparison_markdown",
    "curves_markdown",
    "outlier_rows",
    "outlier_rule",
    "overlays_markdown",
    "paired_rows",
    "publish_training_artifacts",
]
