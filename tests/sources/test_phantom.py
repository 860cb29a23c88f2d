"""The embedded phantom: BraTS 2023 layout, realism, geometry, determinism, atomic writes,
and the options of controlled studies (volume distribution, tumour shape, tails, units)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.stats
import SimpleITK as sitk
from scipy import ndimage

from pipeline import fsio
from pipeline.io.nifti import read_nifti_image
from pipeline.sources import phantom as ph
from pipeline.sources.base import CHANNELS, LABEL_SCHEME
from pipeline.sources.phantom import (
    BRATS_SHAPE,
    DEFAULT_OPTIONS,
    DEFAULT_SHAPE,
    LARGE_FRACTION,
    SPACINGS,
    CasePlan,
    PhantomCase,
    PhantomOptions,
    brain_volume_ml,
    bright_speckle,
    case_plans,
    phantom_case,
    rician,
    tumour_volumes_ml,
    write_phantom,
)

SHAPE = (48, 48, 32)
SEED = 5
ANISO = (0.94, 0.94, 1.5)
CSF, GM, WM = 1, 2, 3
NCR, ED, ET = 1, 2, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("phantom")
    return root, write_phantom(root, cases=4, seed=SEED, shape=SHAPE)


@pytest.fixture(scope="module")
def built() -> list[tuple[CasePlan, PhantomCase]]:
    return [(plan, plan.build(SHAPE)) for plan in case_plans(4, SEED, SHAPE)]


@pytest.fixture(scope="module")
def default_case() -> PhantomCase:
    """One case at the default field of view with a clearly visible tumour (6 mL)."""
    return phantom_case(7, DEFAULT_SHAPE, (1.0, 1.0, 1.0), tumour_volume_ml=6.0)


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return index @ affine[:3, :3].T + affine[:3, 3]


def _medians(case: PhantomCase, channel: str) -> dict[str, float]:
    img = case.images[channel]
    healthy = case.label == 0
    out = {name: float(np.median(img[healthy & (case.tissue == code)]))
           for name, code in (("CSF", CSF), ("GM", GM), ("WM", WM))}
    out.update({name: float(np.median(img[case.label == code]))
                for name, code in (("NCR", NCR), ("ED", ED), ("ET", ET))})
    return out


def _neighbour_values(label: np.ndarray, value: int) -> set[int]:
    """Label values of the 6-neighbours of the voxels labelled `value` (outside them)."""
    mask = label == value
    ring = ndimage.binary_dilation(mask) & ~mask
    return {int(v) for v in np.unique(label[ring])}


class TestLayout:
    def test_case_folders_and_file_names_follow_brats_2023(self, written) -> None:
        root, folders = written
        assert folders == [root / f"XRAI-PHANTOM-{i:05d}-000" for i in range(4)]
        assert sorted(p.name for p in root.iterdir()) == [f.name for f in folders]
        for folder in folders:
            assert re.fullmatch(r"[A-Z]+-[A-Z]+-\d{5}-\d{3}", folder.name)
            expected = {f"{folder.name}-{s}.nii.gz" for s in (*CHANNELS, "seg")}
            assert {p.name for p in folder.iterdir()} == expected  # no temp files left

    def test_files_hold_the_in_memory_case(self, written, built) -> None:
        _, folders = written
        for folder, (plan, case) in zip(folders, built, strict=True):
            for name in (*CHANNELS, "seg"):
                img = nib.load(folder / f"{plan.case_id}-{name}.nii.gz")
                want = case.label if name == "seg" else case.images[name]
                assert img.get_data_dtype() == (np.uint8 if name == "seg" else np.int16)
                np.testing.assert_array_equal(np.asarray(img.dataobj), want)
                # sform is stored in float32: 1e-4 mm
                np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)
                np.testing.assert_allclose(img.header.get_zooms(), plan.spacing, atol=1e-6)
                assert nib.aff2axcodes(img.affine) == tuple(plan.orientation)
                assert int(img.header["sform_code"]) == 1
                assert int(img.header["qform_code"]) == 1

    def test_label_values_are_the_brats_2023_scheme(self, written) -> None:
        _, folders = written
        for folder in folders:
            seg = np.asarray(nib.load(folder / f"{folder.name}-seg.nii.gz").dataobj)
            values = set(np.unique(seg).tolist())
            assert values <= set(LABEL_SCHEME)
            assert values - {0}, f"{folder.name} has no tumour"


class TestGeometry:
    def test_spacing_and_orientation_alternate(self) -> None:
        plans = case_plans(4, SEED, SHAPE)
        assert [p.spacing for p in plans] == [SPACINGS[0], SPACINGS[1]] * 2
        assert [p.orientation for p in plans] == ["RAS", "LPS", "LPS", "RAS"]
        # two cases already cover both spacings and both orientations
        assert {(p.spacing, p.orientation) for p in plans[:2]} == {(SPACINGS[0], "RAS"),
                                                                  (SPACINGS[1], "LPS")}

    def test_grid_scales_so_the_head_keeps_its_physical_size(self) -> None:
        iso = phantom_case(SEED, SHAPE, (1.0, 1.0, 1.0))
        aniso = phantom_case(SEED, SHAPE, ANISO)
        assert iso.label.shape == SHAPE
        assert aniso.label.shape == (51, 51, 21)  # round(48 / 0.94), round(32 / 1.5)
        # same anatomy sampled on two grids: volumes agree to a few percent
        assert aniso.brain_volume_ml == pytest.approx(iso.brain_volume_ml, rel=0.03)
        assert aniso.tumour_volume_ml == pytest.approx(iso.tumour_volume_ml, rel=0.10)
        assert aniso.tumour_centre_mm == iso.tumour_centre_mm

    def test_lps_is_the_ras_array_flipped_with_the_affine_saying_so(self) -> None:
        ras = phantom_case(SEED, SHAPE, (1.0, 1.0, 1.0), orientation="RAS")
        lps = phantom_case(SEED, SHAPE, (1.0, 1.0, 1.0), orientation="LPS")
        assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
        assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
        for name in CHANNELS:
            np.testing.assert_array_equal(lps.images[name], np.flip(ras.images[name], (0, 1)))
        np.testing.assert_array_equal(lps.label, np.flip(ras.label, (0, 1)))
        # the same voxel content sits at the same world position
        n = np.array(SHAPE)
        idx = np.random.default_rng(0).integers(0, n, size=(50, 3))
        flipped = idx.copy()
        flipped[:, :2] = n[:2] - 1 - idx[:, :2]
        np.testing.assert_allclose(_world(lps.affine, idx), _world(ras.affine, flipped),
                                   atol=1e-9)
        assert np.abs(ras.affine[:3, 3]).max() > 1.0  # a non-zero origin

    def test_tumour_centroid_in_world_matches_the_intended_centre_on_disk(
            self, written, built) -> None:
        _, folders = written
        for folder, (plan, case) in zip(folders, built, strict=True):
            img = nib.load(folder / f"{plan.case_id}-seg.nii.gz")
            seg = np.asarray(img.dataobj)
            centroid = _world(img.affine, np.argwhere(seg > 0).mean(axis=0))
            # within one voxel along every axis, for RAS and LPS, 1 mm and anisotropic
            assert np.all(np.abs(centroid - case.tumour_centre_mm) <= plan.spacing), (
                plan.case_id, plan.orientation, centroid, case.tumour_centre_mm)

    @pytest.mark.parametrize("orientation", ["RAS", "LPS"])
    @pytest.mark.parametrize("spacing", SPACINGS)
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_tumour_centroid_in_world_matches_the_intended_centre(
            self, seed, spacing, orientation) -> None:
        case = phantom_case(seed, SHAPE, spacing, orientation=orientation)
        centroid = _world(case.affine, np.argwhere(case.label > 0).mean(axis=0))
        assert np.all(np.abs(centroid - case.tumour_centre_mm) <= spacing)

    def test_full_brats_grid(self) -> None:
        case = phantom_case(3, BRATS_SHAPE, (1.0, 1.0, 1.0))
        assert case.label.shape == BRATS_SHAPE
        assert all(img.shape == BRATS_SHAPE for img in case.images.values())
        # an adult brain: nominal ellipsoid 1353 mL, real brains 1000-1700 mL
        assert 1000 < case.brain_volume_ml < 1700
        assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3}


class TestBrain:
    def test_zero_outside_the_brain_and_positive_inside_in_every_channel(self, built) -> None:
        for _, case in built:
            brain = case.tissue > 0
            for name in CHANNELS:
                np.testing.assert_array_equal(case.images[name] != 0, brain)
                assert case.images[name].min() >= 0
            assert not np.any((case.label > 0) & ~brain)

    def test_brain_is_a_deformed_ellipsoid_inside_the_field_of_view(self, built) -> None:
        nominal = brain_volume_ml(SHAPE)
        for _, case in built:
            brain = case.tissue > 0
            # deformation amplitude is at most 10 % of the radius
            assert case.brain_volume_ml == pytest.approx(nominal, rel=0.15)
            for axis in range(3):
                assert not brain.take([0, -1], axis=axis).any()
        # deformed per case: the brains of two 1-mm cases differ
        assert not np.array_equal(built[0][1].tissue > 0, built[2][1].tissue > 0)

    def test_csf_rim_ventricles_grey_and_white_matter(self, default_case) -> None:
        tissue = default_case.tissue
        brain = tissue > 0
        counts = np.bincount(tissue[brain], minlength=4) / brain.sum()
        assert counts[CSF] > 0.05, counts
        assert counts[GM] > 0.1, counts
        assert counts[WM] > 0.2, counts
        depth = ndimage.distance_transform_edt(brain, sampling=default_case.spacing)
        surface = brain & (depth <= 1.0)
        assert np.mean(tissue[surface] == CSF) > 0.8  # the outer CSF rim
        deep = brain & (depth > 0.4 * depth.max())
        assert np.any(tissue[deep] == CSF)  # ventricles, far from the surface

    @pytest.mark.parametrize(
        ("channel", "brighter", "darker"),
        [
            ("t1n", "WM", "GM"), ("t1n", "GM", "CSF"),
            ("t1c", "WM", "GM"), ("t1c", "GM", "CSF"),
            ("t2w", "CSF", "GM"), ("t2w", "GM", "WM"),
            ("t2f", "GM", "CSF"), ("t2f", "WM", "CSF"),
            ("t2f", "ED", "GM"), ("t2f", "ED", "WM"), ("t2f", "ED", "CSF"),
            ("t1c", "ET", "WM"), ("t1c", "ET", "GM"), ("t1c", "ET", "ED"), ("t1c", "ET", "NCR"),
        ],
    )
    def test_tissue_contrast_per_modality(self, default_case, channel, brighter, darker) -> None:
        medians = _medians(default_case, channel)
        # class gaps are >= 20 % of the channel's reference intensity; noise and bias
        # (about 3 % and 10 %) cannot swap class medians
        assert medians[brighter] > 1.1 * medians[darker], medians

    def test_enhancement_is_specific_to_t1c(self, default_case) -> None:
        t1n, t1c = _medians(default_case, "t1n"), _medians(default_case, "t1c")
        assert t1c["ET"] / t1c["WM"] > 1.2
        assert t1n["ET"] / t1n["WM"] < 1.0

    def test_without_bias_and_noise_each_tissue_is_one_value(self) -> None:
        case = phantom_case(SEED, DEFAULT_SHAPE, (1.0, 1.0, 1.0), noise=0.0, bias=0.0)
        # the partial-volume blur (sigma 0.5 mm, truncated at 3 sigma) reaches 2 voxels
        core = ndimage.binary_erosion((case.tissue == WM) & (case.label == 0),
                                      structure=np.ones((3, 3, 3)), iterations=2)
        assert core.sum() > 1000
        for name in CHANNELS:
            values = case.images[name][core]
            assert values.max() - values.min() <= 1  # int16 rounding only

    def test_bias_field_is_smooth_and_multiplicative(self) -> None:
        for spacing in SPACINGS:
            on = phantom_case(SEED, SHAPE, spacing, noise=0.0, bias=1.0)
            off = phantom_case(SEED, SHAPE, spacing, noise=0.0, bias=0.0)
            for name in CHANNELS:
                clean = off.images[name].astype(np.float64)
                ok = clean >= 50
                log_ratio = np.where(ok, np.log(np.where(ok, on.images[name], 1.0)
                                                / np.where(ok, clean, 1.0)), np.nan)
                spread = np.nanmax(log_ratio) - np.nanmin(log_ratio)
                assert math.exp(spread) > 1.08, (spacing, name)  # a real inhomogeneity
                # one smooth factor for all tissues: between neighbouring voxels the log
                # ratio changes by rounding (<= 2 * 0.5 / 50) plus the field's gradient
                # (measured <= 0.03); an additive or per-tissue field would jump by > 0.5
                # at tissue borders, a voxel-wise one by ~the spread
                for axis in range(3):
                    step = np.abs(np.diff(log_ratio, axis=axis))
                    assert np.nanmax(step) < 0.045, (spacing, name, axis)


class TestNoise:
    @pytest.mark.parametrize("snr", [0.0, 0.5, 2.0, 8.0])
    def test_rician_matches_scipy_rice(self, snr) -> None:
        sigma = 30.0
        values = rician(np.full(20_000, snr * sigma), sigma, np.random.default_rng(11))
        # oracle: scipy.stats.rice(b = nu / sigma, scale = sigma); Rayleigh at nu = 0
        result = scipy.stats.kstest(values, scipy.stats.rice(snr, scale=sigma).cdf)
        assert result.pvalue > 1e-3, result
        assert values.min() >= 0

    def test_case_noise_is_rician_with_the_stated_sigma(self) -> None:
        noisy = phantom_case(SEED, DEFAULT_SHAPE, (1.0, 1.0, 1.0))
        clean = phantom_case(SEED, DEFAULT_SHAPE, (1.0, 1.0, 1.0), noise=0.0)
        np.testing.assert_array_equal(noisy.label, clean.label)  # same anatomy
        for name in CHANNELS:
            sigma = noisy.noise_sigma[name]
            nu = clean.images[name][clean.tissue > 0].astype(np.float64)
            m = noisy.images[name][noisy.tissue > 0].astype(np.float64)
            high = nu > 10 * sigma  # Rice ~ N(nu, sigma^2) there
            assert np.std(m[high] - nu[high]) == pytest.approx(sigma, rel=0.05)
            # mean over all voxels against the Rice mean per voxel (scipy), 5 standard errors
            expected = scipy.stats.rice.mean(nu / sigma, scale=sigma)
            se = np.std(m - expected) / math.sqrt(m.size)
            assert abs(np.mean(m) - np.mean(expected)) < 5 * se + 0.5  # + int rounding


class TestTumour:
    def test_necrosis_inside_enhancing_rim_inside_oedema(self, default_case) -> None:
        label = default_case.label
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        assert _neighbour_values(label, NCR) <= {ET}
        assert _neighbour_values(label, ET) <= {NCR, ED}
        assert not np.any((label > 0) & (default_case.tissue == 0))

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_tumour_outline_is_irregular(self, seed) -> None:
        case = phantom_case(seed, DEFAULT_SHAPE, (1.0, 1.0, 1.0), tumour_volume_ml=6.0)

        def radial_spread(whole: np.ndarray) -> float:
            edge = whole & ~ndimage.binary_erosion(whole)
            r = np.linalg.norm(np.argwhere(edge) - np.argwhere(whole).mean(axis=0), axis=1)
            return float(np.percentile(r, 95) / np.percentile(r, 5))

        grid = np.indices((40, 40, 40)) - 19.7
        sphere = np.sqrt((grid**2).sum(axis=0)) < (3 * 6000 / (4 * math.pi)) ** (1 / 3)
        # a voxelised 6 mL sphere gives 1.08; the perturbed outline (+-20 %) clearly more
        assert radial_spread(case.label > 0) > radial_spread(sphere) + 0.07

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_realised_volume_matches_the_target(self, seed) -> None:
        for plan in case_plans(4, seed, SHAPE):
            case = plan.build(SHAPE)
            voxel_ml = float(np.prod(plan.spacing)) / 1000
            assert case.tumour_volume_ml == pytest.approx(
                (case.label > 0).sum() * voxel_ml, rel=1e-12)
            assert case.tumour_volume_ml > 0
            assert case.tumour_volume_ml == pytest.approx(plan.tumour_volume_ml, rel=0.1)

    def test_volumes_are_log_normal_and_right_skewed(self) -> None:
        volumes = tumour_volumes_ml(4000, 123, BRATS_SHAPE)
        log_v = np.log(volumes)
        # log-normal sigma 0.75 has skewness 2.7; clipped at the cap (1.5 % of draws) ~1.7
        assert scipy.stats.skew(volumes) > 1.0
        assert abs(scipy.stats.skew(log_v)) < 0.3  # the log is close to symmetric
        assert np.mean(volumes) > np.median(volumes)
        # median of ln V is ln(0.02 * V_brain); standard error 1.25 * 0.75 / sqrt(4000)
        expected = math.log(ph.VOLUME_MEDIAN_FRACTION * brain_volume_ml(BRATS_SHAPE))
        assert abs(np.median(log_v) - expected) < 4 * 1.25 * ph.VOLUME_SIGMA / math.sqrt(4000)

    @pytest.mark.parametrize("cases", [2, 3, 8])
    @pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
    def test_at_least_one_tiny_and_one_large_tumour(self, seed, cases) -> None:
        for shape in (SHAPE, DEFAULT_SHAPE, BRATS_SHAPE):
            volumes = tumour_volumes_ml(cases, seed, shape)
            assert volumes.min() < 0.5
            assert volumes.max() >= LARGE_FRACTION * brain_volume_ml(shape)
            assert volumes.max() <= ph.max_tumour_ml(shape)
            assert np.all(volumes >= ph.MIN_TUMOUR_ML)

    def test_every_written_case_has_a_tumour(self, tmp_path) -> None:
        folders = write_phantom(tmp_path, cases=1, seed=9, shape=SHAPE)
        seg = np.asarray(nib.load(folders[0] / f"{folders[0].name}-seg.nii.gz").dataobj)
        assert (seg > 0).sum() > 0


class TestDeterminism:
    def test_same_seed_gives_byte_identical_files(self, tmp_path) -> None:
        def digests(root: Path) -> dict[str, str]:
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(root.rglob("*.nii.gz"))}

        write_phantom(tmp_path / "a", cases=2, seed=SEED, shape=SHAPE)
        write_phantom(tmp_path / "b", cases=2, seed=SEED, shape=SHAPE)
        a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
        assert len(a) == 10
        assert a == b

    def test_same_seed_same_arrays_different_seed_different_arrays(self) -> None:
        one, two = phantom_case(SEED, SHAPE), phantom_case(SEED, SHAPE)
        other = phantom_case(SEED + 1, SHAPE)
        for name in CHANNELS:
            np.testing.assert_array_equal(one.images[name], two.images[name])
            assert not np.array_equal(one.images[name], other.images[name])
        np.testing.assert_array_equal(one.label, two.label)
        assert not np.array_equal(one.label, other.label)

    def test_generator_and_seed_sequence_inputs_are_reproducible(self) -> None:
        a = phantom_case(np.random.default_rng(3), SHAPE)
        b = phantom_case(np.random.default_rng(3), SHAPE)
        c = phantom_case(np.random.SeedSequence(3), SHAPE)
        d = phantom_case(3, SHAPE)
        np.testing.assert_array_equal(a.images["t1n"], b.images["t1n"])
        np.testing.assert_array_equal(c.images["t1n"], d.images["t1n"])

    def test_arrays_are_read_only(self) -> None:
        case = phantom_case(SEED, SHAPE)
        with pytest.raises(ValueError, match="read-only"):
            case.label[0, 0, 0] = 1


class TestAtomicWrite:
    def test_each_file_is_renamed_from_a_temporary_name_in_its_folder(
            self, tmp_path, monkeypatch) -> None:
        calls: list[tuple[Path, Path]] = []
        real = os.replace

        def spy(src, dst) -> None:
            calls.append((Path(src), Path(dst)))
            real(src, dst)

        monkeypatch.setattr(fsio.os, "replace", spy)
        write_phantom(tmp_path, cases=2, seed=SEED, shape=SHAPE)
        assert len(calls) == 10
        for src, dst in calls:
            assert src.parent == dst.parent
            assert dst.name.endswith(".nii.gz")
            assert not src.name.endswith(".nii.gz")  # never readable under a final name

    def test_interrupted_run_leaves_only_complete_files(self, tmp_path, monkeypatch) -> None:
        real = os.replace
        done: list[int] = []

        def fail_third(src, dst) -> None:
            if len(done) == 2:
                raise OSError("simulated crash during rename")
            done.append(1)
            real(src, dst)

        monkeypatch.setattr(fsio.os, "replace", fail_third)
        with pytest.raises(OSError, match="simulated crash"):
            write_phantom(tmp_path, cases=2, seed=SEED, shape=SHAPE)
        files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
        assert [p.name for p in files] == ["XRAI-PHANTOM-00000-000-t1c.nii.gz",
                                           "XRAI-PHANTOM-00000-000-t1n.nii.gz"]
        for path in files:
            assert np.asarray(nib.load(path).dataobj).shape == SHAPE  # fully readable

    def test_failed_write_removes_its_temporary_file(self, tmp_path, monkeypatch) -> None:
        def broken_fsync(fd) -> None:
            raise OSError("simulated disk full")

        monkeypatch.setattr(fsio.os, "fsync", broken_fsync)
        with pytest.raises(OSError, match="simulated disk full"):
            write_phantom(tmp_path, cases=1, seed=SEED, shape=SHAPE)
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"cases": 0}, r"cases must be an integer >= 1, got 0"),
            ({"cases": 2.5}, r"cases must be an integer >= 1, got 2\.5"),
            ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
            ({"shape": (10, 10, 10)}, r"shape must be at least \(40, 40, 32\).*\(10, 10, 10\)"),
            ({"shape": (48, 48)}, r"shape must be 3 integers \(X, Y, Z\), got \(48, 48\)"),
            ({"shape": (48.0, 48, 32)}, r"shape must be 3 integers"),
        ],
    )
    def test_write_phantom_rejects_bad_arguments(self, tmp_path, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            write_phantom(tmp_path, **{"cases": 1, "shape": SHAPE, **kwargs})
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"orientation": "LAS"}, r"orientation must be one of \('RAS', 'LPS'\), got 'LAS'"),
            ({"noise": -0.1}, r"noise must be a finite number >= 0, got -0\.1"),
            ({"bias": math.nan}, r"bias must be a finite number >= 0, got nan"),
            ({"tumour_volume_ml": 50.0}, r"tumour_volume_ml must lie in \[0\.05, 1\.197\]"),
            ({"spacing": (1.0, 0.0, 1.0)}, r"spacing must be 3 numbers in \[0\.25, 4\] mm"),
        ],
    )
    def test_phantom_case_rejects_bad_arguments(self, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            phantom_case(0, SHAPE, **kwargs)

    def test_phantom_case_rejects_a_non_seed(self) -> None:
        with pytest.raises(TypeError, match=r"rng_or_seed must be an int.*got str 'abc'"):
            phantom_case("abc", SHAPE)


# ----------------------------------------------------------------- options (controlled studies)

MULTIFOCAL = PhantomOptions(tumour_shape="multifocal")
ELONGATED = PhantomOptions(tumour_shape="elongated")
HEAVY = PhantomOptions(intensity_tail="heavy")
CONNECT_26 = np.ones((3, 3, 3), dtype=bool)


def _components(label: np.ndarray) -> int:
    """Connected components of the whole tumour, 26-connectivity."""
    return int(ndimage.label(label > 0, structure=CONNECT_26)[1])


def _empty_slices_within_extent(label: np.ndarray) -> int:
    """Axial (z) slices without tumour between the tumour's first and last slice."""
    per_slice = (label > 0).sum(axis=(0, 1))
    z = np.flatnonzero(per_slice)
    return int((per_slice[z[0]:z[-1] + 1] == 0).sum())


