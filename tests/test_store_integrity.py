"""Fault injection on the store: concurrent writers, lost and damaged chunks, damaged
records, a full disk, orphaned workers, odd case ids, and the plain xarray view.

Every test ends the same way: a clear message naming the case (or the file), and every
committed case identical to a clean ingest (its SHA-256 per array equal to the clean
store's, `xrai verify` clean).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import xarray as xr

from pipeline.errors import StoreError, StoreFull
from pipeline.ingest import ingest, ingest_cases
from pipeline.lease import StoreBusy, WriterLease, writer_lease
from pipeline.sources.local import discover
from pipeline.sources.phantom import write_phantom
from pipeline.stats_runner import run_stats
from pipeline.store import CaseDamaged, DatasetStore, Grid, store_key
from pipeline.verify import verify_dataset
from tests.conftest import race_for_lease

GRID = Grid(spacing=(1.5, 1.5, 1.5), shape=(48, 48, 32))
N_CASES = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_phantom(root, cases=N_CASES, seed=3, shape=(72, 72, 48))
    return root


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Checksums of each case of a clean ingest: case id -> array -> SHA-256."""
    url = str(tmp_path_factory.mktemp("clean") / "s.zarr")
    report = ingest(source, url, "d", grid=GRID)
    assert report.exit_code == 0
    return {cid: dict(r.attrs["checksums"]) for cid, r in DatasetStore.open(url, "d").committed().items()}


def assert_identical_to_clean(url: str, clean: dict[str, dict[str, str]], dataset: str = "d") -> None:
    store = DatasetStore.open(url, dataset)
    records = store.committed()
    assert sorted(records) == sorted(clean)
    assert sorted(r.slot for r in records.values()) == list(range(len(records)))  # no shared slot
    for cid, rec in records.items():
        assert rec.attrs["checksums"] == clean[cid], cid
    report = verify_dataset(store)
    assert report.ok, report
    assert sorted(report.intact) == sorted(clean)


# ---------------------------------------------------------------------------------- lease
class TestLease:
    def test_one_writer_wins_each_round_when_released_together(self, tmp_path):
        url = str(tmp_path / "s.zarr")
        for _ in range(30):
            won, busy = race_for_lease(url, "d")
            assert len(won) == 1
            assert len(busy) == 7
            assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in busy[0]
            assert "dataset 'd'" in busy[0]
            assert "--wait" in busy[0]
            won[0].release()
        assert not (tmp_path / "s.zarr" / "d" / "_xrai" / "lease").exists()

    def test_a_second_writer_waits_when_asked(self, tmp_path):
        url = str(tmp_path / "s.zarr")
        first = WriterLease(url, "d").acquire(0)
        threading.Timer(0.8, first.release).start()
        t0 = time.monotonic()
        with writer_lease(url, "d", wait=20):
            assert time.monotonic() - t0 >= 0.7

    def _plant(self, url: str, **holder) -> None:
        doc = {"token": "x", "host": socket.gethostname(), "pid": os.getpid(), "user": "u",
               "command": "c", "started": "s", "renewed": time.time(), "ttl": 60.0, **holder}
        path = Path(url) / "d" / "_xrai" / "lease"
        path.mkdir(parents=True)
        (path / "zarr.json").write_text(json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {"xrai_lease": doc}}))

    def test_the_lease_of_a_killed_process_on_this_host_is_broken_at_once(self, tmp_path):
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        self._plant(str(tmp_path / "s.zarr"), pid=int(proc.stdout))
        with writer_lease(str(tmp_path / "s.zarr"), "d", wait=0) as lease:
            assert not lease.lost

    def test_another_hosts_lease_holds_until_it_expires(self, tmp_path):
        url = str(tmp_path / "s.zarr")
        self._plant(url, host="elsewhere", pid=1, ttl=1.0)
        with pytest.raises(StoreBusy, match="pid 1 on host 'elsewhere'"):
            WriterLease(url, "d").acquire(0)
        with writer_lease(url, "d", wait=10):
            pass

    def test_a_lease_taken_over_is_noticed(self, tmp_path):
        url = str(tmp_path / "s.zarr")
        lease = WriterLease(url, "d").acquire(0)
        doc_path = tmp_path / "s.zarr" / "d" / "_xrai" / "lease" / "zarr.json"
        doc = json.loads(doc_path.read_text())
        doc["attributes"]["xrai_lease"]["token"] = "someone-else"
        doc_path.write_text(json.dumps(doc))
        lease._renew()
        with pytest.raises(StoreBusy, match="was lost"):
            lease.check()
        lease.release()
        assert doc_path.exists()  # not ours: left alone


