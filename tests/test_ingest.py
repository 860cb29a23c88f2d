"""Ingest end to end: phantom and DICOM sources, incremental re-runs, quarantine, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.ingest import ingest
from pipeline.sources.phantom import write_phantom
from pipeline.store import DatasetStore, Grid

GRID = Grid(spacing=(1.5, 1.5, 1.5), shape=(64, 64, 48))
SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root, cases=4, seed=3, shape=SHAPE)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _file(root: Path, case_index: int, suffix: str) -> Path:
    case = sorted(p for p in root.iterdir() if p.is_dir())[case_index]
    return case / f"{case.name}-{suffix}.nii.gz"


def _arrays(url: str) -> dict[str, dict[str, np.ndarray]]:
    store = DatasetStore.open(url, "ds")
    return {cid: store.read_case(cid) for cid in store.committed()}


class TestIncremental:
    def test_first_run_then_unchanged_then_one_changed(self, phantom_dir, tmp_path):
        src = _copy(phantom_dir, tmp_path / "src")
        url = str(tmp_path / "s.zarr")
        first = ingest(src, url, "ds", grid=GRID)
        assert [o.status for o in first.outcomes] == ["ingested"] * 4
        assert first.exit_code == 0
        again = ingest(src, url, "ds", grid=GRID)
        assert [o.status for o in again.outcomes] == ["unchanged"] * 4
        # change one channel of case 2: only that case is re-ingested
        path = _file(src, 2, "t2w")
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2, img.affine, img.header), path)
        third = ingest(src, url, "ds", grid=GRID)
        assert [o.status for o in third.outcomes] == ["unchanged", "unchanged", "ingested", "unchanged"]
        ds = DatasetStore.open(url, "ds").to_xarray()
        assert ds.sizes["case"] == 4
        assert set(np.unique(ds.label.values)) <= {0, 1, 2, 3}
        rec = ds.attrs["cases"][ds.case.values[0]]
        assert len(rec["sources"]) == 5
        assert all(len(s["sha256"]) == 64 for s in rec["sources"])
        assert {"spacing", "orientation", "size"} <= set(rec["volumes"]["t1n"])

    def test_phantom_orientations_and_spacings_are_recorded(self, phantom_dir, tmp_path):
        url = str(tmp_path / "s.zarr")
        ingest(phantom_dir, url, "ds", grid=GRID)
        recs = DatasetStore.open(url, "ds").committed()
        orientations = {r.attrs["volumes"]["t1n"]["orientation"] for r in recs.values()}
        spacings = {tuple(r.attrs["volumes"]["t1n"]["spacing"]) for r in recs.values()}
        assert len(orientations) >= 2, orientations
        assert len(spacings) >= 2, spacings


def test_label_stored_in_another_orientation_ends_exactly_on_the_tumour(phantom_dir, tmp_path):
    """Issue 2: the segmentation file stored with flipped axes (and the affine saying so)."""
    src = _copy(phantom_dir, tmp_path / "src")
    seg = _file(src, 0, "seg")
    img = nib.load(seg)
    data = np.asarray(img.dataobj)
    flip = np.eye(4)
    for axis in (0, 2):  # reverse x and z in storage; the affine keeps world positions
        flip[axis, axis] = -1.0
        flip[axis, 3] = data.shape[axis] - 1
    flipped = nib.Nifti1Image(np.ascontiguousarray(data[::-1, :, ::-1]), img.affine @ flip)
    assert nib.aff2axcodes(flipped.affine) != nib.aff2axcodes(img.affine)
    nib.save(flipped, seg)
    ours, ref = str(tmp_path / "ours.zarr"), str(tmp_path / "ref.zarr")
    # case 0 is stored at 1 mm: on a 1 mm grid every target voxel is a source voxel, so
    # nearest-neighbour sampling has no half-way ties and the result must be exact
    grid = Grid(spacing=(1.0, 1.0, 1.0), shape=(56, 56, 40))
    assert ingest(src, ours, "ds", grid=grid).exit_code == 0
    assert ingest(phantom_dir, ref, "ds", grid=grid).exit_code == 0
    cid = seg.parent.name
    got = DatasetStore.open(ours, "ds").read_case(cid)
    want = DatasetStore.open(ref, "ds").read_case(cid)
    assert int((want["label"] > 0).sum()) > 0
    np.testing.assert_array_equal(got["label"], want["label"])
    rec = DatasetStore.open(ours, "ds").committed()[cid].attrs
    assert "label-resampled-from-other-geometry" in rec["flags"]


class TestQuarantine:
    """Every kind of bad input is quarantined with file and value; the rest is ingested."""

    def _run(self, src: Path, tmp_path: Path):
        report = ingest(src, str(tmp_path / "s.zarr"), "ds", grid=GRID)
        bad = report.by_status("quarantined")
        good = [o for o in report.outcomes if o.status == "ingested"]
        return report, bad, good

    @pytest.mark.parametrize(
        ("damage", "expected"),
        [
            ("truncated", r"-t1c\.nii\.gz"),
            ("missing", r"missing t2f: .*-t2f\.nii\.gz"),
            ("label_values", r"-seg\.nii\.gz: label values \[9\] are outside the scheme"),
            ("far_label", r"-seg\.nii\.gz: label does not overlap the images"),
            ("nan", r"-t2w\.nii\.gz: channel t2w has \d+ non-finite voxel\(s\), first nan"),
            ("all_zero", r"-t1n\.nii\.gz: channel t1n is all zero"),
            ("two_d", r"-t2w\.nii\.gz: has shape \(\d+, \d+\); expected a 3D"),
            ("four_d", r"-t2w\.nii\.gz: has shape \(\d+, \d+, \d+, 3\)"),
        ],
    )
    def test_bad_case_is_quarantined_and_the_rest_ingested(self, phantom_dir, tmp_path, damage,
                                                           expected):
        src = _copy(phantom_dir, tmp_path / "src")
        if damage == "truncated":
            p = _file(src, 1, "t1c")
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif damage == "missing":
            _file(src, 1, "t2f").unlink()
        elif damage in ("label_values", "far_label"):
            p = _file(src, 1, "seg")
            img = nib.load(p)
            data = np.asarray(img.dataobj).copy()
            affine = img.affine.copy()
            if damage == "label_values":
                data[0, 0, 0] = 9
            else:
                affine[:3, 3] += 1000.0
            nib.save(nib.Nifti1Image(data, affine), p)
        else:
            p = _file(src, 1, {"nan": "t2w", "all_zero": "t1n", "two_d": "t2w",
                               "four_d": "t2w"}[damage])
            img = nib.load(p)
            data = np.asarray(img.dataobj).astype(np.float32)
            if damage == "nan":
                data[10, 10, 10] = np.nan
            elif damage == "all_zero":
                data[:] = 0
            elif damage == "two_d":
                data = data[:, :, 0]
            else:
                data = np.stack([data] * 3, axis=-1)
            nib.save(nib.Nifti1Image(data, img.affine), p)
        report, bad, good = self._run(src, tmp_path)
        assert len(bad) == 1
        assert len(good) == 3
        assert bad[0].case_id == sorted(q.name for q in src.iterdir())[1]
        assert bad[0].path is not None
        import re

        assert re.search(expected, bad[0].reason), bad[0].reason
        assert report.exit_code == 3
        store = DatasetStore.open(str(tmp_path / "s.zarr"), "ds")
        assert set(store.quarantined()) == {bad[0].case_id}
        assert len(store.committed()) == 3

    def test_unchanged_broken_case_is_not_read_again(self, phantom_dir, tmp_path, monkeypatch):
        src = _copy(phantom_dir, tmp_path / "src")
        _file(src, 2, "t1n").write_bytes(b"not a nifti")
        url = str(tmp_path / "s.zarr")
        first = ingest(src, url, "ds", grid=GRID).by_status("quarantined")

        def no_read(case):
            raise AssertionError(f"{case.case_id} was read again")

        monkeypatch.setattr("pipeline.ingest.read_case", no_read)
        again = ingest(src, url, "ds", grid=GRID)
        assert again.by_status("quarantined") == [
            type(first[0])(first[0].case_id, "quarantined", first[0].reason, first[0].path,
                           again.by_status("quarantined")[0].seconds)]
        assert len(again.by_status("unchanged")) == 3

    def test_a_repaired_case_leaves_quarantine(self, phantom_dir, tmp_path):
        src = _copy(phantom_dir, tmp_path / "src")
        p = _file(src, 0, "t1n")
        original = p.read_bytes()
        p.write_bytes(b"not a nifti")
        url = str(tmp_path / "s.zarr")
        assert ingest(src, url, "ds", grid=GRID).exit_code == 3
        p.write_bytes(original)
        report = ingest(src, url, "ds", grid=GRID)
        assert report.exit_code == 0
        store = DatasetStore.open(url, "ds")
        assert store.quarantined() == {}
        assert len(store.committed()) == 4


class TestDicom:
    def test_dicom_patient_with_seg_and_an_unreadable_file(self, tmp_path):
        from tests.io import write_mr_series, write_seg

        root = tmp_path / "dicom"
        kw = {"n_slices": 6, "rows": 24, "cols": 24, "pixel_spacing": (1.0, 1.0), "slice_gap": 2.0}
        for pid in ("P001", "P002"):
            series = {}
            for i, desc in enumerate(["AX T1 PRE", "AX T1 POST GAD", "AX T2", "AX FLAIR"]):
                series[desc] = write_mr_series(root / pid / desc.replace(" ", "_"), description=desc,
                                               patient_id=pid, series_number=i + 1, seed=i, **kw)
            tumour = np.zeros((6, 24, 24), bool)
            tumour[2:4, 8:14, 9:15] = True
            ventricles = np.zeros_like(tumour)
            ventricles[1:5, 2:5, 2:5] = True
            write_seg(root / pid / "seg" / "seg.dcm", series["AX T1 POST GAD"],
                      {"Tumor": tumour, "Ventricles": ventricles})
        garbage = root / "P002" / "AX_T2" / "broken.dcm"
        garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
        url = str(tmp_path / "s.zarr")
        report = ingest(root, url, "ds", layout="dicom", grid=Grid(shape=(32, 32, 16)))
        status = {o.case_id: o for o in report.outcomes}
        assert status["P001"].status == "ingested", status["P001"].reason
        assert status["P002"].status == "quarantined"
        assert "broken.dcm" in status["P002"].reason
        case = DatasetStore.open(url, "ds").read_case("P001")
        # 2 slices x 6 x 6 voxels of 1x1x2 mm = 144 mm^3 of tumour; on the 1 mm grid ~144 voxels
        assert 100 <= int((case["label"] > 0).sum()) <= 200
        assert set(np.unique(case["label"])) == {0, 1}


def _ingest_cmd(src: Path, url: str) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import app; app()", "ingest", str(src),
            "--store", url, "--dataset", "ds", "--spacing", "1.5", "1.5", "1.5",
            "--shape", "64", "64", "48"]


@pytest.mark.slow
def test_killed_ingest_leaves_a_readable_store_and_the_rerun_finishes(tmp_path):
    src = tmp_path / "src"
    write_phantom(src, cases=8, seed=11, shape=SHAPE)
    reference = str(tmp_path / "ref.zarr")
    ingest(src, reference, "ds", grid=GRID)
    url = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen(_ingest_cmd(src, url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    cases_dir = Path(url) / "ds" / "_xrai" / "cases"
    while time.time() < deadline:
        # a case is committed once its record's zarr.json exists (its folder comes first)
        done = list(cases_dir.glob("*/zarr.json")) if cases_dir.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = DatasetStore.open(url, "ds")
    visible = store.to_xarray()  # opens cleanly
    assert 2 <= visible.sizes["case"] < 8
    for cid in store.committed():  # what is visible is complete
        np.testing.assert_array_equal(store.read_case(cid)["image"],
                                      DatasetStore.open(reference, "ds").read_case(cid)["image"])
    result = subprocess.run(_ingest_cmd(src, url), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ours, ref = _arrays(url), _arrays(reference)
    assert set(ours) == set(ref)
    for cid in ref:
        for key in ("image", "label", "brain", "annotated"):
            np.testing.assert_array_equal(ours[cid][key], ref[cid][key], err_msg=f"{cid} {key}")


class TestCli:
    def test_exit_codes_and_summary(self, phantom_dir, tmp_path):
        src = _copy(phantom_dir, tmp_path / "src")
        runner = CliRunner()
        args = ["ingest", str(src), "--store", str(tmp_path / "s.zarr"), "--dataset", "ds",
                "--spacing", "1.5", "1.5", "1.5", "--shape", "64", "64", "48"]
        ok = runner.invoke(app, args)
        assert ok.exit_code == 0, ok.output
        assert "4 ingested, 0 unchanged, 0 quarantined" in ok.output
        _file(src, 3, "t1c").write_bytes(b"garbage")
        partial = runner.invoke(app, args)
        assert partial.exit_code == 3, partial.output
        assert "3 unchanged, 1 quarantined" in partial.output

    def test_nothing_usable_is_exit_1(self, tmp_path):
        src = tmp_path / "src"
        write_phantom(src, cases=2, seed=1, shape=SHAPE)
        for case in src.iterdir():
            (case / f"{case.name}-t1n.nii.gz").write_bytes(b"x")
        result = CliRunner().invoke(app, ["ingest", str(src), "--store", str(tmp_path / "s.zarr"),
                                          "--dataset", "ds"])
        assert result.exit_code == 1, result.output

    def test_missing_source_folder_is_a_clear_error(self, tmp_path):
        result = CliRunner().invoke(app, ["ingest", str(tmp_path / "nope"), "--store",
                                          str(tmp_path / "s.zarr"), "--dataset", "ds"])
        assert result.exit_code == 2  # a usage error (issue 12), as the README says
        assert "does not exist" in " ".join(result.output.replace("│", " ").split())  # boxed


@pytest.mark.slow
def test_parallel_workers_give_the_same_store(phantom_dir, tmp_path):
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    ingest(phantom_dir, one, "ds", grid=GRID, workers=1)
    report = ingest(phantom_dir, two, "ds", grid=GRID, workers=2)
    assert report.exit_code == 0
    a, b = _arrays(one), _arrays(two)
    for cid in a:
        np.testing.assert_array_equal(a[cid]["image"], b[cid]["image"])
