"""Dataset statistics over a store: exact against scipy, incremental, persisted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from pipeline.stats_runner import read_stats, run_stats, write_stats
from pipeline.store import DatasetStore, Grid
from stats.summary import DatasetStats

GRID = Grid(spacing=(1.0, 1.0, 2.0), shape=(20, 18, 12))
CHANNELS = ("t1n", "t1c", "t2w", "t2f")


def _make_case(rng: np.random.Generator, tumour_radius: float):
    z, y, x = GRID.zyx
    zz, yy, xx = np.indices((z, y, x))
    brain = ((zz - 6) / 5.5) ** 2 + ((yy - 9) / 8) ** 2 + ((xx - 10) / 9) ** 2 <= 1
    tumour = ((zz - 6) / 2) ** 2 + ((yy - 8) / tumour_radius) ** 2 + ((xx - 9) / tumour_radius) ** 2 <= 1
    label = np.zeros((z, y, x), np.uint8)
    label[tumour & brain] = 2
    core = ((zz - 6) / 1.2) ** 2 + ((yy - 8) / 1.2) ** 2 + ((xx - 9) / 1.2) ** 2 <= 1
    label[core & brain] = 1
    image = np.zeros((4, z, y, x), np.float32)
    for c in range(4):
        vals = rng.lognormal(mean=5 + 0.2 * c, sigma=0.4, size=brain.sum())
        image[c][brain] = vals.astype(np.float32)
    image[:, tumour & brain] *= 1.5
    return {"image": image, "label": label, "brain": brain,
            "annotated": np.ones(z, dtype=bool)}


def _commit(store: DatasetStore, cid: str, arrays, content_hash: str) -> None:
    slot = store.allocate([cid])[cid]
    store.uncommit(cid)
    store.write_case(slot, **arrays)
    rng_ = {ch: [float(arrays["image"][i].min()), float(arrays["image"][i].max())]
            for i, ch in enumerate(CHANNELS)}
    store.commit(cid, slot, content_hash, {"intensity_range": rng_})


@pytest.fixture
def store_with_cases(tmp_path):
    rng = np.random.default_rng(7)
    url = str(tmp_path / "s.zarr")
    store = DatasetStore.create(url, "ds", grid=GRID)
    cases = {f"c{i}": _make_case(rng, r) for i, r in enumerate([2.0, 3.0, 4.5])}
    for cid, arrays in cases.items():
        _commit(store, cid, arrays, f"hash-{cid}")
    return url, store, cases


def _json(intensity) -> str:
    """NaN != NaN, so compare the JSON form (NaN written as null)."""
    import json

    return json.dumps({ch: {r: d.model_dump(mode="json") for r, d in regions.items()}
                       for ch, regions in intensity.items()}, sort_keys=True, default=str)


def _region_values(cases, channel: int, pick):
    return np.concatenate([a["image"][channel][pick(a)].astype(np.float64) for a in cases.values()])


class TestAgainstScipy:
    def test_intensity_moments_per_region(self, store_with_cases):
        url, _, cases = store_with_cases
        stats = run_stats(url, "ds", scheduler="synchronous")
        regions = {
            "brain": lambda a: a["brain"],
            "tumour": lambda a: a["brain"] & (a["label"] > 0),
            "background": lambda a: a["brain"] & (a["label"] == 0),
            "ED": lambda a: a["brain"] & (a["label"] == 2),
        }
        for ci, ch in enumerate(CHANNELS):
            for region, pick in regions.items():
                x = _region_values(cases, ci, pick)
                d = stats.intensity[ch][region]
                assert d.moments.n == x.size
                # contract: 1e-9 relative to max(1, |value|) in float64
                for ours, ref in [
                    (d.moments.mean, x.mean()),
                    (d.moments.std, x.std()),
                    (d.moments.skewness, scipy.stats.skew(x)),
                    (d.moments.kurtosis, scipy.stats.kurtosis(x)),
                    (d.moments.skewness_unbiased, scipy.stats.skew(x, bias=False)),
                    (d.moments.kurtosis_unbiased, scipy.stats.kurtosis(x, bias=False)),
                ]:
                    assert abs(ours - ref) <= 1e-9 * max(1.0, abs(ref)), (ch, region, ours, ref)
                # ln offset: the channel's largest value over the dataset (recorded at
                # ingest) times 2^-10 (issue 10: unit-invariant candidates)
                c = max(float(a["image"][ci].max()) for a in cases.values()) * 2.0**-10
                ln = np.log(x + c)
                cand = d.candidates["ln"]
                assert abs(cand.skewness - scipy.stats.skew(ln)) <= 1e-9 * max(1, abs(cand.skewness))
                log10 = d.candidates["log10"]
                assert abs(log10.skewness - cand.skewness) <= 1e-9
                assert abs(log10.mean - np.log10(x + c).mean()) <= 1e-9 * max(1, abs(log10.mean))

    def test_percentiles_within_one_bin_of_numpy(self, store_with_cases):
        url, _, cases = store_with_cases
        stats = run_stats(url, "ds", scheduler="synchronous")
        x = _region_values(cases, 0, lambda a: a["brain"])
        upper = 2.0 ** math.ceil(math.log2(x.max()))
        width = upper / stats.histogram_bins
        for q in (0.5, 50.0, 99.5):
            assert abs(stats.intensity["t1n"]["brain"].percentiles[f"{q:g}"] - np.percentile(x, q)) <= width

    def test_label_statistics(self, store_with_cases):
        url, _, cases = store_with_cases
        stats = run_stats(url, "ds", scheduler="synchronous")
        fractions = []
        for cid, a in cases.items():
            brain = int(a["brain"].sum())
            tumour = int((a["brain"] & (a["label"] > 0)).sum())
            per = stats.per_case[cid]
            assert per.brain_voxels == brain
            assert per.tumour_voxels == tumour
            assert per.tumour_volume_ml == pytest.approx(tumour * 2.0 / 1000.0, rel=1e-12)
            assert per.components == 1
            assert per.class_voxels["NCR"] == int((a["brain"] & (a["label"] == 1)).sum())
            fractions.append(tumour / brain)
        dist = stats.labels["tumour_fraction_case"]
        assert dist.moments.mean == pytest.approx(np.mean(fractions), rel=1e-12)
        assert dist.moments.skewness == pytest.approx(scipy.stats.skew(fractions), rel=1e-9, abs=1e-12)
        assert dist.percentiles["50"] == pytest.approx(np.median(fractions), rel=1e-12)
        total = sum(stats.class_frequencies.values())
        assert total == pytest.approx(1.0)


class TestIncremental:
    def test_second_run_reuses_everything_and_a_new_case_is_the_only_read(self, store_with_cases):
        url, store, cases = store_with_cases
        seen = []
        first = run_stats(url, "ds", scheduler="synchronous", on_done=seen.append)
        assert sorted(seen) == ["c0", "c1", "c2"]
        seen.clear()
        starts = []
        again = run_stats(url, "ds", scheduler="synchronous", on_done=seen.append,
                          on_start=lambda todo, reused: starts.append((todo, reused)))
        assert seen == []
        assert starts == [(0, 3)]
        assert _json(again.intensity) == _json(first.intensity)
        rng = np.random.default_rng(99)
        new = _make_case(rng, 2.5)
        new["image"] = np.minimum(new["image"], cases["c0"]["image"].max())  # same edges
        _commit(store, "c3", new, "hash-c3")
        third = run_stats(url, "ds", scheduler="synchronous", on_done=seen.append)
        assert seen == ["c3"]
        full = run_stats(url, "ds", scheduler="synchronous", recompute=True)
        assert _json(third.intensity) == _json(full.intensity)
        assert third.n_cases == 4

    def test_changed_case_is_recomputed(self, store_with_cases):
        url, store, cases = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        # a case that holds no channel's maximum: halving it leaves the transforms' scale
        # (the channel maxima) unchanged, so only this case is recomputed
        top = np.max([a["image"].reshape(a["image"].shape[0], -1).max(axis=1)
                      for a in cases.values()], axis=0)
        cid = next(c for c, a in cases.items()
                   if np.all(a["image"].reshape(a["image"].shape[0], -1).max(axis=1) < top))
        changed = dict(cases[cid])
        changed["image"] = changed["image"] * 0.5
        _commit(store, cid, changed, f"hash-{cid}-v2")
        seen = []
        stats = run_stats(url, "ds", scheduler="synchronous", on_done=seen.append)
        assert seen == [cid]
        x = np.concatenate([(changed if c == cid else a)["image"][0][a["brain"]]
                            .astype(np.float64) for c, a in sorted(cases.items())])
        assert stats.intensity["t1n"]["brain"].moments.mean == pytest.approx(x.mean(), rel=1e-12)

    def test_issue10_a_new_channel_maximum_recomputes_every_case(self, store_with_cases):
        # the candidate transforms are scaled by the channel maximum (unit invariance), so
        # their per-case moments depend on it: moving the maximum recomputes every case
        url, store, cases = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        changed = dict(cases["c1"])
        changed["image"] = changed["image"] * 3.0
        _commit(store, "c1", changed, "hash-c1-v3")
        seen = []
        run_stats(url, "ds", scheduler="synchronous", on_done=seen.append)
        assert sorted(seen) == sorted(cases)


def test_json_round_trip_with_nan(store_with_cases, tmp_path):
    url, _, _ = store_with_cases
    stats = run_stats(url, "ds", scheduler="synchronous")
    path = tmp_path / "stats.json"
    write_stats(stats, str(path))
    back = read_stats(str(path))
    assert isinstance(back, DatasetStats)
    assert back.model_dump_json() == stats.model_dump_json()


@pytest.mark.slow
def test_local_dask_cluster_and_existing_scheduler_give_the_same_numbers(store_with_cases):
    from distributed import LocalCluster

    url, _, _ = store_with_cases
    ref = run_stats(url, "ds", scheduler="synchronous", recompute=True)
    local = run_stats(url, "ds", recompute=True)  # starts its own LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        remote = run_stats(url, "ds", scheduler=cluster.scheduler_address, recompute=True)
    assert _json(local.intensity) == _json(ref.intensity) == _json(remote.intensity)
