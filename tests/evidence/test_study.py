"""The evidence study's machinery (issue 10, item 3) at a size that runs in CI.

The numbers of a study this small are not evidence; what is tested is that the study
takes every arm through the real pipeline, trains the variants on shared folds, pairs
the cases, writes the report with its checks and plots, and resumes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.evidence.families import FAMILIES
from pipeline.evidence.study import (
    BASELINES,
    StudyResult,
    _same_loss,
    compare,
    copy_arm,
    get_scale,
    manifest_signature,
    prepare_arm,
    run_study,
    variants_for,
)


def _static(*terms: dict) -> dict:
    return {"name": "manifest", "terms": list(terms),
            "weighting": {"method": "static", "params": {}}}


class TestSameLoss:
    def test_single_term_manifest_is_its_baseline(self) -> None:
        assert _same_loss(_static({"name": "bce", "weight": 1.0, "params": {}}),
                          {"name": "bce"})
        # the registry's Tversky defaults are alpha 0.3, beta 0.7 (Salehi et al. 2017)
        assert _same_loss(_static({"name": "tversky", "weight": 1.0,
                                   "params": {"alpha": 0.3, "beta": 0.7}}), {"name": "tversky"})

    def test_different_parameters_or_losses_differ(self) -> None:
        assert not _same_loss({"name": "dice"}, {"name": "tversky"})
        assert not _same_loss(_static({"name": "focal", "weight": 1.0,
                                       "params": {"gamma": 1.5}}), {"name": "focal"})


@pytest.mark.parametrize("name", ["smoke", "default", "full"])
def test_every_scale_is_a_valid_protocol(name: str) -> None:
    scale = get_scale(name)
    assert scale.name == name
    assert scale.folds >= 2
    assert scale.seeds
    assert set(scale.families or FAMILIES) <= set(FAMILIES)
    if name == "full":  # 3D patches that fit the phantom's grid (Z <= 64, Y, X <= 96)
        assert scale.train.sampling.dim == "3d"
        assert scale.train.device == "cuda"
        grid_zyx = scale.shape[::-1]
        assert all(p <= g for p, g in zip(scale.train.sampling.patch_size, grid_zyx,
                                          strict=True))


def test_unknown_scale_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown study scale 'huge'; known: \['default', "
                                         r"'full', 'smoke'\]"):
        get_scale("huge")


@pytest.fixture(scope="module")
def small_scale():
    scale = get_scale("smoke")
    return replace(scale, cases=4, shape=(48, 48, 32))


def test_issue10_units_family_gives_identical_manifests(tmp_path: Path, small_scale) -> None:
    result = run_study(tmp_path / "units", small_scale, report=tmp_path / "units.md",
                       families=["units"])
    sigs = list(result.signatures.values())
    assert len(sigs) == len(FAMILIES["units"].arms)
    assert all(s == sigs[0] for s in sigs)
    assert result.per_case == []  # an invariant family is not trained
    text = (tmp_path / "units.md").read_text()
    assert "units: identical transforms, clips and loss" in text
    assert "| PASS |" in text


def test_variants_alias_ablations_that_equal_a_baseline(tmp_path: Path, small_scale) -> None:
    fam = FAMILIES["size_tail"]
    data = prepare_arm(tmp_path, fam, fam.arms[0], small_scale)
    aliases: dict[str, str] = {}
    variants = variants_for(data, data.manifest.dataset.channels, greedy=True,
                            aliases=aliases)
    names = [v.name for v in variants]
    assert names[:1 + len(BASELINES)] == ["manifest", *BASELINES]
    terms = [t["name"] for t in data.manifest.loss_spec()["terms"]]
    assert len(terms) == 2  # a region and a distribution term at this imbalance
    # removing a term leaves the other one alone: a baseline (bce, or tversky with the
    # registry's weights) is aliased, a focal with its own gamma is trained
    for t in terms:
        name = f"manifest − {t}"
        assert (name in aliases) != (name in names)
    assert "manifest, softadapt weights" in names
    if "tversky" in terms:
        greedy = next(v for v in variants if v.name == "manifest + greedy α/β")
        assert greedy.spec["adaptation"]["term"] == terms.index("tversky")
    sig = manifest_signature(data.manifest)
    assert sig == manifest_signature(data.manifest.model_copy())


@pytest.mark.slow
def test_smoke_study_trains_pairs_reports_and_resumes(tmp_path: Path, small_scale) -> None:
    out, report = tmp_path / "study", tmp_path / "evidence.md"
    result = run_study(out, small_scale, report=report, families=["intensity_tail"])
    arms = [a.name for a in FAMILIES["intensity_tail"].arms]
    for arm in arms:
        variants = [v["name"] for v in result.variants[f"intensity_tail/{arm}"]]
        rows = [r for r in result.per_case if r["arm"] == arm]
        # every variant validated every case once per seed (k-fold by case)
        assert len(rows) == len(variants) * small_scale.cases * len(small_scale.seeds)
        cmp = compare(result.per_case, "intensity_tail", arm, "manifest", "bce", "dice")
        assert cmp.n == small_scale.cases
    decided = {(d["arm"], d["rule"]): d for d in result.decisions}
    assert decided[("light", "R3")]["expected"] == "none"
    assert decided[("heavy", "R3")]["expected"] == "clip"
    text = report.read_text()
    for heading in ("## Acceptance checks (issue 10)", "## Decisions of the rules, per arm",
                    "### intensity_tail/light", "Paired differences, manifest − comparator"):
        assert heading in text
    for png in ("intensity_tail_dice.png", "intensity_tail_hd95.png"):
        assert (tmp_path / "evidence" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "per_case.json").read_text())
    assert len(raw["per_case"]) == len(result.per_case)
    # a re-run reuses every finished fold: nothing is trained again
    results = sorted(out.glob("runs/**/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_study(out, small_scale, report=report, families=["intensity_tail"])
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again.per_case == result.per_case


def test_an_arm_with_the_same_phantom_reuses_the_earlier_results(small_scale) -> None:
    # intensity_tail/light and slice_heterogeneity/compact are both the default phantom
    light = FAMILIES["intensity_tail"].arm("light").options
    assert FAMILIES["slice_heterogeneity"].arm("compact").options == light
    result = StudyResult(scale=small_scale, out_dir=Path("."))
    row = {"family": "intensity_tail", "arm": "light", "variant": "bce", "case_id": "c0",
           "dice": 0.5}
    result.per_case.append(row)
    result.variants["intensity_tail/light"] = [{"name": "bce"}]
    result.aliases["intensity_tail/light"] = {}
    copy_arm(result, "intensity_tail/light", "slice_heterogeneity/compact")
    assert result.per_case == [row, {**row, "family": "slice_heterogeneity", "arm": "compact"}]
    assert result.same_data == {"slice_heterogeneity/compact": "intensity_tail/light"}
    assert result.variants["slice_heterogeneity/compact"] == [{"name": "bce"}]