def _ingest_half(url: str, source: str, half: int, wait: float, barrier, results) -> None:
    cases = discover(Path(source), layout="brats")[half * 2:(half + 1) * 2]
    barrier.wait()
    try:
        ingest_cases(cases, url, "d", grid=GRID, wait=wait)
    except StoreBusy as err:
        results.put(f"busy: {err}")
    else:
        results.put("done")


def _two_writers(url: str, source: Path, wait: float) -> list[str]:
    """Two processes ingest halves of the source into one dataset, released together."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ingest_half, args=(url, str(source), h, wait, barrier, results))
             for h in (0, 1)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    return out


class TestConcurrentIngest:
    def test_two_ingests_released_together_queue_and_never_cross_wire(self, source, clean, tmp_path):
        for round_ in range(3):
            url = str(tmp_path / f"s{round_}.zarr")
            assert _two_writers(url, source, wait=120.0) == ["done", "done"]
            assert_identical_to_clean(url, clean)

    def test_without_wait_the_second_refuses_and_nothing_is_corrupted(self, source, clean, tmp_path):
        url = str(tmp_path / "s.zarr")
        for r in _two_writers(url, source, wait=0.0):
            assert r == "done" or (r.startswith("busy: dataset 'd'") and "being written by" in r)
        # whatever the interleaving, a re-run completes the dataset, identical to clean
        ingest(source, url, "d", grid=GRID)
        assert_identical_to_clean(url, clean)


# -------------------------------------------------------------------- damaged chunks
@pytest.fixture
def ingested(source, tmp_path) -> tuple[str, DatasetStore]:
    url = str(tmp_path / "s.zarr")
    ingest(source, url, "d", grid=GRID)
    return url, DatasetStore.open(url, "d")


def _chunk(url: str, store: DatasetStore, cid: str, array: str, channel: int | None = None) -> Path:
    slot = store.committed()[cid].slot
    parts = [slot] if channel is None else [slot, channel]
    ndim = store._group[array].ndim  # the test damages the store by hand
    parts += [0] * (ndim - len(parts))
    return Path(url) / "d" / array / "c" / "/".join(map(str, parts))


class TestDamage:
    def test_a_deleted_chunk_is_named_by_verify_stats_and_the_trainer(self, ingested, source, clean):
        url, store = ingested
        cid = sorted(clean)[1]
        chunk = _chunk(url, store, cid, "label")
        chunk.unlink()
        report = verify_dataset(store)
        assert list(report.damaged) == [cid]
        assert "label/c/" in report.damaged[cid]
        assert "missing" in report.damaged[cid]
        with pytest.raises(StoreError, match=rf"case '{cid}': chunk 'd/label/c/[0-9/]+' is missing"):
            run_stats(url, "d", scheduler="synchronous")
        from pipeline.train.data import case_records, load_case

        record = case_records(store, [cid])[cid]
        with pytest.raises(CaseDamaged, match=rf"case '{cid}'.*label/c/.*missing.*xrai verify"):
            load_case(store, record, plan=None)  # the read fails before any normalization
        # a plain re-run re-ingests the damaged case (its source is unchanged)
        report = ingest(source, url, "d", grid=GRID)
        assert [o.case_id for o in report.by_status("ingested")] == [cid]
        assert_identical_to_clean(url, clean)

    def test_a_truncated_chunk_is_named_and_recompute_repairs_it(self, ingested, source, clean):
        url, store = ingested
        cid = sorted(clean)[2]
        chunk = _chunk(url, store, cid, "image", channel=1)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        problem = verify_dataset(store).damaged[cid]
        assert "image/c/" in problem
        assert "cannot be decoded" in problem
        with pytest.raises(CaseDamaged, match=rf"case '{cid}'.*image/c/.*cannot be decoded"):
            run_stats(url, "d", scheduler="synchronous", recompute=True)
        ingest(source, url, "d", grid=GRID, recompute=True)
        assert_identical_to_clean(url, clean)

    def test_a_flipped_byte_fails_the_checksum(self, ingested, clean):
        url, store = ingested
        cid = sorted(clean)[0]
        arr = DatasetStore.open(url, "d", writable=True)._group["brain"]  # deliberate damage
        slot = store.committed()[cid].slot
        values = arr[slot]
        values.flat[0] = ~values.flat[0]
        arr[slot] = values
        assert "does not match the checksum" in verify_dataset(store).damaged[cid]

    def test_checksums_are_xxh3_128_of_the_stored_bytes(self, ingested, clean):
        """Each record holds ``xxh3-128:<hex>`` of its arrays' bytes as read back; the hash
        itself is checked against XXH3-128's published value for empty input."""
        from pipeline.store import checksum

        assert checksum(np.zeros(0, np.uint8)) == "xxh3-128:99aa06d3014798d86001c324468d497f"
        _, store = ingested
        cid = sorted(clean)[0]
        rec = store.committed()[cid]
        arrays = store.read_case(cid, record=rec)
        sums = rec.attrs["checksums"]
        assert sums["brain"] == checksum(arrays["brain"])
        assert sums[f"image/{store.channels[1]}"] == checksum(arrays["image"][1])

    def test_records_written_with_sha256_still_verify(self, ingested, clean):
        """Stores ingested before the checksum became XXH3 hold bare SHA-256 digests: they
        verify, a changed byte still fails, and an unknown algorithm is named."""
        import hashlib

        url, store = ingested
        cid = sorted(clean)[0]
        writable = DatasetStore.open(url, "d", writable=True)
        rec = writable.committed()[cid]
        arrays = writable.read_case(cid, record=rec)
        parts = {"label": arrays["label"], "brain": arrays["brain"],
                 "annotated": arrays["annotated"],
                 **{f"image/{ch}": arrays["image"][i] for i, ch in enumerate(store.channels)}}
        sha = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
               for k, v in parts.items()}
        writable.commit(cid, rec.slot, rec.content_hash, {**rec.attrs, "checksums": sha})
        assert verify_dataset(store).ok
        arr = writable._group["brain"]  # deliberate damage
        values = arr[rec.slot]
        values.flat[0] = ~values.flat[0]
        arr[rec.slot] = values
        assert "does not match the checksum" in verify_dataset(store).damaged[cid]
        writable.commit(cid, rec.slot, rec.content_hash,
                        {**rec.attrs, "checksums": {**sha, "brain": "md5:00"}})
        assert "unknown checksum algorithm 'md5'" in verify_dataset(store).damaged[cid]

    def test_a_truncated_case_record_hides_the_case_until_a_rerun_repairs_it(self, ingested, source, clean):
        url, store = ingested
        cid = sorted(clean)[3]
        path = Path(url) / "d" / "_xrai" / "cases" / store_key(cid) / "zarr.json"
        path.write_text(path.read_text()[:40])
        assert cid not in store.committed()
        report = verify_dataset(store)
        assert not report.ok
        assert list(report.unreadable_records) == [store_key(cid)]
        run_stats(url, "d", scheduler="synchronous")  # the others still work
        ingest(source, url, "d", grid=GRID)
        assert_identical_to_clean(url, clean)

    def test_verify_command_exit_codes(self, ingested, clean):
        from typer.testing import CliRunner

        from pipeline.cli import app

        url, store = ingested
        runner = CliRunner()
        ok = runner.invoke(app, ["verify", "--store", url, "--dataset", "d"])
        assert ok.exit_code == 0
        assert f"{N_CASES} intact, 0 damaged" in ok.output
        _chunk(url, store, sorted(clean)[0], "brain").unlink()
        bad = runner.invoke(app, ["verify", "--store", url, "--dataset", "d"])
        assert bad.exit_code == 1
        assert sorted(clean)[0] in bad.output
        assert "missing" in bad.output