def _clipped_kurtosis(values: np.ndarray) -> float:
    """Fisher excess kurtosis after clipping at the 0.5 / 99.5 percentiles (what a net sees)."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(scipy.stats.kurtosis(np.clip(values.astype(np.float64), lo, hi)))


def _array_digest(case: PhantomCase) -> str:
    h = hashlib.sha256()
    for name in CHANNELS:
        h.update(np.ascontiguousarray(case.images[name]).tobytes())
    h.update(case.label.tobytes())
    h.update(case.tissue.tobytes())
    return h.hexdigest()


class TestDefaultOptionsUnchanged:
    # sha256 of the images (t1n, t1c, t2w, t2f), label and tissue bytes, computed with the
    # phantom as it was before PhantomOptions existed (commit cc7633e), same venv
    @pytest.mark.parametrize(
        ("seed", "spacing", "orientation", "digest"),
        [
            (0, (1.0, 1.0, 1.0), "RAS",
             "3e372480a87c08abf753b41d74e7dfdec22f0a97a002c5fbb4dbce99f42af454"),
            (7, (0.94, 0.94, 1.5), "LPS",
             "8707e95f4883297646622706fea4c2bde87034a86c32a251ee8ae3b1bc1979ea"),
        ],
    )
    def test_default_case_is_the_pre_options_phantom(self, seed, spacing, orientation,
                                                    digest) -> None:
        case = phantom_case(seed, SHAPE, spacing, orientation=orientation)
        assert _array_digest(case) == digest
        assert case.intensity_scale == 1.0

    def test_default_volumes_are_the_pre_options_volumes(self) -> None:
        # tumour_volumes_ml(8, 3, (48, 48, 32)) before PhantomOptions (commit cc7633e), mL
        expected = [0.331001, 0.231818, 0.356504, 0.690035, 0.893782, 0.205297, 0.341261,
                    0.198355]
        np.testing.assert_allclose(tumour_volumes_ml(8, 3, SHAPE), expected, atol=5e-7)

    def test_explicit_default_options_write_byte_identical_files(self, tmp_path) -> None:
        def digests(root: Path) -> dict[str, str]:
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(root.rglob("*.nii.gz"))}

        write_phantom(tmp_path / "a", cases=2, seed=SEED, shape=SHAPE)
        write_phantom(tmp_path / "b", cases=2, seed=SEED, shape=SHAPE, options=PhantomOptions())
        assert digests(tmp_path / "a") == digests(tmp_path / "b")
        assert PhantomOptions() == DEFAULT_OPTIONS
        # no scaling in the header of a default image
        img = nib.load(next((tmp_path / "a").rglob("*-t1n.nii.gz")))
        assert img.dataobj.slope == 1.0
        assert img.dataobj.inter == 0.0


class TestVolumeOptions:
    def test_median_and_sigma_of_the_log_volume(self) -> None:
        options = PhantomOptions(volume_median_fraction=0.005, volume_sigma=0.3,
                                 guarantee_extremes=False)
        n = 4000
        log_v = np.log(tumour_volumes_ml(n, 123, BRATS_SHAPE, options=options))
        # neither cap (10 % of the brain, 10 sigma away) nor floor (0.05 mL) binds here;
        # standard errors: median 1.25 sigma / sqrt(n), standard deviation sigma / sqrt(2n)
        expected = math.log(0.005 * brain_volume_ml(BRATS_SHAPE))
        assert abs(np.median(log_v) - expected) < 4 * 1.25 * 0.3 / math.sqrt(n)
        assert abs(np.std(log_v) - 0.3) < 4 * 0.3 / math.sqrt(2 * n)

    def test_equal_seeds_share_the_normal_deviates(self) -> None:
        # paired arms: (ln V - ln m) / sigma is the same draw for every option value
        a = PhantomOptions(volume_median_fraction=0.01, volume_sigma=0.25,
                           guarantee_extremes=False)
        b = PhantomOptions(volume_median_fraction=0.03, volume_sigma=0.5,
                           guarantee_extremes=False)
        brain = brain_volume_ml(BRATS_SHAPE)
        za = (np.log(tumour_volumes_ml(50, 4, BRATS_SHAPE, options=a) / brain)
              - math.log(0.01)) / 0.25
        zb = (np.log(tumour_volumes_ml(50, 4, BRATS_SHAPE, options=b) / brain)
              - math.log(0.03)) / 0.5
        np.testing.assert_allclose(za, zb, atol=1e-9)

    @pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
    def test_without_guaranteed_extremes_a_narrow_distribution_stays_narrow(self, seed) -> None:
        options = PhantomOptions(volume_sigma=0.2, guarantee_extremes=False)
        for cases in (2, 8, 24):
            volumes = tumour_volumes_ml(cases, seed, DEFAULT_SHAPE, options=options)
            median_ml = 0.02 * brain_volume_ml(DEFAULT_SHAPE)  # 1.78 mL
            # |z| < 4.5 for all of 24 normal draws (P > 0.9998): within e^(+-0.9) of it
            assert np.all(np.abs(np.log(volumes / median_ml)) < 4.5 * 0.2)
            # with the extremes, the same draws include a tiny and an 8 % tumour
            forced = tumour_volumes_ml(cases, seed, DEFAULT_SHAPE,
                                       options=PhantomOptions(volume_sigma=0.2))
            assert forced.min() < 0.5
            assert forced.max() >= LARGE_FRACTION * brain_volume_ml(DEFAULT_SHAPE)

    def test_phantom_case_draws_its_volume_from_the_options(self) -> None:
        options = PhantomOptions(volume_median_fraction=0.08, volume_sigma=0.0)
        case = phantom_case(SEED, DEFAULT_SHAPE, options=options)
        # sigma 0: the target is exactly 8 % of the nominal brain; realised within 10 %
        assert case.tumour_volume_ml == pytest.approx(0.08 * brain_volume_ml(DEFAULT_SHAPE),
                                                      rel=0.10)


@pytest.fixture(scope="module")
def multifocal() -> list[tuple[CasePlan, PhantomCase]]:
    return [(plan, plan.build(SHAPE)) for plan in case_plans(4, SEED, SHAPE, options=MULTIFOCAL)]


@pytest.fixture(scope="module")
def tail_pairs() -> list[tuple[PhantomCase, PhantomCase]]:
    """(light, heavy) builds of the same two plans: one 1-mm and one anisotropic case."""
    return [(plan.build(SHAPE),
             CasePlan(plan.case_id, plan.seed, plan.spacing, plan.orientation,
                      plan.tumour_volume_ml, HEAVY).build(SHAPE))
            for plan in case_plans(2, SEED, SHAPE)]


class TestTumourShape:
    def test_multifocal_foci_are_separate_with_gaps_along_z(self, multifocal) -> None:
        for plan, case in multifocal:
            assert 2 <= _components(case.label) <= 4, plan.case_id
            assert _empty_slices_within_extent(case.label) >= 1, plan.case_id

    def test_multifocal_keeps_the_total_volume_and_the_centre(self, multifocal) -> None:
        for plan, case in multifocal:
            assert case.tumour_volume_ml == pytest.approx(plan.tumour_volume_ml, rel=0.10)
            # the centre is the voxel-weighted mean of the foci's centres: within a voxel
            centroid = _world(case.affine, np.argwhere(case.label > 0).mean(axis=0))
            assert np.all(np.abs(centroid - case.tumour_centre_mm) <= plan.spacing)

    def test_every_focus_is_nested_and_inside_the_brain(self, multifocal) -> None:
        for plan, case in multifocal:
            label, brain = case.label, case.tissue > 0
            assert _neighbour_values(label, NCR) <= {ET}, plan.case_id
            assert _neighbour_values(label, ET) <= {NCR, ED}, plan.case_id
            # no tumour voxel touches the outside of the brain (6-neighbourhood)
            assert not np.any(ndimage.binary_dilation(label > 0) & ~brain), plan.case_id
            components, n = ndimage.label(label > 0, structure=CONNECT_26)
            for k in range(1, n + 1):  # each focus has an oedema rim around its core
                assert ED in set(np.unique(label[components == k]).tolist())

    def test_shapes_keep_the_anatomy(self) -> None:
        compact = phantom_case(SEED, SHAPE)
        for options in (MULTIFOCAL, ELONGATED):
            other = phantom_case(SEED, SHAPE, options=options)
            np.testing.assert_array_equal(other.tissue, compact.tissue)

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_compact_and_elongated_are_one_body(self, seed) -> None:
        for options in (DEFAULT_OPTIONS, ELONGATED):
            case = phantom_case(seed, SHAPE, options=options)
            assert _components(case.label) == 1
            assert _empty_slices_within_extent(case.label) == 0

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_elongated_is_stretched_along_z(self, seed) -> None:
        case = phantom_case(seed, DEFAULT_SHAPE, options=ELONGATED, tumour_volume_ml=1.5)
        label = case.label
        assert _components(label) == 1
        assert _neighbour_values(label, NCR) <= {ET}
        assert _neighbour_values(label, ET) <= {NCR, ED}
        assert not np.any(ndimage.binary_dilation(label > 0) & (case.tissue == 0))
        # principal axes of the voxel cloud (mm): for semi-axes (a, a, 3a) the longest
        # axis is z and sqrt(eigenvalue ratio) = 3; the +-20 % outline blurs that a little
        points = np.argwhere(label > 0) * np.asarray(case.spacing)
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(points.T))
        assert abs(eigenvectors[2, -1]) > 0.95
        assert math.sqrt(eigenvalues[-1] / eigenvalues[0]) > 2.5
        compact = phantom_case(seed, DEFAULT_SHAPE, tumour_volume_ml=1.5)
        c_points = np.argwhere(compact.label > 0).astype(float)
        c_eigenvalues = np.linalg.eigvalsh(np.cov(c_points.T))
        assert math.sqrt(c_eigenvalues[-1] / c_eigenvalues[0]) < 1.6


class TestIntensityTail:
    def test_heavy_tail_survives_percentile_clipping_on_every_channel(
            self, tail_pairs) -> None:
        for light, heavy in tail_pairs:
            brain = light.tissue > 0
            for name in CHANNELS:
                # Rician noise on a tissue mixture: about -1; the speckle: about 60-90
                assert _clipped_kurtosis(light.images[name][brain]) < 1.0, name
                assert _clipped_kurtosis(heavy.images[name][brain]) > 6.0, name

    def test_heavy_tail_is_sparse_and_leaves_the_rest_unchanged(self, tail_pairs) -> None:
        for light, heavy in tail_pairs:
            brain = light.tissue > 0
            np.testing.assert_array_equal(heavy.label, light.label)
            np.testing.assert_array_equal(heavy.tissue, light.tissue)
            for name in CHANNELS:
                a = light.images[name].astype(np.float64)
                b = heavy.images[name].astype(np.float64)
                np.testing.assert_array_equal(b != 0, brain)  # 0 outside, >= 1 inside
                assert b[brain].min() >= 1
                changed = a != b
                assert not np.any(changed & ~brain)
                # hit with probability 0.02: binomial sd sqrt(0.02 * 0.98 / n) <= 0.0015 here
                assert abs(changed[brain].mean() - ph.SPECKLE_FRACTION) < 0.006, name
                # a hit voxel is at least e^1 brighter (or saturated), up to rounding
                ratio = b[changed] / a[changed]
                assert np.all((ratio > math.e * 0.99) | (b[changed] == 32767)), name

    @pytest.mark.parametrize("df", [2.0, 3.0])
    def test_speckle_factor_is_a_shifted_half_student_t(self, df) -> None:
        signal = np.full(200_000, 100.0)
        out = bright_speckle(signal, np.random.default_rng(17), log_amplitude=0.5, df=df)
        hit = out != signal
        # Bernoulli(0.02): 4000 hits, sd 63
        assert abs(int(hit.sum()) - 4000) < 5 * 63
        t = np.log(out[hit] / 100.0) / 0.5 - 1.0  # = |T| (cap at 30 not reached here)
        # oracle: |T| for T ~ t(df) has cdf 2 F(x) - 1 on x >= 0 (scipy.stats.t)
        result = scipy.stats.kstest(t, lambda x: 2 * scipy.stats.t.cdf(x, df) - 1)
        assert result.pvalue > 1e-3, result

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\), got 0\.0"),
            ({"log_amplitude": -1.0}, r"log_amplitude must be a finite number >= 0, got -1\.0"),
            ({"df": math.inf}, r"df must be a finite number > 0, got inf"),
        ],
    )
    def test_speckle_rejects_bad_arguments(self, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            bright_speckle(np.ones(3), np.random.default_rng(0), **kwargs)


class TestUnits:
    @pytest.mark.parametrize("scale", [0.01, 37.5, 1000.0])
    def test_reader_sees_the_scaled_image(self, tmp_path, scale) -> None:
        plain = write_phantom(tmp_path / "plain", cases=2, seed=SEED, shape=SHAPE)
        scaled = write_phantom(tmp_path / "scaled", cases=2, seed=SEED, shape=SHAPE,
                               options=PhantomOptions(intensity_scale=scale))
        for a, b in zip(plain, scaled, strict=True):
            seg_a, seg_b = (f / f"{f.name}-seg.nii.gz" for f in (a, b))
            assert seg_a.read_bytes() == seg_b.read_bytes()  # labels are never scaled
            for name in CHANNELS:
                img_a = nib.load(a / f"{a.name}-{name}.nii.gz")
                img_b = nib.load(b / f"{b.name}-{name}.nii.gz")
                assert img_b.get_data_dtype() == np.int16
                raw = np.asarray(img_a.dataobj)
                np.testing.assert_array_equal(np.asanyarray(img_b.dataobj.get_unscaled()), raw)
                assert img_b.dataobj.slope == pytest.approx(scale, rel=1e-7)  # float32 header
                want = scale * raw.astype(np.float64)
                # float32 reading: relative rounding 2^-24 of the value plus the slope's own
                np.testing.assert_allclose(img_b.get_fdata(dtype=np.float32), want, rtol=2e-7)
                # the project's reader applies the slope too ((z, y, x) SimpleITK order)
                sitk_values = sitk.GetArrayFromImage(
                    read_nifti_image(b / f"{b.name}-{name}.nii.gz")).astype(np.float64)
                np.testing.assert_allclose(sitk_values, want.T, rtol=2e-7)
                # not quantised: as many distinct values as the unscaled image
                assert np.unique(img_b.get_fdata()).size == np.unique(raw).size

    def test_in_memory_case_records_the_scale(self) -> None:
        plain = phantom_case(SEED, SHAPE)
        scaled = phantom_case(SEED, SHAPE, options=PhantomOptions(intensity_scale=0.01))
        assert scaled.intensity_scale == 0.01
        for name in CHANNELS:
            np.testing.assert_array_equal(scaled.images[name], plain.images[name])


class TestOptionsValidation:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"volume_median_fraction": 0.0},
             r"volume_median_fraction must be a number in \(0, 1\), got 0\.0"),
            ({"volume_median_fraction": True}, r"volume_median_fraction .* got True"),
            ({"volume_sigma": -0.1}, r"volume_sigma must be a finite number >= 0, got -0\.1"),
            ({"volume_sigma": math.nan}, r"volume_sigma must be a finite number >= 0, got nan"),
            ({"guarantee_extremes": "no"}, r"guarantee_extremes must be True or False, got 'no'"),
            ({"tumour_shape": "round"},
             r"tumour_shape must be one of \('compact', 'multifocal', 'elongated'\), "
             r"got 'round'"),
            ({"intensity_tail": "fat"},
             r"intensity_tail must be one of \('light', 'heavy'\), got 'fat'"),
            ({"intensity_scale": 0.0}, r"intensity_scale must be a number in \[1e-30, 1e\+30\]"
                                       r" \(stored as a float32 scl_slope\), got 0\.0"),
            ({"intensity_scale": -2.0}, r"intensity_scale .* got -2\.0"),
        ],
    )
    def test_options_reject_bad_values(self, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            PhantomOptions(**kwargs)

    def test_functions_reject_a_non_options(self, tmp_path) -> None:
        match = r"options must be a PhantomOptions, got dict \{'tumour_shape': 'compact'\}"
        bad = {"tumour_shape": "compact"}
        with pytest.raises(TypeError, match=match):
            phantom_case(0, SHAPE, options=bad)
        with pytest.raises(TypeError, match=match):
            tumour_volumes_ml(2, 0, SHAPE, options=bad)
        with pytest.raises(TypeError, match=match):
            write_phantom(tmp_path, cases=1, shape=SHAPE, options=bad)
        assert list(tmp_path.iterdir()) == []
