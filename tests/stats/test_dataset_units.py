"""The statistics engine on tiny in-memory volumes (stats.dataset, no store): the same
data in other units give the same transforms and the same decisions; negative
intensities are counted as 0 instead of stopping the dataset; slice profiles of voxelized
tumours drive R5 (issue 10)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import scipy.stats

from stats.dataset import (
    EngineConfig,
    case_partials,
    class_frequencies,
    dataset_hash,
    intensity_distributions,
    label_distributions,
    nice_upper,
)
from stats.manifest import build_manifest
from stats.rules import ADAPT_CV_THRESHOLD, decide_loss, slice_burden_cv
from stats.summary import DatasetStats, Distribution
from stats.transforms import candidates_for, select
from tests.stats.test_rules import ELLIPSOID_CV, moments_of

CHANNELS = ("t1", "t2")
SHAPE = (28, 22, 22)   # z, y, x
VOXEL_ML = 0.001
CREATED = "2026-01-02T03:04:05+00:00"

Arrays = dict[str, np.ndarray]


# ----------------------------------------------------------------------- volumes
def ellipsoid(centre: Sequence[float], semi: Sequence[float],
              shape: Sequence[int] = SHAPE) -> np.ndarray:
    zz, yy, xx = np.indices(tuple(shape))
    return (((zz - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2
            + ((xx - centre[2]) / semi[2]) ** 2) <= 1.0


def make_case(rng: np.random.Generator, i: int) -> Arrays:
    """One case: an ellipsoidal brain; a tumour (compact in even cases, two foci along z
    in odd ones) of varying size; t1 log-normal (tumour brighter), t2 Student-t(2)
    around 2000 (truncated at ±19 scales), all positive, float32 as the store keeps them."""
    brain = ellipsoid((13.5, 10.5, 10.5), (13.0, 10.0, 10.0))
    r = 1.5 + 0.4 * i
    if i % 2:
        tumour = ellipsoid((6.0, 10.5, 10.5), (2.0, r, r)) | ellipsoid((20.0, 10.5, 10.5),
                                                                        (2.0, r, r))
    else:
        tumour = ellipsoid((13.5, 10.5, 10.5), (3.0, r, r))
    label = np.zeros(SHAPE, np.uint8)
    label[tumour & brain] = 2
    n = int(brain.sum())
    image = np.zeros((len(CHANNELS), *SHAPE), np.float32)
    image[0][brain] = rng.lognormal(5.0, 0.5, n)
    image[0][tumour & brain] *= 1.5
    t = scipy.stats.t.rvs(df=2, size=n, random_state=rng)
    image[1][brain] = 2000.0 + 100.0 * np.clip(t, -19.0, 19.0)
    return {"image": image, "label": label, "brain": brain,
            "annotated": np.ones(SHAPE[0], dtype=bool)}


@pytest.fixture(scope="module")
def cases() -> dict[str, Arrays]:
    rng = np.random.default_rng(20261124)
    return {f"c{i:02d}": make_case(rng, i) for i in range(10)}


def scaled(cases: Mapping[str, Arrays], factor: float) -> dict[str, Arrays]:
    """The same cases in other units (image × factor, in float32 like the store)."""
    return {cid: {**a, "image": (a["image"] * np.float32(factor)).astype(np.float32)}
            for cid, a in cases.items()}


def engine_stats(cases: Mapping[str, Arrays], channels: Sequence[str] = CHANNELS
                 ) -> DatasetStats:
    """DatasetStats as pipeline.stats_runner.run_stats builds them, without a store: the
    engine configuration from each channel's largest value (what ingest records), then
    the per-case partials and their merge."""
    tops = {ch: max(float(a["image"][ci].max()) for a in cases.values())
            for ci, ch in enumerate(channels)}
    config = EngineConfig(channels=tuple(channels),
                          upper={ch: nice_upper(v) for ch, v in tops.items()},
                          voxel_ml=VOXEL_ML, scale=tops)
    parts = [case_partials(cid, f"hash-{cid}", a, config) for cid, a in cases.items()]
    return DatasetStats(
        dataset="units", store="memory://units",
        content_hash=dataset_hash((cid, f"hash-{cid}") for cid in cases),
        n_cases=len(parts), cases=list(cases), channels=list(channels),
        spacing_mm=[1.0, 1.0, 1.0], voxel_ml=VOXEL_ML,
        label_scheme={"0": "background", "1": "NCR", "2": "ED", "3": "ET"},
        intensity=intensity_distributions(parts, config),
        labels=label_distributions(parts, VOXEL_ML),
        class_frequencies=class_frequencies(parts),
        per_case={p.case_id: p.labels for p in parts},
        created_at=CREATED, code_version="0.1.0", histogram_bins=config.bins)


def brain_values(cases: Mapping[str, Arrays], ci: int) -> np.ndarray:
    """The brain voxels of channel ``ci`` over all cases, in float64."""
    return np.concatenate([a["image"][ci][a["brain"]].astype(np.float64)
                           for a in cases.values()])


def clipped_kurtosis(x: np.ndarray, transform, percentiles: Sequence[float]) -> float:
    """Oracle for R3: scipy on f(clip(x, numpy's percentiles))."""
    lo, hi = np.percentile(x, percentiles)
    return float(scipy.stats.kurtosis(transform.forward(np.clip(x, lo, hi))))


# ----------------------------------------------------------------------- units
@pytest.fixture(scope="module")
def reference(cases: dict[str, Arrays]) -> DatasetStats:
    return engine_stats(cases)


@pytest.fixture(scope="module")
def with_negatives(cases: dict[str, Arrays]) -> dict[str, Arrays]:
    """The cases with 25 brain voxels of c00 set to -0.5 .. -3 in every channel."""
    out = {cid: {**a, "image": a["image"].copy()} for cid, a in cases.items()}
    a = out["c00"]
    idx = np.flatnonzero(a["brain"].ravel())[:25]
    for ci in range(len(CHANNELS)):
        a["image"][ci].ravel()[idx] = -np.linspace(0.5, 3.0, idx.size)
    return out


class TestUnitInvariance:
    FACTORS = (0.01, 37.5, 1000.0)

    @pytest.mark.parametrize("factor", FACTORS)
    def test_issue10_same_transforms_in_any_units(self, cases: dict[str, Arrays],
                                                  reference: DatasetStats,
                                                  factor: float) -> None:
        other = engine_stats(scaled(cases, factor))
        for ch in CHANNELS:
            a, b = reference.intensity[ch]["brain"], other.intensity[ch]["brain"]
            assert select(b).chosen == select(a).chosen
            # offsets and scales follow the units: c = max · 2^-10, s = max
            assert b.transforms["ln"]["offset"] == pytest.approx(
                factor * a.transforms["ln"]["offset"], rel=1e-6)
            assert b.transforms["arcsin_sqrt"]["scale"] == pytest.approx(
                factor * a.transforms["arcsin_sqrt"]["scale"], rel=1e-6)
            # shapes equal: ln(kx + kc) = ln k + ln(x + c), arcsin(sqrt(kx / ks)) exact;
            # float32 rounding of k·x moves them by ~1e-7 relative
            for cand in ("identity", "ln", "log10", "arcsin_sqrt"):
                for moment in ("skewness", "kurtosis"):
                    assert getattr(b.candidates[cand], moment) == pytest.approx(
                        getattr(a.candidates[cand], moment), rel=1e-5, abs=1e-6)

    @pytest.mark.parametrize("factor", FACTORS)
    def test_issue10_same_decisions_in_any_units(self, cases: dict[str, Arrays],
                                                 reference: DatasetStats,
                                                 factor: float) -> None:
        other = engine_stats(scaled(cases, factor))
        plan_a, plan_b = decide_loss(reference), decide_loss(other)
        assert plan_b.terms == plan_a.terms
        assert plan_b.weighting == plan_a.weighting
        for da, db in zip(plan_a.decisions, plan_b.decisions, strict=True):
            assert (db.rule, db.outcome, db.fired, db.params) == (
                da.rule, da.outcome, da.fired, da.params)
            if da.rule != "R3":   # label statistics do not see the units at all
                assert db.measured == da.measured or (
                    math.isnan(db.measured) and math.isnan(da.measured))
        # R3 reads a histogram whose bins sit differently on the data in each unit
        # (edges [0, power of two above the max]); each is within 0.02 of scipy on the
        # clipped samples (tests/stats/test_seen.py), which do not depend on the units.
        x = brain_values(cases, 1)
        t = select(reference.intensity["t2"]["brain"]).transform()
        expected = clipped_kurtosis(x, t, (0.5, 99.5))
        r3a, r3b = plan_a.decisions[2], plan_b.decisions[2]
        assert r3a.measured == pytest.approx(expected, abs=0.02)
        assert r3b.measured == pytest.approx(expected, abs=0.02)
        assert (r3a.outcome, r3a.params) == ("clip", {"t2": [2.0, 98.0]})

    @pytest.mark.parametrize("factor", FACTORS)
    def test_issue10_same_network_input_in_any_units(self, cases: dict[str, Arrays],
                                                     reference: DatasetStats,
                                                     factor: float) -> None:
        # The z-scored input the network sees: the same up to the histograms' resolution
        # (one bin of [0, 2^k] in 4096, at most 1/2048 of the max, moves a clip point and
        # the mean by that much; in z units about 0.01 here).
        m_a = build_manifest(reference, created_at=CREATED)
        m_b = build_manifest(engine_stats(scaled(cases, factor)), created_at=CREATED)
        for ci, ch in enumerate(CHANNELS):
            pa, pb = m_a.normalization[ch], m_b.normalization[ch]
            assert (pb.transform.name, pb.percentiles) == (pa.transform.name, pa.percentiles)
            x = brain_values(cases, ci)
            za, zb = pa.apply(x), pb.apply(x * factor)
            np.testing.assert_allclose(zb, za, atol=0.02)

    def test_issue10_log_normal_shape_picked_arcsin_at_max_1_and_ln_at_max_100(
            self, cases: dict[str, Arrays]) -> None:
        # The defect: with ln's offset fixed at 1 unit and arcsin's scale at the power of
        # two above the max, one log-normal shape got different transforms by its units.
        x = brain_values(cases, 0)

        def old_choice(v: np.ndarray) -> str:
            cands, params = {}, {}
            for name, t in candidates_for("intensity", scale=nice_upper(float(v.max()))).items():
                cands[name] = moments_of(v if name == "identity" else t.forward(v))
                params[name] = dict(t.params)
            d = Distribution(name="i", kind="intensity", moments=cands["identity"],
                             candidates=cands, transforms=params)
            return select(d).chosen

        at_1, at_100 = x / x.max(), x / x.max() * 100.0
        assert (old_choice(at_1), old_choice(at_100)) == ("arcsin_sqrt", "ln")
        chosen = set()
        for top in (1.0, 100.0):
            f = top / float(x.max())
            stats = engine_stats(scaled(cases, f), CHANNELS)
            chosen.add(select(stats.intensity["t1"]["brain"]).chosen)
        assert chosen == {"ln"}


# ----------------------------------------------------------------------- negative values
class TestNegativeIntensities:
    def test_issue10_bare_transform_rejects_negatives(self) -> None:
        # why the engine clamps: the candidates' domain is x >= 0
        with pytest.raises(ValueError, match=r"ln"):
            candidates_for("intensity", scale=1.0)["ln"].forward(np.array([-1.0]))

    def test_issue10_negative_voxels_count_as_zero_for_the_candidates(
            self, with_negatives: dict[str, Arrays]) -> None:
        stats = engine_stats(with_negatives)   # before issue 10: ValueError from ln
        for ci, ch in enumerate(CHANNELS):
            d = stats.intensity[ch]["brain"]
            x = brain_values(with_negatives, ci)
            top = float(x.max())
            c = top * 2.0**-10   # ln's offset: the channel's max · 2^-10 (hand)
            expected = {
                "identity": moments_of(x),   # the raw values as they are
                "ln": moments_of(np.log(np.maximum(x, 0.0) + c)),
                "log10": moments_of(np.log10(np.maximum(x, 0.0) + c)),
                "arcsin_sqrt": moments_of(np.arcsin(np.sqrt(np.maximum(x, 0.0) / top))),
            }
            for cand, m in expected.items():
                got = d.candidates[cand]
                assert got.n == m.n
                for field in ("mean", "std", "skewness", "kurtosis"):
                    # one-pass merged moments against scipy: 1e-9 relative to max(1, |v|)
                    # (the project's stated accuracy)
                    want = getattr(m, field)
                    assert getattr(got, field) == pytest.approx(
                        want, abs=1e-9 * max(1.0, abs(want))), (ch, cand, field)
            assert d.histogram is not None
            assert d.histogram.underflow == 25
            assert d.moments.minimum == pytest.approx(-3.0, abs=1e-6)

    def test_issue10_the_plan_clips_at_zero_or_above(self,
                                                     with_negatives: dict[str, Arrays]) -> None:
        m = build_manifest(engine_stats(with_negatives), created_at=CREATED)
        for ci, ch in enumerate(CHANNELS):
            plan = m.normalization[ch]
            assert plan.raw_clip_low >= 0.0
            assert np.all(np.isfinite(plan.apply(brain_values(with_negatives, ci))))


# ----------------------------------------------------------------------- R5 on voxels
class TestSliceProfiles:
    """label_stats' per-slice fractions of voxelized tumours (brain = the whole box, so a
    slice's fraction is proportional to the tumour's cross-section)."""

    SHAPE = (60, 40, 40)

    def profile(self, tumour: np.ndarray) -> list[float]:
        brain = np.ones(self.SHAPE, dtype=bool)
        label = np.where(tumour, 2, 0).astype(np.uint8)
        config = EngineConfig(channels=("t1",), upper={"t1": 1.0}, voxel_ml=VOXEL_ML)
        arrays = {"image": np.ones((1, *self.SHAPE), np.float32), "label": label,
                  "brain": brain, "annotated": np.ones(self.SHAPE[0], dtype=bool)}
        return case_partials("c", "h", arrays, config).labels.slice_fractions

    @pytest.mark.parametrize("semi", [(12.0, 8.0, 8.0), (20.0, 6.0, 12.0), (8.0, 15.0, 15.0)])
    def test_one_voxelized_ellipsoid_is_near_one_over_sqrt5(
            self, semi: tuple[float, float, float]) -> None:
        # closed form 1/sqrt(5) for any axes; voxelization and slice sampling add an error
        # O(1 / semi_z) (tests/stats/test_rules.py): stated tolerance 1.5 / semi_z
        f = self.profile(ellipsoid((30.2, 20.3, 19.8), semi, self.SHAPE))
        cv = slice_burden_cv(f)
        assert cv == pytest.approx(ELLIPSOID_CV, abs=1.5 / semi[0])
        assert cv < ADAPT_CV_THRESHOLD

    def test_voxelized_foci_with_long_gaps_exceed_the_threshold(self) -> None:
        # three balls of radius 5 along z with 10-slice gaps: gap share 20/50 = 0.4,
        # closed form sqrt(1.2 / 0.6 - 1) = 1 (equal bodies, test_rules)
        tumour = np.zeros(self.SHAPE, dtype=bool)
        for z in (10.0, 30.0, 50.0):
            tumour |= ellipsoid((z, 20.0, 20.0), (5.0, 5.0, 5.0), self.SHAPE)
        cv = slice_burden_cv(self.profile(tumour))
        assert cv == pytest.approx(1.0, abs=1.5 / 5)
        assert cv > ADAPT_CV_THRESHOLD
