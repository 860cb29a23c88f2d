"""The paired table of a benchmark run, from synthetic per-case rows (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from pipeline.train.benchmark import (
    PAIRED_MARGINS,
    PAIRED_METRICS,
    BenchmarkResult,
    PairedRow,
    paired_caveat,
    paired_markdown,
    paired_table,
    write_paired,
)
from pipeline.train.cli import print_paired
from stats.paired import MIN_PAIRS, paired_comparison, verdict

LOSSES = ("manifest", "bce", "dice")


def per_case_rows(n_cases: int, *, shift: float = 0.0, seed: int = 0,
                  folds: int = 2) -> list[dict]:
    """Rows like metrics_per_case.csv: every case validated once per loss, in its fold.

    ``manifest`` gets ``shift`` more Dice (and ``10 * shift`` mm less HD95) than ``bce``;
    ``dice`` is ``bce`` plus noise. Case 3's HD95 is undefined for every loss.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.85, n_cases)
    base_hd = rng.uniform(3.0, 9.0, n_cases)
    rows = []
    for loss in LOSSES:
        d = shift if loss == "manifest" else 0.0
        noise = rng.normal(0, 0.01, n_cases)
        for i in range(n_cases):
            rows.append({
                "loss": loss, "fold": i % folds, "case": f"case-{i:03d}",
                "dice": base[i] + d + noise[i], "iou": 0.5,
                "precision": base[i] + d / 2 + noise[i], "recall": base[i] + noise[i],
                "hd95": math.nan if i == 3 else base_hd[i] - 10 * d + 20 * noise[i],
            })
    return rows


def aligned(rows: list[dict], loss: str, metric: str) -> np.ndarray:
    """One loss's metric in sorted case order (the test's own pairing)."""
    by_case = {r["case"]: r[metric] for r in rows if r["loss"] == loss}
    return np.array([by_case[c] for c in sorted(by_case)])


class TestPairedTable:
    def test_rows_against_paired_comparison(self) -> None:
        rows = per_case_rows(20, shift=0.05)
        table = paired_table(rows, "manifest", n_resamples=500, seed=3)
        assert [(r.other, r.metric) for r in table] == [
            (o, m) for o in ("bce", "dice") for m in PAIRED_METRICS]
        for r in table:
            # oracle: stats.paired on the arrays paired by hand
            expected = paired_comparison(aligned(rows, "manifest", r.metric),
                                         aligned(rows, r.other, r.metric),
                                         n_resamples=500, seed=3)
            assert r.comparison == expected
            assert r.loss == "manifest"
            assert r.higher_is_better == (r.metric != "hd95")
            assert r.margin == PAIRED_MARGINS[r.metric]
            assert r.verdict == verdict(expected, margin=r.margin,
                                        higher_is_better=r.higher_is_better)
            assert r.n_unmatched == 0
        dice_bce = table[0]
        assert (dice_bce.metric, dice_bce.comparison.n) == ("dice", 20)
        assert dice_bce.verdict == "better"
        assert dice_bce.separated
        hd_bce = table[1]
        assert (hd_bce.comparison.n, hd_bce.comparison.n_dropped) == (19, 1)
        assert hd_bce.comparison.mean_diff < 0  # manifest's HD95 is lower...
        assert hd_bce.verdict == "better"       # ...which is better for a distance

    def test_pairs_by_case_id_not_row_order(self) -> None:
        rows = per_case_rows(12, shift=0.02)
        shuffled = rows.copy()
        random.Random(4).shuffle(shuffled)
        # the folds of bce listed the other way round must not matter either
        refolded = [dict(r, fold=1 - r["fold"]) if r["loss"] == "bce" else r for r in shuffled]
        # (``others`` given: by default they follow the rows' order of first appearance)
        assert (paired_table(refolded, "manifest", others=["bce", "dice"], n_resamples=200)
                == paired_table(rows, "manifest", n_resamples=200))

    def test_others_and_metrics(self) -> None:
        rows = per_case_rows(10)
        table = paired_table(rows, "bce", ["dice", "iou"], others=["manifest"],
                             n_resamples=100)
        assert [(r.loss, r.other, r.metric) for r in table] == [
            ("bce", "manifest", "dice"), ("bce", "manifest", "iou")]

    def test_unmatched_cases(self) -> None:
        rows = [r for r in per_case_rows(10)
                if not (r["loss"] == "bce" and r["case"] in ("case-000", "case-001"))]
        table = paired_table(rows, "manifest", ["dice"], n_resamples=100)
        assert [(r.other, r.comparison.n, r.n_unmatched) for r in table] == [
            ("bce", 8, 2), ("dice", 10, 0)]

    def test_loss_without_rows(self) -> None:
        # a loss whose folds all failed: comparisons with n = 0, all cases unmatched
        table = paired_table(per_case_rows(10), "manifest", ["dice"], others=["focal"],
                             n_resamples=100)
        assert (table[0].comparison.n, table[0].n_unmatched) == (0, 10)
        assert table[0].verdict == "cannot separate at n=0"

    def test_errors(self) -> None:
        rows = per_case_rows(6)
        with pytest.raises(ValueError, match=r"reference loss 'focal' has no per-case row; "
                                             r"losses with rows: \['manifest', 'bce', 'dice'\]"):
            paired_table(rows, "focal")
        with pytest.raises(ValueError, match=r"repeat case 'case-000' for loss 'bce' "
                                             r"\(folds 0 and 1\)"):
            paired_table([*rows, dict(rows[6], fold=1)], "manifest")
        with pytest.raises(ValueError, match=r"loss 'manifest', case 'case-000' has no "
                                             r"metric 'hd'"):
            paired_table(rows, "manifest", ["dice", "hd"])


