"""The loss-configuration manifest: a versioned pydantic model, its builder, its JSON Schema.

A manifest records, for one dataset of the store:

- ``dataset``: what the statistics describe, and a fingerprint of them;
- ``transforms``: for the brain intensities of every channel, the transform the
  normalization plan applies, with its evidence (`stats.transforms.select`). Transforms of
  the other distributions (other regions, label statistics) are in the statistics file's
  candidates; the manifest lists only what the trainer uses;
- ``normalization``: per channel the plan the trainer applies, exactly
  (`ChannelNormalization.apply`);
- ``loss``: terms, weighting, optionally the greedy adaptation of one term's parameters,
  and the decisions that made them (`stats.rules`);
- ``provenance``: store content hash, code and package versions, seed, creation time.

``Manifest.loss_spec()`` gives the dict the trainer's ``build_loss`` takes
(``{"name": "manifest", "terms": [...], "weighting": {...}}``). `parse_manifest` turns
every validation failure of a manifest's text into a `ManifestError` naming the file, the
field path and the offending value; through ``pipeline.manifest_io.load_manifest`` it is
the one check of both ``xrai manifest validate`` and the trainer.
Besides the schema it checks every loss term's and the weighting's parameters against
what the trainer's constructors accept (`LOSS_PARAMETERS`, `WEIGHTING_PARAMETERS`: names,
kinds, ranges; a trainer test keeps them equal to the constructors), so a manifest that
validates builds its loss. The JSON Schema of the model is committed as
``stats/manifest.schema.json`` (``pipeline.manifest_io.export_schema``; a test keeps it
current).

This module touches no file: reading and writing manifests and statistics files, and the
``xrai manifest`` commands, are in ``pipeline.manifest_io``.

NaN (undefined skewness of a constant sample, for instance) is written as JSON ``null``
and read back as NaN. A file with ``NaN``, ``Infinity`` or a number that overflows a float
(which Python's JSON parser accepts) is rejected, naming the field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from stats.errors import ManifestError
from stats.rules import (
    LOSS_NAMES,
    TERM_NAMES,
    WEIGHTING_METHODS,
    AdaptationConfig,
    Decision,
    LossPlan,
    LossTerm,
    WeightingConfig,
    decide_loss,
)
from stats.seen import seen_moments
from stats.summary import DatasetStats
from stats.transforms import Selection, TransformName, make_transform, select

__all__ = [
    "CLIP_PERCENTILES",
    "LOSS_NAMES",
    "LOSS_PARAMETERS",
    "MANIFEST_SCHEMA_VERSION",
    "MAX_NESTING",
    "SCHEMA_PATH",
    "TERM_NAMES",
    "WEIGHTING_METHODS",
    "WEIGHTING_PARAMETERS",
    "ChannelNormalization",
    "DatasetInfo",
    "LossConfig",
    "Manifest",
    "ManifestError",
    "ParamSpec",
    "Provenance",
    "build_manifest",
    "channel_normalization",
    "decisions_table",
    "manifest_json_schema",
    "parse_manifest",
    "parse_stats",
    "stats_fingerprint",
    "validate_manifest",
]

MANIFEST_SCHEMA_VERSION = 1
#: Percentiles of the intensity clip before the z-score (thesis 6.3, after nnU-Net).
CLIP_PERCENTILES = (0.5, 99.5)
#: The committed JSON Schema of `Manifest`.
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
#: Packages whose versions the provenance records (import-free look-ups).
PACKAGES = ("xrai-pipeline", "numpy", "scipy", "pydantic", "dask", "zarr", "torch")


# ------------------------------------------------------------------ constructor parameters
ParamKind = Literal["bool", "int", "float", "str", "floats"]


@dataclass(frozen=True)
class ParamSpec:
    """One keyword argument of a trainer loss (or weighting) constructor, as a manifest
    writes it.

    ``stats/`` does not import torch, so these tables restate the constructors of
    ``pipeline.train.losses.LOSSES`` and ``pipeline.train.weighting``; a test of the
    trainer keeps names, kinds, defaults and choices equal to the signatures, and a
    property test checks that every manifest `validate_manifest` accepts builds there.

    Parameters
    ----------
    kind : {"bool", "int", "float", "str", "floats"}
        JSON form: ``true``/``false``; an integer; a finite number (integers included);
        a string (one of ``choices``); a list of finite numbers.
    default : bool, int, float, str, tuple of float or None
        The constructor's default (None: only omitting the parameter gives None).
    ge, gt, le : float, optional
        Bounds of the number, or of every item of a list. ``le="1/n_terms"``: at most one
        over the number of loss terms.
    choices : tuple of str
        The strings allowed (kind ``"str"``).
    min_items : int
        Fewest items of a list.
    n_items : int or "n_terms", optional
        Exact number of items of a list (``"n_terms"``: one per loss term).
    adaptable : bool
        Whether ``loss.adaptation.params`` may name it: the built loss holds it as a
        float attribute of that name, which the greedy search multiplies.
    """

    kind: ParamKind
    default: bool | int | float | str | tuple[float, ...] | None
    ge: float | None = None
    gt: float | None = None
    le: float | Literal["1/n_terms"] | None = None
    choices: tuple[str, ...] = ()
    min_items: int = 0
    n_items: int | Literal["n_terms"] | None = None
    adaptable: bool = False


_REDUCTION = ParamSpec("str", "mean", choices=("mean", "sum", "none"))
_BACKGROUND = ParamSpec("bool", True)


def _nonnegative(default: float) -> ParamSpec:
    """A float >= 0 the built loss keeps as an attribute (so the adaptation can act on it)."""
    return ParamSpec("float", default, ge=0.0, adaptable=True)


_REGION = {"smooth": _nonnegative(1e-5), "include_background": _BACKGROUND,
           "reduction": _REDUCTION}
_VOXEL = {"include_background": _BACKGROUND, "reduction": _REDUCTION}

#: Keyword arguments of every manifest term's loss (``TERM_NAMES``), by registry name.
#: ``adaptive_tversky``'s ``regions_per_axis`` is an int here: the constructor also takes
#: a list of ints, but a manifest's parameter lists are lists of floats (`LossTerm.params`),
#: which it rejects.
LOSS_PARAMETERS: Mapping[str, Mapping[str, ParamSpec]] = {
    "adaptive_tversky": {"A": _nonnegative(0.3), "B": _nonnegative(0.4),
                         "regions_per_axis": ParamSpec("int", 1, ge=1), **_REGION},
    "asymmetric": {"beta": _nonnegative(1.5), **_REGION},
    "barron": {"alpha": ParamSpec("float", 1.0, adaptable=True),
               "scale": ParamSpec("float", 0.1, gt=0.0, adaptable=True),
               "learnable": ParamSpec("bool", False),
               "alpha_range": ParamSpec("floats", (0.0, 2.0), ge=0.0, n_items=2),
               "table_size": ParamSpec("int", 257, ge=2), **_VOXEL},
    "bce": _VOXEL,
    "boundary": _VOXEL,
    "dice": _REGION,
    "dice_ce": {"lambda_dice": _nonnegative(1.0), "lambda_ce": _nonnegative(1.0),
                "smooth": ParamSpec("float", 1e-5, ge=0.0), "include_background": _BACKGROUND},
    "dice_focal": {"lambda_dice": _nonnegative(1.0), "lambda_focal": _nonnegative(1.0),
                   "gamma": ParamSpec("float", 2.0, ge=0.0),
                   "alpha": ParamSpec("float", None, ge=0.0, le=1.0),
                   "smooth": ParamSpec("float", 1e-5, ge=0.0),
                   "include_background": _BACKGROUND},
    "focal": {"gamma": _nonnegative(2.0),
              "alpha": ParamSpec("float", None, ge=0.0, le=1.0, adaptable=True), **_VOXEL},
    "focal_tversky": {"alpha": _nonnegative(0.3), "beta": _nonnegative(0.7),
                      "gamma": ParamSpec("float", 4.0 / 3.0, gt=0.0, adaptable=True),
                      **_REGION},
    "generalized_dice": _REGION,
    "hausdorff_dt": {"alpha": _nonnegative(2.0), **_VOXEL},
    "iou": _REGION,
    "tversky": {"alpha": _nonnegative(0.3), "beta": _nonnegative(0.7), **_REGION},
    "wce": {"weight": ParamSpec("floats", None, ge=0.0, min_items=2), **_VOXEL},
}

#: Keyword arguments of every weighting method (``WEIGHTING_METHODS``; the trainer fills
#: in ``n_terms``).
WEIGHTING_PARAMETERS: Mapping[str, Mapping[str, ParamSpec]] = {
    "static": {"weights": ParamSpec("floats", None, ge=0.0, n_items="n_terms")},
    "rebalance": {"alpha_start": ParamSpec("float", 1.0, ge=0.0, le=1.0),
                  "alpha_end": ParamSpec("float", 0.0, ge=0.0, le=1.0),
                  "steps": ParamSpec("int", 1000, ge=1)},
    "softadapt": {"beta": ParamSpec("float", 3.0), "window": ParamSpec("int", 5, ge=2),
                  "variant": ParamSpec("str", "plain", choices=("plain", "loss_weighted")),
                  "normalize": ParamSpec("bool", True)},
    "cov": {"min_weight": ParamSpec("float", None, ge=0.0, le="1/n_terms")},
}

#: A problem with one parameter: (its name, what is wrong, the offending value).
_Problem = tuple[str, str, Any]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _expected(spec: ParamSpec, n_terms: int) -> str:
    """What a parameter must be, in words: ``"a finite number in [0, 1]"``."""
    le = 1 / n_terms if spec.le == "1/n_terms" else spec.le
    low = (f"[{spec.ge:g}" if spec.ge is not None
           else f"({spec.gt:g}" if spec.gt is not None else None)
    if low is not None and le is not None:
        bound = f" in {low}, {le:g}]"
    elif low is not None:
        bound = f" >= {spec.ge:g}" if spec.ge is not None else f" > {spec.gt:g}"
    else:
        bound = "" if le is None else f" <= {le:g}"
    if spec.kind == "bool":
        return "true or false"
    if spec.kind == "str":
        return f"one of {list(spec.choices)!r}"
    if spec.kind == "int":
        return f"an integer{bound}"
    if spec.kind == "float":
        return f"a finite number{bound}"
    n = n_terms if spec.n_items == "n_terms" else spec.n_items
    size = (f"{n}" if n is not None else f"at least {spec.min_items}" if spec.min_items
            else "")
    per_term = " (one per loss term)" if spec.n_items == "n_terms" else ""
    each = f", each{bound}" if bound else ""
    return f"a list of {size + ' ' if size else ''}finite numbers{per_term}{each}"


def _fits(spec: ParamSpec, value: Any, n_terms: int) -> bool:
    le = 1 / n_terms if spec.le == "1/n_terms" else spec.le

    def in_bounds(x: float) -> bool:
        return ((spec.ge is None or x >= spec.ge) and (spec.gt is None or x > spec.gt)
                and (le is None or x <= le))

    if spec.kind == "bool":
        return isinstance(value, bool)
    if spec.kind == "str":
        return isinstance(value, str) and value in spec.choices
    if spec.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and in_bounds(value)
    if spec.kind == "float":
        return _is_number(value) and in_bounds(value)
    if not isinstance(value, (list, tuple)):
        return False
    n = n_terms if spec.n_items == "n_terms" else spec.n_items
    return ((n is None or len(value) == n) and len(value) >= spec.min_items
            and all(_is_number(x) and in_bounds(x) for x in value))


def _parameter_problems(owner: str, specs: Mapping[str, ParamSpec],
                        params: Mapping[str, Any], n_terms: int) -> list[_Problem]:
    """Unknown names and values that do not fit ``specs``; ``owner`` names the
    constructor (``"loss 'dice'"``)."""
    problems: list[_Problem] = []
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(specs), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append((name, f"{owner} has no parameter {name!r}.{hint} Its "
                                   f"parameters: {sorted(specs)!r}", value))
        elif not _fits(spec, value, n_terms):
            problems.append((name, f"{owner} takes {name} as {_expected(spec, n_terms)}",
                             value))
    return problems


def _barron_problems(params: Mapping[str, Any]) -> list[_Problem]:
    """What ``barron``'s constructor checks across its parameters (after each fits)."""
    specs = LOSS_PARAMETERS["barron"]
    bounds = params.get("alpha_range", specs["alpha_range"].default)
    lo, hi = float(bounds[0]), float(bounds[1])  # type: ignore[index]
    if not lo < hi:
        return [("alpha_range", "loss 'barron' takes alpha_range as [lo, hi] with "
                                "0 <= lo < hi", params["alpha_range"])]
    alpha = params.get("alpha", specs["alpha"].default)
    if params.get("learnable", False) and not lo < alpha < hi:
        return [("alpha", f"loss 'barron' with learnable alpha takes alpha strictly inside "
                          f"alpha_range [{lo:g}, {hi:g}]", alpha)]
    return []


