"""Dataset statistics over a store: exact against scipy, incremental, persisted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from pipeline.errors import StoreError
from pipeline.stats_runner import (
    StatsJob,
    StatsPlan,
    merge_stats,
    plan_stats,
    read_reused,
    read_stats,
    run_stats,
    write_stats,
)
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


def _canonical(stats: DatasetStats) -> str:
    """The statistics' JSON without the time they were made."""
    return stats.model_copy(update={"created_at": ""}).model_dump_json()


class TestIssue12StageFunctions:
    """Issue 12: plan -> jobs -> merge are plain functions shared by the CLI and the flow."""

    def test_plan_jobs_merge_equal_run_stats(self, store_with_cases):
        url, _, _ = store_with_cases
        reference = run_stats(url, "ds", scheduler="synchronous", recompute=True)
        store = DatasetStore.open(url, "ds")
        plan = plan_stats(store, recompute=True)
        assert isinstance(plan, StatsPlan)
        assert plan.computed_ids == ["c0", "c1", "c2"]
        assert plan.reused_ids == []
        assert all(isinstance(job, StatsJob) for job in plan.jobs)
        assert [job.content_hash for job in plan.jobs] == ["hash-c0", "hash-c1", "hash-c2"]
        computed = [job.run() for job in reversed(plan.jobs)]  # any finishing order
        assert _canonical(merge_stats(store, plan, computed)) == _canonical(reference)

    def test_plan_reuses_current_partials_and_merge_reads_nothing_again(
            self, store_with_cases, monkeypatch):
        url, _, _ = store_with_cases
        first = run_stats(url, "ds", scheduler="synchronous")
        store = DatasetStore.open(url, "ds")
        plan = plan_stats(store)
        assert plan.jobs == ()
        assert plan.reused_ids == ["c0", "c1", "c2"]

        def no_reading(*args, **kwargs):
            raise AssertionError("merge_stats read the store again")

        for name in ("committed", "read_partials", "partials_current", "read_case",
                     "read_image"):
            monkeypatch.setattr(DatasetStore, name, no_reading)
        monkeypatch.setattr("pipeline.stats_runner.engine_config", no_reading)
        assert _canonical(merge_stats(store, plan, [])) == _canonical(first)

    def test_recompute_plans_every_case(self, store_with_cases):
        url, _, _ = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        plan = plan_stats(DatasetStore.open(url, "ds"), recompute=True)
        assert (plan.computed_ids, plan.reused_ids) == (["c0", "c1", "c2"], [])

    def test_unreadable_persisted_partials_are_computed_again(self, store_with_cases):
        url, _, _ = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        writable = DatasetStore.open(url, "ds", writable=True)
        fingerprint = plan_stats(writable, recompute=True).config.fingerprint()
        writable.write_partials("c1", b"not zlib", content_hash="hash-c1",
                                fingerprint=fingerprint)
        plan = plan_stats(DatasetStore.open(url, "ds"))
        assert plan.computed_ids == ["c1"]
        assert plan.reused_ids == ["c0", "c2"]

    def test_new_cases_are_computed_while_the_stored_partials_are_read(
            self, store_with_cases, monkeypatch):
        """run_stats starts the new case's job before reading the other cases' stored
        partials (both then run at once), and a stored partial found unreadable on the
        way becomes a job too: the statistics equal a full recompute's."""
        import threading

        url, store, cases = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        new = _make_case(np.random.default_rng(98), 2.5)
        for c in range(len(CHANNELS)):  # the channels' maxima, so the same engine config
            new["image"][c] = np.minimum(new["image"][c],
                                         min(a["image"][c].max() for a in cases.values()))
        _commit(store, "c3", new, "hash-c3")
        writable = DatasetStore.open(url, "ds", writable=True)
        fingerprint = plan_stats(writable, recompute=True).config.fingerprint()
        writable.write_partials("c1", b"not zlib", content_hash="hash-c1",
                                fingerprint=fingerprint)
        job_started = threading.Event()
        events: list[str] = []
        original_compute = StatsJob.compute

        def compute(self, arrays, **kwargs):
            events.append(f"compute {self.case_id}")
            job_started.set()
            return original_compute(self, arrays, **kwargs)

        from pipeline import stats_runner

        original_load = stats_runner.load_persisted

        def load(store_, cid, *args, **kwargs):
            assert job_started.wait(30), "the new case's job did not start first"
            events.append(f"load {cid}")
            return original_load(store_, cid, *args, **kwargs)

        monkeypatch.setattr(StatsJob, "compute", compute)
        monkeypatch.setattr(stats_runner, "load_persisted", load)
        starts, done = [], []
        got = run_stats(url, "ds", scheduler="synchronous", on_done=done.append,
                        on_start=lambda todo, reused: starts.append((todo, reused)))
        assert events[0] == "compute c3"
        assert sorted(e for e in events if e.startswith("load")) == ["load c0", "load c1",
                                                                    "load c2"]
        assert events[-1] == "compute c1"  # unreadable: computed after the others
        assert starts == [(1, 3), (2, 2)]
        assert done == ["c3", "c1"]
        monkeypatch.undo()
        full = run_stats(url, "ds", scheduler="synchronous", recompute=True)
        assert _canonical(got) == _canonical(full)

    def test_deferred_plan_reads_the_same_partials(self, store_with_cases):
        url, _, _ = store_with_cases
        run_stats(url, "ds", scheduler="synchronous")
        store = DatasetStore.open(url, "ds")
        deferred = plan_stats(store, defer_reused=True)
        assert (deferred.pending, deferred.reused_ids) == (("c0", "c1", "c2"), [])
        read = read_reused(store, deferred)
        plan = plan_stats(store)
        assert read.pending == ()
        assert read.reused_ids == plan.reused_ids == ["c0", "c1", "c2"]
        assert read.jobs == plan.jobs == ()

    def test_merge_refuses_results_that_are_not_the_plans(self, store_with_cases):
        url, _, _ = store_with_cases
        store = DatasetStore.open(url, "ds")
        plan = plan_stats(store, recompute=True)
        results = [job.run(persist_result=False) for job in plan.jobs]
        with pytest.raises(ValueError, match=r"no partials for 1 planned case\(s\) .*'c2'"):
            merge_stats(store, plan, results[:2])
        with pytest.raises(ValueError, match=r"partials of case 'c0' are not a result of the plan"):
            merge_stats(store, plan, [*results, results[0]])
        import dataclasses

        stale = dataclasses.replace(results[1], content_hash="hash-old")
        with pytest.raises(ValueError, match=r"case 'c1' were computed from content hash 'hash-old'"):
            merge_stats(store, plan, [results[0], stale, results[2]])

    def test_plan_refuses_an_empty_dataset(self, tmp_path):
        store = DatasetStore.create(str(tmp_path / "e.zarr"), "empty", grid=GRID)
        with pytest.raises(StoreError, match=r"dataset 'empty' in .* has no committed case"):
            plan_stats(store)


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
    local = run_stats(url, "ds", scheduler="local", recompute=True)  # its own LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        remote = run_stats(url, "ds", scheduler=cluster.scheduler_address, recompute=True)
    assert _json(local.intensity) == _json(ref.intensity) == _json(remote.intensity)


