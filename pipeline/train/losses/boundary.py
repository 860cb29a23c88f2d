"""Distance-based losses: Kervadec's boundary loss and Karimi's distance-transform
Hausdorff loss.

Both are per channel, averaged over batch and spatial positions, then over channels
(the region convention without smoothing). They take 2D ``(N, C, H, W)`` or 3D
``(N, C, D, H, W)`` inputs; distances are in voxel units.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import HausdorffDTLoss as _MonaiHausdorffDT
from numpy.typing import NDArray
from scipy.ndimage import distance_transform_edt
from torch import Tensor, nn

from ._common import (
    REDUCTIONS,
    Reduction,
    batch_spatial_dims,
    check_choice,
    check_nonnegative,
    prepare,
    reduce_channels,
    select_channels,
)
from ._registry import register_loss


def _check_2d_3d(logits: Tensor, name: str) -> None:
    if logits.ndim not in (4, 5):
        raise ValueError(
            f"{name} needs 2D (N, C, H, W) or 3D (N, C, D, H, W) inputs, "
            f"got shape {tuple(logits.shape)!r}"
        )


def signed_distance_map(target: Tensor | NDArray[np.floating]) -> Tensor:
    """Kervadec's signed distance map of a binary / one-hot target, per sample and channel.

    Parameters
    ----------
    target : tensor or array, shape (N, C, *spatial)
        Binary masks (values > 0.5 are inside).

    Returns
    -------
    Tensor
        float32, same shape: outside the mask the Euclidean distance to the mask,
        inside ``-(d - 1)`` with ``d`` the distance to the background (0 on the inner
        boundary); 0 for empty or full masks. Equal to Kervadec's ``one_hot2dist`` and
        MONAI's ``BoundaryLoss.compute_distance_map``. Voxel units.

    References
    ----------
    .. [1] Kervadec, H. et al. (2021). Boundary loss for highly unbalanced segmentation.
       Medical Image Analysis 67, 101851. doi:10.1016/j.media.2020.101851
    """
    t = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
    if t.ndim < 3:
        raise ValueError(f"target must have shape (N, C, *spatial), got {t.shape!r}")
    out = np.zeros(t.shape, dtype=np.float32)
    for idx in np.ndindex(*t.shape[:2]):
        mask = t[idx] > 0.5
        if not mask.any() or mask.all():
            continue
        inside = distance_transform_edt(mask)
        outside = distance_transform_edt(~mask)
        out[idx] = np.where(mask, -(inside - 1), outside)
    result = torch.from_numpy(out)
    return result.to(target.device) if isinstance(target, Tensor) else result


@register_loss("boundary")
class BoundaryLoss(nn.Module):
    """Boundary loss: mean of ``p * phi_G``, phi_G the signed distance map of the target.

    Parameters
    ----------
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"
        Over channels; ``"none"`` returns ``(C',)``.

    Notes
    -----
    Thesis eq. 3.26, Kervadec et al. eq. 5: ``L_B = 1/M sum_q phi_G(q) p(q)`` per channel,
    M the number of voxels in the batch. ``forward(logits, target, distance_map=None)``:
    pass the precomputed ``signed_distance_map(target)`` (e.g. from the data loader) as
    ``distance_map``; without it the map is computed here with scipy on the CPU. The loss
    is negative when the prediction lies inside the target and is meant to be combined
    with a region term (eq. 3.27, ``weighting`` "rebalance").

    References
    ----------
    .. [1] Kervadec, H., Bouchtiba, J., Desrosiers, C., Granger, E., Dolz, J., Ben Ayed, I.
       (2021). Boundary loss for highly unbalanced segmentation. Medical Image Analysis 67,
       101851. doi:10.1016/j.media.2020.101851 (MIDL 2019, arXiv:1812.07032)
    """

    def __init__(self, *, include_background: bool = True, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor, distance_map: Tensor | None = None) -> Tensor:
        _check_2d_3d(logits, "boundary loss")
        if distance_map is None:
            distance_map = signed_distance_map(target)
        elif distance_map.shape != target.shape:
            raise ValueError(
                f"distance_map shape {tuple(distance_map.shape)!r} differs from target shape "
                f"{tuple(target.shape)!r}"
            )
        probs, _ = prepare(logits, target, self.include_background)
        phi = select_channels(distance_map.to(probs), self.include_background)
        per_channel = (probs * phi).mean(dim=batch_spatial_dims(probs))
        return reduce_channels(per_channel, self.reduction)


@register_loss("hausdorff_dt")
class HausdorffDTLoss(nn.Module):
    """Karimi's distance-transform Hausdorff loss (MONAI ``HausdorffDTLoss``, ``batch=True``).

    Parameters
    ----------
    alpha : float, default 2.0
        Exponent of the distances.
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"
        Over channels; ``"none"`` returns ``(C',)``.

    Notes
    -----
    Thesis eq. 3.29, Karimi & Salcudean eq. 8:
    ``L = 1/M sum_q (p - g)^2 (d_p^alpha + d_g^alpha)`` per channel, ``d_p``, ``d_g`` the
    unsigned distances to the boundary of the thresholded prediction (p > 0.5) and of the
    target, computed without gradient (0 for empty or full masks).

    References
    ----------
    .. [1] Karimi, D., Salcudean, S. E. (2020). Reducing the Hausdorff distance in medical
       image segmentation with convolutional neural networks. IEEE TMI 39(2), 499-513.
       arXiv:1904.10030
    """

    def __init__(
        self, *, alpha: float = 2.0, include_background: bool = True, reduction: Reduction = "mean"
    ) -> None:
        super().__init__()
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self._monai = _MonaiHausdorffDT(
            alpha=check_nonnegative("alpha", alpha), include_background=True, batch=True,
            reduction="none"
        )

    # alpha lives in the MONAI module that uses it, so that setting it changes the loss
    @property
    def alpha(self) -> float:
        """Exponent of the distances."""
        return float(self._monai.alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._monai.alpha = check_nonnegative("alpha", value)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_2d_3d(logits, "hausdorff_dt loss")
        probs, target = prepare(logits, target, self.include_background)
        return reduce_channels(self._monai(probs, target).reshape(-1), self.reduction)
