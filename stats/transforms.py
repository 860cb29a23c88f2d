"""Candidate transforms of a measured distribution, and the choice among them.

For every distribution the statistics measure, four candidates are compared:

============  ==============================  ======================  =====================
name          forward ``y = f(x)``            domain of ``x``         inverse ``x = f⁻¹(y)``
============  ==============================  ======================  =====================
identity      ``x``                           any real                ``y``
ln            ``ln(x + c)``                   ``x >= 0`` (c > 0)      ``exp(y) - c``
log10         ``log10(x + c)``                ``x >= 0`` (c > 0)      ``10**y - c``
arcsin_sqrt   ``arcsin(sqrt(x / s))``         ``0 <= x <= s``         ``s sin(y)**2``
============  ==============================  ======================  =====================

With ``c = 0`` the logarithms need ``x > 0``. Every transform raises ``ValueError``
naming itself, the offending value and its domain when given a value outside it (NaN
and ±inf are outside every domain except identity's). The domain of the logarithms is
``x >= 0`` rather than ``x > -c``: the offset exists for exact zeros, and a negative
value means the data are not what the candidate was built for.

Offsets and scales (`candidates_for`)
-------------------------------------
- intensity: the engine passes ``c = M * 2**-10`` and ``s = M``, with M the channel's
  largest value over the dataset (`stats.dataset.intensity_transforms`), so the choice
  does not depend on the units (MRI magnitudes are >= 0 and single channels have exact
  zeros inside the brain mask, hence the offset); ``candidates_for``'s own default
  offset for intensities, 1, is for callers without a maximum.
- fraction (tumour share of brain voxels, per case or slice): arcsin-sqrt with
  ``s = 1`` needs no offset; the logarithms use ``c`` = one voxel's share of the
  brain, ``1 / n_brain_voxels`` (the smallest non-zero fraction that can be measured),
  :data:`DEFAULT_FRACTION_OFFSET` when the caller has none.
- volume (mL): ``c`` = one voxel's volume (required: there is no unit-free default).
- count (connected components): ``c = 1`` (``ln(k + 1)``, the usual count transform).

The offset changes the shape of the transformed distribution (zeros land at
``ln c``), so it is part of each candidate's parameters and of the evidence.

Which candidates need the data
------------------------------
identity, ln and arcsin_sqrt are computed from the values; log10 is *derived*:
``log10(x + c) = ln(x + c) / ln 10``, so its moment partial is exactly
``scale_partial(ln_partial, 1 / ln 10)`` (`DERIVED`). The engine may compute it either way.

Selection
---------
`select` scores every candidate by the Jarque–Bera form without its ``n/6`` factor,

.. math:: S = g_1^2 + g_2^2 / 4,

with :math:`g_1` the (biased) sample skewness and :math:`g_2` the Fisher excess
kurtosis, both 0 for a normal distribution ([1]_). The lowest score wins, but identity is
kept unless the best candidate lowers the score by at least ``min_improvement``
(relative, default 10 %) *and* by at least ``max(min_absolute, JB_NOISE / n)`` (absolute).
``JB_NOISE / n = 12 / n`` is the expected score of a normal sample of size ``n``
(``JB = n S / 6`` is asymptotically χ²₂, mean 2): an improvement smaller than that is
within sampling noise. Ties therefore keep identity.

ln and log10 differ by the constant factor ``1 / ln 10``; skewness and kurtosis are
invariant under scaling, so their scores are equal and the score cannot choose between
them. The rule is stated rather than hidden: when the log family wins, ``ln`` is
reported (natural units) unless ``prefer_log="log10"`` is passed; the evidence row of the
other says so. The *offset* does change the shape, and it is not chosen by the score
either: it is fixed per kind of quantity (above), one physical unit of resolution.

References
----------
.. [1] Jarque, C. M., Bera, A. K. (1980). Efficient tests for normality,
   homoscedasticity and serial independence of regression residuals. Economics Letters
   6(3), 255-259. doi:10.1016/0165-1765(80)90024-5
.. [2] Bartlett, M. S. (1947). The use of transformations. Biometrics 3(1), 39-52.
   doi:10.2307/3001536 (arcsine-square-root for proportions, logarithm for
   right-skewed positive quantities).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from stats.summary import Distribution, Moments

__all__ = [
    "DEFAULT_FRACTION_OFFSET",
    "DERIVED",
    "JB_NOISE",
    "MIN_ABSOLUTE_IMPROVEMENT",
    "MIN_RELATIVE_IMPROVEMENT",
    "TRANSFORM_NAMES",
    "EvidenceRow",
    "NullableFloat",
    "Selection",
    "Transform",
    "TransformName",
    "arcsin_sqrt",
    "candidates_for",
    "identity",
    "ln",
    "log10",
    "make_transform",
    "normality_score",
    "select",
]

TransformName = Literal["identity", "ln", "log10", "arcsin_sqrt"]
#: Candidate names, in the order used to break exact ties (earlier wins).
TRANSFORM_NAMES: tuple[str, ...] = ("identity", "ln", "log10", "arcsin_sqrt")
#: Derived candidates: name → (candidate it is computed from, exact scale factor).
DERIVED: dict[str, tuple[str, float]] = {"log10": ("ln", 1.0 / math.log(10.0))}
#: Offset of the logarithms for fractions when the brain voxel count is not known.
DEFAULT_FRACTION_OFFSET = 1e-4
#: Default relative improvement of the score needed to leave identity.
MIN_RELATIVE_IMPROVEMENT = 0.10
#: Default smallest absolute improvement of the score needed to leave identity.
MIN_ABSOLUTE_IMPROVEMENT = 0.05
#: n times the expected score of a normal sample of size n (E[JB] = 2, JB = n S / 6).
JB_NOISE = 12.0
_LOG_FAMILY = ("ln", "log10")


def _none_to_nan(v: object) -> object:
    return math.nan if v is None else v


#: A float that may be NaN; JSON has no NaN, so it is written as null and read back as NaN.
NullableFloat = Annotated[
    float,
    BeforeValidator(_none_to_nan),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "null"}]}),
]


# --------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class Transform:
    """One elementwise, strictly increasing transform with its inverse.

    Parameters
    ----------
    name : {"identity", "ln", "log10", "arcsin_sqrt"}
    params : mapping of str to float
        ``{}`` for identity, ``{"offset": c}`` (c >= 0) for ln and log10,
        ``{"scale": s}`` (s > 0) for arcsin_sqrt.

    Raises
    ------
    ValueError
        Unknown name, missing or unknown parameter, or a parameter out of range.

    Notes
    -----
    Forward and inverse work in float64 and return float64 arrays. Because every
    transform is strictly increasing, percentiles map through it exactly:
    :math:`Q_q(f(X)) = f(Q_q(X))`.

    Examples
    --------
    >>> t = ln(offset=1.0)
    >>> float(t.forward(np.e - 1.0))
    1.0
    >>> t.forward(-2.0)
    Traceback (most recent call last):
    ...
    ValueError: transform 'ln' (ln(x + 1)): value -2.0 is outside its domain x >= 0
    """

    name: str
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        required = {"identity": (), "ln": ("offset",), "log10": ("offset",),
                    "arcsin_sqrt": ("scale",)}
        if self.name not in required:
            raise ValueError(f"unknown transform {self.name!r}; known: {list(TRANSFORM_NAMES)}")
        keys = set(self.params)
        if keys != set(required[self.name]):
            raise ValueError(
                f"transform {self.name!r} takes exactly the parameters "
                f"{list(required[self.name])}, got {dict(self.params)!r}"
            )
        clean: dict[str, float] = {}
        for key, value in self.params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ValueError(f"transform {self.name!r}: {key} must be a number, got {value!r}")
            v = float(value)
            if not math.isfinite(v) or v < 0 or (key == "scale" and v == 0):
                bound = "> 0" if key == "scale" else ">= 0"
                raise ValueError(
                    f"transform {self.name!r}: {key} must be finite and {bound}, got {value!r}"
                )
            clean[key] = v
        object.__setattr__(self, "params", clean)

    # ----------------------------------------------------------------- description
    @property
    def expression(self) -> str:
        """The formula, e.g. ``ln(x + 1)``."""
        if self.name == "identity":
            return "x"
        if self.name == "arcsin_sqrt":
            return f"arcsin(sqrt(x / {self.params['scale']:g}))"
        c = self.params["offset"]
        return f"{self.name}(x + {c:g})" if c else f"{self.name}(x)"

    @property
    def domain(self) -> str:
        """The domain of ``forward`` in words."""
        if self.name == "identity":
            return "any real number"
        if self.name == "arcsin_sqrt":
            return f"0 <= x <= {self.params['scale']:g}"
        return "x >= 0" if self.params["offset"] > 0 else "x > 0"

    # ----------------------------------------------------------------- evaluation
    def forward(self, x: ArrayLike) -> NDArray[np.float64]:
        """``f(x)``, elementwise, in float64.

        Raises
        ------
        ValueError
            If any value is outside the domain (the message names the transform, the
            first offending value and the domain).
        """
        a = np.asarray(x, dtype=np.float64)
        if self.name == "identity":
            return a
        if self.name == "arcsin_sqrt":
            s = self.params["scale"]
            self._check(a, lambda v: (v >= 0) & (v <= s), self.domain, "forward")
            return np.arcsin(np.sqrt(a / s))
        c = self.params["offset"]
        self._check(a, (lambda v: v >= 0) if c > 0 else (lambda v: v > 0), self.domain,
                    "forward")
        return np.log(a + c) if self.name == "ln" else np.log10(a + c)

    def inverse(self, y: ArrayLike) -> NDArray[np.float64]:
        """``f⁻¹(y)``, elementwise, in float64 (the image of the domain is checked).

        Raises
        ------
        ValueError
            If any value is outside the image of the domain.
        """
        b = np.asarray(y, dtype=np.float64)
        if self.name == "identity":
            return b
        if self.name == "arcsin_sqrt":
            top = math.pi / 2
            self._check(b, lambda v: (v >= 0) & (v <= top), "0 <= y <= pi/2", "inverse")
            return self.params["scale"] * np.sin(b) ** 2
        c = self.params["offset"]
        if c > 0:
            low = math.log(c) if self.name == "ln" else math.log10(c)
            self._check(b, lambda v: v >= low, f"y >= {self.name}({c:g}) = {low:.6g}",
                        "inverse")
        else:
            self._check(b, np.isfinite, "any finite y", "inverse")
        x = (np.exp(b) if self.name == "ln" else np.power(10.0, b)) - c
        # exp(ln c) - c may round to -1 ulp; the inverse maps onto x >= 0 by definition.
        return np.maximum(x, 0.0) if c > 0 else x

    def _check(self, a: NDArray[np.float64], ok: Any, domain: str, which: str) -> None:
        if a.size == 0:
            return
        lo, hi = a.min(), a.max()  # NaN propagates into both; two cheap passes
        if bool(np.all(ok(np.array([lo, hi])))) and math.isfinite(lo) and math.isfinite(hi):
            return
        flat = a.ravel()
        bad = ~(ok(flat) & np.isfinite(flat))
        value = float(flat[int(np.argmax(bad))])
        arg = "value" if which == "forward" else "transformed value"
        raise ValueError(
            f"transform {self.name!r} ({self.expression}): {arg} {value!r} is outside its "
            f"{'domain' if which == 'forward' else 'range'} {domain}"
        )


def identity() -> Transform:
    """The identity transform ``f(x) = x``."""
    return Transform("identity", {})


def ln(offset: float = 1.0) -> Transform:
    """``f(x) = ln(x + offset)`` on ``x >= 0`` (``x > 0`` when ``offset == 0``)."""
    return Transform("ln", {"offset": offset})


def log10(offset: float = 1.0) -> Transform:
    """``f(x) = log10(x + offset)`` on ``x >= 0`` (``x > 0`` when ``offset == 0``)."""
    return Transform("log10", {"offset": offset})


def arcsin_sqrt(scale: float = 1.0) -> Transform:
    """``f(x) = arcsin(sqrt(x / scale))`` on ``0 <= x <= scale`` (Bartlett 1947)."""
    return Transform("arcsin_sqrt", {"scale": scale})


def make_transform(name: str, params: Mapping[str, float] | None = None) -> Transform:
    """Rebuild a transform from its name and parameters (as recorded in a manifest)."""
    return Transform(name, dict(params or {}))


def candidates_for(
    kind: Literal["intensity", "fraction", "volume", "count"],
    *,
    scale: float | None = None,
    unit_offset: float | None = None,
) -> dict[str, Transform]:
    """The candidate transforms of one kind of quantity, with their offsets and scales.

    Parameters
    ----------
    kind : {"intensity", "fraction", "volume", "count"}
    scale : float, optional
        Upper bound of the values, for arcsin_sqrt. Intensities: the channel's upper
        bound (values above it make arcsin_sqrt raise); fractions: ignored (always 1);
        volumes and counts: arcsin_sqrt is a candidate only when a scale is given.
        Without a scale, intensities have no arcsin_sqrt candidate.
    unit_offset : float, optional
        The offset ``c`` of ln and log10: one unit of resolution. Defaults: intensity 1,
        fraction :data:`DEFAULT_FRACTION_OFFSET` (pass ``1 / n_brain_voxels``), count 1;
        volume has no default (pass one voxel's volume in mL).

    Returns
    -------
    dict
        Name → `Transform`, always starting with ``"identity"``; ``"log10"`` is derived
        from ``"ln"`` (see `DERIVED`).

    Raises
    ------
    ValueError
        Unknown kind, a volume without ``unit_offset``, or a non-positive offset or scale.
    """
    defaults = {"intensity": 1.0, "fraction": DEFAULT_FRACTION_OFFSET, "count": 1.0,
                "volume": None}
    if kind not in defaults:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(defaults)}")
    offset = unit_offset if unit_offset is not None else defaults[kind]
    if offset is None:
        raise ValueError(
            "volume candidates need unit_offset = one voxel's volume (mL); got None"
        )
    for label, value in (("unit_offset", offset), ("scale", scale)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"candidates_for({kind!r}): {label} must be finite and > 0, "
                             f"got {value!r}")
    out = {"identity": identity(), "ln": ln(offset), "log10": log10(offset)}
    if kind == "fraction":
        out["arcsin_sqrt"] = arcsin_sqrt(1.0)
    elif scale is not None:
        out["arcsin_sqrt"] = arcsin_sqrt(scale)
    return out


# --------------------------------------------------------------------------- selection
def normality_score(skewness: float, kurtosis: float) -> float:
    """Jarque–Bera form without ``n/6``: ``skewness**2 + kurtosis**2 / 4``.

    ``kurtosis`` is the Fisher excess kurtosis (0 for a normal distribution); the score
    is 0 for a normal sample's population values and NaN if either moment is NaN.

    Examples
    --------
    >>> normality_score(2.0, 6.0)   # exponential distribution: 4 + 9
    13.0
    """
    return float(skewness) ** 2 + float(kurtosis) ** 2 / 4.0


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvidenceRow(_Frozen):
    """Shape of one candidate's result next to the raw values' shape."""

    candidate: TransformName
    params: dict[str, float]
    expression: str
    n: int = Field(ge=0)
    skewness_before: NullableFloat
    kurtosis_before: NullableFloat
    skewness_after: NullableFloat
    kurtosis_after: NullableFloat
    score: NullableFloat
    note: str = ""


class Selection(_Frozen):
    """The transform chosen for one distribution, with the evidence for every candidate.

    ``scores`` maps every candidate to its `normality_score` (NaN when undefined);
    ``evidence`` holds skewness and (excess) kurtosis before and after per candidate;
    ``reason`` says in words why the choice was made.
    """

    distribution: str
    kind: Literal["intensity", "fraction", "volume", "count"]
    n: int = Field(ge=0)
    chosen: TransformName
    params: dict[str, float]
    expression: str
    score_identity: NullableFloat
    score_chosen: NullableFloat
    scores: dict[str, NullableFloat]
    evidence: list[EvidenceRow]
    reason: str

    def transform(self) -> Transform:
        """The chosen `Transform`."""
        return make_transform(self.chosen, self.params)


def _params_of(dist: Distribution, name: str) -> dict[str, float]:
    if name == "identity":
        return {}
    if name not in dist.transforms:
        raise ValueError(
            f"distribution {dist.name!r}: candidate {name!r} has moments but no parameters "
            f"in 'transforms' (have {sorted(dist.transforms)!r})"
        )
    raw = dist.transforms[name]
    try:
        return {k: float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"distribution {dist.name!r}: parameters of {name!r} must be numbers, got {raw!r}"
        ) from err


def select(
    distribution: Distribution,
    *,
    min_improvement: float = MIN_RELATIVE_IMPROVEMENT,
    min_absolute: float = MIN_ABSOLUTE_IMPROVEMENT,
    prefer_log: Literal["ln", "log10"] = "ln",
) -> Selection:
    """Choose the candidate transform whose result is closest to normal.

    Parameters
    ----------
    distribution : Distribution
        With the raw moments (``moments`` or ``candidates["identity"]``), the moments of
        every candidate (``candidates``) and their parameters (``transforms``).
    min_improvement : float, default 0.10
        Smallest relative decrease of the score that leaves identity.
    min_absolute : float, default 0.05
        Smallest absolute decrease; the rule uses ``max(min_absolute, 12 / n)`` (the
        expected score of a normal sample of size ``n``: below it the gain is noise).
    prefer_log : {"ln", "log10"}, default "ln"
        Which of the two logarithms to report when they win (their scores are equal).

    Returns
    -------
    Selection

    Raises
    ------
    ValueError
        Bad thresholds, an unknown candidate name, or a candidate without parameters.

    Notes
    -----
    Score :math:`S = g_1^2 + g_2^2/4` (module notes). Identity is kept, with the reason,
    when its moments are undefined (no values, fewer than 4 values, constant values:
    NaN as scipy gives), when no candidate has a defined score, or when the best
    improvement is below the thresholds. Exact ties between different candidates go to
    the earlier name in `TRANSFORM_NAMES`.

    Examples
    --------
    A log-normal sample is chosen ln; see ``tests/stats/test_transforms.py``.
    """
    if not (0 <= min_improvement < 1) or not (min_absolute >= 0):
        raise ValueError(
            f"select: need 0 <= min_improvement < 1 and min_absolute >= 0, got "
            f"min_improvement={min_improvement!r}, min_absolute={min_absolute!r}"
        )
    if prefer_log not in _LOG_FAMILY:
        raise ValueError(f"select: prefer_log must be 'ln' or 'log10', got {prefer_log!r}")
    raw: Moments = distribution.candidates.get("identity", distribution.moments)
    n = raw.n
    unknown = sorted(set(distribution.candidates) - set(TRANSFORM_NAMES))
    if unknown:
        raise ValueError(f"distribution {distribution.name!r}: unknown candidates {unknown!r}; "
                         f"known: {list(TRANSFORM_NAMES)}")
    moments = {"identity": raw, **{k: v for k, v in distribution.candidates.items()
                                   if k != "identity"}}
    names = [k for k in TRANSFORM_NAMES if k in moments]
    params = {k: _params_of(distribution, k) for k in names}
    scores = {k: normality_score(moments[k].skewness, moments[k].kurtosis) for k in names}
    s0 = scores["identity"]

    logs_present = [k for k in _LOG_FAMILY if k in names]
    same_log_shape = (
        len(logs_present) == 2 and params["ln"] == params["log10"]
    )
    notes: dict[str, str] = {}
    if same_log_shape:
        other = "log10" if prefer_log == "ln" else "ln"
        notes[other] = (f"same shape as {prefer_log} (log10 = ln / ln 10: scale-invariant "
                        f"skewness and kurtosis); {prefer_log} is reported")
        notes[prefer_log] = f"preferred over {other}: equal score, {prefer_log} requested"

    def row(k: str) -> EvidenceRow:
        m = moments[k]
        return EvidenceRow(
            candidate=k, params=params[k], expression=make_transform(k, params[k]).expression,
            n=m.n, skewness_before=raw.skewness, kurtosis_before=raw.kurtosis,
            skewness_after=m.skewness, kurtosis_after=m.kurtosis, score=scores[k],
            note=notes.get(k, ""),
        )

    evidence = [row(k) for k in names]

    def result(chosen: str, reason: str) -> Selection:
        t = make_transform(chosen, params[chosen])
        return Selection(
            distribution=distribution.name, kind=distribution.kind, n=n, chosen=chosen,
            params=params[chosen], expression=t.expression, score_identity=s0,
            score_chosen=scores[chosen], scores=scores, evidence=evidence, reason=reason,
        )

    if math.isnan(s0):
        why = ("no values" if n == 0 else
               f"n = {n} < 4" if n < 4 else "constant values")
        return result("identity", f"identity kept: skewness/kurtosis undefined ({why})")
    # One entry per shape: drop the non-preferred logarithm when both have the same offset.
    contenders = [k for k in names if k != "identity" and not math.isnan(scores[k])
                  and not (same_log_shape and k != prefer_log and k in _LOG_FAMILY)]
    if not contenders:
        return result("identity", f"identity kept: no candidate has a defined score "
                                  f"(identity score {s0:.3g})")
    best = min(contenders, key=lambda k: (scores[k], TRANSFORM_NAMES.index(k)))
    gain = s0 - scores[best]
    need_abs = max(min_absolute, JB_NOISE / n)
    need_rel = min_improvement * s0
    if gain >= need_rel and gain >= need_abs:
        return result(best, (
            f"{best} chosen: score {scores[best]:.3g} vs identity {s0:.3g} "
            f"(decrease {gain:.3g} >= {min_improvement:.0%} of identity and "
            f">= max({min_absolute:g}, 12/n = {JB_NOISE / n:.3g}))"))
    return result("identity", (
        f"identity kept: best candidate {best} scores {scores[best]:.3g} vs identity "
        f"{s0:.3g}; decrease {gain:.3g} below the thresholds ({min_improvement:.0%} "
        f"relative = {need_rel:.3g}, absolute {need_abs:.3g})"))
