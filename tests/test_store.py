from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store import DatasetStore, Grid

GRID = Grid(spacing=(1.0, 1.0, 2.0), shape=(6, 5, 4))


def _case(value: float):
    z, y, x = GRID.zyx
    image = np.full((4, z, y, x), value, dtype=np.float32)
    label = np.zeros((z, y, x), dtype=np.uint8)
    label[1, 2, 3] = 2
    return {"image": image, "label": label, "brain": image[0] > 0,
            "annotated": np.ones(z, dtype=bool)}


def test_new_store_opens_empty_with_grid_attributes(tmp_path):
    store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    assert store.committed() == {}
    ds = store.to_xarray()
    assert ds.sizes["case"] == 0
    assert ds.attrs["orientation"] == "LPS"
    assert ds.attrs["shape"] == [6, 5, 4]
    assert list(ds.channel.values) == ["t1n", "t1c", "t2w", "t2f"]


def test_reopening_with_another_grid_is_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    DatasetStore.create(url, "ds", grid=GRID)
    with pytest.raises(StoreError, match=r"was created with grid .*'shape': \[6, 5, 4\]"):
        DatasetStore.create(url, "ds", grid=Grid(spacing=(1.0, 1.0, 1.0), shape=(6, 5, 4)))


def test_only_committed_cases_are_visible(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = DatasetStore.create(url, "ds", grid=GRID)
    slots = store.allocate(["a", "b", "c"])
    assert slots == {"a": 0, "b": 1, "c": 2}
    for cid, value in (("a", 1.0), ("b", 2.0)):
        store.write_case(slots[cid], **_case(value))
    store.commit("a", slots["a"], "hash-a", {"note": "first"})
    # b is written but not committed (as after a kill): invisible
    ds = DatasetStore.open(url, "ds").to_xarray()
    assert list(ds.case.values) == ["a"]
    assert float(ds.image.sel(case="a").max()) == 1.0
    assert ds.attrs["cases"]["a"]["note"] == "first"
    assert int(ds.label.sel(case="a").sum()) == 2


def test_slots_are_stable_and_arrays_grow(tmp_path):
    store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    first = store.allocate([f"c{i}" for i in range(3)])
    again = store.allocate([f"c{i}" for i in range(20)])
    assert {k: again[k] for k in first} == first
    assert store.n_slots >= 20


def test_quarantine_hides_the_case_and_commit_clears_it(tmp_path):
    store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    slot = store.allocate(["a"])["a"]
    store.write_case(slot, **_case(1.0))
    store.commit("a", slot, "h1", {})
    store.quarantine("a", "a.nii.gz: all zero", "a.nii.gz", "h2")
    assert store.committed() == {}
    assert store.quarantined()["a"]["reason"] == "a.nii.gz: all zero"
    store.commit("a", slot, "h3", {})
    assert store.quarantined() == {}
    assert store.committed()["a"].content_hash == "h3"


def test_wrong_array_shape_is_refused(tmp_path):
    store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    slot = store.allocate(["a"])["a"]
    bad = _case(1.0)
    bad["label"] = bad["label"][:-1]
    with pytest.raises(StoreError, match=r"label \(3, 5, 6\)"):
        store.write_case(slot, **bad)


@pytest.mark.parametrize("name", ["", "a/b", "_x", ".hidden"])
def test_bad_dataset_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="dataset name must be a plain name"):
        DatasetStore.create(str(tmp_path / "s.zarr"), name, grid=GRID)


def test_missing_dataset_is_a_store_error(tmp_path):
    DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    with pytest.raises(StoreError, match="no dataset 'other'"):
        DatasetStore.open(str(tmp_path / "s.zarr"), "other")


def _committed_store(tmp_path, checksums: bool = True) -> DatasetStore:
    store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
    slot = store.allocate(["a"])["a"]
    arrays = _case(1.0)
    arrays["image"][2] = 3.0
    sums = store.write_case(slot, **arrays)
    store.commit("a", slot, "hash-a", {"checksums": sums} if checksums else {})
    return store


