"""The statistics result (``xrai stats --out stats.json``): a versioned pydantic model.

Conventions: ``skewness`` is the biased sample skewness g1 and ``kurtosis`` the Fisher
excess kurtosis g2 (scipy.stats' defaults, ``bias=True``); ``skewness_unbiased`` /
``kurtosis_unbiased`` are scipy's ``bias=False`` values (G1, G2). Percentiles of voxel
intensities are read from fixed-edge histograms (their bound is stated in
`stats.histogram`); percentiles of per-case and per-slice label statistics are exact
(numpy's linear method on the values).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

STATS_SCHEMA_VERSION = 1

#: Percentiles reported for every distribution.
PERCENTILES: tuple[float, ...] = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)


def _none_to_nan(v: object) -> object:
    return math.nan if v is None else v


#: A float that may be NaN: JSON has no NaN, so it is written as null and read back as NaN.
NanFloat = Annotated[float, BeforeValidator(_none_to_nan)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Moments(_Frozen):
    """Summary of one set of values (NaN where undefined, as scipy gives)."""

    n: int = Field(ge=0)
    mean: NanFloat
    std: NanFloat
    skewness: NanFloat
    kurtosis: NanFloat
    skewness_unbiased: NanFloat
    kurtosis_unbiased: NanFloat
    minimum: NanFloat
    maximum: NanFloat


class Histogram(_Frozen):
    """A dense fixed-edge histogram: ``bins`` equal bins over ``[low, high]``.

    ``underflow`` counts values below ``low`` (for intensities, whose lower edge is 0:
    the negative values), ``overflow`` values above ``high``. Kept for the brain region of
    each channel so that what the network sees (transform, then percentile clip) can be
    measured after the fact (`stats.seen`).
    """

    low: float
    high: float
    counts: list[int]
    underflow: int = Field(default=0, ge=0)
    overflow: int = Field(default=0, ge=0)


class Distribution(_Frozen):
    """One measured distribution, with the moments of each candidate transform of it.

    Parameters
    ----------
    name : str
        Path-like name, e.g. ``intensity/t1n/brain`` or ``label/tumour_volume_ml``.
    kind : {"intensity", "fraction", "volume", "count"}
        What the values are; decides which transforms are candidates.
    unit : str
    moments : Moments
        Of the raw values.
    percentiles : dict
        ``"50"`` → median etc. (keys are `PERCENTILES` formatted with ``g``).
    candidates : dict
        Candidate transform name → moments of the transformed values, gathered in the
        same pass as the raw moments (the transform's parameters are in `transforms`).
    transforms : dict
        Candidate name → its parameters (offset, scale) as applied.
    histogram : Histogram, optional
        The merged fixed-edge histogram of the raw values (intensity, brain region).
    """

    name: str
    kind: Literal["intensity", "fraction", "volume", "count"]
    unit: str = ""
    moments: Moments
    percentiles: dict[str, NanFloat] = Field(default_factory=dict)
    candidates: dict[str, Moments] = Field(default_factory=dict)
    transforms: dict[str, dict[str, float | str]] = Field(default_factory=dict)
    histogram: Histogram | None = None


class CaseLabelStats(_Frozen):
    """Label statistics of one case (over annotated slices of the brain)."""

    brain_voxels: int = Field(ge=0)
    tumour_voxels: int = Field(ge=0)
    tumour_fraction: float = Field(ge=0, le=1)
    tumour_volume_ml: float = Field(ge=0)
    components: int = Field(ge=0)
    class_voxels: dict[str, int]
    slice_fractions: list[float]


class DatasetStats(_Frozen):
    """Everything measured on one dataset of the store."""

    schema_version: Literal[1] = STATS_SCHEMA_VERSION
    dataset: str
    store: str
    content_hash: str = Field(description="sha256 over the sorted (case id, content hash) pairs")
    n_cases: int = Field(ge=0)
    cases: list[str]
    channels: list[str]
    spacing_mm: list[float]
    voxel_ml: float
    label_scheme: dict[str, str]
    intensity: dict[str, dict[str, Distribution]] = Field(
        description="channel → region (brain, tumour, background, NCR, ED, ET) → distribution")
    labels: dict[str, Distribution] = Field(
        description="tumour_fraction_case, tumour_fraction_slice, tumour_volume_ml, components, ...")
    class_frequencies: dict[str, NanFloat] = Field(
        description="share of annotated brain voxels per class over the dataset")
    per_case: dict[str, CaseLabelStats]
    created_at: str
    code_version: str
    histogram_bins: int
