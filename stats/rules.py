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
R1     class imbalance       median tumour fraction of brain voxels per case        dice / none
R2     tumour-size tail      skewness of tumour volume per case; fires when its      focal(gamma) / bce
                             one-sided 95 % lower bound at the dataset's n > 1
R3     intensity tails       max excess kurtosis over channels of the brain         clip (tighter percentiles)
                             intensities after the normalization plan (transform,   / none
                             then percentile clip)
R5     slice heterogeneity   median over cases of the coefficient of variation of   heterogeneous / fixed
                             the per-slice tumour fraction within the tumour's      (recorded, loss unchanged)
                             axial extent
R4     term weighting        number of loss terms                                   static / cov
=====  ====================  =====================================================  ==========================

(R4 runs last because it counts the terms the others chose.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stats.seen import CLIP_LEVELS, SeenMoments, seen_moments
from stats.summary import DatasetStats, Distribution, Moments
from stats.transforms import NullableFloat, select

__all__ = [
    "ADAPT_CV_THRESHOLD",
    "FOCAL_GAMMA_MAX",
    "FOCAL_GAMMA_MIN",
    "FOCAL_SKEW_THRESHOLD",
    "IMBALANCE_MILD",
    "KURTOSIS_THRESHOLD",
    "LOSS_NAMES",
    "RULES",
    "SKEW_MIN_N",
    "SKEW_Z",
    "TERM_NAMES",
    "WEIGHTING_METHODS",
    "AdaptationConfig",
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
    "skewness_lower_bound",
    "skewness_standard_error",
    "slice_burden_cv",
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
#: R1: median tumour fraction below which a Dice region term is added. (Calibrated by
#: the evidence study: the Tversky region term with alpha 0.3 / beta 0.7 that this rule
#: chose below 5 % trailed Dice + CE in 7 of the 8 arms where it was chosen, by up to
#: 9 Dice points, through lost precision; docs/evidence-calibration.md.)
IMBALANCE_MILD = 0.20
#: R2: skewness of tumour volume above which the distribution term is focal (seed 000:
#: |skewness| >= 1 is "highly skewed").
FOCAL_SKEW_THRESHOLD = 1.0
#: R2: gamma = clip(skewness, FOCAL_GAMMA_MIN, FOCAL_GAMMA_MAX); gamma = 2 (Lin et al.
#: 2017's best) at skewness 2, an exponential distribution's.
FOCAL_GAMMA_MIN = 1.0
FOCAL_GAMMA_MAX = 3.0
#: R2: z of the one-sided 95 % lower bound of the skewness (the rule fires only when
#: the bound exceeds FOCAL_SKEW_THRESHOLD).
SKEW_Z = 1.6448536269514722
#: R2: fewest cases for which a tail is judged at all (scipy.stats.skewtest's own limit).
SKEW_MIN_N = 8
#: R3: excess kurtosis (after the normalization plan) above which the plan clips tighter
#: (a Laplace distribution's: tails heavier than exponential).
KURTOSIS_THRESHOLD = 3.0
#: R5: median per-case CV of the per-slice tumour fraction (within the tumour's axial
#: extent) above which the tumour burden is called heterogeneous. One ellipsoidal
#: tumour has CV 1/sqrt(5) = 0.447 whatever its axes (its cross-section area is
#: proportional to 1 - t² over the extent); the threshold is twice that: the burden must
#: vary across slices twice as much as a single compact body's would.
ADAPT_CV_THRESHOLD = 2.0 / math.sqrt(5.0)



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


class AdaptationConfig(_Frozen):
    """Greedy adaptation of one term's parameters during training (Seo et al. 2021).

    Before a training step every combination of ``factors`` over ``params``
    (``len(factors) ** len(params)`` actions) multiplies the parameters of term ``term``,
    takes a trial step and measures the L2 norm between the new prediction and the
    target; the best action is kept (thesis section 5.1; ``pipeline.train.greedy``).
    ``every``: steps between searches; the thesis searches at every step (1), a larger
    value trades the fidelity of following the best action at each step for speed (each
    search costs ``len(factors) ** len(params)`` extra forward-backward passes). The
    trainer checks that the names are float parameters of that term.

    References
    ----------
    .. [1] Seo, H., Bassenne, M., Xing, L. (2021; online 2020). Closing the gap between
       deep neural network modeling and biomedical decision-making metrics in
       segmentation via adaptive loss functions. IEEE TMI 40(2), 585-593.
       doi:10.1109/TMI.2020.3031913
    """

    method: Literal["greedy"]
    term: int = Field(ge=0)
    params: list[str] = Field(min_length=1)
    factors: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.9, 1.0, 1.1], min_length=1)
    every: int = Field(default=1, ge=1)
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
             f"< {IMBALANCE_MILD:g}: Dice region term; else none",
             {"mild": IMBALANCE_MILD},
             "Milletari et al. 2016 (arXiv:1606.04797); Isensee et al. 2021 (nnU-Net: Dice "
             "+ CE); thesis (Hun 2021) ch. 3.3; calibration: docs/evidence-calibration.md"),
        Rule("R2", "tumour-size tail", "skewness of tumour volume per case (g1)",
             f"one-sided 95 % lower bound G1 - {SKEW_Z:.3f}·SES(n) > "
             f"{FOCAL_SKEW_THRESHOLD:g} (n >= {SKEW_MIN_N}): focal, gamma = clip(g1, "
             f"{FOCAL_GAMMA_MIN:g}, {FOCAL_GAMMA_MAX:g}); else BCE",
             {"skewness": FOCAL_SKEW_THRESHOLD, "gamma_min": FOCAL_GAMMA_MIN,
              "gamma_max": FOCAL_GAMMA_MAX, "z": SKEW_Z, "min_n": float(SKEW_MIN_N)},
             "Lin et al. 2017 (arXiv:1708.02002); seed 000 (skewness >= 1: highly skewed); "
             "Joanes & Gill 1998 (doi:10.1111/1467-9884.00122)"),
        Rule("R3", "intensity tails",
             "max over channels of the excess kurtosis of brain intensities after the "
             "normalization plan (chosen transform, then 0.5/99.5 percentile clip)",
             f"> {KURTOSIS_THRESHOLD:g}: that channel is clipped at the first of "
             f"{', '.join(f'{lo:g}/{hi:g}' for lo, hi in CLIP_LEVELS[1:])} percentiles "
             f"that brings it to <= {KURTOSIS_THRESHOLD:g} (else the tightest); else none",
             {"kurtosis": KURTOSIS_THRESHOLD},
             "seed 000 (leptokurtic: prone to outliers); thesis (Hun 2021) section 6.3 "
             "(percentile clipping); Isensee et al. 2021 (nnU-Net, doi:10.1038/"
             "s41592-020-01008-z)"),
        Rule("R5", "slice heterogeneity",
             "median over cases of the coefficient of variation (std/mean) of the "
             "per-slice tumour fraction within the tumour's axial extent",
             f"CV > {ADAPT_CV_THRESHOLD:.3g} (twice a single ellipsoid's 1/sqrt(5)): "
             f"heterogeneous, recorded; the loss is not changed (adaptive Tversky trailed "
             f"Dice + CE by 9 Dice points on the multifocal arm)",
             {"cv": ADAPT_CV_THRESHOLD},
             "Chen et al. 2023 (arXiv:2305.08908); calibration: "
             "docs/evidence-calibration.md"),
        Rule("R4", "term weighting", "number of loss terms",
             "1 or 2: static (equal weights); >= 3: coefficient of variations with a "
             "floor",
             {},
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
    """R1: below 20 % median tumour fraction, a Dice region term joins the distribution term.

    The Tversky region term (alpha 0.3, beta 0.7) that this rule chose below 5 % before
    calibration over-segmented: in the evidence study the manifest with it trailed
    Dice + CE in 7 of 8 arms (docs/evidence-calibration.md), by 3.5-9.1 Dice points where
    significant, losing 7-14 points of precision for 1-5 of recall.

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
    if f < IMBALANCE_MILD:
        return _decision("R1", f, True, "dice",
                         f"{what} < {_pct(IMBALANCE_MILD)}: Dice region term added")
    return _decision("R1", f, False, "none",
                     f"{what} >= {_pct(IMBALANCE_MILD)}: classes balanced enough, no region "
                     f"term (distribution term only)")


def skewness_standard_error(n: int) -> float:
    r"""Standard error of the adjusted sample skewness G1 of n normal values.

    :math:`SES = \sqrt{6n(n-1) / ((n-2)(n+1)(n+3))}` (exact variance of G1 under
    normality; Joanes & Gill 1998). NaN for n < 3. For skewed populations the true
    sampling spread is larger, so a bound built on it is a minimum guard, not a
    guarantee.

    References
    ----------
    .. [1] Joanes, D. N., Gill, C. A. (1998). Comparing measures of sample skewness and
       kurtosis. The Statistician 47(1), 183-189. doi:10.1111/1467-9884.00122
    """
    if n < 3:
        return math.nan
    return math.sqrt(6.0 * n * (n - 1.0) / ((n - 2.0) * (n + 1.0) * (n + 3.0)))


def skewness_lower_bound(g1_adjusted: float, n: int) -> float:
    """One-sided 95 % lower bound of the population skewness: ``G1 - z * SES(n)``.

    NaN when ``G1`` is NaN or ``n < SKEW_MIN_N``.
    """
    if math.isnan(g1_adjusted) or n < SKEW_MIN_N:
        return math.nan
    return g1_adjusted - SKEW_Z * skewness_standard_error(n)


def volume_tail_rule(stats: DatasetStats) -> Decision:
    """R2: a heavy right tail of tumour volume makes the distribution term focal.

    Fires when the one-sided 95 % lower bound of the population skewness,
    ``G1 - 1.645 SES(n)`` (`skewness_lower_bound`), exceeds `FOCAL_SKEW_THRESHOLD`: the
    tail must be *known* to be heavier than the threshold at the dataset's n. With 8
    cases from a population of skewness 1.8 the sample skewness is often below 1 and
    sometimes far above it; a rule on the point estimate is then a coin weighted by n.
    (Being distinguishable from 0 is implied: the bound exceeds 1.)
    ``gamma = clip(g1, FOCAL_GAMMA_MIN, FOCAL_GAMMA_MAX)``; undefined skewness (fewer
    than 3 cases, all volumes equal) and n < `SKEW_MIN_N` keep BCE.
    """
    m = _label(stats, "tumour_volume_ml").moments
    s, n = float(m.skewness), int(m.n)
    big_g1 = float(m.skewness_unbiased)
    low = skewness_lower_bound(big_g1, n)
    what = (f"skewness of tumour volume per case {s:.3g} (n={n}; adjusted G1 {big_g1:.3g}, "
            f"95 % lower bound {low:.3g})")
    if low > FOCAL_SKEW_THRESHOLD:
        gamma = min(max(s, FOCAL_GAMMA_MIN), FOCAL_GAMMA_MAX)
        return _decision("R2", s, True, "focal",
                         f"{what}: lower bound > {FOCAL_SKEW_THRESHOLD:g}, the tail is heavy "
                         f"at this n: focal distribution term, gamma = clip({s:.3g}, "
                         f"{FOCAL_GAMMA_MIN:g}, {FOCAL_GAMMA_MAX:g}) = {gamma:.3g}",
                         {"gamma": round(gamma, 4), "lower_bound": round(low, 4)})
    if math.isnan(s):
        why = "undefined"
    elif n < SKEW_MIN_N:
        why = f"too few cases to tell a tail (n < {SKEW_MIN_N})"
    else:
        why = f"lower bound <= {FOCAL_SKEW_THRESHOLD:g}: no heavy tail shown at n={n}"
    params: dict[str, Param] = {} if math.isnan(low) else {"lower_bound": round(low, 4)}
    return _decision("R2", s, False, "bce", f"{what}: {why}: BCE distribution term", params)


def _brain(stats: DatasetStats, ch: str) -> Distribution:
    regions = stats.intensity.get(ch, {})
    if "brain" not in regions:
        raise ValueError(f"statistics of {stats.dataset!r}: field intensity.{ch}.brain is "
                         f"missing")
    return regions["brain"]


def seen_by_network(stats: DatasetStats, ch: str,
                    percentiles: tuple[float, float] = CLIP_LEVELS[0]) -> SeenMoments | None:
    """Moments of channel ``ch`` after its transform and the percentile clip, or None when
    the statistics carry no histogram (written before it was kept)."""
    dist = _brain(stats, ch)
    if dist.histogram is None:
        return None
    return seen_moments(dist.histogram, select(dist).transform(), percentiles)


def intensity_tail_rule(stats: DatasetStats) -> Decision:
    """R3: intensities that stay heavy-tailed after the plan's clip are clipped tighter.

    The kurtosis is measured on what the network sees: the brain intensities after the
    transform `select` chooses for the channel and the 0.5/99.5 percentile clip
    (`stats.seen`), maximised over channels. A channel above `KURTOSIS_THRESHOLD` gets
    the first clip of `CLIP_LEVELS` that brings its kurtosis to the threshold or below
    (the tightest if none does); the outcome's ``params`` map each such channel to its
    ``[low, high]`` percentiles, which the manifest's normalization plan uses.

    Heavy input tails are an input problem, answered at the input: a robust term on the
    network's *output* residual (Barron's loss on probabilities, this rule's earlier
    outcome) bounds the gradient of confidently wrong voxels, which works against the
    imbalance and tail rules, and it does not see the intensities at all.

    Statistics without histograms (older files) fall back to the unclipped kurtosis after
    the chosen transform, and say so.
    """
    per_channel: dict[str, tuple[float, str, bool]] = {}
    for ch in stats.channels:
        dist = _brain(stats, ch)
        chosen = select(dist).chosen
        seen = seen_by_network(stats, ch)
        if seen is not None:
            per_channel[ch] = (seen.kurtosis, chosen, True)
        else:
            m: Moments = dist.candidates.get(chosen, dist.moments)
            per_channel[ch] = (float(m.kurtosis), chosen, False)
    defined = {ch: v for ch, v in per_channel.items() if not math.isnan(v[0])}
    if not defined:
        return _decision("R3", math.nan, False, "none",
                         "excess kurtosis of brain intensities undefined in every channel: "
                         "the plan keeps the 0.5/99.5 percentile clip")
    ch = max(defined, key=lambda c: defined[c][0])
    k, chosen, clipped = defined[ch]
    where = (f"after {chosen} and the {CLIP_LEVELS[0][0]:g}/{CLIP_LEVELS[0][1]:g} clip"
             if clipped else f"after {chosen}, unclipped: these statistics have no histogram")
    what = f"max excess kurtosis of brain intensities {k:.3g} ({ch}, {where})"
    if k <= KURTOSIS_THRESHOLD:
        return _decision("R3", k, False, "none",
                         f"{what} <= {KURTOSIS_THRESHOLD:g}: tails no heavier than Laplace, "
                         f"the plan keeps the {CLIP_LEVELS[0][0]:g}/{CLIP_LEVELS[0][1]:g} "
                         f"percentile clip")
    params: dict[str, Param] = {}
    parts = []
    for c, (kc, _, has_hist) in defined.items():
        if kc <= KURTOSIS_THRESHOLD or not has_hist:
            continue
        level, k_at = CLIP_LEVELS[-1], math.nan
        for lv in CLIP_LEVELS[1:]:
            seen = seen_by_network(stats, c, lv)
            k_at = math.nan if seen is None else seen.kurtosis
            if not k_at > KURTOSIS_THRESHOLD:
                level = lv
                break
        params[c] = [level[0], level[1]]
        parts.append(f"{c} clipped at {level[0]:g}/{level[1]:g} (kurtosis {kc:.3g} -> "
                     f"{k_at:.3g})")
    if not params:  # only the no-histogram fallback was heavy: nothing to clip with
        return _decision("R3", k, False, "none",
                         f"{what} > {KURTOSIS_THRESHOLD:g}, but without histograms the "
                         f"tighter clip cannot be measured; the plan keeps 0.5/99.5")
    return _decision("R3", k, True, "clip",
                     f"{what} > {KURTOSIS_THRESHOLD:g}: tails heavier than Laplace reach "
                     f"the network; {'; '.join(parts)}", params)


def slice_burden_cv(slice_fractions: Sequence[float]) -> float:
    """CV (population std / mean) of one case's per-slice tumour fraction over the
    tumour's axial extent (first to last slice that carries tumour, gaps included).

    NaN when the case has no tumour. One ellipsoid gives 1/sqrt(5) for any axes; gaps
    between foci and uneven burden raise it.
    """
    f = np.asarray(slice_fractions, dtype=np.float64)
    nz = np.flatnonzero(f > 0)
    if nz.size == 0:
        return math.nan
    span = f[nz[0]: nz[-1] + 1]
    mean = float(span.mean())
    return float(span.std()) / mean


def adaptation_rule(stats: DatasetStats, region_term: str) -> Decision:
    """R5: is the tumour burden heterogeneous across slices (multifocal, uneven)?

    Measured per case over the tumour's axial extent (`slice_burden_cv`), so that the
    tumour-free slices of the brain do not count: over all brain slices a perfectly
    uniform tumour covering a share q of them has CV sqrt((1 - q)/q), above 1 for any
    q < 0.5, and the rule fired on almost every dataset. The dataset's value is the
    median over cases with tumour.

    The rule records the measurement and does not change the loss. Before calibration a
    heterogeneous dataset replaced the region term by adaptive Tversky (Chen et al.
    2023); in the evidence study that manifest trailed Dice + CE by 9.1 Dice points
    [4.7, 13.7] on the multifocal arm (docs/evidence-calibration.md), so the evidence
    does not support it.

    Parameters
    ----------
    region_term : str
        R1's outcome (``"dice"`` or ``"none"``).
    """
    cvs = [slice_burden_cv(c.slice_fractions) for c in stats.per_case.values()]
    cvs = [v for v in cvs if not math.isnan(v)]
    cv = float(np.median(cvs)) if cvs else math.nan
    what = (f"median over {len(cvs)} cases of the CV of per-slice tumour fraction within "
            f"the tumour's extent {cv:.3g}")
    if cv > ADAPT_CV_THRESHOLD:
        keep = "no region term" if region_term == "none" else f"{region_term} kept"
        return _decision("R5", cv, True, "heterogeneous",
                         f"{what} > {ADAPT_CV_THRESHOLD:.3g}: heterogeneous tumour burden "
                         f"(multifocal or uneven across slices); {keep}: adaptive Tversky "
                         f"trailed Dice + CE on such data in the evidence study")
    why = "undefined (no tumour)" if math.isnan(cv) else f"<= {ADAPT_CV_THRESHOLD:.3g}"
    return _decision("R5", cv, False, "fixed", f"{what} {why}: compact tumour burden")


def weighting_rule(n_terms: int) -> Decision:
    """R4: one or two terms static (equal weights), three or more coefficient of
    variations with a floor.

    Two terms of the same scale (a region term and a distribution term, both in [0, 1]
    at the start) are weighted equally, as Dice + CE is in nnU-Net: SoftAdapt on raw
    step differences did not adapt at all (weights within 0.494-0.507 over 200 steps),
    and the thesis found adaptive weighting helped only sporadically (Hun 2021, section
    8.5). The evidence study keeps SoftAdapt as an ablation. Three or more terms of
    different scales get the coefficient-of-variations weighting, whose floor
    (`pipeline.train.weighting`) keeps a stalled term from being switched off.
    """
    if n_terms < 1:
        raise ValueError(f"weighting_rule: need at least one loss term, got {n_terms!r}")
    what = f"{n_terms} loss term{'s' if n_terms > 1 else ''}"
    if n_terms == 1:
        return _decision("R4", float(n_terms), False, "static", f"{what}: static weighting")
    if n_terms == 2:
        return _decision("R4", float(n_terms), False, "static",
                         f"{what}: equal static weights (as Dice + CE); adaptive weighting "
                         f"is not chosen for two terms of one scale")
    return _decision("R4", float(n_terms), True, "cov",
                     f"{what}: coefficient-of-variations weighting (with its floor)")


# ------------------------------------------------------------------ assembly
@dataclass(frozen=True)
class LossPlan:
    """The loss the rules chose: terms in order, their weighting, every decision."""

    terms: tuple[LossTerm, ...]
    weighting: WeightingConfig
    decisions: tuple[Decision, ...]
    adaptation: AdaptationConfig | None = None


def decide_loss(stats: DatasetStats) -> LossPlan:
    """Run R1, R2, R3, R5, then R4, and assemble the loss terms.

    Terms, in order: the region term (R1) and the distribution term (R2, always
    present); R5 records the slice heterogeneity without changing them. R3 adds no term: its outcome sets the
    normalization plan's clip (`stats.manifest`). Each term has weight 1; the weighting
    (R4) balances them in training. Region terms leave out the background channel
    (``include_background=False``): under imbalance its overlap is near 1 and would
    dilute the foreground's.
    """
    r1 = imbalance_rule(stats)
    r2 = volume_tail_rule(stats)
    r3 = intensity_tail_rule(stats)
    r5 = adaptation_rule(stats, r1.outcome)
    terms: list[LossTerm] = []
    if r1.outcome == "dice":
        terms.append(LossTerm(name="dice", params={"include_background": False},
                              reason=f"R1: {r1.text}; R5: {r5.text}"))
    loss_params = {k: v for k, v in r2.params.items() if k == "gamma"}  # not lower_bound
    terms.append(LossTerm(name=r2.outcome, params=loss_params,  # type: ignore[arg-type]
                          reason=f"R2: {r2.text}"))
    r4 = weighting_rule(len(terms))
    weighting = WeightingConfig(method=r4.outcome, params=dict(r4.params),  # type: ignore[arg-type]
                                reason=f"R4: {r4.text}")
    return LossPlan(terms=tuple(terms), weighting=weighting, decisions=(r1, r2, r3, r5, r4))