class TestCaveat:
    def test_demo_size_is_not_evidence(self) -> None:
        table = paired_table(per_case_rows(8), "manifest", n_resamples=500)
        assert paired_caveat(table) == ("n=8 cases: too few to separate these losses; the "
                                        "differences above are not evidence.")

    def test_below_minimum(self) -> None:
        # even a large shift is not separated below MIN_PAIRS cases
        table = paired_table(per_case_rows(MIN_PAIRS - 1, shift=0.2), "manifest", ["dice"],
                             n_resamples=200)
        assert all(r.comparison.ci_low > 0 for r in table if r.other == "bce")
        assert not any(r.separated for r in table)
        assert paired_caveat(table).startswith(f"n={MIN_PAIRS - 1} cases: too few")

    def test_some_separated(self) -> None:
        table = paired_table(per_case_rows(40, shift=0.05), "manifest", ["dice", "iou"],
                             n_resamples=500)
        # Dice differs by 0.05 on every case; IoU is 0.5 for every loss (all zero)
        assert [r.separated for r in table] == [True, False, True, False]
        assert paired_caveat(table) == (
            "n=40 cases: 2 of the 4 differences above cannot be told from 0 (interval "
            "contains 0, Wilcoxon p >= 0.05, or fewer than 6 pairs); those are not evidence.")

    def test_all_separated(self) -> None:
        table = paired_table(per_case_rows(40, shift=0.05), "manifest", ["dice"],
                             n_resamples=500)
        assert paired_caveat(table) is None
        assert paired_caveat([]) is None

    def test_interval_without_wilcoxon_is_flagged(self) -> None:
        # n = 8, interval above 0, but the exact Wilcoxon p = 0.078 (numbers seen at n = 8)
        cmp = dataclasses.replace(paired_comparison(np.arange(8.0), np.arange(8.0)),
                                  mean_diff=0.024, ci_low=0.0065, ci_high=0.041,
                                  p_value=0.078)
        row = PairedRow("manifest", "bce", "dice", True, 0.01, cmp,
                        verdict(cmp, margin=0.01))
        assert row.verdict == "better"
        assert not row.separated
        assert row.verdict_text() == "better? (interval only)"
        assert paired_caveat([row]).startswith("n=8 cases: too few")


class TestOutputs:
    def test_write_paired(self, tmp_path: Path) -> None:
        table = paired_table(per_case_rows(8), "manifest", n_resamples=200)
        write_paired(tmp_path, table)
        md = (tmp_path / "paired.md").read_text()
        assert md.startswith("| A − B | Metric | n | Mean A − B [95% CI] |")
        assert "| manifest − bce | HD95 (mm) | 7 (1 undefined) |" in md
        assert "**n=8 cases: too few to separate these losses" in md
        data = json.loads((tmp_path / "paired.json").read_text())  # NaN allowed, as elsewhere
        assert data["reference"] == "manifest"
        assert len(data["rows"]) == 2 * len(PAIRED_METRICS)
        assert data["rows"][0]["comparison"]["n"] == 8
        assert data["caveat"].startswith("n=8 cases")
        assert (tmp_path / "paired_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_write_nothing_without_rows(self, tmp_path: Path) -> None:
        write_paired(tmp_path, [])
        assert list(tmp_path.iterdir()) == []

    def test_benchmark_result_default(self, tmp_path: Path) -> None:
        assert BenchmarkResult(tmp_path, [], {}, []).paired == ()

    def test_cli_prints_table_and_caveat(self) -> None:
        out = Console(record=True, width=200)
        print_paired(paired_table(per_case_rows(8), "manifest", n_resamples=200), out=out)
        text = out.export_text()
        assert "manifest − bce" in text
        assert "manifest − dice" in text
        assert "HD95 (mm)" in text
        assert "n=8 cases: too few to separate these losses; the differences above are not " \
               "evidence." in text

    def test_cli_prints_nothing_without_rows(self) -> None:
        out = Console(record=True, width=200)
        print_paired([], out=out)
        assert out.export_text() == ""


def test_markdown_empty() -> None:
    assert paired_markdown([]) == ""
