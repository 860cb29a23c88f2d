"""Region (overlap) losses: Dice, IoU, Tversky, focal Tversky, asymmetric, generalized
Dice and the region-specific adaptive Tversky.

All follow ``_common``'s region convention: soft TP, FP, FN summed over batch and
spatial dimensions per channel, ``smooth`` (1e-5) added to numerator and denominator,
mean over channels. Dice, IoU, Tversky and generalized Dice call MONAI's
implementations with ``batch=True`` on probabilities we compute ourselves (sigmoid for
C = 1, softmax otherwise; channel selection done here too); the tests pin them against
naive formulas. MONAI has no focal Tversky (Abraham's form), asymmetric or adaptive
Tversky loss, so those are written here from the formulas.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.losses import DiceLoss as _MonaiDice
from monai.losses import GeneralizedDiceLoss as _MonaiGeneralizedDice
from monai.losses import TverskyLoss as _MonaiTversky
from torch import Tensor, nn

from ._common import (
    REDUCTIONS,
    SMOOTH,
    Reduction,
    check_choice,
    check_nonnegative,
    confusion_sums,
    prepare,
    reduce_channels,
)
from ._registry import register_loss


def tversky_index(
    tp: Tensor,
    fp: Tensor,
    fn: Tensor,
    *,
    alpha: float | Tensor,
    beta: float | Tensor,
    smooth: float = SMOOTH,
) -> Tensor:
    """Soft Tversky index ``(TP + s) / (TP + alpha FP + beta FN + s)`` (thesis eq. 3.20-3.21)."""
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


class _RegionLoss(nn.Module):
    """Common configuration of the region losses (``smooth``, channels, reduction)."""

    def __init__(
        self,
        *,
        smooth: float = SMOOTH,
        include_background: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.smooth = check_nonnegative("smooth", smooth)
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        probs, target = prepare(logits, target, self.include_background)
        return reduce_channels(self.per_channel(probs, target), self.reduction)


@register_loss("dice")
class DiceLoss(_RegionLoss):
    """Soft Dice loss ``1 - (2 TP + s) / (2 TP + FP + FN + s)`` per channel (MONAI ``DiceLoss``).

    Parameters
    ----------
    smooth : float, default 1e-5
        Added to numerator and denominator.
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"

    Notes
    -----
    Thesis eq. 3.14: ``L_D = 1 - 2 sum(p g) / sum(p + g)``; with binary g,
    ``sum(p) + sum(g) = 2 TP + FP + FN``.

    References
    ----------
    .. [1] Milletari, F., Navab, N., Ahmadi, S.-A. (2016). V-Net: fully convolutional neural
       networks for volumetric medical image segmentation. 3DV 2016. arXiv:1606.04797
    """

    jaccard = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._monai = _MonaiDice(
            include_background=True,
            batch=True,
            jaccard=self.jaccard,
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            reduction="none",
        )

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        return self._monai(probs, target).reshape(-1)


@register_loss("iou")
class IoULoss(DiceLoss):
    """Soft IoU (Jaccard) loss ``1 - (TP + s) / (TP + FP + FN + s)`` per channel.

    MONAI ``DiceLoss(jaccard=True)``; parameters as ``dice``.

    Notes
    -----
    Thesis eq. 3.15-3.16; IoU = D / (2 - D) for the unsmoothed hard sets (eq. 3.18).

    References
    ----------
    .. [1] Rahman, M. A., Wang, Y. (2016). Optimizing intersection-over-union in deep neural
       networks for image segmentation. ISVC 2016. doi:10.1007/978-3-319-50835-1_22
    """

    jaccard = True


@register_loss("tversky")
class TverskyLoss(_RegionLoss):
    """Tversky loss ``1 - (TP + s) / (TP + alpha FP + beta FN + s)`` per channel (MONAI).

    Parameters
    ----------
    alpha, beta : float, default 0.3, 0.7
        Weights of false positives and false negatives; alpha = beta = 0.5 gives Dice,
        alpha = beta = 1 gives IoU.
    smooth, include_background, reduction
        As ``dice``.

    Notes
    -----
    Thesis eq. 3.21 with ``FP = sum(p (1 - g))``, ``FN = sum((1 - p) g)``.

    References
    ----------
    .. [1] Salehi, S. S. M., Erdogmus, D., Gholipour, A. (2017). Tversky loss function for
       image segmentation using 3D fully convolutional deep networks. MLMI 2017.
       arXiv:1706.05721
    """

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.7, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._monai = _MonaiTversky(
            include_background=True,
            batch=True,
            alpha=check_nonnegative("alpha", alpha),
            beta=check_nonnegative("beta", beta),
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            reduction="none",
        )

    # alpha and beta live in the MONAI module that uses them, so that setting them (the
    # greedy parameter adaptation does, between steps) changes the loss
    @property
    def alpha(self) -> float:
        """Weight of the false positives."""
        return float(self._monai.alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._monai.alpha = check_nonnegative("alpha", value)

    @property
    def beta(self) -> float:
        """Weight of the false negatives."""
        return float(self._monai.beta)

    @beta.setter
    def beta(self, value: float) -> None:
        self._monai.beta = check_nonnegative("beta", value)

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        return self._monai(probs, target).reshape(-1)


@register_loss("focal_tversky")
class FocalTverskyLoss(_RegionLoss):
    """Focal Tversky loss ``(1 - TI_c)^(1/gamma)`` per channel, averaged over channels.

    Parameters
    ----------
    alpha, beta : float, default 0.3, 0.7
        Tversky weights of FP and FN as in ``tversky``. Abraham & Khan name the FN weight
        alpha and recommend 0.7 for it; in this module's naming that is beta = 0.7.
    gamma : float > 0, default 4/3
        gamma = 1 gives the Tversky loss.
    smooth, include_background, reduction
        As ``dice``.

    Notes
    -----
    ``FTL = sum_c (1 - TI_c)^(1/gamma)`` (Abraham & Khan 2019, eq. 4); we average over
    channels. The thesis' eq. 3.31 prints ``(1 - L_T)^(1/gamma)``, i.e. ``TI^(1/gamma)``,
    which increases with overlap; the paper's form is used.

    References
    ----------
    .. [1] Abraham, N., Khan, N. M. (2019). A novel focal Tversky loss function with
       improved attention U-Net for lesion segmentation. ISBI 2019. arXiv:1810.07842
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 4.0 / 3.0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.alpha = check_nonnegative("alpha", alpha)
        self.beta = check_nonnegative("beta", beta)
        if not check_nonnegative("gamma", gamma) > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        tp, fp, fn = confusion_sums(probs, target)
        ti = tversky_index(tp, fp, fn, alpha=self.alpha, beta=self.beta, smooth=self.smooth)
        # clamp: 1 - TI can round to a tiny negative value; x^(1/gamma) would be NaN
        return (1 - ti).clamp_min(0) ** (1 / self.gamma)