#: Checks across the parameters of one loss, by registry name.
_CROSS_CHECKS: Mapping[str, Callable[[Mapping[str, Any]], list[_Problem]]] = {
    "barron": _barron_problems,
}


def _not_adaptable(name: str, params: Mapping[str, Any], param: str) -> str | None:
    """Why the greedy adaptation cannot act on ``param`` of a ``name`` term (None: it can)."""
    spec = LOSS_PARAMETERS[name].get(param)
    if spec is None or not spec.adaptable:
        names = sorted(p for p, s in LOSS_PARAMETERS[name].items() if s.adaptable)
        return f"is not a float parameter of loss {name!r} that can adapt; those are {names!r}"
    if name == "barron" and param == "alpha" and params.get("learnable", False):
        return "is learned by gradient descent (learnable=true); it cannot also adapt"
    value = params.get(param, spec.default)
    if not (_is_number(value) and value > 0):
        return (f"is {value!r} in that term; a multiplicative action cannot move a parameter "
                f"that is not > 0")
    return None


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------ sections
class DatasetInfo(_Frozen):
    """The dataset the statistics describe, and a fingerprint of those statistics."""

    name: str
    store: str
    n_cases: int = Field(ge=0)
    channels: list[str] = Field(min_length=1)
    spacing_mm: list[float]
    voxel_ml: float = Field(gt=0)
    label_scheme: dict[str, str]
    stats_schema_version: int
    stats_fingerprint: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the statistics JSON without its created_at")


