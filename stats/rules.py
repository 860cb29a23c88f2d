"""The rules that build the loss configuration from the statistics.

Each rule reads one measured value from a `stats.summary.DatasetStats`, compares it with
named thresholds and returns a `Decision`: the rule id, what was measured, the value, the
thresholds, the outcome (with its parameters) and a sentence saying all of it. `decide_loss`
runs the rules in order and assembles the loss terms and their weighting. The table of
rules is data (`RULES`); ``docs/rules.md`` states why each threshold is sound, with the
papers and seeds it comes from.

=====  ====================  =====================================================  ==========================
id     title                 measured                                               outcome
=====  ====================  =====================================================  ==========================
R1     class imbalance       median tumour fraction of brain voxels per case        tversky / dice / none
R2     tumour-size tail      skewness of tumour volume per case                     focal(gamma) / bce
R3     intensity tails       max excess kurtosis of brain intensities (chosen       barron(alpha0) / none
                             transform) over channels
R5     region adaptation     coefficient of variation of per-slice tumour fraction  adaptive_tversky(A, B) /
                                                                                    fixed
R4     term weighting        number of loss terms                                   static / softadapt / cov
=====  ====================  =====================================================  ==========================

(R4 runs last because it counts the terms the others chose.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stats.summary import DatasetStats, Distribution, Moments
from stats.transforms import NullableFloat, select

__all__ = [
    "ADAPT_A",
    "ADAPT_B",
    "ADAPT_CV_THRESHOLD",
    "ADAPT_REGIONS_PER_AXIS",
    "BARRON_ALPHA_MIN",
    "BARRON_ALPHA_RANGE",
    "BARRON_SCALE",
    "FOCAL_GAMMA_MAX",
    "FOCAL_GAMMA_MIN",
    "FOCAL_SKEW_THRESHOLD",
    "IMBALANCE_MILD",
    "IMBALANCE_STRONG",
    "KURTOSIS_THRESHOLD",
    "LOSS_NAMES",
    "RULES",
    "SOFTADAPT_BETA",
    "TERM_NAMES",
    "TVERSKY_ALPHA",
    "TVERSKY_BETA",
    "WEIGHTING_METHODS",
    "Decision",
    "LossName",
    "LossPlan",
    "LossTerm",
    "Rule",
    "WeightingConfig",
    "adaptation_rule",
    "decide_loss",
    "imbalance_rule",
    "intensity_tail_rule",
    "volume_tail_rule",
    "weighting_rule",
]

# ------------------------------------------------------------------ names the trainer knows
#: Every name in the trainer's loss registry (``pipeline.train.losses.LOSSES``); a test of
#: the lead keeps the two equal.
LOSS_NAMES: tuple[str, ...] = (
    "adaptive_tversky", "asymmetric", "barron", "bce", "boundary", "dice", "dice_ce",
    "dice_focal", "focal", "focal_tversky", "generalized_dice", "hausdorff_dt", "iou",
    "manifest", "tversky", "wce",
)
#: Names a manifest term may use: the registry without ``manifest`` (no nesting).
TERM_NAMES: tuple[str, ...] = tuple(n for n in LOSS_NAMES if n != "manifest")
LossName = Literal[
    "adaptive_tversky", "asymmetric", "barron", "bce", "boundary", "dice", "dice_ce",
    "dice_focal", "focal", "focal_tversky", "generalized_dice", "hausdorff_dt", "iou",
    "tversky", "wce",
]
#: ``pipeline.train.weighting.WEIGHTINGS``.
WEIGHTING_METHODS: tuple[str, ...] = ("static", "rebalance", "softadapt", "cov")
WeightingMethod = Literal["static", "rebalance", "softadapt", "cov"]

# ------------------------------------------------------------------ thresholds and constants
#: R1: median tumour fraction below which the region term is Tversky (strong imbalance).
IMBALANCE_STRONG = 0.05
#: R1: median tumour fraction below which a Dice region term is added (mild imbalance).
IMBALANCE_MILD = 0.20
#: R1: Tversky weights of false positives and false negatives (Salehi et al. 2017).
TVERSKY_ALPHA = 0.3
TVERSKY_BETA = 0.7
#: R2: skewness of tumour volume above which the distribution term is focal (seed 000:
#: |skewness| >= 1 is "highly skewed").
FOCAL_SKEW_THRESHOLD = 1.0
#: R2: gamma = clip(skewness, FOCAL_GAMMA_MIN, FOCAL_GAMMA_MAX); gamma = 2 (Lin et al.
#: 2017's best) at skewness 2, an exponential distribution's.
FOCAL_GAMMA_MIN = 1.0
FOCAL_GAMMA_MAX = 3.0
#: R3: excess kurtosis above which a Barron robust term is added (a Laplace distribution's).
KURTOSIS_THRESHOLD = 3.0
#: R3: alpha0 = 6 / (3 + k), floored here so a learnable alpha starts inside (0, 2).
BARRON_ALPHA_MIN = 0.1
#: R3: Barron's range of the learnable shape and its scale on probability residuals.
BARRON_ALPHA_RANGE = (0.0, 2.0)
BARRON_SCALE = 0.1
#: R5: coefficient of variation of the per-slice tumour fraction above which the region
#: term adapts its weights per region in training (an exponential distribution's CV).
ADAPT_CV_THRESHOLD = 1.0
#: R5: alpha = A + B FP/(FP+FN), beta = A + B FN/(FP+FN) (Chen et al. 2023): 2A + B = 1.
ADAPT_A = 0.3
ADAPT_B = 0.4
#: R5: blocks per spatial axis (a U-Net input is divisible by 2 at every level).
ADAPT_REGIONS_PER_AXIS = 2
#: R4: SoftAdapt's beta (Heydari et al. 2019; the thesis' setting).
SOFTADAPT_BETA = 0.1


# ------------------------------------------------------------------ models
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Param = bool | int | float | str | list[float]


class Decision(_Frozen):
    """One rule applied to the statistics.

    ``measured`` is NaN (JSON null) when the statistic is undefined; ``fired`` says
    whether the rule's condition held; ``outcome`` is the short result and ``params`` the
    parameters it set; ``text`` is the sentence for people.
    """

    rule: str
    title: str
    measure: str
    measured: NullableFloat
    thresholds: dict[str, float]
    fired: bool
    outcome: str
    params: dict[str, Param] = Field(default_factory=dict)
    text: str
    reference: str


class LossTerm(_Frozen):
    """One term of the manifest loss: a registry name, a fixed weight, its parameters."""

    name: LossName
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    params: dict[str, Param] = Field(default_factory=dict)
    reason: str


class WeightingConfig(_Frozen):
    """How the terms are weighted during training (``pipeline.train.weighting``)."""

    method: WeightingMethod
    params: dict[str, Param] = Field(default_factory=dict)
    reason: str


@dataclass(frozen=True)
class Rule:
    """One row of the rule table."""

    id: str
    title: str
    measure: str
    condition: str
    thresholds: Mapping[str, float]
    reference: str


RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule("R1", "class imbalance", "median tumour fraction of brain voxels per case",
             f"< {IMBALANCE_STRONG:g}: Tversky region term (alpha {TVERSKY_ALPHA:g}, beta "
             f"{TVERSKY_BETA:g}); < {IMBALANCE_MILD:g}: Dice region term; else none",
             {"strong": IMBALANCE_STRONG, "mild": IMBALANCE_MILD,
              "tversky_alpha": TVERSKY_ALPHA, "tversky_beta": TVERSKY_BETA},
             "Salehi et al. 2017 (arXiv:1706.05721); Milletari et al. 2016 "
             "(arXiv:1606.04797); thesis (Hun 2021) ch. 3.3"),
        Rule("R2", "tumour-size tail", "skewness of tumour volume per case (g1)",
             f"> {FOCAL_SKEW_THRESHOLD:g}: focal, gamma = clip(skewness, "
             f"{FOCAL_GAMMA_MIN:g}, {FOCAL_GAMMA_MAX:g}); else BCE",
             {"skewness": FOCAL_SKEW_THRESHOLD, "gamma_min": FOCAL_GAMMA_MIN,
              "gamma_max": FOCAL_GAMMA_MAX},
             "Lin et al. 2017 (arXiv:1708.02002); seed 000 (skewness >= 1: highly skewed)"),
        Rule("R3", "intensity tails",
             "max over channels of the excess kurtosis of brain intensities after the "
             "chosen transform",
             f"> {KURTOSIS_THRESHOLD:g}: Barron robust term, learnable alpha from "
             f"max({BARRON_ALPHA_MIN:g}, 6/(3 + k)); else none",
             {"kurtosis": KURTOSIS_THRESHOLD, "alpha_min": BARRON_ALPHA_MIN,
              "scale": BARRON_SCALE},
             "Barron 2019 (arXiv:1701.03077); seed 000 (leptokurtic: prone to outliers)"),
        Rule("R5", "region adaptation",
             "coefficient of variation (std/mean) of the per-slice tumour fraction",
             f"region term present and CV > {ADAPT_CV_THRESHOLD:g}: adaptive Tversky with "
             f"A {ADAPT_A:g}, B {ADAPT_B:g}; else fixed weights",
             {"cv": ADAPT_CV_THRESHOLD, "A": ADAPT_A, "B": ADAPT_B,
              "regions_per_axis": float(ADAPT_REGIONS_PER_AXIS)},
             "Chen et al. 2023 (arXiv:2305.08908); seed 000 (region-specific adaptive loss)"),
        Rule("R4", "term weighting", "number of loss terms",
             "1: static; 2: SoftAdapt (beta 0.1); >= 3: coefficient of variations",
             {"softadapt_beta": SOFTADAPT_BETA},
             "thesis (Hun 2021) eq. 5.2-5.11; Heydari et al. 2019 (arXiv:1912.12355); "
             "Groenendijk et al. 2020 (arXiv:2009.01717)"),
    )
}


def _decision(rule_id: str, measured: float, fired: bool, outcome: str, text: str,
              params: Mapping[str, Param] | None = None) -> Decision:
    r = RULES[rule_id]
    return Decision(rule=r.id, title=r.title, measure=r.measure, measured=measured,
                    thresholds=dict(r.thresholds), fired=fired, outcome=outcome,
                    params=dict(params or {}), text=text, reference=r.reference)


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%"


def _label(stats: DatasetStats, key: str) -> Distribution:
    if key not in stats.labels:
        raise ValueError(f"statistics of {stats.dataset!r}: field labels.{key} is missing "
                         f"(have {sorted(stats.labels)!r})")
    return stats.labels[key]


# ------------------------------------------------------------------ the rules
def imbalance_rule(stats: DatasetStats) -> Decision:
    """R1: the median tumour fraction decides the region term and its weights.

    Raises
    ------
    ValueError
        If ``labels.tumour_fraction_case`` or its median is missing, or the median is
        NaN (no cases) or outside [0, 1].
    """
    dist = _label(stats, "tumour_fraction_case")
    if "50" not in dist.percentiles:
        raise ValueError(f"statistics of {stats.dataset!r}: field "
                         f"labels.tumour_fraction_case.percentiles['50'] is missing")
    f = float(dist.percentiles["50"])
    if not 0 <= f <= 1:  # also NaN
        raise ValueError(f"statistics of {stats.dataset!r}: median tumour fraction must be in "
                         f"[0, 1], got {f!r} (n = {dist.moments.n})")
    what = f"median tumour fraction per case {_pct(f)}"
    if f < IMBALANCE_STRONG:
        return _decision("R1", f, True, "tversky",
                         f"{what} < {_pct(IMBALANCE_STRONG)}: Tversky region term added "
                         f"(alpha={TVERSKY_ALPHA:g}, beta={TVERSKY_BETA:g}: false negatives "
                         f"weigh more)",
                         {"alpha": TVERSKY_ALPHA, "beta": TVERSKY_BETA})
    if f < IMBALANCE_MILD:
        return _decision("R1", f, True, "dice",
                         f"{what} in [{_pct(IMBALANCE_STRONG)}, {_pct(IMBALANCE_MILD)}): "
                         f"Dice region term added")
    return _decision("R1", f, False, "none",
                     f"{what} >= {_pct(IMBALANCE_MILD)}: classes balanced enough, no region "
                     f"term (distribution term only)")


def volume_tail_rule(stats: DatasetStats) -> Decision:
    """R2: a heavy right tail of tumour volume makes the distribution term focal.

    ``gamma = clip(g1, FOCAL_GAMMA_MIN, FOCAL_GAMMA_MAX)``; NaN skewness (fewer than 3
    cases, or all volumes equal) keeps BCE.
    """
    m = _label(stats, "tumour_volume_ml").moments
    s = float(m.skewness)
    what = f"skewness of tumour volume per case {s:.3g} (n={m.n})"
    if s > FOCAL_SKEW_THRESHOLD:
        gamma = min(max(s, FOCAL_GAMMA_MIN), FOCAL_GAMMA_MAX)
        return _decision("R2", s, True, "focal",
                         f"{what} > {FOCAL_SKEW_THRESHOLD:g}: focal distribution term, gamma "
                         f"= clip({s:.3g}, {FOCAL_GAMMA_MIN:g}, {FOCAL_GAMMA_MAX:g}) = "
                         f"{gamma:.3g}",
                         {"gamma": round(gamma, 4)})
    why = "undefined" if math.isnan(s) else f"<= {FOCAL_SKEW_THRESHOLD:g}"
    return _decision("R2", s, False, "bce", f"{what} {why}: BCE distribution term")


def _brain_kurtosis(stats: DatasetStats) -> dict[str, tuple[float, str]]:
    """Channel → (excess kurtosis of brain intensities after the chosen transform, name)."""
    out: dict[str, tuple[float, str]] = {}
    for ch in stats.channels:
        regions = stats.intensity.get(ch, {})
        if "brain" not in regions:
            raise ValueError(f"statistics of {stats.dataset!r}: field "
                             f"intensity.{ch}.brain is missing")
        dist = regions["brain"]
        chosen = select(dist).chosen
        m: Moments = dist.candidates.get(chosen, dist.moments)
        out[ch] = (float(m.kurtosis), chosen)
    return out


def intensity_tail_rule(stats: DatasetStats) -> Decision:
    """R3: heavy-tailed intensities (on the scale the network sees) add a Barron term.

    The kurtosis is that of the brain intensities after the transform `select` chooses
    for the channel (the normalization plan applies it), maximised over channels.
    ``alpha0 = max(BARRON_ALPHA_MIN, 6 / (3 + k))``: 2 (L2) for k = 0, 1 (pseudo-Huber)
    for a Laplace tail (k = 3), towards 0 (Cauchy) as k grows.
    """
    per_channel = _brain_kurtosis(stats)
    defined = {ch: v for ch, v in per_channel.items() if not math.isnan(v[0])}
    if not defined:
        return _decision("R3", math.nan, False, "none",
                         "excess kurtosis of brain intensities undefined in every channel: "
                         "no robust term")
    ch = max(defined, key=lambda c: defined[c][0])
    k, chosen = defined[ch]
    what = f"max excess kurtosis of brain intensities {k:.3g} ({ch}, after {chosen})"
    if k > KURTOSIS_THRESHOLD:
        alpha0 = max(BARRON_ALPHA_MIN, 6.0 / (3.0 + k))
        return _decision("R3", k, True, "barron",
                         f"{what} > {KURTOSIS_THRESHOLD:g}: Barron robust term added, "
                         f"learnable alpha starting at max({BARRON_ALPHA_MIN:g}, 6/(3+k)) = "
                         f"{alpha0:.3g}",
                         {"alpha": round(alpha0, 4), "channel": ch})
    return _decision("R3", k, False, "none",
                     f"{what} <= {KURTOSIS_THRESHOLD:g}: tails no heavier than Laplace, no "
                     f"robust term")


def adaptation_rule(stats: DatasetStats, region_term: str) -> Decision:
    """R5: heterogeneous tumour burden across slices makes the region weights adaptive.

    Parameters
    ----------
    region_term : str
        R1's outcome (``"tversky"``, ``"dice"`` or ``"none"``).
    """
    m = _label(stats, "tumour_fraction_slice").moments
    mean, std = float(m.mean), float(m.std)
    cv = std / mean if mean > 0 and math.isfinite(std) else math.nan
    what = f"coefficient of variation of per-slice tumour fraction {cv:.3g} (n={m.n})"
    if region_term == "none":
        return _decision("R5", cv, False, "none", f"{what}; no region term: nothing to adapt")
    if cv > ADAPT_CV_THRESHOLD:
        return _decision("R5", cv, True, "adaptive_tversky",
                         f"{what} > {ADAPT_CV_THRESHOLD:g}: {region_term} replaced by adaptive "
                         f"Tversky, alpha = {ADAPT_A:g} + {ADAPT_B:g}·FP/(FP+FN), beta = "
                         f"{ADAPT_A:g} + {ADAPT_B:g}·FN/(FP+FN) in {ADAPT_REGIONS_PER_AXIS} "
                         f"blocks per axis",
                         {"A": ADAPT_A, "B": ADAPT_B,
                          "regions_per_axis": ADAPT_REGIONS_PER_AXIS})
    why = "undefined (no tumour)" if math.isnan(cv) else f"<= {ADAPT_CV_THRESHOLD:g}"
    return _decision("R5", cv, False, "fixed",
                     f"{what} {why}: {region_term} keeps fixed weights")


def weighting_rule(n_terms: int) -> Decision:
    """R4: one term static, two SoftAdapt, three or more coefficient of variations."""
    if n_terms < 1:
        raise ValueError(f"weighting_rule: need at least one loss term, got {n_terms!r}")
    what = f"{n_terms} loss term{'s' if n_terms > 1 else ''}"
    if n_terms == 1:
        return _decision("R4", float(n_terms), False, "static", f"{what}: static weighting")
    if n_terms == 2:
        return _decision("R4", float(n_terms), True, "softadapt",
                         f"{what}: SoftAdapt weighting (beta={SOFTADAPT_BETA:g})",
                         {"beta": SOFTADAPT_BETA})
    return _decision("R4", float(n_terms), True, "cov",
                     f"{what}: coefficient-of-variations weighting")


# ------------------------------------------------------------------ assembly
@dataclass(frozen=True)
class LossPlan:
    """The loss the rules chose: terms in order, their weighting, every decision."""

    terms: tuple[LossTerm, ...]
    weighting: WeightingConfig
    decisions: tuple[Decision, ...]


def decide_loss(stats: DatasetStats) -> LossPlan:
    """Run R1, R2, R3, R5, then R4, and assemble the loss terms.

    Terms, in order: the region term (R1, possibly made adaptive by R5), the distribution
    term (R2, always present), the robust term (R3). Each has weight 1; the weighting
    (R4) balances them in training. Region terms leave out the background channel
    (``include_background=False``): under imbalance its overlap is near 1 and would
    dilute the foreground's.
    """
    r1 = imbalance_rule(stats)
    r2 = volume_tail_rule(stats)
    r3 = intensity_tail_rule(stats)
    r5 = adaptation_rule(stats, r1.outcome)
    terms: list[LossTerm] = []
    if r5.outcome == "adaptive_tversky":
        terms.append(LossTerm(name="adaptive_tversky",
                              params={**r5.params, "include_background": False},
                              reason=f"R1: {r1.text}; R5: {r5.text}"))
    elif r1.outcome in ("tversky", "dice"):
        terms.append(LossTerm(name=r1.outcome,  # type: ignore[arg-type]
                              params={**r1.params, "include_background": False},
                              reason=f"R1: {r1.text}; R5: {r5.text}"))
    terms.append(LossTerm(name=r2.outcome, params=dict(r2.params),  # type: ignore[arg-type]
                          reason=f"R2: {r2.text}"))
    if r3.outcome == "barron":
        terms.append(LossTerm(
            name="barron",
            params={"alpha": r3.params["alpha"], "scale": BARRON_SCALE, "learnable": True,
                    "alpha_range": list(BARRON_ALPHA_RANGE)},
            reason=f"R3: {r3.text}"))
    r4 = weighting_rule(len(terms))
    weighting = WeightingConfig(method=r4.outcome, params=dict(r4.params),  # type: ignore[arg-type]
                                reason=f"R4: {r4.text}")
    return LossPlan(terms=tuple(terms), weighting=weighting, decisions=(r1, r2, r3, r5, r4))
