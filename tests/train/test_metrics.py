"""Segmentation metrics against hand counts, brute-force distances and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from pipeline.train.metrics import METRIC_NAMES, segmentation_metrics


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def sitk_hausdorff(a: np.ndarray, b: np.ndarray, spacing_zyx) -> float:
    """SimpleITK's HausdorffDistanceImageFilter (all voxels, physical units)."""
    ia, ib = sitk.GetImageFromArray(a.astype(np.uint8)), sitk.GetImageFromArray(b.astype(np.uint8))
    for im in (ia, ib):
        im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK: (x, y, z)
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(ia, ib)
    return f.GetHausdorffDistance()


def brute_force_surface_distances(a, b, spacing) -> np.ndarray:
    """Both directed surface-to-surface distance sets by explicit pairwise distances."""
    def pts(m):
        s = m & ~binary_erosion(m, structure=np.array(
            [[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
             [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], dtype=bool), border_value=0)
        return np.argwhere(s) * np.asarray(spacing)
    pa, pb = pts(a), pts(b)
    d = cdist(pa, pb)
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


class TestHandCounts:
    def test_overlap_metrics(self) -> None:
        # 2D 4x5 grid: pred covers 6 voxels, target 4, overlap 3 (counted by hand below)
        pred = box((4, 5), (0, 0), (2, 3))  # rows 0-1, cols 0-2: 6 voxels
        target = box((4, 5), (1, 1), (3, 3))  # rows 1-2, cols 1-2: 4 voxels
        tp, fp, fn, tn = 2, 4, 2, 12  # overlap = row 1, cols 1-2
        m = segmentation_metrics(pred, target, (1.0, 1.0))
        assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 4/10
        assert m["iou"] == pytest.approx(tp / (tp + fp + fn))  # 2/8
        assert m["precision"] == pytest.approx(tp / (tp + fp))  # 2/6
        assert m["recall"] == pytest.approx(tp / (tp + fn))  # 2/4
        assert m["specificity"] == pytest.approx(tn / (tn + fp))  # 12/16
        p, r = tp / (tp + fp), tp / (tp + fn)
        assert m["f2"] == pytest.approx(5 * p * r / (4 * p + r))  # thesis eq. 8.5
        assert m["accuracy"] == pytest.approx((tp + tn) / 20)
        assert list(m) == list(METRIC_NAMES)

    def test_distances_by_hand_with_anisotropic_spacing(self) -> None:
        # single voxels 3 apart along axis 0 with spacing 2.5 mm: every distance 7.5 mm
        a, b = np.zeros((8, 3, 3), bool), np.zeros((8, 3, 3), bool)
        a[1, 1, 1] = b[4, 1, 1] = True
        m = segmentation_metrics(a, b, (2.5, 1.0, 1.0))
        assert m["hd"] == pytest.approx(7.5)
        assert m["hd95"] == pytest.approx(7.5)

    def test_tensors_and_0_1_arrays_are_accepted(self) -> None:
        a = box((6, 6), (1, 1), (4, 4))
        m1 = segmentation_metrics(a, a, (1, 1))
        m2 = segmentation_metrics(torch.from_numpy(a.astype(np.uint8)), a.astype(np.float32), (1, 1))
        assert m1 == m2
        assert m1["dice"] == 1.0
        assert m1["hd"] == 0.0


class TestAgainstReferences:
    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_hd_matches_simpleitk(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        shape = (12, 16, 14)
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        lo_a = rng.integers(0, 5, 3)
        lo_b = rng.integers(0, 5, 3)
        a = box(shape, lo_a, lo_a + rng.integers(3, 7, 3))
        b = box(shape, lo_b, lo_b + rng.integers(3, 7, 3))
        # boxes: each mask's farthest voxel from the other lies on its surface, so the
        # surface and all-voxel Hausdorff distances agree; float64 EDT vs ITK: rtol 1e-6
        np.testing.assert_allclose(segmentation_metrics(a, b, spacing)["hd"],
                                   sitk_hausdorff(a, b, spacing), rtol=1e-6)

    def test_hd_matches_simpleitk_on_spheres(self) -> None:
        zz, yy, xx = np.mgrid[:20, :20, :20]
        a = (zz - 9) ** 2 + (yy - 9) ** 2 + (xx - 9) ** 2 < 36
        b = (zz - 11) ** 2 + (yy - 8) ** 2 + (xx - 10) ** 2 < 20
        spacing = (2.0, 1.0, 0.8)
        np.testing.assert_allclose(segmentation_metrics(a, b, spacing)["hd"],
                                   sitk_hausdorff(a, b, spacing), rtol=1e-6)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_hd95_matches_brute_force_percentile(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        a = rng.random((10, 12, 12)) > 0.6
        b = rng.random((10, 12, 12)) > 0.6
        spacing = (2.0, 0.7, 1.3)
        d = brute_force_surface_distances(a, b, spacing)
        m = segmentation_metrics(a, b, spacing)
        np.testing.assert_allclose(m["hd95"], np.percentile(d, 95), rtol=1e-9)
        np.testing.assert_allclose(m["hd"], d.max(), rtol=1e-9)


class TestEmptyMasks:
    def test_both_empty_is_perfect(self) -> None:
        z = np.zeros((4, 4, 4), bool)
        m = segmentation_metrics(z, z, (1, 1, 1))
        assert all(m[k] == 1.0 for k in METRIC_NAMES if k not in ("hd", "hd95"))
        assert m["hd"] == 0.0
        assert m["hd95"] == 0.0

    @pytest.mark.parametrize("pred_empty", [True, False])
    def test_one_empty_scores_zero_and_nan_distance(self, pred_empty: bool) -> None:
        full = box((4, 4, 4), (1, 1, 1), (3, 3, 3))
        empty = np.zeros_like(full)
        pred, target = (empty, full) if pred_empty else (full, empty)
        m = segmentation_metrics(pred, target, (1, 1, 1))
        for k in ("dice", "iou", "f2", "precision", "recall"):
            assert m[k] == 0.0, k
        assert math.isnan(m["hd"])
        assert math.isnan(m["hd95"])


class TestErrors:
    def test_shape_mismatch(self) -> None:
        with pytest.raises(ValueError, match=r"pred shape \(2, 2\) differs from target shape \(2, 3\)"):
            segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 3)), (1, 1))

    def test_non_binary(self) -> None:
        with pytest.raises(ValueError, match=r"pred must be a binary mask .* got values \[0\.0, 0\.7\]"):
            segmentation_metrics(np.array([[0.0, 0.7]]), np.zeros((1, 2)), (1, 1))

    def test_spacing_per_axis(self) -> None:
        with pytest.raises(ValueError, match=r"one positive mm value per axis of the 2D masks, got \(1, 1, 1\)"):
            segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 2)), (1, 1, 1))