# -------------------------------------------------------------------------- full disk
_FSIZE_SCRIPT = """
import resource, sys
from pathlib import Path
from typing import ClassVar
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
from pipeline.errors import StoreFull
from pipeline.ingest import ingest
from pipeline.store import Grid
try:
    ingest(Path(sys.argv[1]), sys.argv[2], "d", grid=Grid(spacing=(1.5, 1.5, 1.5), shape=(48, 48, 32)))
except StoreFull as err:
    print("FULL:", err)
    sys.exit(1)
"""


class TestFullDisk:
    def test_a_file_size_limit_stops_the_run_cleanly(self, source, clean, tmp_path):
        url = str(tmp_path / "s.zarr")
        proc = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(source), url, "20000"],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "FULL: the store" in proc.stdout
        assert "File too large" in proc.stdout
        assert "while writing case 'XRAI-PHANTOM-" in proc.stdout
        assert "not attempted" in proc.stdout
        assert not list(Path(url).rglob("*.partial"))
        assert DatasetStore.open(url, "d").committed() == {}
        ingest(source, url, "d", grid=GRID)  # space is back: the re-run completes
        assert_identical_to_clean(url, clean)

    def test_no_space_after_two_cases_keeps_them_and_names_the_third(self, source, clean, tmp_path,
                                                                    monkeypatch):
        url = str(tmp_path / "s.zarr")
        real = DatasetStore.write_case
        calls = []

        def write_case(self, slot, **arrays):
            calls.append(slot)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return real(self, slot, **arrays)

        monkeypatch.setattr(DatasetStore, "write_case", write_case)
        cases = discover(source, layout="brats")
        with pytest.raises(StoreFull, match=rf"case '{cases[2].case_id}'.*2 of 4 cases done, 2 not attempted"):
            ingest_cases(cases, url, "d", grid=GRID)
        assert sorted(DatasetStore.open(url, "d").committed()) == [c.case_id for c in cases[:2]]
        monkeypatch.setattr(DatasetStore, "write_case", real)
        ingest(source, url, "d", grid=GRID)
        assert_identical_to_clean(url, clean)


