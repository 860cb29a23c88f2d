"""The loss zoo: every loss the manifest may name, selectable by name.

``build_loss({"name": <name>, **params})`` builds one; ``LOSSES`` maps names to classes;
``register_loss(name)`` adds a class (duplicate names raise ``ValueError``).

Conventions (all losses)
------------------------
- Called as ``loss(logits, target)``: ``logits`` the raw network output
  ``(N, C, *spatial)``; ``target`` a float tensor of the same shape, binary (C = 1) or
  one-hot (C > 1).
- Activation by channel count: ``sigmoid`` when C = 1, ``softmax`` over C otherwise.
- ``include_background`` (default True): with C > 1, False drops channel 0 after the
  softmax; with C = 1 it has no effect. The default averages over all channels,
  background included (the plain reading of "average over channels").
- Region terms (dice, iou, tversky, focal_tversky, asymmetric, generalized_dice,
  adaptive_tversky) sum soft TP, FP, FN over batch and spatial dimensions per channel,
  add ``smooth`` = 1e-5 to numerator and denominator, and average over channels.
- Voxel-wise terms (bce, wce, focal, barron) sum over the channels of a voxel and average
  over batch and spatial positions.
- Distance terms (boundary, hausdorff_dt) average over batch and space per channel, then
  over channels; 2D or 3D inputs only.
- ``reduction``: ``"mean"`` (default, scalar), ``"sum"``, ``"none"`` (per channel for
  region/distance terms, per voxel for voxel-wise terms).

Where MONAI's implementation matches these conventions it is used (dice, iou, tversky,
generalized_dice: MONAI with ``batch=True`` on our probabilities; hausdorff_dt: MONAI's
``HausdorffDTLoss``); the tests pin each against a naive formula. The rest is written
from the formulas in the thesis (Hun 2021, chapter 3) and the papers cited in each class.

Families: ``distribution`` (bce, wce, focal), ``region``, ``boundary`` (boundary,
hausdorff_dt), ``robust`` (barron, ``barron_rho``), ``compound`` (dice_ce, dice_focal,
manifest; the manifest's dict shape is documented there).
"""

from __future__ import annotations

from . import boundary, compound, distribution, region, robust
from ._registry import LOSSES, build_loss, register_loss
from .boundary import signed_distance_map
from .compound import ManifestLoss
from .region import adaptive_tversky_weights, tversky_index
from .robust import barron_rho

__all__ = [
    "LOSSES",
    "ManifestLoss",
    "adaptive_tversky_weights",
    "barron_rho",
    "boundary",
    "build_loss",
    "compound",
    "distribution",
    "region",
    "register_loss",
    "robust",
    "signed_distance_map",
    "tversky_index",
]