def test_the_default_scheduler_follows_the_size_of_the_job(store_with_cases, monkeypatch):
    """A small job runs in this process (no cluster start-up); a large one, or "local",
    starts the local cluster; an address is used as given."""
    from pipeline import stats_runner as sr

    url, _, _ = store_with_cases
    seen = []
    real = sr.run_jobs

    def spy(jobs, scheduler="synchronous", on_done=None):
        seen.append(scheduler)
        return real(jobs, "synchronous", on_done)

    monkeypatch.setattr(sr, "run_jobs", spy)
    run_stats(url, "ds", recompute=True)
    run_stats(url, "ds", scheduler="local", recompute=True)
    monkeypatch.setattr(sr, "IN_PROCESS_MAX_VOXELS", 1)
    monkeypatch.setattr(sr, "available_cores", lambda: 2)
    run_stats(url, "ds", recompute=True)  # large, but 2 cores: a cluster would not help
    monkeypatch.setattr(sr, "available_cores", lambda: 8)
    run_stats(url, "ds", recompute=True)
    run_stats(url, "ds", scheduler="tcp://127.0.0.1:1", recompute=True)
    assert seen == ["synchronous", None, "synchronous", None, "tcp://127.0.0.1:1"]


def test_in_process_jobs_read_the_next_case_while_computing(store_with_cases, monkeypatch):
    """The in-process scheduler reads case i+1 while case i is reduced (issue 14), keeps
    the jobs' order, and never holds more than two cases."""
    import threading
    import time

    from pipeline import stats_runner as sr
    from pipeline.store import DatasetStore

    url, _, _ = store_with_cases
    plan = sr.plan_stats(DatasetStore.open(url, "ds"), recompute=True)
    events, lock = [], threading.Lock()
    computing = threading.Event()
    real_read, real_compute = sr.StatsJob.read, sr.StatsJob.compute

    def read(self):
        with lock:
            events.append(("read", self.case_id, computing.is_set()))
        return real_read(self)

    def compute(self, arrays, *, persist_result=True):
        computing.set()
        # wait (at most 5 s) for the read-ahead thread to start the next case's read
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with lock:
                n_read = sum(e[0] == "read" for e in events)
                n_done = sum(e[0] == "done" for e in events)
            if n_read >= min(len(plan.jobs), n_done + 2):
                break
            time.sleep(0.005)
        try:
            return real_compute(self, arrays, persist_result=persist_result)
        finally:
            with lock:
                events.append(("done", self.case_id, True))
            computing.clear()

    monkeypatch.setattr(sr.StatsJob, "read", read)
    monkeypatch.setattr(sr.StatsJob, "compute", compute)
    out = sr.run_jobs(plan.jobs, "synchronous")
    assert [p.case_id for p in out] == [j.case_id for j in plan.jobs]
    reads = [e for e in events if e[0] == "read"]
    assert [e[1] for e in reads] == [j.case_id for j in plan.jobs]
    assert any(e[2] for e in reads[1:])  # a later read happened while a case was computing
    # never more than one read ahead of the computations
    ahead = 0
    for kind, _, _ in events:
        ahead += 1 if kind == "read" else -1
        assert ahead <= 2


