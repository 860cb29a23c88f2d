"""Distribution (voxel-wise) losses: cross-entropy, weighted cross-entropy, focal.

Every term here is computed per voxel and channel, summed over the channels of a voxel
and averaged over batch and spatial positions (see ``_common``). With C = 1 the terms
are the binary ones on ``sigmoid(logits)``; with C > 1 the categorical ones on
``softmax(logits)``.

Written by hand rather than wrapping MONAI: MONAI's ``FocalLoss(use_softmax=True)``
averages over channels as well as voxels (a factor 1/C against the categorical
cross-entropy, pinned in the tests), and the weighted cross-entropy below divides by the
number of voxels (Long et al.'s form), not by the sum of weights as
``torch.nn.functional.cross_entropy(weight=...)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional

from ._common import (
    REDUCTIONS,
    Reduction,
    check_choice,
    check_inputs,
    check_nonnegative,
    reduce_voxels,
    select_channels,
)
from ._registry import register_loss


def cross_entropy_terms(logits: Tensor, target: Tensor) -> Tensor:
    """Per-element cross-entropy ``(N, C, *spatial)``.

    C = 1: ``-(g log p + (1 - g) log(1 - p))`` with ``p = sigmoid(z)``;
    C > 1: ``-g_c log p_c`` with ``p = softmax(z)`` (sum over c gives the categorical CE).
    """
    if logits.shape[1] == 1:
        return functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return -target * torch.log_softmax(logits, dim=1)


def _class_frequency_weights(target: Tensor, eps: float = 1e-5) -> Tensor:
    """Inverse class frequencies of the batch, normalised to mean 1 (detached).

    C = 1: two classes (background = 1 - g, foreground = g), returned as ``(w_bg, w_fg)``.
    """
    dims = [0, *range(2, target.ndim)]
    t = target.detach()
    if t.shape[1] == 1:
        fg = t.sum(dim=dims)[0]
        counts = torch.stack([t[:, 0].numel() - fg, fg])
    else:
        counts = t.sum(dim=dims)
    freq = (counts + eps) / (counts.sum() + eps)
    inv = 1.0 / freq
    return inv / inv.mean()


def _check_weight(weight: Sequence[float] | None) -> tuple[float, ...] | None:
    if weight is None:
        return None
    if isinstance(weight, (str, bytes)) or not isinstance(weight, Sequence) or len(weight) < 2:
        raise ValueError(f"weight must be None or a sequence of >= 2 class weights, got {weight!r}")
    return tuple(check_nonnegative(f"weight[{i}]", w) for i, w in enumerate(weight))


@register_loss("bce")
class CrossEntropyLoss(nn.Module):
    """Cross-entropy: binary for C = 1 (thesis eq. 3.8), categorical for C > 1 (eq. 3.6).

    Parameters
    ----------
    include_background : bool, default True
        With C > 1, False drops the ``c = 0`` term of each voxel's sum.
    reduction : {"mean", "sum", "none"}, default "mean"

    Notes
    -----
    ``L = -1/M sum_i [g_i log p_i + (1 - g_i) log(1 - p_i)]`` (C = 1) and
    ``L = -1/M sum_i sum_c g_ic log p_ic`` (C > 1), M the number of voxels.

    References
    ----------
    .. [1] Hun, A. (2021). Loss functions for medical image segmentation (thesis), eq. 3.6-3.8.
    """

    def __init__(self, *, include_background: bool = True, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_inputs(logits, target)
        terms = select_channels(cross_entropy_terms(logits, target), self.include_background)
        return reduce_voxels(terms, self.reduction)


@register_loss("wce")
class WeightedCrossEntropyLoss(nn.Module):
    """Weighted cross-entropy with per-class weights.

    Parameters
    ----------
    weight : sequence of float or None, default None
        One weight per class: ``(w_background, w_foreground)`` when C = 1, ``C`` weights
        otherwise. None: inverse class frequencies of each batch, normalised to mean 1
        and detached (Long et al.'s median-frequency idea in its plain form).
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"

    Notes
    -----
    ``L = -1/M sum_i sum_c w_c g_ic log p_ic`` (taxonomy seed 003, "WCE"); for C = 1
    ``L = -1/M sum_i [w_1 g_i log p_i + w_0 (1 - g_i) log(1 - p_i)]``. The sum is divided
    by the number of voxels M, not by the sum of the weights.

    References
    ----------
    .. [1] Long, J., Shelhamer, E., Darrell, T. (2015). Fully convolutional networks for
       semantic segmentation. CVPR 2015. doi:10.1109/CVPR.2015.7298965
    .. [2] Ma, J. et al. (2021). Loss odyssey in medical image segmentation. Medical Image
       Analysis 71, 102035. doi:10.1016/j.media.2021.102035
    """

    def __init__(
        self,
        *,
        weight: Sequence[float] | None = None,
        include_background: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.weight = _check_weight(weight)
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_inputs(logits, target)
        n_classes = 2 if logits.shape[1] == 1 else logits.shape[1]
        if self.weight is None:
            w = _class_frequency_weights(target).to(logits.dtype)
        else:
            if len(self.weight) != n_classes:
                raise ValueError(
                    f"wce has {len(self.weight)} class weights {self.weight!r} but the input has "
                    f"{n_classes} classes (C = {logits.shape[1]}; C = 1 means background/foreground)"
                )
            w = torch.tensor(self.weight, dtype=logits.dtype, device=logits.device)
        if logits.shape[1] == 1:
            terms = -(
                w[1] * target * functional.logsigmoid(logits)
                + w[0] * (1 - target) * functional.logsigmoid(-logits)
            )
        else:
            shape = (1, -1) + (1,) * (logits.ndim - 2)
            terms = -w.view(shape) * target * torch.log_softmax(logits, dim=1)
        return reduce_voxels(select_channels(terms, self.include_background), self.reduction)


@register_loss("focal")
class FocalLoss(nn.Module):
    """Focal loss: cross-entropy scaled by ``(1 - p_t)^gamma``.

    Parameters
    ----------
    gamma : float, default 2.0
        Focusing parameter; gamma = 0 gives the cross-entropy (``bce``).
    alpha : float in [0, 1] or None, default None
        Class balance: weight alpha for the foreground (C = 1: g = 1; C > 1: channels
        c >= 1) and 1 - alpha for the background; None (thesis eq. 3.9) weighs all by 1.
    include_background : bool, default True
    reduction : {"mean", "sum", "none"}, default "mean"

    Notes
    -----
    Thesis eq. 3.9-3.10: ``L_F = alpha (1 - exp(-L_CE))^gamma L_CE``. Per element, C = 1:
    ``alpha_t (1 - p_t)^gamma BCE(z, g)`` with ``p_t = p g + (1 - p)(1 - g)`` (MONAI's
    ``sigmoid_focal_loss``); C > 1: ``-alpha_c g_c (1 - p_c)^gamma log p_c``, summed over c.

    References
    ----------
    .. [1] Lin, T.-Y., Goyal, P., Girshick, R., He, K., Dollár, P. (2017). Focal loss for
       dense object detection. ICCV 2017. arXiv:1708.02002
    """

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: float | None = None,
        include_background: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.gamma = check_nonnegative("gamma", gamma)
        if alpha is not None and not 0.0 <= check_nonnegative("alpha", alpha) <= 1.0:
            raise ValueError(f"alpha must be None or in [0, 1], got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)
        self.include_background = bool(include_background)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_inputs(logits, target)
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits)
            p_t = p * target + (1 - p) * (1 - target)
            terms = (1 - p_t) ** self.gamma * cross_entropy_terms(logits, target)
            if self.alpha is not None:
                terms = (self.alpha * target + (1 - self.alpha) * (1 - target)) * terms
        else:
            log_p = torch.log_softmax(logits, dim=1)
            terms = -target * (1 - log_p.exp()) ** self.gamma * log_p
            if self.alpha is not None:
                a = torch.full(
                    (logits.shape[1],), self.alpha, dtype=logits.dtype, device=logits.device
                )
                a[0] = 1 - self.alpha
                terms = a.view((1, -1) + (1,) * (logits.ndim - 2)) * terms
        return reduce_voxels(select_channels(terms, self.include_background), self.reduction)
