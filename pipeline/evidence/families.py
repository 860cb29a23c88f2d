"""Phantom families of the evidence study: one dataset property changed at a time.

A `Family` is a list of `Arm` s that differ in one property of the phantom
(`pipeline.sources.phantom.PhantomOptions`); every other option keeps its phantom
default unless the family states otherwise. Each arm says, per rule id, the outcome it is
built to trigger (`Arm.expected`); the study checks the rules' decisions against it and
compares the losses by paired k-fold cross-validation. Written with the same seed, the
arms of a family are paired: same anatomy, spacing, orientation, noise and the same
normal deviates behind the tumour volumes, so they differ only in the family's property.

===================  ==========================  ============================================
family               arms                        expected
===================  ==========================  ============================================
imbalance            tiny, small, large          R1: dice, dice, dice
size_tail            narrow, wide                R2: bce, focal
intensity_tail       light, heavy                R3: none, clip
slice_heterogeneity  compact, multifocal,        R5: fixed, heterogeneous, fixed
                     elongated
units                x0.01, x37.5, x1000         every decision identical across arms
                                                 (``Family.invariant``)
===================  ==========================  ============================================

Rules (`stats.rules`): R1 median tumour fraction of the brain < 20 % → Dice region term;
R2 skewness of tumour volume shown > 1 (one-sided 95 % lower bound) → focal; R3 heavy
intensity tails after the normalization plan → tighter input clipping ("clip"); R5
coefficient of variation of the per-slice tumour fraction within the tumour's extent
> 2/sqrt(5) → "heterogeneous" (recorded; the loss is unchanged).

Choices that depart from the plain description, and why (measured with
`pipeline.sources.phantom.tumour_volumes_ml`, 300 seeds, 16 and 24 cases, shapes
64 x 64 x 48 and 96 x 96 x 64):

- imbalance: all three arms use ``volume_sigma=0.25`` and no forced extremes, so only the
  median changes. The tiny arm asks for 0.1 % of the brain; tumours are never smaller
  than `~pipeline.sources.phantom.MIN_TUMOUR_ML` (0.05 mL), which is above 0.1 % for
  brains under 50 mL, i.e. fields of view below about 80 x 80 x 56: at 64 x 64 x 48 the
  tiny arm's tumours are 0.05 mL, 0.17 % of the brain (still Tversky).
- size_tail: both arms have a median of 1 % of the brain, not 2 %: a tumour must fit in
  the brain (`~pipeline.sources.phantom.max_tumour_ml`, 11-13 % of it), and at a 2 %
  median that cap cuts the wide arm's tail so that its sample skewness exceeds 1 in only
  66-87 % of the seeds; at 1 % (sigma 1.2, forced extremes) in 98-100 %. The narrow arm
  (sigma 0.1, no forced extremes) exceeds 1 in 5-8 % of the seeds (12-13 % at sigma
  0.2): sample skewness of 16-24 cases is noisy, so a study should report the realised
  skewness with the decision.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pipeline.sources.phantom import DEFAULT_SHAPE, PhantomOptions, write_phantom

__all__ = ["FAMILIES", "RULE_IDS", "Arm", "Family", "get_family", "write_arm"]

#: Rule ids an arm may name in `Arm.expected` (`stats.rules.RULES`).
RULE_IDS: tuple[str, ...] = ("R1", "R2", "R3", "R4", "R5")


@dataclass(frozen=True)
class Arm:
    """One dataset of a family.

    Parameters
    ----------
    name : str
        Short name, unique in its family (used in folder names: no path separators).
    options : PhantomOptions
        Generator options of the arm's dataset.
    expected : mapping of str to str
        Rule id (`RULE_IDS`) → the outcome the arm is built to trigger (``"dice"``,
        ``"focal"``, ...); empty in an invariant family. Stored read-only.

    Raises
    ------
    ValueError
        Empty or path-like name, unknown rule id, empty outcome.
    TypeError
        If `options` is not a `PhantomOptions`.
    """

    name: str
    options: PhantomOptions
    expected: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(
                c in self.name for c in "/\\") or self.name in {".", ".."}:
            raise ValueError(f"arm name must be a non-empty string without path separators, "
                             f"got {self.name!r}")
        if not isinstance(self.options, PhantomOptions):
            raise TypeError(f"arm {self.name!r}: options must be a PhantomOptions, got "
                            f"{type(self.options).__name__} {self.options!r}")
        expected = dict(self.expected)
        for rule, outcome in expected.items():
            if rule not in RULE_IDS:
                raise ValueError(f"arm {self.name!r}: expected names unknown rule {rule!r}; "
                                 f"known rules: {list(RULE_IDS)}")
            if not isinstance(outcome, str) or not outcome:
                raise ValueError(f"arm {self.name!r}: expected outcome of {rule} must be a "
                                 f"non-empty string, got {outcome!r}")
        object.__setattr__(self, "expected", MappingProxyType(expected))

    def __hash__(self) -> int:  # a mapping proxy is not hashable; its items are
        return hash((self.name, self.options, tuple(sorted(self.expected.items()))))


@dataclass(frozen=True)
class Family:
    """Arms that differ in one property, with the rule outcomes each should trigger.

    Parameters
    ----------
    name : str
        Family name (a key of `FAMILIES`).
    varies : str
        The property that changes from arm to arm.
    description : str
        One or two sentences: what the arms are and what they test.
    arms : tuple of Arm
        In order (e.g. increasing imbalance); names unique.
    invariant : bool, default False
        True: the arms are the same data in another form (units), so every rule's decision
        (outcome and parameters) must be identical across the arms, and no arm lists
        expected outcomes. False: every arm lists an expected outcome for the same rules.

    Raises
    ------
    ValueError
        No arms, duplicate arm names, expected outcomes inconsistent with `invariant`.
    """

    name: str
    varies: str
    description: str
    arms: tuple[Arm, ...]
    invariant: bool = False

    def __post_init__(self) -> None:
        arms = tuple(self.arms)
        object.__setattr__(self, "arms", arms)
        if not arms:
            raise ValueError(f"family {self.name!r} has no arms")
        names = [a.name for a in arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"family {self.name!r} has duplicate arm names {duplicates!r}")
        if self.invariant:
            listed = [a.name for a in arms if a.expected]
            if listed:
                raise ValueError(f"family {self.name!r} is invariant (decisions identical "
                                 f"across arms) but arms {listed!r} list expected outcomes")
        else:
            rules = {a.name: tuple(sorted(a.expected)) for a in arms}
            if len(set(rules.values())) != 1 or not rules[names[0]]:
                raise ValueError(f"family {self.name!r}: every arm must list expected outcomes "
                                 f"for the same rules, got {rules!r}")

    @property
    def rules(self) -> tuple[str, ...]:
        """Rule ids the family checks: those of `Arm.expected`, or all for an invariant one."""
        return RULE_IDS if self.invariant else tuple(sorted(self.arms[0].expected))

    def arm(self, name: str) -> Arm:
        """The arm called `name`.

        Raises
        ------
        ValueError
            If there is none; the message lists the arms and suggests a close name.
        """
        for arm in self.arms:
            if arm.name == name:
                return arm
        names = [a.name for a in self.arms]
        raise ValueError(f"family {self.name!r} has no arm {name!r}.{_hint(name, names)} "
                         f"Known arms: {names}")


def _hint(name: object, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _narrow(median: float) -> PhantomOptions:
    return PhantomOptions(volume_median_fraction=median, volume_sigma=0.25,
                          guarantee_extremes=False)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="imbalance",
            varies="median tumour share of the brain (class imbalance)",
            description="Tumours of about 0.1 %, 1 % and 8 % of the brain volume (log-normal, "
                        "sigma 0.25, no forced tiny or large case): R1 adds a Dice region term "
                        "below 20 %.",
            arms=(
                Arm("tiny", _narrow(0.001), {"R1": "dice"}),
                Arm("small", _narrow(0.01), {"R1": "dice"}),
                Arm("large", _narrow(0.08), {"R1": "dice"}),
            ),
        ),
        Family(
            name="size_tail",
            varies="spread (right tail) of the tumour-volume distribution",
            description="Median tumour 1 % of the brain; log-normal sigma 0.1 without forced "
                        "extremes (narrow) or sigma 1.2 with a forced tiny and large case "
                        "(wide): R2 turns focal when the volume skewness is shown to exceed "
                        "1 (its one-sided 95 % lower bound).",
            arms=(
                Arm("narrow", PhantomOptions(volume_median_fraction=0.01, volume_sigma=0.1,
                                             guarantee_extremes=False), {"R2": "bce"}),
                Arm("wide", PhantomOptions(volume_median_fraction=0.01, volume_sigma=1.2,
                                           guarantee_extremes=True), {"R2": "focal"}),
            ),
        ),
        Family(
            name="intensity_tail",
            varies="tails of the brain intensity distribution",
            description="Rician noise only (light) or with a sparse bright speckle of "
                        "heavy-tailed amplitude that survives 0.5/99.5 percentile clipping "
                        "(heavy): R3 tightens the input clipping when tails stay heavy.",
            arms=(
                Arm("light", PhantomOptions(intensity_tail="light"), {"R3": "none"}),
                Arm("heavy", PhantomOptions(intensity_tail="heavy"), {"R3": "clip"}),
            ),
        ),
        Family(
            name="slice_heterogeneity",
            varies="variation of the tumour burden across axial slices",
            description="One compact body, 2-4 foci apart along z (gaps and strong "
                        "variation of the per-slice burden), or one body stretched 3:1 along "
                        "z (a single smooth profile): R5 calls the burden heterogeneous when "
                        "the per-slice coefficient of variation within the tumour's extent "
                        "exceeds 2/sqrt(5).",
            arms=(
                Arm("compact", PhantomOptions(tumour_shape="compact"), {"R5": "fixed"}),
                Arm("multifocal", PhantomOptions(tumour_shape="multifocal"),
                    {"R5": "heterogeneous"}),
                Arm("elongated", PhantomOptions(tumour_shape="elongated"), {"R5": "fixed"}),
            ),
        ),
        Family(
            name="units",
            varies="intensity units (a constant factor)",
            description="The same data stored in other units (x0.01, x37.5, x1000 through "
                        "the NIfTI scl_slope): every decision must be the same in every arm.",
            arms=(
                Arm("x0.01", PhantomOptions(intensity_scale=0.01)),
                Arm("x37.5", PhantomOptions(intensity_scale=37.5)),
                Arm("x1000", PhantomOptions(intensity_scale=1000.0)),
            ),
            invariant=True,
        ),
    )
}


def get_family(name: str) -> Family:
    """The family called `name` (a key of `FAMILIES`).

    Raises
    ------
    ValueError
        If there is none; the message lists the families and suggests a close name.
    """
    if name in FAMILIES:
        return FAMILIES[name]
    known = list(FAMILIES)
    raise ValueError(f"unknown family {name!r}.{_hint(name, known)} Known families: {known}")


def write_arm(out_dir: Path, family: Family | str, arm: Arm | str, *, cases: int = 16,
              seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> list[Path]:
    """Write one arm's dataset in the BraTS 2023 layout (`write_phantom` with its options).

    Parameters
    ----------
    out_dir : Path
        Folder of this arm's dataset (e.g. ``root / family.name / arm.name``); created if
        needed, cases of the same ids replaced.
    family : Family or str
        The family, or its name in `FAMILIES`.
    arm : Arm or str
        An arm of `family`, or its name.
    cases : int, default 16
        Number of cases (>= 1).
    seed : int, default 0
        Dataset seed; give every arm of a family the same seed to pair them.
    shape : tuple of 3 int, default (96, 96, 64)
        Field of view in 1-mm voxels.

    Returns
    -------
    list of Path
        The case folders, in case order.

    Raises
    ------
    ValueError
        Unknown family or arm (with the known names), an arm object that is not one of
        `family`'s, or `cases`, `seed`, `shape` out of range.
    """
    fam = get_family(family) if isinstance(family, str) else family
    if isinstance(arm, str):
        chosen = fam.arm(arm)
    else:
        chosen = arm
        if fam.arm(arm.name) != arm:
            raise ValueError(f"arm {arm.name!r} given is not the arm of that name in "
                             f"family {fam.name!r}")
    return write_phantom(Path(out_dir), cases=cases, seed=seed, shape=shape,
                         options=chosen.options)
