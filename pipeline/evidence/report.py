"""The evidence study's report: markdown tables, acceptance checks and forest plots.

`write_report` turns a `pipeline.evidence.study.StudyResult` into one markdown file and
its plots (in a folder named after the file, beside it), so that the report can be
committed and read on its own. Numbers are written as measured; the acceptance checks
of the issue are computed from them and stated with PASS / FAIL, never edited by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fsio import write_text_atomic
from pipeline.report import ForestRow, forest_plot
from stats.paired import PairedComparison, verdict

__all__ = ["write_report"]

_LABELS = {"dice": "Dice", "hd95": "HD95", "precision": "Precision", "recall": "Recall"}


def _pp(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{100 * v:+.1f}"


def _mm(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.1f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


def _diff_cell(c: PairedComparison, metric: str) -> str:
    f = _mm if metric == "hd95" else _pp
    return f"{f(c.mean_diff)} [{f(c.ci_low)}, {f(c.ci_high)}] p={_p(c.p_value)}"


def _mean_std(values: Sequence[float], metric: str) -> str:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return "–"
    k = 1.0 if metric == "hd95" else 100.0
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{k * a.mean():.1f} ± {k * sd:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def write_report(result: Any, path: Path, env: Mapping[str, str]) -> Path:
    """Write the study's markdown report and plots; return the report's path."""
    from pipeline.evidence.families import FAMILIES
    from pipeline.evidence.study import (
        BASELINES,
        DICE_MARGIN,
        METRICS,
        best_baseline,
        case_means,
        compare,
    )

    path = Path(path)
    plots = path.parent / path.stem
    plots.mkdir(parents=True, exist_ok=True)
    scale = result.scale
    tr = scale.train
    rows = result.per_case
    lines = [
        "# Evidence: does the manifest's loss earn its decisions?",
        "",
        "Written by `xrai evidence` (`make evidence`); every number below is computed by "
        "that command from its own runs. Do not edit by hand: re-run it.",
        "",
        f"- scale **{scale.name}** ({scale.description}): {scale.cases} phantom cases per "
        f"arm, field of view {scale.shape[0]}×{scale.shape[1]}×{scale.shape[2]} voxels at "
        f"1 mm, {scale.folds}-fold cross-validation by case, seeds "
        f"{', '.join(map(str, scale.seeds))} (each seed: its own split, initialisation and "
        f"sampling; per-case metrics are averaged over seeds before pairing)",
        f"- training: {tr.sampling.dim.upper()}, patch {tr.sampling.patch_size}, "
        f"tumour-centred sampling {tr.sampling.fg_fraction:g}, {tr.epochs} epochs × "
        f"{tr.batches_per_epoch} batches of {tr.batch_size}, AdamW lr {tr.lr:g} with PolyLR, "
        f"U-Net {tr.features} features × {tr.levels} levels; whole-tumour target",
        f"- device {result.device} (GPU: {env.get('gpu', 'none')}), {env.get('cpu', '')}; "
        f"python {env.get('python')}, torch {env.get('torch')}, code {env.get('code_version')}",
        f"- {result.trained + result.reused} folds; their training time (validation "
        f"excluded, summed over folds) {result.train_seconds / 60:.1f} min; this invocation "
        f"trained {result.trained} and reused {result.reused} from an earlier one of the "
        f"same configuration (same loss, plan and protocol), wall time "
        f"{result.seconds / 60:.1f} min, finished {env.get('finished')}",
        "",
        "Differences are **manifest − comparator**, per case, in percentage points for "
        "Dice, precision and recall and in mm for HD95 (lower HD95 is better, so a "
        "negative HD95 difference favours the manifest); 95 % bootstrap interval of the "
        "mean difference (cases resampled) and the two-sided Wilcoxon signed-rank p-value "
        "(scipy.stats.wilcoxon). HD95 is undefined for a case whose prediction is empty; "
        "such pairs are left out of the HD95 comparison.",
        "",
    ]
    # ---------------------------------------------------------------- acceptance checks
    checks: list[tuple[str, bool | None, str]] = []
    trained = []
    for fam_name, fam in FAMILIES.items():
        for arm in fam.arms:
            if any(r["family"] == fam_name and r["arm"] == arm.name for r in rows):
                trained.append((fam_name, arm.name))
    for fam_name, arm in trained:
        best = best_baseline(rows, fam_name, arm)
        if best is None:
            continue
        c = compare(rows, fam_name, arm, "manifest", best, "dice")
        ok = math.isfinite(c.ci_low) and -c.ci_low <= DICE_MARGIN
        checks.append((f"{fam_name}/{arm}: manifest not worse than the best baseline "
                       f"({best}) by more than {100 * DICE_MARGIN:g} Dice point", ok,
                       f"Δ Dice {_diff_cell(c, 'dice')}; deficit upper bound "
                       f"{_pp(-c.ci_low)} points"))
    tiny = [(f, a) for f, a in trained if f == "imbalance" and a == "tiny"]
    for f, a in tiny:
        cd = compare(rows, f, a, "manifest", "bce", "dice")
        ch = compare(rows, f, a, "manifest", "bce", "hd95")
        ok = ((cd.mean_diff > 0 and cd.p_value < 0.05)
              or (ch.mean_diff < 0 and ch.p_value < 0.05))
        checks.append(("imbalance/tiny: manifest beats bce on Dice or HD95 with p < 0.05", ok,
                       f"Δ Dice {_diff_cell(cd, 'dice')}; Δ HD95 {_diff_cell(ch, 'hd95')}"))
    for fam_name, fam in FAMILIES.items():
        if not fam.invariant:
            continue
        sigs = {k: v for k, v in result.signatures.items() if k.startswith(fam_name + "/")}
        if not sigs:
            continue
        first = next(iter(sigs.values()))
        same = all(v == first for v in sigs.values())
        checks.append((f"{fam_name}: identical transforms, clips and loss across "
                       f"{', '.join(k.split('/')[1] for k in sigs)}", same,
                       "manifests compared field by field"))
    decided = [d for d in result.decisions if d["match"] is not None]
    n_ok = sum(bool(d["match"]) for d in decided)
    checks.append((f"rules decide what each arm was built to trigger ({n_ok} of "
                   f"{len(decided)})", n_ok == len(decided) if decided else None,
                   ", ".join(f"{d['family']}/{d['arm']} {d['rule']}: {d['outcome']} "
                             f"(expected {d['expected']})"
                             for d in decided if not d["match"]) or "all match"))
    lines += ["## Acceptance checks (issue 10)", ""]
    lines += _table(["check", "result", "numbers"],
                    [(name, "–" if ok is None else ("PASS" if ok else "**FAIL**"), detail)
                     for name, ok, detail in checks])
    if result.failures:
        lines += ["", "Runs that diverged (left out):", ""]
        lines += [f"- {f}" for f in result.failures]
    # ---------------------------------------------------------------- decisions
    lines += ["", "## Decisions of the rules, per arm", "",
              "What each rule measured and decided; *expected* is what the arm was built "
              "to trigger (empty where the family does not aim at that rule).", ""]
    lines += _table(["family / arm", "rule", "measured", "decided", "expected", ""],
                    [(f"{d['family']}/{d['arm']}", f"{d['rule']} {d['title']}",
                      "–" if not isinstance(d["measured"], float) or
                      not math.isfinite(d["measured"]) else f"{d['measured']:.4g}",
                      d["outcome"], d["expected"] or "", "" if d["match"] is None else
                      ("✓" if d["match"] else "✗"))
                     for d in result.decisions])
    # ---------------------------------------------------------------- per family
    for fam_name, fam in FAMILIES.items():
        arms = [a for f, a in trained if f == fam_name]
        if not arms:
            continue
        lines += ["", f"## Family `{fam_name}`: {fam.description}", ""]
        forest: dict[str, list[ForestRow]] = {m: [] for m in ("dice", "hd95")}
        for arm in arms:
            key = f"{fam_name}/{arm}"
            variants = [v["name"] for v in result.variants.get(key, [])]
            spec = result.signatures[key]["loss"]
            terms = " + ".join(f"{t['name']}{_params(t['params'])}" for t in spec["terms"])
            lines += [f"### {key}", "",
                      f"Manifest: {terms}; weighting {spec['weighting']['method']}.", ""]
            if key in result.same_data:
                lines += [f"The same phantom as {result.same_data[key]} (same options and "
                          f"seed): its training results are reused, not trained again.", ""]
            body = []
            for v in variants:
                cells = [v]
                for metric in METRICS:
                    cells.append(_mean_std(list(case_means(rows, fam_name, arm, v,
                                                           metric).values()), metric))
                body.append(cells)
            lines += _table(["variant", "Dice %", "HD95 mm", "Precision %", "Recall %"],
                            body)
            lines += ["", "Paired differences, manifest − comparator:", ""]
            prow = []
            for v in variants:
                if v == "manifest":
                    continue
                cmp = {m: compare(rows, fam_name, arm, "manifest", v, m) for m in METRICS}
                for m in forest:
                    forest[m].append(ForestRow(f"− {v}", cmp[m], group=arm))
                prow.append([v] + [_diff_cell(cmp[m], m) for m in METRICS]
                            + [verdict(cmp["dice"], margin=DICE_MARGIN)])
            lines += _table(["comparator", "Δ Dice (pp)", "Δ HD95 (mm)", "Δ Precision (pp)",
                             "Δ Recall (pp)", "Dice verdict"], prow)
            for ablation, baseline in result.aliases.get(key, {}).items():
                lines += ["", f"*{ablation}* is the loss of *{baseline}* (same value and "
                          f"gradient): its row is {baseline}'s."]
            lines.append("")
        for metric, frows in forest.items():
            if not frows:
                continue
            png = plots / f"{fam_name}_{metric}.png"
            label = ("Dice difference (percentage points), manifest − comparator"
                     if metric == "dice" else "HD95 difference (mm), manifest − comparator")
            fav = (("← favours comparator", "favours manifest →") if metric == "dice"
                   else ("← favours manifest", "favours comparator →"))
            forest_plot(frows, png, title=f"{fam_name}: {_LABELS[metric]}", xlabel=label,
                        scale=100.0 if metric == "dice" else 1.0, favours=fav)
            lines += [f"![{fam_name} {_LABELS[metric]} forest plot]({plots.name}/{png.name})",
                      ""]
    lines += ["", "## Baselines", "", "Baselines: " + ", ".join(BASELINES) +
              " (the trainer's registry defaults). Ablations: the manifest with each term "
              "removed in turn, with the other weighting (static ↔ adaptive), and with "
              "identity transforms and the default clip instead of its plan (only when the "
              "plan differs)."]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _params(p: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in p.items() if k != "include_background"}
    return "" if not shown else "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
