"""Shared conventions of every loss in the zoo.

Input convention
----------------
``loss(logits, target)``: ``logits`` is the raw network output, shape
``(N, C, *spatial)``; ``target`` is a float tensor of the same shape, binary (C = 1)
or one-hot (C > 1). Probabilities are ``sigmoid(logits)`` when C = 1 and
``softmax(logits, dim=1)`` otherwise; the activation is chosen by C, never by a flag.

Channels
--------
``include_background`` (default True): with C > 1, False drops channel 0 (the
background class of the one-hot target) *after* the softmax. With C = 1 the single
channel is the foreground and the option has no effect.

Reductions
----------
Region terms (Dice, IoU, Tversky, ...) sum TP, FP, FN over the batch and spatial
dimensions per channel (MONAI's ``batch=True``), add ``smooth`` = 1e-5 to numerator
and denominator, and average over channels: ``reduction="mean"`` (default) gives a
scalar, ``"sum"`` the sum over channels, ``"none"`` the per-channel vector ``(C',)``.

Voxel-wise terms (cross-entropy, focal, Barron) sum the per-channel terms of a voxel
(the categorical cross-entropy form; with C = 1 that is the binary term) and average
over the batch and spatial positions: ``"mean"`` gives a scalar, ``"sum"`` the sum over
voxels, ``"none"`` the per-voxel map ``(N, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

SMOOTH = 1e-5
"""Added to the numerator and the denominator of every region ratio (MONAI's default)."""

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_nonnegative(name: str, value: float) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_inputs(logits: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless logits and target are ``(N, C, *spatial)`` of one shape."""
    if logits.ndim < 3:
        raise ValueError(
            f"logits must have shape (N, C, *spatial) with at least one spatial dimension, "
            f"got shape {tuple(logits.shape)!r}"
        )
    if logits.shape != target.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)!r} differs from logits shape "
            f"{tuple(logits.shape)!r}; targets must be binary (C = 1) or one-hot"
        )
    if not target.is_floating_point():
        raise ValueError(f"target must be a float tensor, got dtype {target.dtype!r}")


def probabilities(logits: Tensor) -> Tensor:
    """Sigmoid of the logits when C = 1, softmax over the channel axis otherwise."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def select_channels(x: Tensor, include_background: bool) -> Tensor:
    """Drop channel 0 when ``include_background`` is False and there is more than one channel."""
    if include_background or x.shape[1] == 1:
        return x
    return x[:, 1:]


def prepare(logits: Tensor, target: Tensor, include_background: bool) -> tuple[Tensor, Tensor]:
    """Check the inputs, apply the activation, select the channels: ``(probs, target)``."""
    check_inputs(logits, target)
    probs = probabilities(logits)
    return select_channels(probs, include_background), select_channels(target, include_background)


def batch_spatial_dims(x: Tensor) -> list[int]:
    """All dimensions but the channel axis: ``[0, 2, 3, ...]``."""
    return [0, *range(2, x.ndim)]


def confusion_sums(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft TP, FP, FN per channel, summed over the batch and spatial dimensions.

    ``TP = sum(p * g)``, ``FP = sum(p * (1 - g))``, ``FN = sum((1 - p) * g)``; each ``(C,)``.
    """
    dims = batch_spatial_dims(probs)
    tp = (probs * target).sum(dim=dims)
    fp = (probs * (1 - target)).sum(dim=dims)
    fn = ((1 - probs) * target).sum(dim=dims)
    return tp, fp, fn


def reduce_channels(per_channel: Tensor, reduction: str) -> Tensor:
    """Reduce a per-channel ``(C,)`` loss: mean (default), sum or none."""
    if reduction == "mean":
        return per_channel.mean()
    if reduction == "sum":
        return per_channel.sum()
    return per_channel


def reduce_voxels(per_element: Tensor, reduction: str) -> Tensor:
    """Sum a per-element ``(N, C, *spatial)`` loss over channels, then reduce over voxels."""
    per_voxel = per_element.sum(dim=1)
    if reduction == "mean":
        return per_voxel.mean()
    if reduction == "sum":
        return per_voxel.sum()
    return per_voxel
