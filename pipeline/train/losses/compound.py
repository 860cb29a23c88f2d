"""Compound losses: Dice + cross-entropy, Dice + focal, and the manifest's weighted sum.

The ``manifest`` loss
---------------------
Built from the dict the manifest's loss configuration emits::

    {"name": "manifest",
     "terms": [{"name": "tversky", "weight": 1.0, "params": {"alpha": 0.3, "beta": 0.7}},
               {"name": "focal", "weight": 1.0, "params": {"gamma": 2.0}},
               {"name": "barron", "weight": 0.5, "params": {"alpha": 1.0, "scale": 0.1}}],
     "weighting": {"method": "softadapt", "params": {"beta": 0.1}}}

- ``terms``: each is built through the registry as ``build_loss({"name": name,
  **params})``; ``weight`` (default 1.0, >= 0) is a fixed factor; ``params`` defaults to
  ``{}``. Other keys of a term (``reason`` etc.) are ignored here.
- ``weighting``: optional, default ``{"method": "static"}``; ``method`` is one of
  ``pipeline.train.weighting.WEIGHTINGS`` ("static", "rebalance", "softadapt", "cov"),
  ``params`` are its keyword arguments (``n_terms`` is filled in).
- ``adaptation``: optional, default none; ``{"method": "greedy", "term": i, "params":
  ["alpha", "beta"], "factors": [0.9, 1.0, 1.1], "every": 1}`` makes the trainer adapt
  the named float parameters of term ``i`` by Seo et al.'s greedy search
  (``pipeline.train.greedy``; thesis section 5.1). ``factors`` and ``every`` have these
  defaults; a ``reason`` key is ignored. The loss only holds and validates the spec and
  sets the values (``adapted_values``, ``set_adapted_values``, which keeps each value in
  ``ADAPTATION_BOUNDS``); the search needs the model and optimizer and is the loop's.

The value is ``sum_i weight_i * w_i(t) * L_i``, ``w_i(t)`` the weighting method's
weights (all 1 for "static" without params, so the term weights are the weights).

How the trainer drives it: one ``forward`` per training step, in training mode
(``loss.train()``). Each forward computes the terms, passes their detached values to the
weighting's ``update`` (which returns that step's weights), and returns the weighted
sum. In eval mode (``loss.eval()``, validation) the weights are not updated: the last
training weights are used. ``last_values`` and ``weights`` hold the last component values
and weights, ``term_names`` their names, for logging. Terms that accept extra inputs
(``boundary``'s ``distance_map``) receive them from ``forward(logits, target, **extras)``.
Learnable terms (``barron`` with ``learnable=True``) appear in ``loss.parameters()``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pipeline.train.weighting import Weighting, build_weighting

from ._common import SMOOTH, check_nonnegative
from ._registry import build_loss, register_loss
from .distribution import CrossEntropyLoss, FocalLoss
from .region import DiceLoss


@register_loss("dice_ce")
class DiceCELoss(nn.Module):
    """Dice + cross-entropy, ``lambda_dice L_D + lambda_ce L_CE`` (thesis eq. 3.32).

    Parameters
    ----------
    lambda_dice, lambda_ce : float >= 0, default 1.0
        Weights (MONAI's names).
    smooth : float, default 1e-5
        Dice smoothing.
    include_background : bool, default True
        Passed to both terms.

    References
    ----------
    .. [1] Isensee, F., Jaeger, P. F., Kohl, S. A. A., Petersen, J., Maier-Hein, K. H.
       (2021). nnU-Net: a self-configuring method for deep learning-based biomedical image
       segmentation. Nature Methods 18, 203-211. doi:10.1038/s41592-020-01008-z
    """

    def __init__(
        self,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth: float = SMOOTH,
        include_background: bool = True,
    ) -> None:
        super().__init__()
        self.lambda_dice = check_nonnegative("lambda_dice", lambda_dice)
        self.lambda_ce = check_nonnegative("lambda_ce", lambda_ce)
        self.dice = DiceLoss(smooth=smooth, include_background=include_background)
        self.ce = CrossEntropyLoss(include_background=include_background)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.ce(
            logits, target
        )


@register_loss("dice_focal")
class DiceFocalLoss(nn.Module):
    """Dice + focal, ``lambda_dice L_D + lambda_focal L_F`` (thesis eq. 3.33).

    Parameters
    ----------
    lambda_dice, lambda_focal : float >= 0, default 1.0
    gamma : float, default 2.0
    alpha : float or None, default None
        Focal parameters (see ``focal``).
    smooth : float, default 1e-5
    include_background : bool, default True

    References
    ----------
    .. [1] Iantsen, A., Visvikis, D., Hatt, M. (2021). Squeeze-and-excitation normalization
       for automated delineation of head and neck primary tumors in combined PET and CT
       images. HECKTOR 2020, LNCS 12603. doi:10.1007/978-3-030-67194-5_4
    """

    def __init__(
        self,
        *,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        gamma: float = 2.0,
        alpha: float | None = None,
        smooth: float = SMOOTH,
        include_background: bool = True,
    ) -> None:
        super().__init__()
        self.lambda_dice = check_nonnegative("lambda_dice", lambda_dice)
        self.lambda_focal = check_nonnegative("lambda_focal", lambda_focal)
        self.dice = DiceLoss(smooth=smooth, include_background=include_background)
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, include_background=include_background)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_focal * self.focal(
            logits, target
        )


#: Range each adapted parameter is kept in, by (registry name, parameter); any other
#: parameter only stays > 0 (the actions multiply by factors > 0). Tversky weights are
#: clamped to [0.05, 0.95] rather than renormalized to alpha + beta = 1: Seo et al. act on
#: each parameter separately, and renormalizing would make the actions that scale alpha
#: and beta by the same factor (3 of the 9) identical. The clamp keeps both FP and FN in
#: the loss (weight >= 0.05) and each weight below 1 (alpha = beta = 1 is IoU).
ADAPTATION_BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("tversky", "alpha"): (0.05, 0.95),
    ("tversky", "beta"): (0.05, 0.95),
    ("focal_tversky", "alpha"): (0.05, 0.95),
    ("focal_tversky", "beta"): (0.05, 0.95),
}
ADAPTATION_FACTORS: tuple[float, ...] = (0.9, 1.0, 1.1)


@dataclass(frozen=True)
class GreedyAdaptation:
    """A validated ``adaptation`` spec of the manifest loss (see the module docstring).

    ``term``: index of the term whose parameters adapt; ``params``: their names;
    ``factors``: the discrete actions (each parameter is multiplied by one); ``every``:
    steps between searches; ``bounds``: per parameter the range it is kept in.
    """

    term: int
    params: tuple[str, ...]
    factors: tuple[float, ...]
    every: int
    bounds: tuple[tuple[float, float], ...]
    method: str = "greedy"


def _parse_adaptation(
    spec: Mapping[str, Any], modules: Sequence[nn.Module], names: Sequence[str]
) -> GreedyAdaptation:
    if not isinstance(spec, Mapping):
        raise ValueError(f"adaptation must be a mapping, got {spec!r}")
    unknown = set(spec) - {"method", "term", "params", "factors", "every", "reason"}
    if unknown:
        raise ValueError(f"adaptation: unknown keys {sorted(unknown)!r} in {dict(spec)!r}")
    if spec.get("method") != "greedy":
        raise ValueError(f"adaptation.method must be 'greedy', got {spec.get('method')!r}")
    term = spec.get("term")
    if isinstance(term, bool) or not isinstance(term, int) or not 0 <= term < len(modules):
        raise ValueError(
            f"adaptation.term must be the index of a term, 0 to {len(modules) - 1}, got {term!r}"
        )
    params = spec.get("params")
    if isinstance(params, str) or not isinstance(params, Sequence) or not params:
        raise ValueError(f"adaptation.params must be a non-empty list of names, got {params!r}")
    if len(set(params)) != len(params):
        raise ValueError(f"adaptation.params names a parameter twice: {list(params)!r}")
    module, name = modules[term], names[term]
    bounds = []
    for p in params:
        value = getattr(module, p, None) if isinstance(p, str) else None
        if isinstance(value, bool) or not isinstance(value, float):
            raise ValueError(
                f"adaptation.params: {p!r} is not a float parameter of terms[{term}] "
                f"({name!r}); it is {type(value).__name__}: {value!r}"
            )
        if not value > 0:
            raise ValueError(
                f"adaptation.params: terms[{term}].{p} is {value!r}; a multiplicative action "
                f"cannot move a parameter that is not > 0"
            )
        bounds.append(ADAPTATION_BOUNDS.get((name, p), (0.0, math.inf)))
    factors = spec.get("factors", ADAPTATION_FACTORS)
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < math.inf
        for f in factors
    ):
        raise ValueError(f"adaptation.factors must be finite numbers > 0, got {factors!r}")
    every = spec.get("every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"adaptation.every must be an int >= 1, got {every!r}")
    return GreedyAdaptation(term, tuple(params), tuple(float(f) for f in factors), every,
                            tuple(bounds))


@register_loss("manifest")
class ManifestLoss(nn.Module):
    """The manifest's compound loss: registry terms combined by a weighting method.

    Parameters
    ----------
    terms : sequence of mappings
        ``{"name": str, "weight": float = 1.0, "params": dict = {}}`` each (see the module
        docstring).
    weighting : mapping, optional
        ``{"method": str, "params": dict = {}}``; default static.
    adaptation : mapping, optional
        ``{"method": "greedy", "term": int, "params": [str, ...], "factors": [float, ...] =
        [0.9, 1.0, 1.1], "every": int = 1}``; default none (no parameter adaptation).

    Raises
    ------
    ValueError
        Empty or malformed terms, an unknown term name (with the registry's suggestion,
        prefixed by ``terms[i]``), a nested ``manifest`` term, a bad weighting, or a bad
        adaptation (a term index out of range, a name that is not a float parameter > 0
        of that term, a factor <= 0, ``every`` < 1).

    Notes
    -----
    ``L = sum_i weight_i w_i(t) L_i`` (thesis eq. 5.2). Unlike the other losses, forward
    in training mode updates the weighting state (once per call: one call per step).
    """

    def __init__(
        self,
        *,
        terms: Sequence[Mapping[str, Any]],
        weighting: Mapping[str, Any] | None = None,
        adaptation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
            raise ValueError(f"terms must be a non-empty list of term mappings, got {terms!r}")
        modules, names, factors = [], [], []
        for i, term in enumerate(terms):
            if not isinstance(term, Mapping) or "name" not in term:
                raise ValueError(f"terms[{i}] must be a mapping with a 'name', got {term!r}")
            if term["name"] == "manifest":
                raise ValueError(f"terms[{i}].name: a manifest loss cannot contain another one")
            params = term.get("params") or {}
            if not isinstance(params, Mapping):
                raise ValueError(f"terms[{i}].params must be a mapping, got {params!r}")
            try:
                modules.append(build_loss({"name": term["name"], **params}))
                factors.append(check_nonnegative(f"terms[{i}].weight", term.get("weight", 1.0)))
            except ValueError as err:
                raise ValueError(f"terms[{i}]: {err}") from err
            names.append(str(term["name"]))
        self.terms = nn.ModuleList(modules)
        self.term_names: tuple[str, ...] = tuple(names)
        self.term_weights: tuple[float, ...] = tuple(factors)
        spec = dict(weighting or {"method": "static"})
        unknown = set(spec) - {"method", "params"}
        if "method" not in spec or unknown:
            raise ValueError(
                f"weighting must be {{'method': ..., 'params': {{...}}}}, got {weighting!r}"
            )
        self.weighting: Weighting = build_weighting(
            spec["method"], len(modules), spec.get("params")
        )
        self.weighting_method = str(spec["method"])
        self._extras = [
            set(inspect.signature(m.forward).parameters) - {"logits", "target"} for m in modules
        ]
        self.last_values: tuple[float, ...] = ()
        self.adaptation: GreedyAdaptation | None = (
            None if adaptation is None else _parse_adaptation(adaptation, modules, names)
        )

    @property
    def weights(self) -> tuple[float, ...]:
        """Effective weights of the last step, ``weight_i * w_i``."""
        return tuple(f * w for f, w in zip(self.term_weights, self.weighting.weights, strict=True))

    def adapted_values(self) -> dict[str, float]:
        """Current values of the adapted parameters (``{}`` without an adaptation)."""
        if self.adaptation is None:
            return {}
        module = self.terms[self.adaptation.term]
        return {p: float(getattr(module, p)) for p in self.adaptation.params}

    def set_adapted_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """Set adapted parameters, each clamped to its bounds; return the values set.

        Raises
        ------
        ValueError
            Without an adaptation, or for a name that is not an adapted parameter.
        """
        if self.adaptation is None:
            raise ValueError("this manifest loss has no adaptation; nothing to set")
        spec, module = self.adaptation, self.terms[self.adaptation.term]
        unknown = set(values) - set(spec.params)
        if unknown:
            raise ValueError(
                f"{sorted(unknown)!r} are not adapted parameters; adapted: {list(spec.params)!r}"
            )
        applied = {}
        for p, (lo, hi) in zip(spec.params, spec.bounds, strict=True):
            if p in values:
                v = min(max(float(values[p]), lo), hi)
                setattr(module, p, v)
                applied[p] = v
        return applied

    def forward(self, logits: Tensor, target: Tensor, **extras: Tensor) -> Tensor:
        values = []
        for module, accepted in zip(self.terms, self._extras, strict=True):
            kwargs = {k: v for k, v in extras.items() if k in accepted}
            values.append(module(logits, target, **kwargs))
        self.last_values = tuple(float(v.detach()) for v in values)
        if self.training:
            self.weighting.update(self.last_values)
        total = values[0] * self.weights[0]
        for v, w in zip(values[1:], self.weights[1:], strict=True):
            total = total + w * v
        return total
