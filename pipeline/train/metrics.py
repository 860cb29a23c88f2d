"""Segmentation metrics on binary masks: overlap counts and spacing-aware surface distances.

``segmentation_metrics(pred, target, spacing)`` returns the metrics of the thesis
(Hun 2021, section 8.3) for one case: Dice, IoU, precision, recall, specificity, F2,
accuracy, and the Hausdorff distance (maximum and 95th percentile) in mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

METRIC_NAMES: tuple[str, ...] = (
    "dice", "iou", "precision", "recall", "specificity", "f2", "accuracy", "hd95", "hd",
)
"""Keys of ``segmentation_metrics``'s result, in table order."""

DISTANCE_METRICS: tuple[str, ...] = ("hd95", "hd")
"""Metrics in mm (lower is better); the others are ratios in [0, 1] (higher is better)."""


def _as_mask(x: Any, name: str) -> NDArray[np.bool_]:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.dtype != np.bool_:
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"{name} must be a binary mask (bool or 0/1 values), got values "
                f"{values[:5].tolist()!r}{'...' if values.size > 5 else ''}"
            )
        arr = arr.astype(bool)
    return arr


def surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Surface voxels of a mask: mask voxels with a face neighbour outside it.

    ``mask & ~binary_erosion(mask, face connectivity)``, with the outside of the array
    counted as background (MedPy's ``__surface_distances`` convention).
    """
    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    a: NDArray[np.bool_], b: NDArray[np.bool_], spacing: Sequence[float]
) -> NDArray[np.float64]:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Both masks must be non-empty. ``spacing`` is the voxel size per array axis.
    """
    sa, sb = surface(a), surface(b)
    dist_to_b = distance_transform_edt(~sb, sampling=tuple(float(s) for s in spacing))
    return np.asarray(dist_to_b[sa], dtype=np.float64)


def _ratio(num: int, den: int, *, equal: bool) -> float:
    if den == 0:
        return 1.0 if equal else 0.0
    return num / den


def segmentation_metrics(pred: Any, target: Any, spacing: Sequence[float]) -> dict[str, float]:
    """Overlap and distance metrics of one binary prediction against its reference.

    Parameters
    ----------
    pred, target : array-like of bool or {0, 1}, same shape (2D or 3D)
        Binary masks (numpy arrays or tensors). Probabilities must be thresholded first
        (the trainer uses p > 0.5, i.e. logit > 0, like the thesis).
    spacing : sequence of float
        Voxel size in mm **per array axis, in the array's axis order**. Store arrays are
        ``(z, y, x)`` while ``Grid.spacing`` is ``(x, y, z)``: pass ``grid.spacing[::-1]``.

    Returns
    -------
    dict of str to float
        Keys ``METRIC_NAMES``: ``dice``, ``iou``, ``precision``, ``recall``,
        ``specificity``, ``f2``, ``accuracy`` in [0, 1]; ``hd95`` and ``hd`` in mm.

    Raises
    ------
    ValueError
        If the shapes differ, the masks are not binary, or ``spacing`` does not give one
        positive value per axis.

    Notes
    -----
    With TP, FP, FN, TN the voxel counts (thesis eq. 8.2-8.7):

    - dice = 2TP / (2TP + FP + FN), iou = TP / (TP + FP + FN)
    - precision = TP / (TP + FP), recall = TP / (TP + FN), specificity = TN / (TN + FP)
    - f2 = 5TP / (5TP + 4FN + FP) (= 5PR / (4P + R)), accuracy = (TP + TN) / all

    Distances follow MedPy's ``hd`` / ``hd95``: the surface of a mask is its voxels with
    a face neighbour outside it; ``d(a -> b)`` is the Euclidean distance (mm, spacing-
    aware, via ``scipy.ndimage.distance_transform_edt(sampling=spacing)``) from each
    surface voxel of ``a`` to the nearest surface voxel of ``b``. ``hd`` is the maximum
    of both directed sets, ``hd95`` the 95th percentile (numpy's linear interpolation)
    of their union (the symmetric surface distances). ``hd`` equals the voxel-set
    Hausdorff distance of SimpleITK's ``HausdorffDistanceImageFilter`` whenever the
    farthest voxel of each mask from the other lies on its surface (e.g. for convex or
    overlapping shapes); the surface form differs only when one mask lies inside a
    hole of the other.

    Empty masks (a ratio whose denominator is 0 is 1 when ``pred`` equals ``target``
    and 0 otherwise):

    - both empty: every ratio metric 1, ``hd = hd95 = 0``;
    - exactly one empty: dice, iou, f2, precision and recall 0; ``hd = hd95 = NaN``
      (undefined; the trainer's summaries average distances over the cases where they
      are defined and report how many were not).

    References
    ----------
    .. [1] Hun, A. (2021). Loss functions for medical image segmentation. Master's thesis,
       section 8.3.
    .. [2] Maier, O. et al. MedPy, ``medpy.metric.binary.hd95``.
       https://github.com/loli/medpy
    .. [3] Taha, A. A., Hanbury, A. (2015). Metrics for evaluating 3D medical image
       segmentation: analysis, selection, and tool. BMC Medical Imaging 15, 29.
       doi:10.1186/s12880-015-0068-x

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((4, 4), bool); a[1:3, 1:3] = True
    >>> m = segmentation_metrics(a, a, (1.0, 1.0))
    >>> m["dice"], m["hd"]
    (1.0, 0.0)
    """
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape!r} differs from target shape {t.shape!r}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != p.ndim or any(not s > 0 for s in sp):
        raise ValueError(
            f"spacing must give one positive mm value per axis of the {p.ndim}D masks, "
            f"got {tuple(spacing)!r}"
        )
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    equal = fp == 0 and fn == 0
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, equal=equal),
        "iou": _ratio(tp, tp + fp + fn, equal=equal),
        "precision": _ratio(tp, tp + fp, equal=equal),
        "recall": _ratio(tp, tp + fn, equal=equal),
        "specificity": _ratio(tn, tn + fp, equal=equal),
        "f2": _ratio(5 * tp, 5 * tp + 4 * fn + fp, equal=equal),
        "accuracy": _ratio(tp + tn, p.size, equal=equal),
    }
    has_p, has_t = tp + fp > 0, tp + fn > 0
    if not has_p and not has_t:
        out["hd95"] = out["hd"] = 0.0
    elif has_p != has_t:
        out["hd95"] = out["hd"] = math.nan
    else:
        d = np.concatenate([surface_distances(p, t, sp), surface_distances(t, p, sp)])
        out["hd95"] = float(np.percentile(d, 95))
        out["hd"] = float(d.max())
    return {k: float(out[k]) for k in METRIC_NAMES}