# ---------------------------------------------------------------------- orphaned workers
def _running(proc) -> bool:
    """Alive and not a zombie (an exited child nobody has reaped yet counts as gone)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_exit_within_seconds_of_a_killed_parent(tmp_path):
    import psutil

    src = tmp_path / "src"
    write_phantom(src, cases=10, seed=5, shape=(96, 96, 64))
    url = str(tmp_path / "s.zarr")
    grid = ["--spacing", "1", "1", "1", "--shape", "96", "96", "64"]
    cmd = [str(Path(sys.executable).with_name("xrai")), "ingest", str(src), "--store", url, "--dataset",
           "d", "--workers", "2", *grid]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = Path(url) / "d" / "_xrai" / "cases"
    deadline = time.monotonic() + 120

    def records() -> list[str]:
        return sorted(p.name for p in cases.iterdir() if p.is_dir()) if cases.exists() else []

    while time.monotonic() < deadline and not records():
        time.sleep(0.05)
    workers = psutil.Process(parent.pid).children(recursive=True)
    assert workers, "the ingest had no worker processes"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in workers):
        time.sleep(0.1)
    alive = [p.pid for p in workers if _running(p)]
    assert not alive, f"workers {alive} outlived their parent"
    committed = records()
    time.sleep(1.0)
    assert records() == committed  # nothing commits afterwards
    assert len(committed) < 10
    # the next run breaks the dead parent's lease at once and finishes the dataset
    done = subprocess.run([*cmd[:-len(grid) - 2], "--workers", "1", *grid], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    report = verify_dataset(DatasetStore.open(url, "d"))
    assert report.ok
    assert len(report.intact) == 10


# --------------------------------------------------------------------- keys and xarray
class TestKeysAndView:
    ODD: ClassVar[list[str]] = ["_case01", "case02 ", " case03", "zarr.json", ".hidden", "50%", "a\\b", "tab\there",
           "ünï", "UPENN-GBM-00001_11", "c", "%5Fcase01"]

    def test_store_keys_are_safe_and_distinct(self):
        keys = [store_key(i) for i in self.ODD]
        assert len(set(keys)) == len(keys)
        for key in keys:
            assert not key.startswith((".", "_", " "))
            assert not key.endswith(" ")
            assert "/" not in key
            assert "\\" not in key
            assert key != "zarr.json"
            assert all(32 < ord(ch) < 127 or ch == " " for ch in key)
        assert store_key("UPENN-GBM-00001_11") == "UPENN-GBM-00001_11"  # plain ids unchanged
        with pytest.raises(ValueError, match="empty"):
            store_key("")

    def test_odd_ids_round_trip_through_the_store(self, tmp_path):
        url = str(tmp_path / "s.zarr")
        grid = Grid(spacing=(1.0, 1.0, 1.0), shape=(4, 5, 3))
        store = DatasetStore.create(url, "d", grid=grid)
        slots = store.allocate(self.ODD)
        rng = np.random.default_rng(0)
        for cid in self.ODD:
            image = rng.random((4, 3, 5, 4), dtype=np.float32)
            sums = store.write_case(slots[cid], image=image, label=np.zeros((3, 5, 4), np.uint8),
                                    brain=image[0] > 0.5, annotated=np.ones(3, bool))
            store.commit(cid, slots[cid], "h", {"checksums": sums})
        store.quarantine("zarr.json", "test")
        store.compact()
        again = DatasetStore.open(url, "d")
        assert sorted(again.committed()) == sorted(set(self.ODD) - {"zarr.json"})
        assert list(again.quarantined()) == ["zarr.json"]
        assert verify_dataset(again).ok
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            view = xr.open_zarr(url, group="d")
        assert sorted(view.case.values.tolist()) == sorted(again.committed())

    def test_plain_xarray_shows_exactly_the_committed_cases(self, source, tmp_path):
        src = tmp_path / "src"
        shutil.copytree(source, src)
        bad = sorted(p for p in src.iterdir() if p.is_dir())[1]
        next(bad.glob("*t1n.nii.gz")).write_bytes(b"not a volume")
        url = str(tmp_path / "s.zarr")
        report = ingest(src, url, "d", grid=GRID)
        assert report.exit_code == 3
        store = DatasetStore.open(url, "d")
        assert store.n_slots == N_CASES - 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "consolidated metadata" warning either
            view = xr.open_zarr(url, group="d")
        ours = store.to_xarray()
        assert view.sizes["case"] == N_CASES - 1
        assert sorted(view.case.values.tolist()) == sorted(ours.case.values.tolist())
        assert bad.name not in view.case.values.tolist()
        for cid in ours.case.values:
            np.testing.assert_array_equal(view.image.sel(case=cid).values, ours.image.sel(case=cid).values)
        # trimmed slots leave no chunks behind
        assert sorted(int(p.name) for p in (Path(url) / "d" / "label" / "c").iterdir()) == [0, 1, 2]
        assert verify_dataset(store).ok


def test_compaction_interrupted_at_any_step_loses_nothing(source, clean, tmp_path, monkeypatch):
    """Stop the compaction after each of its writes in turn: every committed case stays
    readable and unchanged, and the next run finishes the job."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    first = sorted(p for p in src.iterdir() if p.is_dir())[0]
    next(first.glob("*t1n.nii.gz")).write_bytes(b"broken")  # slot 0 ends up a hole
    expected = {cid: sums for cid, sums in clean.items() if cid != first.name}
    real_array = DatasetStore._array
    step = 0
    while True:
        url = str(tmp_path / f"s{step}.zarr")
        calls = {"n": 0}

        def array(self, name, calls=calls, stop=step):
            if calls.get("compacting"):
                calls["n"] += 1
                if calls["n"] > stop:
                    raise KeyboardInterrupt("killed during compaction")
            return real_array(self, name)

        real_compact = DatasetStore.compact

        def compact(self, calls=calls, real_compact=real_compact):
            calls["compacting"] = True
            return real_compact(self)

        monkeypatch.setattr(DatasetStore, "_array", array)
        monkeypatch.setattr(DatasetStore, "compact", compact)
        try:
            ingest(src, url, "d", grid=GRID)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(DatasetStore, "_array", real_array)
        monkeypatch.setattr(DatasetStore, "compact", real_compact)
        store = DatasetStore.open(url, "d")
        assert sorted(store.committed()) == sorted(expected)
        assert verify_dataset(store).ok
        ingest(src, url, "d", grid=GRID)  # the next run compacts
        assert_identical_to_clean(url, expected)
        if finished:
            break
        step += 1
    assert step >= 6  # four arrays copied, the case id, the record, the old slot cleared