class TransformSpec(_Frozen):
    """A transform by name and parameters (`stats.transforms.make_transform`)."""

    name: TransformName
    params: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> TransformSpec:
        make_transform(self.name, self.params)  # the trainer rebuilds it the same way
        return self


class ChannelNormalization(_Frozen):
    """How the trainer normalises one channel: transform, clip, z-score.

    ``y = (f(clip(x, raw_clip_low, raw_clip_high)) - mean) / std``. Because ``f`` is
    strictly increasing this equals clipping ``f(x)`` to ``[clip_low, clip_high]``
    (``clip_low = f(raw_clip_low)``: percentiles map through monotone transforms
    exactly), and clipping first keeps every value inside ``f``'s domain.

    ``mean`` and ``std`` are those of the transformed brain intensities *after* the clip
    (``moments_source = "transformed_clipped"``: read from the engine's histogram by
    `stats.seen.seen_moments`, so the z-scored input has mean 0 and std 1 as the network
    sees it). Statistics written without histograms give the unclipped candidate moments
    (``"transformed_unclipped"``; the 0.5/99.5 clip lowers a normal sample's std by about
    2 %). The raw percentiles come from the histogram (within one bin width); negative
    intensities count as 0 (`stats.dataset.clamped`). ``percentiles`` are 0.5/99.5 unless
    rule R3 chose a tighter clip for the channel.
    """

    channel: str
    region: Literal["brain"] = "brain"
    transform: TransformSpec
    percentiles: tuple[float, float] = CLIP_PERCENTILES
    raw_clip_low: float
    raw_clip_high: float
    clip_low: float
    clip_high: float
    mean: float
    std: float = Field(gt=0, allow_inf_nan=False)
    moments_source: Literal["transformed_clipped", "transformed_unclipped"] = \
        "transformed_unclipped"

    @model_validator(mode="after")
    def _ordered(self) -> ChannelNormalization:
        if not (self.raw_clip_low <= self.raw_clip_high and self.clip_low <= self.clip_high):
            raise ValueError(
                f"clip bounds must be ordered, got raw [{self.raw_clip_low!r}, "
                f"{self.raw_clip_high!r}] and transformed [{self.clip_low!r}, "
                f"{self.clip_high!r}]")
        return self

    def apply(self, x: ArrayLike) -> NDArray[np.float64]:
        """Normalise intensities: clip (raw percentiles), transform, z-score; float64."""
        t = make_transform(self.transform.name, self.transform.params)
        clipped = np.clip(np.asarray(x, dtype=np.float64), self.raw_clip_low,
                          self.raw_clip_high)
        return (t.forward(clipped) - self.mean) / self.std


