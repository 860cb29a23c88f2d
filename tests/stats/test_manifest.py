"""Tests of stats.manifest: building, round trip, validation errors with the field path,
the loss spec the trainer takes, the normalization plan, and the committed JSON Schema
(issue 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stats.manifest import (
    SCHEMA_PATH,
    Manifest,
    ManifestError,
    build_manifest,
    decisions_table,
    load_manifest,
    manifest_command,
    manifest_json_schema,
    stats_fingerprint,
    validate_command,
    write_manifest,
)
from stats.summary import DatasetStats
from tests.stats.test_rules import balanced_stats, make_stats, small_tumour_stats

CREATED = "2026-01-02T03:04:05+00:00"


@pytest.fixture
def stats(rng: np.random.Generator) -> DatasetStats:
    return small_tumour_stats(rng)


@pytest.fixture
def manifest(stats: DatasetStats) -> Manifest:
    return build_manifest(stats, seed=7, created_at=CREATED)


@pytest.fixture
def written(manifest: Manifest, tmp_path: Path) -> Path:
    return write_manifest(manifest, tmp_path / "manifest.json")


def edit(path: Path, change) -> Path:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------- building
class TestBuild:
    def test_sections(self, manifest: Manifest, stats: DatasetStats) -> None:
        assert manifest.schema_version == 1
        assert manifest.dataset.name == "synthetic"
        assert manifest.dataset.stats_fingerprint == stats_fingerprint(stats)
        assert manifest.provenance.store_content_hash == stats.content_hash
        assert manifest.provenance.seed == 7
        assert manifest.provenance.created_at == CREATED
        assert "numpy" in manifest.provenance.packages

    def test_every_measured_distribution_has_a_transform(self, manifest: Manifest) -> None:
        assert set(manifest.transforms) == {
            "intensity/t1/brain", "intensity/t2/brain", "label/tumour_fraction_case",
            "label/tumour_fraction_slice", "label/tumour_volume_ml", "label/components"}
        # log-normal volumes -> a logarithm; the chosen transform is explained
        vol = manifest.transforms["label/tumour_volume_ml"]
        assert vol.chosen == "ln"
        assert vol.reason.startswith("ln chosen")
        assert len(vol.evidence) == 3

    def test_loss_and_decisions(self, manifest: Manifest) -> None:
        assert [t.name for t in manifest.loss.terms] == ["adaptive_tversky", "focal", "barron"]
        assert [d.rule for d in manifest.loss.decisions] == ["R1", "R2", "R3", "R5", "R4"]
        assert manifest.loss.weighting.method == "cov"

    def test_fingerprint_ignores_creation_time_only(self, stats: DatasetStats) -> None:
        later = stats.model_copy(update={"created_at": "2030-01-01T00:00:00+00:00"})
        other = stats.model_copy(update={"n_cases": stats.n_cases + 1})
        assert stats_fingerprint(later) == stats_fingerprint(stats)
        assert stats_fingerprint(other) != stats_fingerprint(stats)

    def test_zero_std_channel_raises_naming_it(self, rng: np.random.Generator) -> None:
        s = make_stats(fractions=[0.01] * 5, slice_fractions=[0.0, 0.1] * 5,
                       volumes=[1, 2, 3, 4, 5], intensities={"flair": np.full(100, 7.0)})
        with pytest.raises(ValueError, match=r"intensity\.flair\.brain: std of the intensities "
                                             r"after identity is 0\.0"):
            build_manifest(s)


class TestLossSpec:
    def test_exact_shape(self, manifest: Manifest) -> None:
        spec = manifest.loss_spec()
        assert set(spec) == {"name", "terms", "weighting"}
        assert spec["name"] == "manifest"
        assert spec["weighting"] == {"method": "cov", "params": {}}
        assert spec["terms"][0] == {
            "name": "adaptive_tversky", "weight": 1.0,
            "params": {"A": 0.3, "B": 0.4, "regions_per_axis": 2, "include_background": False}}
        for term in spec["terms"]:
            assert set(term) == {"name", "weight", "params"}
        json.dumps(spec)   # plain JSON types only

    def test_balanced_spec(self, rng: np.random.Generator) -> None:
        spec = build_manifest(balanced_stats(rng), created_at=CREATED).loss_spec()
        assert spec == {"name": "manifest",
                        "terms": [{"name": "bce", "weight": 1.0, "params": {}}],
                        "weighting": {"method": "static", "params": {}}}

    def test_the_trainer_builds_and_runs_it(self, manifest: Manifest) -> None:
        torch = pytest.importorskip("torch")
        losses = pytest.importorskip("pipeline.train.losses")
        loss = losses.build_loss(manifest.loss_spec())
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 1, 8, 8, 8, generator=g)
        target = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.9).float()
        value = loss(logits, target)
        assert value.ndim == 0
        assert torch.isfinite(value)
        assert loss.term_names == ("adaptive_tversky", "focal", "barron")


class TestNormalization:
    def test_clip_values_are_the_transformed_percentiles(self, manifest: Manifest,
                                                         stats: DatasetStats) -> None:
        for ch, plan in manifest.normalization.items():
            dist = stats.intensity[ch]["brain"]
            sel = manifest.transforms[f"intensity/{ch}/brain"]
            t = sel.transform()
            assert plan.transform.name == sel.chosen
            assert plan.raw_clip_low == dist.percentiles["0.5"]
            assert plan.raw_clip_high == dist.percentiles["99.5"]
            assert plan.clip_low == float(t.forward(dist.percentiles["0.5"]))
            assert plan.clip_high == float(t.forward(dist.percentiles["99.5"]))
            assert plan.mean == dist.candidates[sel.chosen].mean
            assert plan.std == dist.candidates[sel.chosen].std

    def test_apply_is_clip_transform_zscore(self, manifest: Manifest) -> None:
        plan = manifest.normalization["t1"]
        t = manifest.transforms["intensity/t1/brain"].transform()
        x = np.array([0.0, plan.raw_clip_low, 1100.0, plan.raw_clip_high, 1e6])
        expected = (np.clip(t.forward(x), plan.clip_low, plan.clip_high) - plan.mean) / plan.std
        np.testing.assert_allclose(plan.apply(x), expected, rtol=1e-12)

    def test_z_scored_sample_is_standardised(self, rng: np.random.Generator) -> None:
        x = rng.lognormal(6.0, 0.5, size=50_000)
        s = make_stats(fractions=[0.01] * 5, slice_fractions=[0.0, 0.1] * 5,
                       volumes=[1, 2, 3, 4, 5], intensities={"t1": x})
        plan = build_manifest(s, created_at=CREATED).normalization["t1"]
        assert plan.transform.name == "ln"
        z = plan.apply(x)
        # unclipped moments of the transformed data, clip at 0.5/99.5: mean ~0, std ~1
        assert abs(z.mean()) < 0.01
        assert 0.97 < z.std() <= 1.0


# ----------------------------------------------------------------------- I/O
class TestRoundTrip:
    def test_write_then_load_gives_the_same_manifest(self, manifest: Manifest,
                                                     written: Path) -> None:
        loaded = load_manifest(written)
        assert loaded.model_dump_json() == manifest.model_dump_json()   # NaN-safe equality
        assert loaded.loss_spec() == manifest.loss_spec()

    def test_nan_is_written_as_null_and_read_back(self, rng: np.random.Generator,
                                                  tmp_path: Path) -> None:
        s = make_stats(fractions=[0.01, 0.02, 0.03], slice_fractions=[0.0, 0.1, 0.2],
                       volumes=[1.0, 2.0, 3.0], intensities={"t1": rng.normal(500, 20, 500)})
        m = build_manifest(s, created_at=CREATED)
        p = write_manifest(m, tmp_path / "m.json")
        assert "NaN" not in p.read_text()
        vol = load_manifest(p).transforms["label/tumour_volume_ml"]
        assert math.isnan(vol.score_identity)
        assert vol.chosen == "identity"

    def test_atomic_write_leaves_no_temporary_and_overwrites(self, manifest: Manifest,
                                                             tmp_path: Path) -> None:
        p = tmp_path / "sub" / "manifest.json"
        p.parent.mkdir()
        p.write_text("old")
        write_manifest(manifest, p)
        assert sorted(x.name for x in p.parent.iterdir()) == ["manifest.json"]
        assert load_manifest(p).dataset.name == "synthetic"

    def test_file_validates_against_the_exported_schema(self, written: Path) -> None:
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(json.loads(written.read_text()), manifest_json_schema())

    def test_commands(self, stats: DatasetStats, tmp_path: Path) -> None:
        sp = tmp_path / "stats.json"
        sp.write_text(stats.model_dump_json())
        m = manifest_command(sp, tmp_path / "out" / "manifest.json", seed=3)
        assert m.provenance.seed == 3
        assert validate_command(tmp_path / "out" / "manifest.json").loss_spec() == m.loss_spec()

    def test_manifest_command_rejects_bad_statistics(self, tmp_path: Path) -> None:
        sp = tmp_path / "stats.json"
        sp.write_text(json.dumps({"dataset": "x", "n_cases": -1}))
        with pytest.raises(ManifestError, match=r"statistics .*stats\.json: field "):
            manifest_command(sp, tmp_path / "m.json", seed=0)


class TestRejection:
    @pytest.mark.parametrize(("change", "message"), [
        (lambda d: d["loss"]["terms"][0].update(name="tverskyy"),
         r"field loss\.terms\.0\.name: Input should be .*'tversky'.* \(got 'tverskyy'\)"),
        (lambda d: d["loss"]["terms"][1].update(weight=-1.0),
         r"field loss\.terms\.1\.weight: Input should be greater than 0 \(got -1\.0\)"),
        (lambda d: d["loss"]["weighting"].update(method="softmax"),
         r"field loss\.weighting\.method: .* \(got 'softmax'\)"),
        (lambda d: d.update(schema_version=2),
         r"field schema_version: Input should be 1 \(got 2\)"),
        (lambda d: d["provenance"].update(seed=-3),
         r"field provenance\.seed: Input should be greater than or equal to 0 \(got -3\)"),
        (lambda d: d["normalization"]["t1"].update(std=0.0),
         r"field normalization\.t1\.std: Input should be greater than 0 \(got 0\.0\)"),
        (lambda d: d["transforms"]["label/components"].update(chosen="sqrt"),
         r"field transforms\.label/components\.chosen: .* \(got 'sqrt'\)"),
        (lambda d: d["dataset"].update(colour="red"),
         r"field dataset\.colour: Extra inputs are not permitted \(got 'red'\)"),
        (lambda d: d["loss"].pop("weighting"),
         r"field loss\.weighting: Field required"),
        (lambda d: d["normalization"].pop("t2"),
         r"normalization has channels \['t1'\] but the dataset has \['t1', 't2'\]"),
        (lambda d: d["loss"]["weighting"].update(method="rebalance"),
         r"weighting 'rebalance' needs exactly 2 terms, got 3"),
    ])
    def test_names_file_field_and_value(self, written: Path, change, message: str) -> None:
        edit(written, change)
        with pytest.raises(ManifestError, match=message) as info:
            load_manifest(written)
        assert str(info.value).startswith(str(written))

    def test_several_errors_are_all_listed(self, written: Path) -> None:
        def two(d: dict) -> None:
            d["provenance"]["seed"] = -1
            d["loss"]["terms"][0]["name"] = "nope"
        edit(written, two)
        with pytest.raises(ManifestError, match=r"\(and 1 more: field "):
            load_manifest(written)

    def test_not_json(self, tmp_path: Path) -> None:
        p = tmp_path / "m.json"
        p.write_text("{not json")
        with pytest.raises(ManifestError, match=r"m\.json: not valid JSON"):
            validate_command(p)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"manifest .*nope\.json' does not exist"):
            load_manifest(tmp_path / "nope.json")


# ----------------------------------------------------------------------- schema and table
def test_committed_schema_is_current() -> None:
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == manifest_json_schema(), (
        "stats/manifest.schema.json is stale: run "
        "python -c 'from stats.manifest import export_schema; export_schema()'")


def test_schema_lists_the_loss_names_as_an_enumeration() -> None:
    from stats.rules import TERM_NAMES

    schema = manifest_json_schema()
    assert sorted(schema["$defs"]["LossTerm"]["properties"]["name"]["enum"]) == sorted(TERM_NAMES)


def test_decisions_table(manifest: Manifest) -> None:
    rows = decisions_table(manifest)
    assert rows[0][0] == "R1 class imbalance"
    assert rows[0][1].startswith("median tumour fraction of brain voxels per case = 0.00")
    assert rows[0][2].startswith("Tversky region term added")
    assert [r[0] for r in rows[:5]] == ["R1 class imbalance", "R2 tumour-size tail",
                                        "R3 intensity tails", "R5 region adaptation",
                                        "R4 term weighting"]
    assert ("transform label/tumour_volume_ml" in {r[0] for r in rows})
    assert all(len(r) == 3 and all(isinstance(c, str) for c in r) for r in rows)
