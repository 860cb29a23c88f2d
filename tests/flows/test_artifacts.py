"""Markdown and table builders of the artifacts (flows.artifacts); no server."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from flows.artifacts import (
    KINDS,
    MAX_IMAGE_BYTES,
    VERDICT_MAX_CELL,
    VERDICT_MAX_LINE,
    artifact_key,
    dataset_summary_markdown,
    fmt,
    intensity_picture,
    label_picture,
    loss_markdown,
    loss_text,
    markdown_table,
    png_markdown,
    quarantine_rows,
    reprocess_markdown,
    rules_picture,
    statistics_markdown,
    store_id,
    training_markdown,
    transforms_markdown,
    verdict_markdown,
    verdict_row,
)
from flows.concurrency import write_limit_name

from .conftest import CASES, PlainRun


class TestKeys:
    def test_key_is_folded_to_prefects_alphabet(self) -> None:
        assert artifact_key("statistics", "UPENN_GBM.v2") == "statistics-upenn-gbm-v2"

    def test_every_kind_gives_a_valid_key(self) -> None:
        from prefect.types.names import LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX

        for kind in KINDS:
            for store in (None, "S3://Bucket/X.zarr/", "/tmp/a b/store.zarr"):
                key = artifact_key(kind, "Ph", store)
                assert re.fullmatch(LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX, key)

    def test_key_ends_with_the_store_id(self) -> None:
        # the id is the write limit's: sha256 of the store identity, 12 hex digits
        assert artifact_key("statistics", "UPENN_GBM.v2", "s3://bucket/xrai.zarr") == (
            "statistics-upenn-gbm-v2-f0e9b022a039")
        assert write_limit_name("s3://bucket/xrai.zarr", "x").split(":")[1] == "f0e9b022a039"

    def test_issue_13_two_stores_give_two_histories(self, tmp_path: Path) -> None:
        a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
        assert artifact_key("verdict", "phantom", str(a)) != artifact_key(
            "verdict", "phantom", str(b))
        # spellings of one store share the key
        (tmp_path / "link").symlink_to(tmp_path)
        assert store_id(str(a)) == store_id(f"file://{tmp_path}/link/a.zarr")
        assert store_id(str(a)) == store_id(str(tmp_path / "." / "a.zarr"))

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


def test_transforms_are_one_row_per_channel_in_use(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    md = transforms_markdown(m, plain_run.stats)
    for key, sel in m.transforms.items():
        ch = key.split("/")[1]
        row = next(e for e in sel.evidence if e.candidate == sel.chosen)
        expr = sel.expression if sel.chosen != "identity" else "identity"
        assert (f"| {ch} | {expr} | {fmt(row.skewness_before)} / {fmt(row.kurtosis_before)} | "
                f"{fmt(row.skewness_after)} / {fmt(row.kurtosis_after)} |") in md
        assert md.count(f"| {ch} |") == 1
    assert "(chosen)" not in md  # no candidate tables (issue 13: 343 lines before)
    assert len(md.splitlines()) <= 6 + len(m.transforms)


def test_loss_config_gives_every_term_with_its_reason(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    md = loss_markdown(m)
    for t in m.loss.terms:
        assert f"- **{t.name}** × {fmt(t.weight)} (" in md
        assert t.reason in md
    assert f"Weighting: **{m.loss.weighting.method}**" in md
    for d in m.loss.decisions:
        assert f"### {d.rule} {d.title}\n" in md
        assert d.text in md
        assert d.reference in md
    assert "|" not in md  # lists, not tables: nothing scrolls sideways


class TestVerdict:
    def test_loss_then_one_narrow_row_per_rule(self, plain_run: PlainRun) -> None:
        m = plain_run.manifest
        md = verdict_markdown(m, store=plain_run.store_url,
                              links={"rules and loss": "/artifacts/artifact/1"})
        assert f"**Loss: {loss_text(m)}**" in md
        assert f"store `{store_id(plain_run.store_url)}`" in md
        table = [line for line in md.splitlines() if line.startswith("|")]
        assert table[0] == "| rule | measured | threshold | decision |"
        assert len(table) == 2 + len(m.loss.decisions)
        assert max(len(line) for line in table) <= VERDICT_MAX_LINE
        for line, d in zip(table[2:], m.loss.decisions, strict=True):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(cells) == 4
            assert cells[0] == f"{d.rule} {d.title}"
            assert max(len(c) for c in cells) <= VERDICT_MAX_CELL
            assert d.outcome in cells[3]
        assert "Full evidence: [rules and loss](/artifacts/artifact/1)" in md

    def test_long_cells_are_cut(self, plain_run: PlainRun) -> None:
        d = plain_run.manifest.loss.decisions[0]
        long = d.model_copy(update={"rule": "R9", "title": "x" * 80,
                                    "params": {f"p{i}": 1.0 for i in range(20)}})
        cells = verdict_row(long)
        assert all(len(c) <= VERDICT_MAX_CELL for c in cells)
        assert cells[0].endswith("…")

    def test_picture_is_a_small_png(self, plain_run: PlainRun) -> None:
        md = verdict_markdown(plain_run.manifest, picture=rules_picture(plain_run.stats))
        png = decode_images(md)
        assert len(png) == 1
        assert len(png[0]) < 25_000


def decode_images(md: str) -> list[bytes]:
    """The PNG bytes of every data-URI markdown image in `md` (checked to be PNGs)."""
    out = []
    for b64 in re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md):
        png = base64.b64decode(b64, validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(png)
    return out


class TestPictures:
    def test_statistics_and_transforms_embed_their_pictures(self, plain_run: PlainRun) -> None:
        stats, m = plain_run.stats, plain_run.manifest
        md = statistics_markdown(stats, picture=label_picture(stats))
        assert [len(p) < 40_000 for p in decode_images(md)] == [True]
        md = transforms_markdown(m, stats, picture=intensity_picture(stats, m))
        assert [len(p) < 60_000 for p in decode_images(md)] == [True]

    def test_png_markdown_rejects_what_is_not_a_small_png(self) -> None:
        with pytest.raises(ValueError, match=r"picture 'x' is not a PNG"):
            png_markdown(b"<svg/>", "x")
        big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)
        with pytest.raises(ValueError, match=rf"picture 'x' has {MAX_IMAGE_BYTES + 8} bytes"):
            png_markdown(big, "x")

    def test_no_histograms_no_picture(self, plain_run: PlainRun) -> None:
        stats = plain_run.stats
        bare = {ch: {r: d.model_copy(update={"histogram": None}) for r, d in regions.items()}
                for ch, regions in stats.intensity.items()}
        md = intensity_picture(stats.model_copy(update={"intensity": bare}), plain_run.manifest)
        assert md.startswith("_No picture: these statistics carry no brain-intensity")


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
