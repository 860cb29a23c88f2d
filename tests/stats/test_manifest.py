"""Tests of stats.manifest: building, round trip, validation errors with the field path,
the loss spec the trainer takes, the normalization plan, and the committed JSON Schema
(issue 4); the plan's clip and moments as the network sees them (issue 10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest_io import (
    load_manifest,
    manifest_command,
    validate_command,
    write_manifest,
)
from stats.errors import ManifestError
from stats.manifest import (
    SCHEMA_PATH,
    Manifest,
    build_manifest,
    decisions_table,
    manifest_json_schema,
    parse_manifest,
    parse_stats,
    stats_fingerprint,
)
from stats.seen import CLIP_LEVELS
from stats.summary import DatasetStats
from stats.transforms import select
from tests.stats.test_rules import (
    balanced_stats,
    make_stats,
    small_tumour_stats,
    t2_intensity,
    with_intensities,
)
from tests.stats.test_seen import output_bound

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

    def test_issue10_lists_only_the_transforms_the_plan_uses(self, manifest: Manifest,
                                                             stats: DatasetStats) -> None:
        # label transforms were listed but never used; they stay in the statistics file
        assert set(manifest.transforms) == {"intensity/t1/brain", "intensity/t2/brain"}
        assert set(stats.labels["tumour_volume_ml"].candidates) == {
            "identity", "ln", "log10"}
        for ch in stats.channels:
            sel = manifest.transforms[f"intensity/{ch}/brain"]
            assert sel == select(stats.intensity[ch]["brain"])
            assert sel.reason
            assert manifest.normalization[ch].transform.name == sel.chosen

    def test_loss_and_decisions(self, manifest: Manifest) -> None:
        assert [t.name for t in manifest.loss.terms] == ["dice", "focal"]
        assert [d.rule for d in manifest.loss.decisions] == ["R1", "R2", "R3", "R5", "R4"]
        assert manifest.loss.weighting.method == "static"

    def test_fingerprint_ignores_creation_time_only(self, stats: DatasetStats) -> None:
        later = stats.model_copy(update={"created_at": "2030-01-01T00:00:00+00:00"})
        other = stats.model_copy(update={"n_cases": stats.n_cases + 1})
        assert stats_fingerprint(later) == stats_fingerprint(stats)
        assert stats_fingerprint(other) != stats_fingerprint(stats)

    def test_zero_std_channel_raises_naming_it(self) -> None:
        s = make_stats(fractions=[0.01] * 5, volumes=[1, 2, 3, 4, 5],
                       intensities={"flair": np.full(100, 7.0)})
        with pytest.raises(ValueError, match=r"intensity\.flair\.brain: std of the intensities "
                                             r"after identity and the 0\.5/99\.5 clip is 0\.0"):
            build_manifest(s)
        with pytest.raises(ValueError, match=r"intensity\.flair\.brain: std of the intensities "
                                             r"after identity is 0\.0"):
            build_manifest(without_histograms(s))


class TestLossSpec:
    def test_exact_shape(self, manifest: Manifest) -> None:
        spec = manifest.loss_spec()
        assert set(spec) == {"name", "terms", "weighting"}
        assert spec["name"] == "manifest"
        assert spec["weighting"] == {"method": "static", "params": {}}
        assert spec["terms"][0] == {
            "name": "dice", "weight": 1.0, "params": {"include_background": False}}
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
        assert loss.term_names == ("dice", "focal")


def without_histograms(stats: DatasetStats) -> DatasetStats:
    """The statistics as written before issue 10 (no brain histograms)."""
    intensity = {ch: {r: d.model_copy(update={"histogram": None}) for r, d in regions.items()}
                 for ch, regions in stats.intensity.items()}
    return stats.model_copy(update={"intensity": intensity})


@pytest.fixture
def samples(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """t1: Student-t(2) around 2000 (R3 clips it tighter); t2: log-normal (ln chosen)."""
    return {"t1": t2_intensity(rng), "t2": rng.lognormal(6.0, 0.5, size=50_000)}


@pytest.fixture
def sampled(stats: DatasetStats, samples: dict[str, np.ndarray]) -> DatasetStats:
    return with_intensities(stats, **samples)


class TestNormalization:
    def test_issue10_clip_and_moments_are_what_the_network_sees(
            self, sampled: DatasetStats, samples: dict[str, np.ndarray]) -> None:
        m = build_manifest(sampled, created_at=CREATED)
        r3 = m.loss.decisions[2]
        assert (r3.rule, r3.outcome) == ("R3", "clip")
        for ch, x in samples.items():
            plan = m.normalization[ch]
            sel = m.transforms[f"intensity/{ch}/brain"]
            t = sel.transform()
            hist = sampled.intensity[ch]["brain"].histogram
            width = (hist.high - hist.low) / len(hist.counts)
            expected_pct = tuple(r3.params[ch]) if ch in r3.params else CLIP_LEVELS[0]
            assert plan.percentiles == expected_pct
            assert plan.moments_source == "transformed_clipped"
            assert plan.transform.name == sel.chosen
            # the raw clip within one bin of numpy's percentiles (stats.histogram bound)
            lo, hi = np.percentile(x, expected_pct)
            assert plan.raw_clip_low == pytest.approx(lo, abs=width)
            assert plan.raw_clip_high == pytest.approx(hi, abs=width)
            assert plan.clip_low == float(t.forward(plan.raw_clip_low))
            assert plan.clip_high == float(t.forward(plan.raw_clip_high))
            # mean and std of f(clip(x)) from scipy on the samples, clipped at numpy's
            # percentiles; tolerance: output_bound
            y = t.forward(np.clip(x, lo, hi))
            tol = output_bound(t, lo, hi, width, float(x.max()))
            assert plan.mean == pytest.approx(float(y.mean()), abs=tol)
            assert plan.std == pytest.approx(float(y.std()), abs=tol)
        assert m.normalization["t1"].percentiles == (2.0, 98.0)   # t(2): see test_rules
        assert m.normalization["t2"].percentiles == (0.5, 99.5)

    def test_z_scored_sample_is_standardised(self, sampled: DatasetStats,
                                             samples: dict[str, np.ndarray]) -> None:
        # Moments after the clip: the network's input has mean 0 and std 1 (before issue
        # 10 the unclipped moments left the std at 0.97-1.0).
        m = build_manifest(sampled, created_at=CREATED)
        for ch, x in samples.items():
            z = m.normalization[ch].apply(x)
            assert abs(z.mean()) < 0.01
            assert abs(z.std() - 1.0) < 0.01

    def test_apply_is_clip_transform_zscore(self, manifest: Manifest) -> None:
        plan = manifest.normalization["t1"]
        t = manifest.transforms["intensity/t1/brain"].transform()
        x = np.array([0.0, plan.raw_clip_low, 1100.0, plan.raw_clip_high, 1e6])
        expected = (np.clip(t.forward(x), plan.clip_low, plan.clip_high) - plan.mean) / plan.std
        np.testing.assert_allclose(plan.apply(x), expected, rtol=1e-12)

    def test_without_histograms_the_plan_uses_the_unclipped_moments(
            self, sampled: DatasetStats) -> None:
        # Statistics written before issue 10: 0.5/99.5 clip from the stored percentiles,
        # the candidate moments of the chosen transform, and R3 cannot clip tighter.
        old = without_histograms(sampled)
        m = build_manifest(old, created_at=CREATED)
        for ch, plan in m.normalization.items():
            dist = old.intensity[ch]["brain"]
            sel = m.transforms[f"intensity/{ch}/brain"]
            t = sel.transform()
            assert plan.moments_source == "transformed_unclipped"
            assert plan.percentiles == (0.5, 99.5)
            assert plan.raw_clip_low == dist.percentiles["0.5"]
            assert plan.raw_clip_high == dist.percentiles["99.5"]
            assert plan.clip_low == float(t.forward(dist.percentiles["0.5"]))
            assert plan.clip_high == float(t.forward(dist.percentiles["99.5"]))
            assert plan.mean == dist.candidates[sel.chosen].mean
            assert plan.std == dist.candidates[sel.chosen].std

    def test_issue10_negative_intensities_count_as_zero_in_the_plan(
            self, stats: DatasetStats, rng: np.random.Generator) -> None:
        # 2 % of the brain voxels slightly negative (resampling overshoot): numpy's 0.5
        # percentile is negative; the plan's raw clip never is (they count as 0). The
        # cluster at 0 is a heavy tail, so R3 clips it away with the histogram; without
        # one the plan keeps 0.5/99.5 and its low clip is exactly 0.
        x = np.concatenate([rng.normal(800, 60, 49_000), -rng.uniform(0.5, 5.0, 1_000)])
        assert np.percentile(x, 0.5) < 0
        s = with_intensities(stats, t1=x)
        plans = [build_manifest(st, created_at=CREATED).normalization["t1"]
                 for st in (s, without_histograms(s))]
        for plan in plans:
            assert plan.raw_clip_low >= 0.0
            assert np.all(np.isfinite(plan.apply(x)))
        assert plans[0].percentiles != (0.5, 99.5)
        assert (plans[1].percentiles, plans[1].raw_clip_low) == ((0.5, 99.5), 0.0)


# ----------------------------------------------------------------------- I/O
class TestRoundTrip:
    def test_write_then_load_gives_the_same_manifest(self, manifest: Manifest,
                                                     written: Path) -> None:
        loaded = load_manifest(written)
        assert loaded.model_dump_json() == manifest.model_dump_json()   # NaN-safe equality
        assert loaded.loss_spec() == manifest.loss_spec()

    def test_nan_is_written_as_null_and_read_back(self, rng: np.random.Generator,
                                                  tmp_path: Path) -> None:
        # three cases: the skewness of tumour volume is undefined (NaN, scipy needs 4 here)
        s = make_stats(fractions=[0.01, 0.02, 0.03], volumes=[1.0, 2.0, 3.0],
                       intensities={"t1": rng.normal(500, 20, 500)})
        m = build_manifest(s, created_at=CREATED)
        p = write_manifest(m, tmp_path / "m.json")
        assert "NaN" not in p.read_text()
        r2 = load_manifest(p).loss.decisions[1]
        assert r2.rule == "R2"
        assert math.isnan(r2.measured)
        assert r2.outcome == "bce"

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
        (lambda d: d["transforms"]["intensity/t1/brain"].update(chosen="sqrt"),
         r"field transforms\.intensity/t1/brain\.chosen: .* \(got 'sqrt'\)"),
        (lambda d: d["dataset"].update(colour="red"),
         r"field dataset\.colour: Extra inputs are not permitted \(got 'red'\)"),
        (lambda d: d["loss"].pop("weighting"),
         r"field loss\.weighting: Field required"),
        (lambda d: d["normalization"].pop("t2"),
         r"normalization has channels \['t1'\] but the dataset has \['t1', 't2'\]"),
        (lambda d: (d["loss"]["terms"].pop(), d["loss"]["weighting"].update(method="rebalance")),
         r"weighting 'rebalance' needs exactly 2 terms, got 1"),
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


# ----------------------------------------------------------------------- greedy adaptation
GREEDY = {"method": "greedy", "term": 1, "params": ["gamma"], "reason": "test: focal gamma"}


def with_adaptation(manifest: Manifest, adaptation: dict) -> dict:
    """The manifest with two fixed terms (whatever the rules chose) and an adaptation."""
    doc = json.loads(manifest.model_dump_json())
    doc["loss"]["terms"] = [
        {"name": "tversky", "params": {"alpha": 0.3, "beta": 0.7}, "reason": "test"},
        {"name": "focal", "params": {"gamma": 2.0}, "reason": "test"}]
    doc["loss"]["weighting"] = {"method": "softadapt", "params": {}, "reason": "test"}
    doc["loss"]["adaptation"] = adaptation
    return doc


class TestAdaptation:
    def test_validates_round_trips_and_builds_the_loss(self, manifest: Manifest,
                                                       tmp_path: Path) -> None:
        m = Manifest.model_validate(with_adaptation(manifest, GREEDY))
        assert m.loss.adaptation is not None
        assert m.loss.adaptation.factors == [0.9, 1.0, 1.1]  # the default actions
        assert m.loss.adaptation.every == 1
        p = write_manifest(m, tmp_path / "m.json")
        loaded = load_manifest(p)
        assert loaded == m
        spec = loaded.loss_spec()
        assert spec["adaptation"] == {"method": "greedy", "term": 1, "params": ["gamma"],
                                      "factors": [0.9, 1.0, 1.1], "every": 1}
        json.dumps(spec)
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(json.loads(p.read_text()), manifest_json_schema())
        losses = pytest.importorskip("pipeline.train.losses")
        loss = losses.build_loss(spec)
        assert isinstance(loss, losses.ManifestLoss)
        assert loss.adaptation is not None
        assert (loss.adaptation.term, loss.adaptation.params) == (1, ("gamma",))
        assert loss.adapted_values() == {"gamma": loss.terms[1].gamma}

    def test_absent_by_default(self, manifest: Manifest) -> None:
        assert manifest.loss.adaptation is None
        assert "adaptation" not in manifest.loss_spec()

    def test_build_manifest_passes_the_plan_through(self, stats: DatasetStats,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        import dataclasses

        import stats.manifest as module
        from stats.rules import AdaptationConfig

        config = AdaptationConfig(**GREEDY)
        real = module.decide_loss
        monkeypatch.setattr(module, "decide_loss",
                            lambda s: dataclasses.replace(real(s), adaptation=config))
        m = build_manifest(stats, created_at=CREATED)
        assert m.loss.adaptation == config
        assert m.loss_spec()["adaptation"]["params"] == ["gamma"]

    @pytest.mark.parametrize(("change", "message"), [
        ({"term": 2}, r"adaptation\.term 2 names no term: there are 2 \(indices 0 to 1\)"),
        ({"factors": [0.9, 0.0]},
         r"field loss\.adaptation\.factors\.1: Input should be greater than 0 \(got 0\.0\)"),
        ({"every": 0},
         r"field loss\.adaptation\.every: Input should be greater than or equal to 1 \(got 0\)"),
        ({"method": "heuristic"}, r"field loss\.adaptation\.method: .* \(got 'heuristic'\)"),
        ({"params": []}, r"field loss\.adaptation\.params: List should have at least 1 item"),
    ])
    def test_rejects_naming_the_field(self, manifest: Manifest, tmp_path: Path, change: dict,
                                      message: str) -> None:
        p = tmp_path / "m.json"
        p.write_text(json.dumps(with_adaptation(manifest, {**GREEDY, **change})))
        with pytest.raises(ManifestError, match=message):
            load_manifest(p)

    def test_decision_changes_report_it(self, manifest: Manifest) -> None:
        from stats.manifest import decision_changes

        m = Manifest.model_validate(with_adaptation(manifest, GREEDY))
        before = Manifest.model_validate({**with_adaptation(manifest, GREEDY), "loss": {
            **with_adaptation(manifest, GREEDY)["loss"], "adaptation": None}})
        assert decision_changes(before, m) == [
            "adaptation: none -> {every=1, factors=[0.9, 1, 1.1], method=greedy, "
            "params=[gamma], term=1}"]
        assert decision_changes(m, m) == []


class TestParseWithoutFiles:
    """Issue 12, item 6: stats/ validates text; reading the file is pipeline.manifest_io's."""

    def test_manifest_text_and_bytes(self, manifest: Manifest) -> None:
        text = manifest.model_dump_json(indent=2)
        for data in (text, text.encode("utf-8")):
            assert parse_manifest(data, "inline.json").loss_spec() == manifest.loss_spec()

    def test_errors_name_the_source(self, manifest: Manifest) -> None:
        with pytest.raises(ManifestError, match=r"^inline\.json: not valid JSON"):
            parse_manifest("{", "inline.json")
        with pytest.raises(ManifestError, match=r"^inline\.json: not UTF-8 text: byte b'\\xff'"):
            parse_manifest(b"\xff{}", "inline.json")

    def test_stats_text(self, stats: DatasetStats) -> None:
        assert parse_stats(stats.model_dump_json(), "s.json").dataset == stats.dataset
        with pytest.raises(ManifestError, match=r"^statistics s\.json: field "):
            parse_stats("{}", "s.json")


# ----------------------------------------------------------------------- schema and table
def test_committed_schema_is_current() -> None:
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == manifest_json_schema(), (
        "stats/manifest.schema.json is stale: run "
        "python -c 'from pipeline.manifest_io import export_schema; export_schema()'")


def test_schema_lists_the_loss_names_as_an_enumeration() -> None:
    from stats.rules import TERM_NAMES

    schema = manifest_json_schema()
    assert sorted(schema["$defs"]["LossTerm"]["properties"]["name"]["enum"]) == sorted(TERM_NAMES)


def test_decisions_table(manifest: Manifest) -> None:
    rows = decisions_table(manifest)
    assert rows[0][0] == "R1 class imbalance"
    assert rows[0][1].startswith("median tumour fraction of brain voxels per case = 0.00")
    assert rows[0][2].startswith("Dice region term added")
    assert [r[0] for r in rows[:5]] == ["R1 class imbalance", "R2 tumour-size tail",
                                        "R3 intensity tails", "R5 slice heterogeneity",
                                        "R4 term weighting"]
    assert [r[0] for r in rows[5:]] == ["transform intensity/t1/brain",
                                        "transform intensity/t2/brain"]
    assert all(len(r) == 3 and all(isinstance(c, str) for c in r) for r in rows)
