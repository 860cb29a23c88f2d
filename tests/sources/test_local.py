"""Discovery of cases in local folders laid out like the TCIA brain-tumour collections."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io import read_image, read_label
from pipeline.sources.base import CHANNELS
from pipeline.sources.local import (
    annotated_slices,
    axial_axis,
    classify_series,
    detect_layout,
    discover,
)
from tests.io import write_mr_series, write_seg


def nifti(path: Path, data: np.ndarray | None = None, aff: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((4, 4, 4), np.int16) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if aff is None else aff), path)
    return path


def tree(root: Path, names: list[str]) -> Path:
    for name in names:
        nifti(root / name)
    return root


BRATS21 = ["_t1", "_t1ce", "_t2", "_flair", "_seg"]
BRATS23 = ["-t1n", "-t1c", "-t2w", "-t2f", "-seg"]


class TestBrats:
    def test_2021_names(self, tmp_path: Path) -> None:
        names = [f"BraTS2021_00001/BraTS2021_00001{s}.nii.gz" for s in BRATS21]
        names += [f"BraTS2021_00000/BraTS2021_00000{s}.nii.gz" for s in BRATS21 if s != "_t1ce"]
        root = tree(tmp_path / "data", names)
        assert detect_layout(root) == "brats"
        cases = discover(root)
        assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
        full = cases[1]
        assert full.label_map == {4: 3}
        assert full.missing == ()
        assert full.images["t1c"].paths == (root / "BraTS2021_00001/BraTS2021_00001_t1ce.nii.gz",)
        assert full.images["t2f"].paths == (root / "BraTS2021_00001/BraTS2021_00001_flair.nii.gz",)
        assert full.label is not None
        assert full.label.paths == (root / "BraTS2021_00001/BraTS2021_00001_seg.nii.gz",)
        assert cases[0].missing == (f"t1c: {root}/BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz",)
        assert "t1c" not in cases[0].images

    @pytest.mark.parametrize("case_id", ["BraTS-GLI-00002-000", "BraTS-SSA-00041-000"])
    def test_2023_and_africa_names_flat(self, tmp_path: Path, case_id: str) -> None:
        root = tree(tmp_path / "data", [f"{case_id}{s}.nii" for s in BRATS23])
        [case] = discover(root, layout="brats")
        assert case.case_id == case_id
        assert case.label_map == {}
        assert case.missing == ()
        assert {c: r.paths[0].name for c, r in case.images.items()} == {
            c: f"{case_id}-{c}.nii" for c in CHANNELS
        }

    def test_missing_label_is_listed_unless_not_required(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "d", [f"A/A{s}.nii.gz" for s in BRATS23[:4]])
        [case] = discover(root)
        assert case.label is None
        assert case.missing == (f"label: {root}/A/A-seg.nii.gz",)
        [case] = discover(root, require_label=False)
        assert case.missing == ()

    def test_duplicate_case_ids_are_refused(self, tmp_path: Path) -> None:
        root = tree(
            tmp_path / "d", [f"{d}/A/A{s}.nii.gz" for d in ("train", "copy") for s in BRATS23]
        )
        with pytest.raises(ValueError, match=r"case id 'A' occurs twice"):
            discover(root)


class TestUpenn:
    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        base = tmp_path / "UPENN-GBM" / "NIfTI-files"
        names = []
        for case_id in ("UPENN-GBM-00001_11", "UPENN-GBM-00002_11", "UPENN-GBM-00003_21"):
            names += [
                f"images_structural/{case_id}/{case_id}_{m}.nii.gz"
                for m in ("T1", "T1GD", "T2", "FLAIR")
            ]
        names += [
            "images_segm/UPENN-GBM-00001_11_segm.nii.gz",
            "automated_segm/UPENN-GBM-00001_11_automated_approx_segm.nii.gz",
            "automated_segm/UPENN-GBM-00002_11_automated_approx_segm.nii.gz",
        ]
        tree(base, names)
        return tmp_path

    def test_manual_masks_only_by_default(self, root: Path) -> None:
        assert detect_layout(root) == "upenn"
        a, b, c = discover(root)
        base = root / "UPENN-GBM" / "NIfTI-files"
        assert a.label is not None
        assert a.label.paths == (base / "images_segm/UPENN-GBM-00001_11_segm.nii.gz",)
        assert a.label_map == {4: 3}
        assert a.flags == ()
        assert a.images["t1c"].paths[0].name == "UPENN-GBM-00001_11_T1GD.nii.gz"
        assert b.label is None
        assert len(b.missing) == 1
        assert b.missing[0].startswith(f"label: {base}/images_segm/UPENN-GBM-00002_11_segm.nii.gz")
        assert "automated mask" in b.missing[0]
        assert c.missing == (f"label: {base}/images_segm/UPENN-GBM-00003_21_segm.nii.gz",)

    def test_automated_masks_when_asked_and_flagged(self, root: Path) -> None:
        a, b, c = discover(root, layout="upenn", use_automated=True)
        assert a.label is not None
        assert a.label.paths[0].name == "UPENN-GBM-00001_11_segm.nii.gz"  # manual still wins
        assert a.flags == ()
        assert b.label is not None
        assert b.label.paths[0].name == "UPENN-GBM-00002_11_automated_approx_segm.nii.gz"
        assert b.flags == ("automated-segmentation",)
        assert b.missing == ()
        assert c.label is None


def test_ucsf_layout_with_ids_that_differ_between_folder_and_files(tmp_path: Path) -> None:
    names = [
        f"UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_{m}.nii.gz"
        for m in ("T1", "T1c", "T2", "FLAIR", "tumor_segmentation")
    ]
    names += ["UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_brain_segmentation.nii.gz"]
    names += [
        f"UCSF-PDGM-0005_nifti/UCSF-PDGM-005_{m}.nii.gz" for m in ("T1", "T1c", "T2", "FLAIR")
    ]
    root = tree(tmp_path / "PKG", names)
    assert detect_layout(root) == "ucsf"
    a, b = discover(root)
    assert (a.case_id, b.case_id) == ("UCSF-PDGM-0004", "UCSF-PDGM-0005")
    assert a.missing == ()
    assert a.label_map == {4: 3}
    assert a.label is not None
    assert a.label.paths[0].name == "UCSF-PDGM-0004_tumor_segmentation.nii.gz"
    assert {c: r.paths[0].name for c, r in b.images.items()} == {
        "t1n": "UCSF-PDGM-005_T1.nii.gz",
        "t1c": "UCSF-PDGM-005_T1c.nii.gz",
        "t2w": "UCSF-PDGM-005_T2.nii.gz",
        "t2f": "UCSF-PDGM-005_FLAIR.nii.gz",
    }
    assert b.missing == (
        f"label: {root}/UCSF-PDGM-0005_nifti/UCSF-PDGM-0005_tumor_segmentation.nii.gz",
    )


class TestDicom:
    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        root = tmp_path / "ReMIND"
        p1 = root / "ReMIND-001" / "study"
        t1c = None
        for n, desc in enumerate(["AX T1 PRE", "AX T1 POST GAD", "AX T2", "AX FLAIR", "ADC"], 1):
            s = write_mr_series(p1 / f"s{n}", description=desc, series_number=n, seed=n)
            if n == 2:
                t1c = s
        shape = t1c.array.shape
        tumour = np.zeros(shape, bool)
        tumour[1, 3:5, 3:5] = True
        ventricles = np.zeros(shape, bool)
        ventricles[2, 9:12, 9:12] = True
        write_seg(p1 / "seg" / "1-1.dcm", t1c, {"Tumor": tumour, "Ventricles": ventricles})
        (root / "ReMIND-001" / "notes.txt").write_text("not DICOM")
        p2 = root / "ReMIND-002"
        for n, desc in enumerate(["T1_MPRAGE", "T1 +C", "T2 TSE"], 1):
            write_mr_series(p2 / f"s{n}", description=desc, series_number=n, seed=10 + n)
        (root / "metadata").mkdir()
        (root / "metadata" / "summary.csv").write_text("a,b\n")
        return root

    def test_series_classified_and_seg_is_the_label(self, root: Path) -> None:
        assert detect_layout(root) == "dicom"
        one, _two = discover(root)
        assert one.case_id == "ReMIND-001"
        assert one.missing == ()
        descriptions = {}
        for channel, ref in one.images.items():
            assert ref.kind == "dicom"
            assert len(ref.paths) == 4
            descriptions[channel] = ref.paths[0].parent.name
        assert descriptions == {"t1n": "s1", "t1c": "s2", "t2w": "s3", "t2f": "s4"}
        assert one.label is not None
        assert one.label.kind == "dicom-seg"
        assert one.label.paths == (root / "ReMIND-001/study/seg/1-1.dcm",)
        assert one.label.segments == ("tumor", "tumour")
        assert "seg-reference:t1c" in one.flags
        assert one.label_map == {}

    def test_label_reads_on_the_referenced_channel(self, root: Path) -> None:
        one = discover(root)[0]
        image = read_image(one.images["t1c"])
        label = read_label(one.label, reference=image)
        expected = np.zeros(image.GetSize()[::-1], np.uint8)
        expected[1, 3:5, 3:5] = 1  # the tumour segment only, painted 1
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)

    def test_missing_channel_and_label(self, root: Path) -> None:
        two = discover(root)[1]
        assert two.case_id == "ReMIND-002"
        assert set(two.images) == {"t1n", "t1c", "t2w"}
        assert len(two.missing) == 2
        assert two.missing[0] == f"label: a DICOM SEG object under {root / 'ReMIND-002'}"
        assert two.missing[1].startswith(f"t2f: an MR series under {root / 'ReMIND-002'}")
        assert "'T1 +C'" in two.missing[1]

    def test_tumour_segment_names_are_configurable(self, root: Path) -> None:
        one = discover(root, tumour_segments=("lesion",))[0]
        assert one.label is None
        assert one.missing[0].startswith("label: no segment of the SEG objects")
        assert "['Tumor', 'Ventricles']" in one.missing[0]
        one = discover(root, tumour_segments=("ventricles",))[0]
        assert one.label is not None
        assert one.label.segments == ("ventricles",)

    def test_unreadable_dicom_file_goes_to_missing(self, root: Path) -> None:
        bad = root / "ReMIND-002" / "s1" / "002.dcm"
        bad.write_bytes(b"\x00" * 50)
        two = discover(root)[1]
        assert any(m.startswith(f"dicom: {bad}: not a readable DICOM file") for m in two.missing)

    def test_several_series_for_one_channel_prefers_the_segs_reference(self, root: Path) -> None:
        write_mr_series(
            root / "ReMIND-001" / "late",
            description="T1 post contrast",
            n_slices=6,
            series_number=9,
        )
        one = discover(root)[0]
        assert (
            one.images["t1c"].paths[0].parent.name == "s2"
        )  # the SEG's series, not the longer one
        assert "several-series:t1c" in one.flags


class TestPartialAnnotation:
    def test_annotated_slices_along_the_axial_index_axis(self, tmp_path: Path) -> None:
        root = tmp_path / "lgg"
        # Sagittal acquisition: voxel axis j runs along S (nibabel RAS affine).
        aff = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
        for s in BRATS23[:4]:
            nifti(root / "A" / f"A{s}.nii.gz", aff=aff)
        seg = np.zeros((5, 6, 7), np.uint8)
        seg[1, 2, 3] = 1
        seg[4, 4, 0] = 2
        nifti(root / "A" / "A-seg.nii.gz", seg, aff)
        [case] = discover(root, partial_annotation=True)
        assert case.annotated_slices == (2, 4)  # the j indices that carry a label
        assert "partial-annotation" in case.flags
        [plain] = discover(root)
        assert plain.annotated_slices is None

    def test_unreadable_label_goes_to_missing(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "d", [f"A/A{s}.nii.gz" for s in BRATS23[:4]])
        (root / "A" / "A-seg.nii.gz").write_bytes(b"garbage")
        [case] = discover(root, partial_annotation=True)
        assert case.annotated_slices is None
        assert case.missing[0].startswith(f"label: {root}/A/A-seg.nii.gz: not a readable NIfTI")

    def test_helper(self) -> None:
        a = np.zeros((3, 4, 5), np.uint8)
        a[0, 1, 4] = a[2, 3, 4] = 1
        assert annotated_slices(a, 0) == (0, 2)
        assert annotated_slices(a, 1) == (1, 3)
        assert annotated_slices(a, -1) == (4,)
        assert annotated_slices(np.zeros((2, 2, 2)), 2) == ()
        with pytest.raises(
            ValueError, match=r"axis 3 is out of range for an array of shape \(3, 4, 5\)"
        ):
            annotated_slices(a, 3)

    def test_axial_axis_of_directions(self) -> None:
        assert axial_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 2
        assert axial_axis((0, 0, -1, 1, 0, 0, 0, -1, 0)) == 1  # S along index axis 1, flipped


@pytest.mark.parametrize(
    ("description", "channel"),
    [
        ("AX T1 PRE", "t1n"),
        ("Ax T1 pre-contrast", "t1n"),
        ("T1 W/O", "t1n"),
        ("SAG T1 MPRAGE", "t1n"),
        ("T1_FLAIR_AX", "t1n"),
        ("AX T1 POST", "t1c"),
        ("Ax T1 +C", "t1c"),
        ("T1 GD", "t1c"),
        ("T1+C", "t1c"),
        ("T12 relaxometry", None),
        ("MPRAGE post gad", "t1c"),
        ("t1ce", "t1c"),
        ("T1-CE axial", "t1c"),
        ("AX T2 FSE", "t2w"),
        ("T2W_TSE", "t2w"),
        ("AX FLAIR", "t2f"),
        ("Sag T2 FLAIR 3D", "t2f"),
        ("ADC map", None),
        ("DWI b1000", None),
        ("T2* GRE", None),
        ("SWI", None),
        ("3-plane localizer", None),
        ("DSC perfusion", None),
    ],
)
def test_classify_series(description: str, channel: str | None) -> None:
    assert classify_series(description) == channel


class TestErrors:
    def test_unrecognisable_folder(self, tmp_path: Path) -> None:
        root = tmp_path / "stuff"
        (root / "x").mkdir(parents=True)
        (root / "x" / "readme.txt").write_text("hello")
        nifti(root / "x" / "brain.nii.gz")
        with pytest.raises(
            ValueError,
            match=r"cannot tell the layout of '.*stuff'.*looked for upenn: .*images_structural.*ucsf: .*brats: .*dicom: ",
        ):
            detect_layout(root)
        with pytest.raises(ValueError, match=r"cannot tell the layout"):
            discover(root)

    def test_layout_given_but_nothing_found(self, tmp_path: Path) -> None:
        root = tree(tmp_path / "d", [f"A/A{s}.nii.gz" for s in BRATS23])
        with pytest.raises(
            ValueError, match=r"no ucsf cases in '.*d': looked for '<ID>_nifti' folders"
        ):
            discover(root, layout="ucsf")

    def test_unknown_layout(self, tmp_path: Path) -> None:
        with pytest.raises(
            ValueError, match=r"unknown layout 'bratz'; expected one of \('auto', 'upenn'"
        ):
            discover(tmp_path, layout="bratz")  # type: ignore[arg-type]

    def test_missing_root(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"dataset folder '.*nowhere' does not exist"):
            discover(tmp_path / "nowhere")
        with pytest.raises(FileNotFoundError, match=r"dataset folder '.*nowhere' does not exist"):
            detect_layout(tmp_path / "nowhere")
