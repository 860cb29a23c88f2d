"""Markdown and table builders of the artifacts (flows.artifacts); no server."""

from __future__ import annotations

import pytest

from flows.artifacts import (
    KINDS,
    artifact_key,
    dataset_summary_markdown,
    fmt,
    loss_markdown,
    markdown_table,
    quarantine_rows,
    reprocess_markdown,
    statistics_markdown,
    training_markdown,
    transforms_markdown,
)

from .conftest import CASES, PlainRun


class TestKeys:
    def test_key_is_folded_to_prefects_alphabet(self) -> None:
        assert artifact_key("statistics", "UPENN_GBM.v2") == "statistics-upenn-gbm-v2"

    def test_every_kind_gives_a_valid_key(self) -> None:
        import re

        for kind in KINDS:
            assert re.fullmatch(r"[a-z0-9-]+", artifact_key(kind, "Ph"))

    def test_unknown_kind(self) -> None:
        with pytest.raises(ValueError, match=r"unknown artifact kind 'stats'"):
            artifact_key("stats", "ph")


def test_markdown_table_escapes_pipes() -> None:
    assert markdown_table(("a", "b"), [("x|y", 1)]) == "| a | b |\n|---|---|\n| x\\|y | 1 |\n"


@pytest.mark.parametrize(("value", "text"), [(float("nan"), "–"), (None, "–"), (3, "3"),
                                             (0.123456, "0.1235"), (123456.0, "1.235e+05")])
def test_fmt(value: object, text: str) -> None:
    assert fmt(value) == text


def test_dataset_summary_lists_every_case_and_the_grid(plain_run: PlainRun) -> None:
    md = dataset_summary_markdown(plain_run.store, "plain", plain_run.report.outcomes)
    assert "40×40×32 voxels at 1×1×1 mm" in md
    assert f"committed cases: {CASES}; quarantined: 1" in md
    assert f"this run: {CASES} ingested, 0 unchanged, 1 quarantined" in md
    for cid, rec in plain_run.store.committed().items():
        assert f"| {cid} | ingested |" in md
        assert rec.content_hash[:12] in md


def test_quarantine_rows_give_the_reason_and_file(plain_run: PlainRun) -> None:
    rows = quarantine_rows(plain_run.store)
    assert [r["case"] for r in rows] == ["XRAI-PHANTOM-00099-000"]
    assert rows[0]["reason"].startswith("missing label")
    assert rows[0]["path"].endswith("seg.nii.gz")


def test_statistics_table_carries_the_measured_values(plain_run: PlainRun) -> None:
    stats = plain_run.stats
    md = statistics_markdown(stats, computed=["a"], reused=["b", "c"])
    assert "1 computed, 2 reused" in md
    for ch, regions in stats.intensity.items():
        m = regions["brain"].moments
        assert f"| {ch} | brain | {m.n} | {fmt(m.mean)} | {fmt(m.std)} | {fmt(m.skewness)} |" in md
    vol = stats.labels["tumour_volume_ml"].moments
    assert f"| tumour_volume_ml | mL | {vol.n} | {fmt(vol.mean)} |" in md


def test_transforms_show_choice_and_evidence(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    md = transforms_markdown(m)
    for key, sel in m.transforms.items():
        assert f"| {key} | {sel.chosen} |" in md
        assert f"### {key}\n\n{sel.reason}" in md
        assert f"| {sel.chosen} (chosen) |" in md


def test_loss_config_gives_every_term_with_its_reason(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    md = loss_markdown(m)
    for t in m.loss.terms:
        assert f"| {t.name} | {fmt(t.weight)} |" in md
        assert t.reason in md
    assert f"Weighting: **{m.loss.weighting.method}**" in md
    for d in m.loss.decisions:
        assert f"| {d.rule} {d.title} |" in md


def test_training_and_reprocess_reports() -> None:
    md = training_markdown("| Loss |\n|---|\n| dice |\n", {"dice/fold1": "NaN loss"}, "/r")
    assert "| dice |" in md
    assert "- dice/fold1: NaN loss" in md
    assert "`/r`" in md
    md = reprocess_markdown("ph", changed=["c3"], unchanged=3, quarantined={"c9": "missing"},
                            missing_at_source=[], computed=["c3"], reused=["c0"],
                            decision_changes=["R2 (x): bce -> focal"], manifest_written=True,
                            trained=False)
    assert "new or changed cases ingested: 1 (c3)" in md
    assert "  - c9: missing" in md
    assert "decisions changed:\n  - R2 (x): bce -> focal" in md
    assert "retrained: no" in md