class LossConfig(_Frozen):
    """The loss terms, their weighting, the optional greedy adaptation of one term's
    parameters, and the rule decisions behind them."""

    terms: list[LossTerm] = Field(min_length=1)
    weighting: WeightingConfig
    decisions: list[Decision]
    adaptation: AdaptationConfig | None = None

    @model_validator(mode="after")
    def _weighting_fits(self) -> LossConfig:
        if self.weighting.method == "rebalance" and len(self.terms) != 2:
            raise ValueError(f"weighting 'rebalance' needs exactly 2 terms, got "
                             f"{len(self.terms)}")
        if self.adaptation is not None and self.adaptation.term >= len(self.terms):
            raise ValueError(f"adaptation.term {self.adaptation.term!r} names no term: there "
                             f"are {len(self.terms)} (indices 0 to {len(self.terms) - 1})")
        return self

    @model_validator(mode="after")
    def _parameters_fit(self) -> LossConfig:
        """Every parameter is one the trainer's constructor takes, of the kind and range it
        accepts (`LOSS_PARAMETERS`, `WEIGHTING_PARAMETERS`); adapted parameters are float
        parameters > 0 of their term. All problems are reported, each at its field."""
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        n_terms = len(self.terms)
        for i, term in enumerate(self.terms):
            problems = _parameter_problems(f"loss {term.name!r}", LOSS_PARAMETERS[term.name],
                                           term.params, n_terms)
            if not problems and term.name in _CROSS_CHECKS:
                problems = _CROSS_CHECKS[term.name](term.params)
            errors += [(("terms", i, "params", p), msg, v) for p, msg, v in problems]
        method = self.weighting.method
        errors += [(("weighting", "params", p), msg, v) for p, msg, v in _parameter_problems(
            f"weighting {method!r}", WEIGHTING_PARAMETERS[method], self.weighting.params,
            n_terms)]
        a = self.adaptation
        if a is not None and a.term < n_terms:  # an index out of range is reported above
            if len(set(a.params)) != len(a.params):
                errors.append((("adaptation", "params"), "names a parameter twice", a.params))
            term = self.terms[a.term]
            for j, p in enumerate(a.params):
                why = _not_adaptable(term.name, term.params, p)
                if why is not None:
                    errors.append((("adaptation", "params", j),
                                   f"{p!r} of terms.{a.term} ({term.name!r}) {why}", p))
        if errors:
            raise ValidationError.from_exception_data("LossConfig", [
                InitErrorDetails(type=PydanticCustomError("manifest_parameter", msg), loc=loc,
                                 input=value)
                for loc, msg, value in errors])
        return self


