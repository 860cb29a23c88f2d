"""Issue 11, item 5: junk and odd folders next to the cases of a local collection.

System and tool litter (``__MACOSX``, ``.ipynb_checkpoints``, ``Thumbs.db``, ...) is skipped
at every level discovery walks; a folder that stands where a case folder would but holds
no case becomes a quarantine case named after the folder; unusual but legitimate names
(``_case01``, ``case02 ``, ``zarr.json``) are case ids exactly as written.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.sources import local
from pipeline.sources.base import CaseSource
from pipeline.sources.local import LOOKED_FOR, detect_layout, discover, is_junk
from tests.io import write_mr_series

BRATS23 = ("-t1n", "-t1c", "-t2w", "-t2f", "-seg")
UCSF = ("T1", "T1c", "T2", "FLAIR", "tumor_segmentation")
UPENN = ("T1", "T1GD", "T2", "FLAIR")
DICOM_SERIES = ("AX T1 PRE", "AX T1 POST GAD", "AX T2", "AX FLAIR")

#: First bytes of an AppleDouble resource fork (magic 0x00051607, RFC 1740).
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\x00" * 74

JUNK_FOLDERS = [
    "__MACOSX",
    ".ipynb_checkpoints",
    ".git",
    "@eaDir",
    "$RECYCLE.BIN",
    "$Recycle.Bin",
    "lost+found",
    "System Volume Information",
    "#recycle",
    "__pycache__",
]
JUNK_FILES = [".DS_Store", "Thumbs.db", "desktop.ini", "Icon\r"]


def nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    return path


# --------------------------------------------------------------------------- builders
# Each returns the folders at which junk is planted: the root, a folder holding case
# folders and a case folder (and, for DICOM, a series folder).


def brats_case(folder: Path, case_id: str) -> None:
    for s in BRATS23:
        nifti(folder / f"{case_id}{s}.nii.gz")


def build_brats(root: Path) -> list[Path]:
    for case_id in ("A", "B"):
        brats_case(root / case_id, case_id)
    return [root, root / "A"]


def build_ucsf(root: Path) -> list[Path]:
    # File names whose id differs from the folder's ("P-005" in "P-0005_nifti") are found
    # by the single-match fallback, which an AppleDouble twin must not make ambiguous.
    for folder, file_id in (("P-0004", "P-0004"), ("P-0005", "P-005")):
        for m in UCSF:
            nifti(root / f"{folder}_nifti" / f"{file_id}_{m}.nii.gz")
    return [root, root / "P-0005_nifti"]


def upenn_case(base: Path, case_id: str) -> None:
    for m in UPENN:
        nifti(base / "images_structural" / case_id / f"{case_id}_{m}.nii.gz")
    nifti(base / "images_segm" / f"{case_id}_segm.nii.gz")


def build_upenn(root: Path) -> list[Path]:
    base = root / "UPENN-GBM" / "NIfTI-files"
    for case_id in ("UPENN-GBM-00001_11", "UPENN-GBM-00002_11"):
        upenn_case(base, case_id)
    structural = base / "images_structural"
    return [root, structural, structural / "UPENN-GBM-00001_11"]


def dicom_case(folder: Path, seed: int = 0) -> None:
    for n, desc in enumerate(DICOM_SERIES, 1):
        write_mr_series(
            folder / f"s{n}", description=desc, series_number=n, n_slices=2, rows=4, cols=4,
            seed=seed + n,
        )  # fmt: skip


def build_dicom(root: Path) -> list[Path]:
    dicom_case(root / "P1")
    dicom_case(root / "P2", seed=10)
    return [root, root / "P1", root / "P1" / "s1"]


BUILDERS = {"brats": build_brats, "ucsf": build_ucsf, "upenn": build_upenn, "dicom": build_dicom}


def plant_junk_folder(level: Path, name: str) -> None:
    """``level/name`` holding a copy of everything in ``level`` and AppleDouble twins."""
    junk = level / name
    entries = sorted(level.iterdir())
    junk.mkdir()
    for entry in entries:
        if entry.is_dir():
            shutil.copytree(entry, junk / entry.name)
        else:
            shutil.copy(entry, junk / entry.name)
            (junk / f"._{entry.name}").write_bytes(APPLEDOUBLE)


def plant_junk_file(level: Path, name: str) -> None:
    (level / name).write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 200)


def plant_appledouble(level: Path) -> None:
    """``._<name>`` resource forks next to every entry, as macOS writes on non-HFS disks."""
    for entry in sorted(level.iterdir()):
        (level / f"._{entry.name}").write_bytes(APPLEDOUBLE)


# --------------------------------------------------------------------------- junk


class TestJunkIsSkipped:
    @pytest.mark.parametrize("layout", sorted(BUILDERS))
    @pytest.mark.parametrize("name", JUNK_FOLDERS)
    def test_issue11_junk_folder_at_every_level(
        self, tmp_path: Path, layout: str, name: str
    ) -> None:
        root = tmp_path / "data"
        levels = BUILDERS[layout](root)
        clean = discover(root)
        for level in levels:
            plant_junk_folder(level, name)
        assert detect_layout(root) == layout
        assert discover(root) == clean

    @pytest.mark.parametrize("layout", sorted(BUILDERS))
    @pytest.mark.parametrize("name", [*JUNK_FILES, "._ (AppleDouble)"])
    def test_issue11_junk_file_at_every_level(self, tmp_path: Path, layout: str, name: str) -> None:
        root = tmp_path / "data"
        levels = BUILDERS[layout](root)
        clean = discover(root)
        for level in levels:
            if name.startswith("._"):
                plant_appledouble(level)
            else:
                plant_junk_file(level, name)
        assert discover(root) == clean

    def test_every_kind_of_junk_at_once_leaves_the_phantom_cases(self, tmp_path: Path) -> None:
        from pipeline.sources.phantom import write_phantom

        root = tmp_path / "src"
        write_phantom(root, cases=2, seed=3, shape=(40, 40, 32))
        clean = discover(root)
        first = clean[0].case_id
        macosx = root / "__MACOSX" / first
        macosx.mkdir(parents=True)
        for path in sorted((root / first).iterdir()):
            (macosx / f"._{path.name}").write_bytes(APPLEDOUBLE)
            (root / first / f"._{path.name}").write_bytes(APPLEDOUBLE)
        shutil.copytree(root / first, root / ".ipynb_checkpoints" / first)
        (root / ".git").mkdir()
        (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (root / "@eaDir" / f"{first}-t1n.nii.gz").mkdir(parents=True)
        (root / "@eaDir" / f"{first}-t1n.nii.gz" / "SYNOINDEX_MEDIA_INFO").write_text("x")
        (root / "$RECYCLE.BIN").mkdir()
        (root / "$RECYCLE.BIN" / "desktop.ini").write_text("[.ShellClassInfo]\n")
        (root / "lost+found").mkdir()
        for name in (".DS_Store", "Thumbs.db"):
            plant_junk_file(root, name)
            plant_junk_file(root / first, name)
        assert discover(root) == clean

    def test_junk_does_not_change_the_detected_layout(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        build_brats(root)
        # A macOS archive of some other UPENN-like tree: its images_structural folder
        # would otherwise make the layout "upenn".
        (root / "__MACOSX" / "x" / "images_structural" / "y").mkdir(parents=True)
        assert detect_layout(root) == "brats"

    def test_junk_does_not_use_up_the_dicom_detection_budget(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        root = tmp_path / "data"
        build_dicom(root)
        thumbs = root / "@eaDir"  # sorts (and is walked) before the patient folders
        thumbs.mkdir()
        for n in range(5):
            (thumbs / f"SYNOFILE_THUMB_{n}.jpg").write_bytes(b"\xff\xd8")
        monkeypatch.setattr(local, "DETECT_MAX_FILES", 3)
        assert detect_layout(root) == "dicom"

    @pytest.mark.parametrize(
        ("name", "junk"),
        [
            ("__MACOSX", True),
            ("__macosx", True),
            ("._BraTS-GLI-00000-000-t1n.nii.gz", True),
            (".DS_Store", True),
            (".ipynb_checkpoints", True),
            ("Thumbs.db", True),
            ("$Recycle.Bin", True),
            ("@eaDir", True),
            ("lost+found", True),
            ("_case01", False),
            ("__case", False),
            ("case02 ", False),
            (" case03", False),
            ("zarr.json", False),
            ("BraTS-GLI-00000-000", False),
        ],
    )
    def test_is_junk(self, name: str, junk: bool) -> None:
        assert is_junk(name) is junk


# --------------------------------------------------------------------------- odd folders


def assert_quarantined(case: CaseSource, folder: Path, layout: str, holds: str) -> None:
    """An empty case named after ``folder`` whose ``missing`` names it first (the path the
    ingest records as ``missing[0].split(": ", 1)[-1]``), then says what it holds."""
    assert case.case_id == folder.name
    assert case.images == {}
    assert case.label is None
    assert case.missing[0] == f"volumes: {folder}"
    assert case.missing[1] == f"{folder.name!r} {holds}; expected {LOOKED_FOR[layout]}"


class TestOddFoldersAreQuarantined:
    @pytest.mark.parametrize("require_label", [True, False])
    def test_issue11_brats_folders_without_a_case(
        self, tmp_path: Path, require_label: bool
    ) -> None:
        root = tmp_path / "data"
        build_brats(root)
        (root / "empty").mkdir()
        (root / "only-litter").mkdir()
        plant_junk_file(root / "only-litter", ".DS_Store")
        plant_junk_file(root / "only-litter", "Thumbs.db")
        nifti(root / "unrecognised" / "brain.nii.gz")
        (root / "unrecognised" / "T1.mha").write_bytes(b"x")
        (root / "download").mkdir()
        (root / "download" / "C-t1n.nii.gz.part").write_bytes(b"x")
        (root / "nested" / "deeper").mkdir(parents=True)
        (root / "docs").mkdir()  # documentation only: skipped, as the dicom layout does
        (root / "docs" / "readme.txt").write_text("x")
        (root / "docs" / "mapping.csv").write_text("a,b\n")
        cases = discover(root, require_label=require_label)
        by_id = {c.case_id: c for c in cases}
        assert [c.case_id for c in cases] == [
            "A", "B", "download", "empty", "nested", "only-litter", "unrecognised",
        ]  # fmt: skip
        assert by_id["A"].missing == by_id["B"].missing == ()
        empty = "holds no files (system litter such as .DS_Store ignored)"
        assert_quarantined(by_id["empty"], root / "empty", "brats", empty)
        assert_quarantined(by_id["only-litter"], root / "only-litter", "brats", empty)
        assert_quarantined(by_id["nested"], root / "nested", "brats", empty)
        assert_quarantined(
            by_id["unrecognised"],
            root / "unrecognised",
            "brats",
            "holds no brats case, only ['T1.mha', 'brain.nii.gz']",
        )
        assert_quarantined(
            by_id["download"], root / "download", "brats",
            "holds no brats case, only ['C-t1n.nii.gz.part']",
        )  # fmt: skip

    def test_long_listings_are_cut(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        build_brats(root)
        for n in range(7):
            (root / "many" / f"f{n}.bin").parent.mkdir(exist_ok=True)
            (root / "many" / f"f{n}.bin").write_bytes(b"x")
        many = discover(root)[-1]
        assert_quarantined(
            many, root / "many", "brats",
            "holds no brats case, only ['f0.bin', 'f1.bin', 'f2.bin', 'f3.bin', 'f4.bin'] "
            "and 2 more",
        )  # fmt: skip

    def test_brats_candidates_are_the_neighbours_of_case_folders(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        brats_case(root / "train" / "A", "A")
        (root / "train" / "B").mkdir()  # next to a case folder: a candidate
        (root / "other").mkdir()  # next to 'train', which holds case folders: not one
        cases = discover(root)
        assert [c.case_id for c in cases] == ["A", "B"]
        assert cases[1].missing[0] == f"volumes: {root / 'train' / 'B'}"

    def test_issue11_ucsf_folder_without_the_nifti_suffix_and_a_bare_nifti_folder(
        self, tmp_path: Path
    ) -> None:
        root = tmp_path / "data"
        build_ucsf(root)
        nifti(root / "P-0007" / "P-0007_T1.nii.gz")
        (root / "_nifti").mkdir()
        cases = discover(root)
        assert [c.case_id for c in cases] == ["P-0004", "P-0005", "P-0007", "_nifti"]
        assert_quarantined(
            cases[2], root / "P-0007", "ucsf", "holds no ucsf case, only ['P-0007_T1.nii.gz']"
        )
        assert_quarantined(cases[3], root / "_nifti", "ucsf", "has no case id before '_nifti'")

    def test_issue11_dicom_folders_without_dicom(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        build_dicom(root)
        (root / "P3").mkdir()
        nifti(root / "P4" / "t1.nii.gz")
        (root / "metadata").mkdir()  # as before: documentation only is not a patient
        (root / "metadata" / "summary.csv").write_text("a,b\n")
        cases = discover(root)
        assert [c.case_id for c in cases] == ["P1", "P2", "P3", "P4"]
        assert_quarantined(
            cases[2],
            root / "P3",
            "dicom",
            "holds no files (system litter such as .DS_Store ignored)",
        )
        assert_quarantined(
            cases[3], root / "P4", "dicom", "holds no dicom case, only ['t1.nii.gz']"
        )

    def test_upenn_empty_case_folder_lists_every_channel_as_before(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        build_upenn(root)
        structural = root / "UPENN-GBM" / "NIfTI-files" / "images_structural"
        (structural / "UPENN-GBM-00003_11").mkdir()
        case = discover(root)[-1]
        assert case.case_id == "UPENN-GBM-00003_11"
        assert case.missing[0] == (
            f"t1n: {structural / 'UPENN-GBM-00003_11' / 'UPENN-GBM-00003_11_T1.nii.gz'}"
        )
        assert len(case.missing) == 5  # four channels and the label

    def test_only_odd_folders_is_still_no_case(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        (root / "empty").mkdir(parents=True)
        with pytest.raises(ValueError, match=r"no dicom cases in '.*data': looked for patient"):
            discover(root, layout="dicom")
        with pytest.raises(ValueError, match=r"no brats cases in '.*data'"):
            discover(root, layout="brats")


# --------------------------------------------------------------------------- odd names

ODD_IDS = ["_case01", "case02 ", " case03", "zarr.json", "__x"]


class TestOddNamesAreKept:
    def test_issue11_brats(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        for case_id in ODD_IDS:
            brats_case(root / case_id, case_id)
        cases = discover(root)
        assert [c.case_id for c in cases] == sorted(ODD_IDS)
        assert all(c.missing == () for c in cases)
        zarr = next(c for c in cases if c.case_id == "zarr.json")
        assert zarr.images["t1n"].paths == (root / "zarr.json" / "zarr.json-t1n.nii.gz",)

    def test_issue11_ucsf(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        for case_id in ODD_IDS:
            for m in UCSF:
                nifti(root / f"{case_id}_nifti" / f"{case_id}_{m}.nii.gz")
        cases = discover(root)
        assert [c.case_id for c in cases] == sorted(ODD_IDS)
        assert all(c.missing == () for c in cases)

    def test_issue11_upenn(self, tmp_path: Path) -> None:
        base = tmp_path / "data" / "NIfTI-files"
        for case_id in ODD_IDS:
            upenn_case(base, case_id)
        cases = discover(tmp_path / "data")
        assert [c.case_id for c in cases] == sorted(ODD_IDS)
        assert all(c.missing == () for c in cases)

    def test_issue11_dicom(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        for n, case_id in enumerate(("_case01", "case02 ", "zarr.json")):
            dicom_case(root / case_id, seed=10 * n)
        cases = discover(root, require_label=False)
        assert [c.case_id for c in cases] == ["_case01", "case02 ", "zarr.json"]
        assert all(c.missing == () for c in cases)

    def test_a_trailing_space_makes_a_different_id(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        brats_case(root / "A", "A")
        brats_case(root / "A ", "A ")
        assert [c.case_id for c in discover(root)] == ["A", "A "]


class TestDuplicateIds:
    def test_issue11_ucsf_case_and_unusable_folder_of_the_same_id(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        build_ucsf(root)
        (root / "P-0004").mkdir()
        (root / "P-0004" / "P-0004.zip").write_bytes(b"PK")
        first = root / "P-0004_nifti" / "P-0004_T1.nii.gz"
        with pytest.raises(
            ValueError,
            match=(
                rf"case id 'P-0004' occurs twice in '.*data': at '{re.escape(str(first))}' and at "
                rf"'{re.escape(str(root / 'P-0004'))}' \(the ucsf layout takes the id from the name of the "
                r"'<ID>_nifti' folder without '_nifti'.*\); case ids must be unique"
            ),
        ):
            discover(root)

    def test_brats_2021_and_2023_names_of_one_id(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        for s in ("_t1", "_t1ce", "_t2", "_flair", "_seg"):
            nifti(root / "x" / f"A{s}.nii.gz")
        brats_case(root / "y", "A")
        with pytest.raises(
            ValueError,
            match=(
                rf"case id 'A' occurs twice in '.*data': at '{re.escape(str(root / 'x' / 'A_t1.nii.gz'))}' "
                rf"and at '{re.escape(str(root / 'y' / 'A-t1n.nii.gz'))}' \(the brats layout takes the id "
                r"from the file-name prefix"
            ),
        ):
            discover(root)