@register_loss("asymmetric")
class AsymmetricLoss(_RegionLoss):
    """Asymmetric similarity loss (F_beta form) per channel.

    Parameters
    ----------
    beta : float, default 1.5
        beta = 1 gives Dice, beta = 2 the F2 score; beta > 1 weighs recall more.
    smooth, include_background, reduction
        As ``dice``.

    Notes
    -----
    Thesis eq. 3.23: ``L_A = 1 - ((1 + b^2) TP + s) / ((1 + b^2) TP + FP + b^2 FN + s)``,
    the Tversky index with alpha = 1/(1 + b^2), beta = b^2/(1 + b^2) (up to smoothing).

    References
    ----------
    .. [1] Hashemi, S. R. et al. (2019). Asymmetric loss functions and deep densely-connected
       networks for highly-imbalanced medical image segmentation: application to multiple
       sclerosis lesion detection. IEEE Access 7, 1721-1735. doi:10.1109/ACCESS.2018.2886371
    """

    def __init__(self, *, beta: float = 1.5, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.beta = check_nonnegative("beta", beta)

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        tp, fp, fn = confusion_sums(probs, target)
        b2 = self.beta**2
        return 1 - ((1 + b2) * tp + self.smooth) / ((1 + b2) * tp + fp + b2 * fn + self.smooth)


@register_loss("generalized_dice")
class GeneralizedDiceLoss(_RegionLoss):
    """Generalized Dice loss with squared inverse-volume class weights (MONAI).

    Parameters
    ----------
    smooth, include_background
        As ``dice``.
    reduction : {"mean", "sum", "none"}, default "mean"
        The loss is already one number over all channels; every reduction returns it
        (``"none"`` as a one-element vector).

    Notes
    -----
    ``w_c = 1 / (sum g_c)^2`` (over batch and space; a channel absent from the batch gets
    the largest finite weight, as MONAI does),
    ``L = 1 - (2 sum_c w_c TP_c + s) / (sum_c w_c (sum p_c + sum g_c) + s)``.

    References
    ----------
    .. [1] Sudre, C. H., Li, W., Vercauteren, T., Ourselin, S., Cardoso, M. J. (2017).
       Generalised Dice overlap as a deep learning loss function for highly unbalanced
       segmentations. DLMIA 2017. arXiv:1707.03237
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._monai = _MonaiGeneralizedDice(
            include_background=True,
            batch=True,
            w_type="square",
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            reduction="none",
        )

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        return self._monai(probs, target).reshape(-1)


def adaptive_tversky_weights(
    fp: Tensor, fn: Tensor, *, A: float, B: float, smooth: float = SMOOTH
) -> tuple[Tensor, Tensor]:
    """Region-specific Tversky weights from the current prediction's errors.

    ``alpha = A + B (FP + s/2) / (FP + FN + s)``, ``beta = A + B (FN + s/2) / (FP + FN + s)``;
    the ``s`` terms make a region without errors get ``alpha = beta = A + B/2``. The
    result is detached: the weights are chosen from the prediction, not trained through.
    """
    fp, fn = fp.detach(), fn.detach()
    total = fp + fn + smooth
    return A + B * (fp + smooth / 2) / total, A + B * (fn + smooth / 2) / total


def _region_sums(x: Tensor, regions: tuple[int, ...]) -> Tensor:
    """Sum ``(N, C, *spatial)`` over the batch and within each of ``regions`` blocks: ``(C, R)``."""
    n, c, *spatial = x.shape
    shape: list[int] = [n, c]
    for size, r in zip(spatial, regions, strict=True):
        shape += [r, size // r]
    x = x.reshape(shape)
    within = [0, *range(3, len(shape), 2)]
    return x.sum(dim=within).reshape(c, -1)


@register_loss("adaptive_tversky")
class AdaptiveTverskyLoss(_RegionLoss):
    """Region-specific adaptive Tversky loss (Chen et al. 2023).

    The spatial grid is cut into ``regions_per_axis`` equal blocks per axis; in each
    block and channel, alpha and beta follow the current prediction's soft FP and FN
    (``adaptive_tversky_weights``), and the Tversky losses of all blocks and channels are
    averaged (``reduction="none"`` returns ``(C',)``, each channel averaged over blocks).

    Parameters
    ----------
    A, B : float, default 0.3, 0.4
        ``alpha = A + B FP/(FP + FN)``, ``beta = A + B FN/(FP + FN)`` (the paper's values;
        alpha + beta = 2A + B = 1).
    regions_per_axis : int or sequence of int, default 1
        Number of blocks along each spatial axis (1: one region per channel). Each
        spatial size must be divisible by its count.
    smooth, include_background, reduction
        As ``dice``.

    References
    ----------
    .. [1] Chen, Y., Yu, L., Wang, J.-Y., Panjwani, N., Obeid, J.-P., Liu, W., Liu, L.,
       Kovalchuk, N., Gensheimer, M. F., Vitzthum, L. K., Beadle, B. M., Chang, D. T.,
       Le, Q.-T., Han, B., Xing, L. (2023). Adaptive region-specific loss for improved
       medical image segmentation. IEEE TPAMI 45(11). arXiv:2305.08908
    """

    def __init__(
        self,
        *,
        A: float = 0.3,
        B: float = 0.4,
        regions_per_axis: int | Sequence[int] = 1,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.A = check_nonnegative("A", A)
        self.B = check_nonnegative("B", B)
        counts = (
            (regions_per_axis,) if isinstance(regions_per_axis, int) else tuple(regions_per_axis)
        )
        if not counts or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in counts
        ):
            raise ValueError(
                f"regions_per_axis must be a positive int or ints, got {regions_per_axis!r}"
            )
        self.regions_per_axis = counts

    def _regions(self, spatial: Sequence[int]) -> tuple[int, ...]:
        counts = self.regions_per_axis
        if len(counts) == 1:
            counts = counts * len(spatial)
        if len(counts) != len(spatial) or any(s % r for s, r in zip(spatial, counts, strict=True)):
            raise ValueError(
                f"adaptive_tversky: regions_per_axis {self.regions_per_axis!r} does not divide "
                f"the spatial shape {tuple(spatial)!r}"
            )
        return counts

    def weights(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The ``(alpha, beta)`` the loss uses for these inputs, each ``(C', R)``."""
        probs, target = prepare(logits, target, self.include_background)
        return self._weights(probs, target)[3:]

    def _weights(self, probs: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        regions = self._regions(probs.shape[2:])
        tp = _region_sums(probs * target, regions)
        fp = _region_sums(probs * (1 - target), regions)
        fn = _region_sums((1 - probs) * target, regions)
        alpha, beta = adaptive_tversky_weights(fp, fn, A=self.A, B=self.B, smooth=self.smooth)
        return tp, fp, fn, alpha, beta

    def per_channel(self, probs: Tensor, target: Tensor) -> Tensor:
        tp, fp, fn, alpha, beta = self._weights(probs, target)
        index = tversky_index(tp, fp, fn, alpha=alpha, beta=beta, smooth=self.smooth)
        return (1 - index).mean(dim=1)


__all__ = [
    "AdaptiveTverskyLoss",
    "AsymmetricLoss",
    "DiceLoss",
    "FocalTverskyLoss",
    "GeneralizedDiceLoss",
    "IoULoss",
    "TverskyLoss",
    "adaptive_tversky_weights",
    "tversky_index",
]