class Provenance(_Frozen):
    """Where the manifest comes from."""

    store_content_hash: str
    stats_created_at: str
    stats_code_version: str
    code_version: str
    packages: dict[str, str]
    python: str
    seed: int = Field(ge=0)
    created_at: str


class Manifest(_Frozen):
    """The loss-configuration manifest (schema version 1)."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    dataset: DatasetInfo
    transforms: dict[str, Selection]
    normalization: dict[str, ChannelNormalization]
    loss: LossConfig
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if set(self.normalization) != set(self.dataset.channels):
            raise ValueError(
                f"normalization has channels {sorted(self.normalization)!r} but the dataset "
                f"has {sorted(self.dataset.channels)!r}")
        for ch, plan in self.normalization.items():
            if plan.channel != ch:
                raise ValueError(f"normalization[{ch!r}].channel is {plan.channel!r}")
        return self

    def loss_spec(self) -> dict[str, Any]:
        """The dict ``pipeline.train.losses.build_loss`` takes for the manifest loss.

        ``"adaptation"`` (method, term, params, factors, every) is present only when the
        manifest has one.
        """
        spec: dict[str, Any] = {
            "name": "manifest",
            "terms": [{"name": t.name, "weight": t.weight, "params": _plain(t.params)}
                      for t in self.loss.terms],
            "weighting": {"method": self.loss.weighting.method,
                          "params": _plain(self.loss.weighting.params)},
        }
        if self.loss.adaptation is not None:
            spec["adaptation"] = self.loss.adaptation.model_dump(exclude={"reason"})
        return spec


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items()}


# ------------------------------------------------------------------ building
def stats_fingerprint(stats: DatasetStats) -> str:
    """sha256 of the statistics' canonical JSON without ``created_at`` (so re-running the
    statistics on unchanged data gives the same fingerprint)."""
    doc = json.loads(stats.model_dump_json())
    doc.pop("created_at", None)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def channel_normalization(stats: DatasetStats, ch: str, sel: Selection,
                          percentiles: tuple[float, float] = CLIP_PERCENTILES
                          ) -> ChannelNormalization:
    """The normalization plan of channel ``ch``: transform ``sel``, clip at
    ``percentiles`` of its brain intensities, z-score with the clipped mean and std.

    Raises
    ------
    ValueError
        When the channel has no brain voxels, or its std after the clip is 0 (the message
        names the field).
    """
    dist = stats.intensity[ch]["brain"]
    where = f"statistics of {stats.dataset!r}: intensity.{ch}.brain"
    t = sel.transform()
    spec = TransformSpec(name=sel.chosen, params=sel.params)
    if dist.histogram is not None:
        seen = seen_moments(dist.histogram, t, percentiles)
        if not (math.isfinite(seen.raw_clip_low) and math.isfinite(seen.raw_clip_high)):
            raise ValueError(f"{where}: the histogram holds no brain voxels to normalise with")
        if not (math.isfinite(seen.std) and seen.std > 0):
            raise ValueError(f"{where}: std of the intensities after {sel.chosen} and the "
                             f"{percentiles[0]:g}/{percentiles[1]:g} clip is {seen.std!r}; a "
                             f"z-score needs std > 0")
        return ChannelNormalization(
            channel=ch, transform=spec, percentiles=(seen.percentiles[0], seen.percentiles[1]),
            raw_clip_low=seen.raw_clip_low, raw_clip_high=seen.raw_clip_high,
            clip_low=seen.clip_low, clip_high=seen.clip_high, mean=seen.mean, std=seen.std,
            moments_source="transformed_clipped")
    keys = [f"{q:g}" for q in CLIP_PERCENTILES]
    missing = [k for k in keys if k not in dist.percentiles]
    if missing:
        raise ValueError(f"{where}.percentiles lacks {missing!r}")
    lo, hi = (max(float(dist.percentiles[k]), 0.0) for k in keys)  # negatives count as 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: percentiles {keys} are {lo!r}, {hi!r}; the channel has "
                         f"no brain voxels to normalise with")
    m = dist.candidates.get(sel.chosen, dist.moments)
    if not (math.isfinite(m.std) and m.std > 0):
        raise ValueError(f"{where}: std of the intensities after {sel.chosen} is {m.std!r}; "
                         f"a z-score needs std > 0")
    return ChannelNormalization(
        channel=ch, transform=spec,
        raw_clip_low=lo, raw_clip_high=hi, clip_low=float(t.forward(lo)),
        clip_high=float(t.forward(hi)), mean=float(m.mean), std=float(m.std),
    )


def clip_percentiles(plan: LossPlan, channel: str) -> tuple[float, float]:
    """The clip R3 chose for ``channel`` (0.5/99.5 unless it fired for that channel)."""
    for d in plan.decisions:
        if d.rule == "R3" and d.outcome == "clip" and channel in d.params:
            lo, hi = d.params[channel]  # type: ignore[misc]
            return (float(lo), float(hi))
    return CLIP_PERCENTILES


def build_manifest(stats: DatasetStats, *, seed: int = 0,
                   created_at: str | None = None) -> Manifest:
    """Build the manifest of a dataset from its statistics.

    Parameters
    ----------
    stats : DatasetStats
    seed : int, default 0
        The training seed to record.
    created_at : str, optional
        ISO time to record (default now, UTC); fixed in tests.

    Returns
    -------
    Manifest

    Raises
    ------
    ValueError
        When a statistic the rules or the normalization plan need is missing or
        undefined (the message names the field).
    """
    transforms: dict[str, Selection] = {}
    for ch in stats.channels:
        if ch not in stats.intensity:
            raise ValueError(f"statistics of {stats.dataset!r}: field intensity.{ch} is "
                             f"missing (channels {stats.channels!r})")
        if "brain" not in stats.intensity[ch]:
            raise ValueError(f"statistics of {stats.dataset!r}: field intensity.{ch}.brain "
                             f"is missing")
        transforms[f"intensity/{ch}/brain"] = select(stats.intensity[ch]["brain"])
    plan = decide_loss(stats)
    normalization = {ch: channel_normalization(stats, ch, transforms[f"intensity/{ch}/brain"],
                                               clip_percentiles(plan, ch))
                     for ch in stats.channels}
    return Manifest(
        dataset=DatasetInfo(
            name=stats.dataset, store=stats.store, n_cases=stats.n_cases,
            channels=list(stats.channels), spacing_mm=list(stats.spacing_mm),
            voxel_ml=stats.voxel_ml, label_scheme=dict(stats.label_scheme),
            stats_schema_version=stats.schema_version,
            stats_fingerprint=stats_fingerprint(stats)),
        transforms=transforms,
        normalization=normalization,
        loss=LossConfig(terms=list(plan.terms), weighting=plan.weighting,
                        decisions=list(plan.decisions), adaptation=plan.adaptation),
        provenance=Provenance(
            store_content_hash=stats.content_hash, stats_created_at=stats.created_at,
            stats_code_version=stats.code_version,
            code_version=_package_versions()["xrai-pipeline"],
            packages=_package_versions(), python=platform.python_version(), seed=seed,
            created_at=created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")),
    )


# ------------------------------------------------------------------ parsing (no file I/O)
def _describe(err: ValidationError, path: str | os.PathLike[str]) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = repr(e.get("input"))
        if len(shown) > 200:
            shown = shown[:200] + "..."
        lines.append(f"field {where}: {e['msg']} (got {shown})")
    return _join(path, lines)


def _join(path: str | os.PathLike[str], lines: list[str]) -> str:
    more = f" (and {len(lines) - 1} more: " + "; ".join(lines[1:]) + ")" if len(lines) > 1 else ""
    return f"{path}: {lines[0]}{more}"


#: Deepest nesting of arrays and objects a manifest file may have (a manifest nests 6
#: levels; Python's JSON parser would raise RecursionError near 1000).
MAX_NESTING = 32
# A JSON string (an unterminated one runs to the end) or a bracket.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


class _NonFinite:
    """Placeholder the JSON parser puts where the file has NaN, Infinity or an overflow."""

    def __init__(self, text: str) -> None:
        self.text = text


def _position(text: str, index: int) -> str:
    """``"line L, column C"`` (1-based) of character ``index``."""
    line, start = text.count("\n", 0, index) + 1, text.rfind("\n", 0, index) + 1
    return f"line {line}, column {index - start + 1}"


def _parse_json(data: bytes | str, source: str | os.PathLike[str]) -> Any:
    """The JSON document of a manifest's bytes or text; errors name ``source`` (and where
    in it).

    Raises
    ------
    ManifestError
        If it is not UTF-8 (byte position), nested deeper than `MAX_NESTING`, not JSON, or
        holds a non-finite number (NaN, Infinity, or one that overflows a float; field path).
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise ManifestError(
                f"{source}: not UTF-8 text: byte {data[err.start:err.start + 1]!r} at byte "
                f"position {err.start} (line {line}) cannot be decoded ({err.reason}); a "
                f"manifest is UTF-8 JSON") from err
    else:
        text = data
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        c = token.group()
        if c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ManifestError(
                    f"{source}: JSON nested more than {MAX_NESTING} levels deep at "
                    f"{_position(text, token.start())}; a manifest nests a few levels")
        elif c in "]}":
            depth -= 1
    try:
        doc = json.loads(text, parse_constant=_NonFinite, parse_float=_finite_or_placeholder)
    except RecursionError as err:  # not reached below MAX_NESTING; kept as a guard
        raise ManifestError(f"{source}: JSON nested too deeply to parse") from err
    except ValueError as err:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise ManifestError(f"{source}: not valid JSON: {err}") from err
    bad = _non_finite_fields(doc)
    if bad:
        lines = [f"field {where}: not a finite number; a manifest holds finite numbers "
                 f"only (an undefined statistic is written as null) (got {token})"
                 for where, token in bad]
        raise ManifestError(_join(source, lines))
    return doc