class TestIssue12StoreOwnsItsLayout:
    """Issue 12: readers and the statistics go through the store's methods, not its group."""

    def test_the_zarr_group_is_private(self, tmp_path):
        store = _committed_store(tmp_path)
        assert not hasattr(store, "group")

    def test_read_image_and_label_read_one_chunk_of_a_case(self, tmp_path):
        store = _committed_store(tmp_path)
        expected = _case(1.0)
        np.testing.assert_array_equal(store.read_label("a"), expected["label"])
        assert float(store.read_image("a", "t2w").max()) == 3.0
        assert float(store.read_image("a", "t1n").max()) == 1.0
        record = store.committed()["a"]
        np.testing.assert_array_equal(store.read_image("a", "t2w", record=record),
                                      store.read_case("a", record=record)["image"][2])
        assert store.label_scheme == store.to_xarray().attrs["label_scheme"]

    def test_read_image_and_label_refuse_what_is_not_there(self, tmp_path):
        store = _committed_store(tmp_path)
        with pytest.raises(ValueError, match=r"channel 'flair' is not one of \['t1n'"):
            store.read_image("a", "flair")
        with pytest.raises(KeyError, match=r"case 'b' is not committed"):
            store.read_label("b")

    def test_a_missing_label_chunk_is_named(self, tmp_path):
        from pathlib import Path

        from pipeline.store import CaseDamaged

        store = _committed_store(tmp_path)
        slot = store.committed()["a"].slot
        Path(store.url, "ds", "label", "c", str(slot), "0", "0", "0").unlink()
        with pytest.raises(CaseDamaged, match=r"case 'a' .*chunk 'ds/label/c/0/0/0/0' is missing"):
            store.read_label("a")
        assert float(store.read_image("a", "t1n").max()) == 1.0  # other chunks still read

    def test_partials_round_trip_and_currency(self, tmp_path):
        store = _committed_store(tmp_path)
        assert store.read_partials("a") is None
        assert not store.partials_current("a", "hash-a", "engine-1")
        store.write_partials("a", b"\x00blob\xff", content_hash="hash-a", fingerprint="engine-1")
        again = DatasetStore.open(store.url, "ds")
        assert again.read_partials("a") == b"\x00blob\xff"
        assert again.partials_current("a", "hash-a", "engine-1")
        assert not again.partials_current("a", "hash-b", "engine-1")
        assert not again.partials_current("a", "hash-a", "engine-2")
        store.write_partials("a", b"v2", content_hash="hash-b", fingerprint="engine-2")
        assert again.read_partials("a") == b"v2"
        assert again.partials_current("a", "hash-b", "engine-2")

    @pytest.mark.parametrize("case_id", ["_odd", "zarr.json", "a/b", "50%"])
    def test_partials_of_odd_case_ids(self, tmp_path, case_id):
        store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
        store.write_partials(case_id, b"x", content_hash="h", fingerprint="f")
        assert store.read_partials(case_id) == b"x"
        assert store.partials_current(case_id, "h", "f")

    def test_empty_partials_are_refused(self, tmp_path):
        store = DatasetStore.create(str(tmp_path / "s.zarr"), "ds", grid=GRID)
        with pytest.raises(ValueError, match=r"partials of case 'a' are empty"):
            store.write_partials("a", b"", content_hash="h", fingerprint="f")


def test_drop_partials_makes_the_next_statistics_run_compute_the_case(tmp_path):
    store = _committed_store(tmp_path)
    store.write_partials("a", b"blob", content_hash="hash-a", fingerprint="f")
    assert store.partials_current("a", "hash-a", "f")
    store.drop_partials("a")
    assert not store.partials_current("a", "hash-a", "f")
    assert store.read_partials("a") is None
    store.drop_partials("a")  # nothing left: a no-op
    assert "a" in store.committed()