def test_persisted_partials_of_another_case_or_content_are_computed_again(store_with_cases):
    """A blob whose attributes say current but whose partials name another case (or
    content) is not reused: what a write stopped between metadata and chunk, or a
    misplaced blob, would leave."""
    from pipeline import stats_runner as sr
    from pipeline.store import DatasetStore

    url, _, _ = store_with_cases
    run_stats(url, "ds", scheduler="synchronous")
    store = DatasetStore.open(url, "ds", writable=True)
    plan = sr.plan_stats(store)
    assert plan.jobs == ()
    assert list(plan.reused) == ["c0", "c1", "c2"]
    # c0's blob under c1's name, with c1's content hash and the engine's fingerprint
    store.write_partials("c1", store.read_partials("c0"), content_hash="hash-c1",
                         fingerprint=plan.config.fingerprint())
    assert store.partials_current("c1", "hash-c1", plan.config.fingerprint())
    again = sr.plan_stats(store)
    assert [job.case_id for job in again.jobs] == ["c1"]
    fresh = run_stats(url, "ds", scheduler="synchronous", recompute=True)
    reused = run_stats(url, "ds", scheduler="synchronous")
    assert _json(reused.intensity) == _json(fresh.intensity)


def test_in_process_jobs_say_when_each_case_is_read(store_with_cases):
    """``on_read`` (what run_stats waits on before reading the stored partials) is called
    once a case, in the jobs' order, before that case's partials are done."""
    from pipeline import stats_runner as sr

    url, _, _ = store_with_cases
    plan = sr.plan_stats(DatasetStore.open(url, "ds"), recompute=True)
    events: list[str] = []
    sr.run_jobs(plan.jobs, "synchronous", on_done=lambda cid: events.append(f"done {cid}"),
                on_read=lambda cid: events.append(f"read {cid}"))
    reads = [e for e in events if e.startswith("read")]
    assert reads == ["read c0", "read c1", "read c2"]
    for cid in ("c0", "c1", "c2"):
        assert events.index(f"read {cid}") < events.index(f"done {cid}")