def _finite_or_placeholder(text: str) -> float | _NonFinite:
    x = float(text)
    return x if math.isfinite(x) else _NonFinite(text)


def _non_finite_fields(doc: Any) -> list[tuple[str, str]]:
    """``(field path, JSON text)`` of every non-finite number, in document order."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), doc)]
    while stack:  # iterative: no recursion limit
        loc, node = stack.pop()
        if isinstance(node, _NonFinite):
            found.append((".".join(loc) or "(top level)", node.text))
        elif isinstance(node, dict):
            stack.extend(((*loc, str(k)), v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*loc, str(i)), v) for i, v in reversed(list(enumerate(node))))
    return found


def validate_manifest(doc: Any, source: str | os.PathLike[str]) -> Manifest:
    """Validate a parsed manifest document: the schema, and every loss and weighting
    parameter against what the trainer's constructors accept.

    Parameters
    ----------
    doc : Any
        The JSON document (`json.loads` of the file).
    source : str or PathLike
        The file it came from, named in every message.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        The message names ``source``, each field path (``loss.terms.0.params.smooth``) and
        offending value.
    """
    try:
        return Manifest.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(_describe(err, source)) from err


def parse_manifest(data: bytes | str, source: str | os.PathLike[str]) -> Manifest:
    """Parse and validate a manifest's bytes (or text): the one check of
    ``xrai manifest validate`` and of the trainer (both read the file with
    ``pipeline.manifest_io.load_manifest``), so that a manifest that validates also builds
    its loss there.

    Parameters
    ----------
    data : bytes or str
        The file's contents; bytes must be UTF-8.
    source : str or PathLike
        The file it came from, named in every message.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        If it is not UTF-8 (the byte position), nests deeper than `MAX_NESTING`, is not
        JSON, holds NaN or Infinity, or does not validate (`validate_manifest`): the
        message names ``source``, the field path (``loss.terms.0.name``) and the offending
        value.
    """
    return validate_manifest(_parse_json(data, source), source)


def parse_stats(data: bytes | str, source: str | os.PathLike[str]) -> DatasetStats:
    """Parse and validate the contents of a statistics file (``xrai stats --out``).

    Raises
    ------
    ManifestError
        Not JSON or not valid statistics (``source``, field path, value).
    """
    try:
        return DatasetStats.model_validate_json(data)
    except ValidationError as err:
        raise ManifestError("statistics " + _describe(err, source)) from err


def decisions_table(manifest: Manifest) -> list[tuple[str, str, str]]:
    """Rows ``(rule, measured value, decision)`` for the demo's printed table.

    The loss rules first (R1, R2, R3, R5, R4), then the transform chosen for each
    channel's brain intensities (the only transforms a manifest lists).
    """
    rows: list[tuple[str, str, str]] = []
    for d in manifest.loss.decisions:
        value = "undefined" if math.isnan(d.measured) else f"{d.measured:.4g}"
        rows.append((f"{d.rule} {d.title}", f"{d.measure} = {value}", d.text.split(": ", 1)[-1]))
    for key, sel in manifest.transforms.items():
        if not (key.startswith("label/") or key.endswith("/brain")):
            continue
        score = ("undefined" if math.isnan(sel.score_identity)
                 else f"{sel.score_identity:.3g} -> {sel.score_chosen:.3g}")
        rows.append((f"transform {key}", f"skew²+kurt²/4 = {score} (n={sel.n})",
                     f"{sel.chosen}: {sel.expression}"))
    return rows


# ------------------------------------------------------------------ JSON Schema
def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `Manifest`, as committed in the repository."""
    schema = Manifest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# -- which decisions changed (scheduled reprocessing) ------------------------------
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def decision_changes(old: Manifest, new: Manifest) -> list[str]:
    """Human-readable list of the decisions that differ from `old` to `new`.

    Parameters are compared at 6 significant digits (`_short`), so float noise from a
    re-merge in another order is not reported as a change.

    Returns
    -------
    list of str
        Empty when every decision is the same, e.g.
        ``"R2 (distribution term): bce -> focal {gamma=2.1}"``,
        ``"transform label/tumour_volume_ml: identity -> ln"``.
    """
    changes: list[str] = []
    before = {d.rule: d for d in old.loss.decisions}
    after = {d.rule: d for d in new.loss.decisions}
    for rule in [*before, *(r for r in after if r not in before)]:
        a, b = before.get(rule), after.get(rule)
        if a is None or b is None:
            changes.append(f"{rule}: {'added' if a is None else 'removed'}")
            continue
        was = f"{a.outcome}{' ' + _short(a.params) if a.params else ''}"
        now = f"{b.outcome}{' ' + _short(b.params) if b.params else ''}"
        if a.fired != b.fired or was != now:
            changes.append(f"{rule} ({b.title}): {was} -> {now}"
                           + (f" (fired: {a.fired} -> {b.fired})" if a.fired != b.fired else ""))
    terms_a = [(t.name, _short(t.weight), _short(t.params)) for t in old.loss.terms]
    terms_b = [(t.name, _short(t.weight), _short(t.params)) for t in new.loss.terms]
    if terms_a != terms_b:
        def show(terms: list[tuple[str, str, str]]) -> str:
            return " + ".join(f"{w}·{n}{p if p != '{}' else ''}" for n, w, p in terms)

        changes.append(f"loss terms: {show(terms_a)} -> {show(terms_b)}")
    wa, wb = old.loss.weighting, new.loss.weighting
    if (wa.method, _short(wa.params)) != (wb.method, _short(wb.params)):
        changes.append(f"weighting: {wa.method} {_short(wa.params)} -> "
                       f"{wb.method} {_short(wb.params)}")

    def adaptation(a: AdaptationConfig | None) -> str:
        return "none" if a is None else _short(a.model_dump(exclude={"reason"}))

    if adaptation(old.loss.adaptation) != adaptation(new.loss.adaptation):
        changes.append(f"adaptation: {adaptation(old.loss.adaptation)} -> "
                       f"{adaptation(new.loss.adaptation)}")
    for key in [*old.transforms, *(k for k in new.transforms if k not in old.transforms)]:
        a, b = old.transforms.get(key), new.transforms.get(key)
        if a is None or b is None:
            changes.append(f"transform {key}: {'added' if a is None else 'removed'}")
        elif a.chosen != b.chosen:
            changes.append(f"transform {key}: {a.chosen} -> {b.chosen}")
    return changes
