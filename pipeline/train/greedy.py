"""Greedy adaptation of loss parameters (Seo et al. 2021; thesis section 5.1).

Before a training step, every combination of the discrete actions (the cartesian product
of ``factors`` over the adapted parameters: ``len(factors) ** p`` combinations) is tried
on the batch of that step: the action multiplies the parameters of the manifest loss's
adapted term, one optimizer step is taken, the model predicts the same batch again, and
the L2 norm between that prediction (sigmoid for one channel, softmax otherwise) and the
target is recorded; then model, optimizer, loss and weighting state are restored. The
action with the smallest norm is applied to the loss for good, and the caller takes the
real step with it. `greedy_search` does the trials; ``pipeline.train.loop.train_fold``
calls it every ``adaptation.every`` steps when the loss has an adaptation.

A trial step is the loop's training step exactly: forward under the given autocast,
loss on float logits (training mode, so the weighting is updated as the real step
would), ``zero_grad(set_to_none=True)``, backward (through the gradient scaler when one
is given), optimizer step, scaler update. The snapshot taken before the trials holds the
model's and the loss's ``state_dict`` (parameters and buffers: batch-norm statistics,
Barron's learnable shape), a deep copy of the optimizer's ``state_dict``, the weighting
object, the last component values, the scaler's state and the torch random-number state
(CPU and CUDA), so every trial starts from the same state and the trials leave nothing
behind but the chosen parameter values; gradients are cleared (``None``).

Cost: each search is ``len(factors) ** p`` extra forward-backward-forward passes (9 for
alpha and beta with three factors), which is why ``every`` > 1 exists: it trades the
fidelity of following the best action at each step for speed. The thesis searches at
every step.

References
----------
.. [1] Seo, H., Bassenne, M., Xing, L. (2021; online 2020). Closing the gap between deep
   neural network modeling and biomedical decision-making metrics in segmentation via
   adaptive loss functions. IEEE Transactions on Medical Imaging 40(2), 585-593.
   doi:10.1109/TMI.2020.3031913
.. [2] Hun, A. (2021). Loss functions for medical image segmentation (thesis),
   section 5.1 and figure 5.1.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.train.losses._common import probabilities
from pipeline.train.losses.compound import ManifestLoss

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

__all__ = ["GreedyChoice", "action_grid", "greedy_search", "prediction_error"]


def action_grid(factors: Sequence[float], n_params: int) -> list[tuple[float, ...]]:
    """All ``len(factors) ** n_params`` actions, in ``itertools.product`` order."""
    return list(itertools.product(factors, repeat=n_params))


def prediction_error(logits: Tensor, target: Tensor) -> float:
    """L2 norm ``||p - y||_2`` over all voxels and channels of the batch.

    ``p`` is the sigmoid of the logits for one channel, the softmax over channels
    otherwise (the losses' convention); ``y`` the binary or one-hot target. A non-finite
    result (a trial that diverged) is returned as ``inf`` so that it is never chosen.
    """
    value = float(torch.linalg.vector_norm(probabilities(logits.float()) - target.float()))
    return value if math.isfinite(value) else math.inf


@dataclass(frozen=True)
class GreedyChoice:
    """The result of one greedy search.

    ``candidates``: the actions tried, one factor per adapted parameter;
    ``errors``: the L2 norm after each candidate's trial step; ``action``: the chosen
    candidate (smallest error; ties go to the action nearest to no change,
    ``sum |log f|``, then to the first); ``before`` and ``values``: the parameters before
    the search and after the chosen action (clamped to their bounds).
    """

    candidates: tuple[tuple[float, ...], ...]
    errors: tuple[float, ...]
    action: tuple[float, ...]
    before: dict[str, float]
    values: dict[str, float]


class _Snapshot:
    """Everything a trial step changes, copied so that it can be put back."""

    def __init__(self, model: nn.Module, loss_fn: ManifestLoss,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.loss = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}
        # the optimizer's state_dict holds references to its live state tensors, and
        # load_state_dict may reuse the tensors it is given: copy on both sides
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.weighting = copy.deepcopy(loss_fn.weighting)
        self.last_values = loss_fn.last_values
        self.adapted = loss_fn.adapted_values()
        self.scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self, model: nn.Module, loss_fn: ManifestLoss,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        model.load_state_dict(self.model)
        loss_fn.load_state_dict(self.loss)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        loss_fn.weighting = copy.deepcopy(self.weighting)
        loss_fn.last_values = self.last_values
        loss_fn.set_adapted_values(self.adapted)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(copy.deepcopy(self.scaler))
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def greedy_search(model: nn.Module, loss_fn: ManifestLoss, optimizer: torch.optim.Optimizer,
                  x: Tensor, y: Tensor, *, extras: Mapping[str, Tensor] | None = None,
                  scaler: torch.amp.GradScaler | None = None,
                  autocast: Autocast = contextlib.nullcontext) -> GreedyChoice:
    """Try every action on this batch, apply the best one to the loss (Seo et al. 2021).

    Parameters
    ----------
    model : nn.Module
        In training mode; its parameters (and the loss's learnable ones) are those of
        ``optimizer``.
    loss_fn : ManifestLoss
        With an ``adaptation``; in training mode.
    optimizer : torch.optim.Optimizer
    x, y : Tensor
        The step's input batch and target (on the model's device).
    extras : mapping, optional
        Extra loss inputs (``distance_map``), as the loop passes them.
    scaler : torch.amp.GradScaler, optional
        The loop's gradient scaler (fp16); None for a plain backward and step.
    autocast : callable returning a context manager, default no autocast
        The loop's mixed-precision context for the forward passes.

    Returns
    -------
    GreedyChoice
        The candidates, their errors and the chosen action; the loss's adapted
        parameters are left at the chosen values, everything else as it was.

    Raises
    ------
    ValueError
        If the loss has no adaptation.

    Notes
    -----
    For each action ``a`` (one factor per parameter): ``p <- clamp(p_0 a)``, one training
    step on ``(x, y)``, ``e_a = ||softmax/sigmoid(h_{t+1}(x)) - y||_2`` with the stepped
    model (training mode, no gradient), restore. Then ``p <- clamp(p_0 a*)`` with
    ``a* = argmin_a e_a``. Actions whose clamped parameters equal those of an action
    already tried (at a bound) reuse its error instead of repeating the trial.
    """
    spec = loss_fn.adaptation
    if spec is None:
        raise ValueError("greedy_search needs a manifest loss with an adaptation")
    extras = dict(extras or {})
    before = loss_fn.adapted_values()
    candidates = action_grid(spec.factors, len(spec.params))
    snapshot = _Snapshot(model, loss_fn, optimizer, scaler)
    tried: dict[tuple[float, ...], float] = {}
    errors = []
    for action in candidates:
        values = loss_fn.set_adapted_values(
            {p: before[p] * f for p, f in zip(spec.params, action, strict=True)})
        key = tuple(values[p] for p in spec.params)
        if key not in tried:
            try:
                with autocast():
                    logits = model(x)
                loss = loss_fn(logits.float(), y, **extras)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                with torch.no_grad(), autocast():
                    tried[key] = prediction_error(model(x), y)
            finally:
                snapshot.restore(model, loss_fn, optimizer, scaler)
        errors.append(tried[key])
    best = min(range(len(candidates)),
               key=lambda i: (errors[i], sum(abs(math.log(f)) for f in candidates[i]), i))
    values = loss_fn.set_adapted_values(
        {p: before[p] * f for p, f in zip(spec.params, candidates[best], strict=True)})
    return GreedyChoice(tuple(candidates), tuple(errors), candidates[best], before, values)
