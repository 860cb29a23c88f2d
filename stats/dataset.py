"""Per-case partial statistics and their merge into dataset statistics (no I/O).

One case is read once: for every channel the hot kernel (`stats.fused.region_partials`,
compiled, one pass; `stats.kernels.region_partials` is its numpy fallback) returns, per
region code, the moment partials of the raw intensities and of every candidate
transform, and a fixed-edge histogram; the label statistics come from the same in-memory
arrays. These `CasePartials` are what the store persists (keyed by the case's
content hash and the engine configuration), so adding or changing a case recomputes that
case only and re-merges.

Region codes (one small-int array per case)::

    0  outside the brain, or on an axial slice that carries no annotation
    1  brain, label 0 (background)
    2  NCR    3  ED    4  ET

Regions are unions of codes: brain = {1, 2, 3, 4}, tumour = {2, 3, 4}. Per-region
partials are merged from the per-code ones, exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stats import fused
from stats import moments as mom
from stats.histogram import HistogramPartial, fixed_edges, percentile
from stats.histogram import merge as merge_hist
from stats.kernels import IDENTITY, RegionPartials, region_partials
from stats.moments import MomentPartial
from stats.summary import PERCENTILES, CaseLabelStats, Distribution, Histogram, Moments
from stats.transforms import DERIVED, candidates_for

ENGINE_VERSION = 2
N_CODES = 5
CLASS_CODES: dict[str, int] = {"background": 1, "NCR": 2, "ED": 3, "ET": 4}
REGIONS: dict[str, tuple[int, ...]] = {
    "brain": (1, 2, 3, 4),
    "tumour": (2, 3, 4),
    "background": (1,),
    "NCR": (2,),
    "ED": (3,),
    "ET": (4,),
}
DEFAULT_BINS = 4096


def nice_upper(maximum: float) -> float:
    """Upper histogram edge for a channel: the next power of two above its maximum.

    Rounding up keeps the edges (and so every stored per-case histogram) valid when a
    new case raises the maximum a little; they change only when it doubles.
    """
    if not math.isfinite(maximum) or maximum <= 0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(maximum * (1 + 1e-12))))


@dataclass(frozen=True)
class EngineConfig:
    """What a per-case partial depends on besides the voxels; part of its cache key.

    Parameters
    ----------
    channels : tuple of str
    upper : mapping of str to float
        Histogram upper edge per channel (lower edge 0: intensities are >= 0).
    voxel_ml : float
        Volume of one voxel of the dataset grid in mL.
    bins : int
        Histogram bins per channel; percentile error is at most one bin width.
    scale : mapping of str to float, optional
        The channel's largest intensity over the dataset (recorded at ingest): the scale
        of the candidate transforms (`intensity_transforms`). Defaults to ``upper``.
    """

    channels: tuple[str, ...]
    upper: Mapping[str, float]
    voxel_ml: float
    bins: int = DEFAULT_BINS
    scale: Mapping[str, float] | None = None

    def edges(self, channel: str) -> np.ndarray:
        return fixed_edges(0.0, float(self.upper[channel]), self.bins)

    def channel_scale(self, channel: str) -> float:
        s = float((self.scale or self.upper)[channel])
        return s if math.isfinite(s) and s > 0 else 1.0

    def transforms(self, channel: str) -> dict[str, Any]:
        return intensity_transforms(self.channel_scale(channel))

    def fingerprint(self) -> str:
        doc = {
            "engine": ENGINE_VERSION,
            "channels": list(self.channels),
            "upper": {k: float(v) for k, v in sorted(self.upper.items())},
            "bins": self.bins,
            "scale": {c: self.channel_scale(c) for c in self.channels},
            "voxel_ml": round(self.voxel_ml, 12),
            "transforms": {c: {n: _params(t) for n, t in self.transforms(c).items()}
                           for c in self.channels},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


#: Offset of the intensity logarithms as a share of the channel's largest value (2^-10:
#: one step of a 10-bit quantisation of the channel's range). A share, not an absolute
#: unit, so that the same data in other units (x 0.01, x 1000) get transformed
#: distributions of the same shape: ln(k x + k c) = ln k + ln(x + c).
INTENSITY_OFFSET_SHARE = 2.0**-10


def intensity_transforms(scale: float) -> dict[str, Any]:
    """The intensity candidates for a channel whose largest value is ``scale``.

    ln / log10 use the offset ``scale * INTENSITY_OFFSET_SHARE`` and arcsin-sqrt the scale
    itself, so every candidate is invariant to the units of the data up to a constant
    shift (the logarithms) or exactly (arcsin-sqrt of ``x / scale``): the choice between
    them depends on the shape of the distribution, never on its units.
    """
    return candidates_for("intensity", scale=scale,
                          unit_offset=scale * INTENSITY_OFFSET_SHARE)


def clamped(forward: Any, upper: float) -> Any:
    """``forward`` applied to values clamped to ``[0, upper]``: the documented rule for
    intensities outside the candidates' domain.

    MRI magnitudes are >= 0, but linear resampling overshoots near sharp edges and some
    scanners store small negative offsets. For the candidate transforms a negative value
    counts as 0 (and a value above the recorded maximum, a rounding artefact, as the
    maximum), per voxel, so one such voxel never stops the statistics of a dataset; the
    raw moments and the histogram (whose underflow counts the negative values) still see
    the values as they are.
    """
    def f(x: np.ndarray) -> np.ndarray:
        return forward(np.clip(x, 0.0, upper))
    return f


def _params(t: Any) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) else str(v))
            for k, v in dict(getattr(t, "params", {})).items()}


@dataclass(frozen=True)
class ChannelPartials:
    """One channel of one case: per code, candidate → MomentPartial, and a histogram."""

    moments: Mapping[int, Mapping[str, MomentPartial]]
    histograms: Mapping[int, HistogramPartial]


@dataclass(frozen=True)
class CasePartials:
    """Everything measured on one case, mergeable with other cases."""

    case_id: str
    content_hash: str
    config: str
    channels: Mapping[str, ChannelPartials]
    labels: CaseLabelStats
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "content_hash": self.content_hash,
            "config": self.config,
            "channels": {
                ch: {
                    "moments": {str(code): {cand: p.to_dict() for cand, p in cands.items()}
                                for code, cands in cp.moments.items()},
                    "histograms": {str(code): _hist_to_dict(h)
                                   for code, h in cp.histograms.items()},
                }
                for ch, cp in self.channels.items()
            },
            "labels": self.labels.model_dump(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CasePartials:
        channels = {
            ch: ChannelPartials(
                moments={int(code): {cand: MomentPartial.from_dict(p) for cand, p in cands.items()}
                         for code, cands in cp["moments"].items()},
                histograms={int(code): _hist_from_dict(h)
                            for code, h in cp["histograms"].items()},
            )
            for ch, cp in d["channels"].items()
        }
        return cls(case_id=d["case_id"], content_hash=d["content_hash"], config=d["config"],
                   channels=channels, labels=CaseLabelStats.model_validate(d["labels"]))


def _hist_to_dict(h: HistogramPartial) -> dict[str, Any]:
    """Compact form for persisting: equal-width edges as (low, high, bins), counts sparse.

    Most bins of a small region are empty, and a per-case record holds 16 histograms of
    4096 bins, so the dense form would dominate what is written per case.
    """
    edges = np.asarray(h.edges)
    bins = edges.size - 1
    nz = np.flatnonzero(h.counts)
    d: dict[str, Any] = {"index": nz.tolist(), "counts": np.asarray(h.counts)[nz].tolist(),
                         "underflow": h.underflow, "overflow": h.overflow, "n_nan": h.n_nan}
    if np.array_equal(fixed_edges(float(edges[0]), float(edges[-1]), bins), edges):
        d["range"] = [float(edges[0]), float(edges[-1]), bins]
    else:
        d["edges"] = edges.tolist()
    return d


def _hist_from_dict(d: Mapping[str, Any]) -> HistogramPartial:
    if "range" in d:
        low, high, bins = d["range"]
        edges = fixed_edges(float(low), float(high), int(bins))
    else:
        edges = np.asarray(d["edges"], dtype=np.float64)
    counts = np.zeros(edges.size - 1, dtype=np.int64)
    counts[np.asarray(d["index"], dtype=np.intp)] = d["counts"]
    return HistogramPartial(edges, counts, d["underflow"], d["overflow"], d["n_nan"])


def region_codes(label: np.ndarray, brain: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """Code array (see module notes): 0 outside brain or annotated slices, else 1 + label.

    One compiled pass (`stats.fused.region_codes`) where the fused kernel is selected;
    this numpy form otherwise, and as the tests' reference.
    """
    if label.ndim == 3 and fused.selected() == "numba":
        return fused.region_codes(label, brain, annotated)
    keep = brain & annotated[:, None, None]
    codes = np.zeros(label.shape, dtype=np.uint8)
    np.add(label, 1, out=codes, where=keep, casting="unsafe")
    return codes


def label_stats(label: np.ndarray, codes: np.ndarray, voxel_ml: float,
                counts: np.ndarray | None = None) -> CaseLabelStats:
    """Tumour fraction, volume, connected components, class counts and slice fractions.

    Only annotated brain voxels count (code > 0). Components are 26-connected (full 3D
    neighbourhood), over all tumour labels together.
    """
    if counts is None:  # voxels per code; the kernel already has them
        counts = np.bincount(codes.ravel(), minlength=N_CODES)[:N_CODES]
    brain_vox = int(counts[1:].sum())
    tumour_vox = int(counts[2:].sum())
    if codes.ndim == 3 and fused.selected() == "numba":
        per_slice_brain, per_slice_tumour, box = fused.slice_counts(codes)
    else:
        tumour = codes >= 2
        nz = codes.shape[0]
        per_slice_brain = np.count_nonzero(codes.reshape(nz, -1), axis=1)
        per_slice_tumour = np.count_nonzero(tumour.reshape(nz, -1), axis=1)
        box = _bounding_box(tumour, per_slice_tumour) if tumour_vox else None
    n_comp = 0
    if tumour_vox and box is not None:
        # only the tumour's bounding box: same components, a fraction of the work
        if codes.ndim == 3 and fused.selected() == "numba":
            n_comp = fused.components(codes[box], 2)
        else:
            from scipy import ndimage  # here: 0.05-0.25 s to import, which most runs skip

            _, n_comp = ndimage.label(codes[box] >= 2, structure=np.ones((3, 3, 3), dtype=bool))
    has = per_slice_brain > 0
    fractions = (per_slice_tumour[has] / per_slice_brain[has]).astype(float).tolist()
    return CaseLabelStats(
        brain_voxels=brain_vox,
        tumour_voxels=tumour_vox,
        tumour_fraction=tumour_vox / brain_vox if brain_vox else 0.0,
        tumour_volume_ml=tumour_vox * voxel_ml,
        components=int(n_comp),
        class_voxels={name: int(counts[code]) for name, code in CLASS_CODES.items()},
        slice_fractions=fractions,
    )


def _bounding_box(mask: np.ndarray, per_z: np.ndarray) -> tuple[slice, slice, slice]:
    """Smallest (z, y, x) box holding every True voxel (``per_z``: counts per z slice)."""
    z = np.flatnonzero(per_z)
    slab = mask[z[0] : z[-1] + 1]
    y = np.flatnonzero(np.count_nonzero(slab, axis=(0, 2)))
    x = np.flatnonzero(np.count_nonzero(slab, axis=(0, 1)))
    return (slice(int(z[0]), int(z[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1),
            slice(int(x[0]), int(x[-1]) + 1))


def prepare() -> None:
    """Load what `case_partials` needs on its first call, so that a caller can overlap it
    with reading the first case: the compiled kernel's machine code (under a millisecond
    ahead of time, 0.4-0.6 s through numba's JIT; `stats.fused`), or scipy.ndimage for
    the numpy path."""
    if fused.selected() == "numba":
        fused.warm_up()
    else:
        from scipy import ndimage  # noqa: F401


def case_partials(case_id: str, content_hash: str, arrays: Mapping[str, np.ndarray],
                  config: EngineConfig) -> CasePartials:
    """All partial statistics of one case from its arrays (one read of each).

    Parameters
    ----------
    arrays : mapping
        ``image`` (C, Z, Y, X), ``label`` (Z, Y, X), ``brain`` (Z, Y, X), ``annotated`` (Z,)
        as `pipeline.store.DatasetStore.read_case` returns them.
    """
    codes = region_codes(arrays["label"], arrays["brain"], arrays["annotated"])
    kernel = fused.selected()
    channels: dict[str, ChannelPartials] = {}
    for ci, ch in enumerate(config.channels):
        transforms = config.transforms(ch)
        # log10 is ln scaled by 1/ln(10): derived exactly from the ln partial, not computed.
        computed = {n: t for n, t in transforms.items() if n != IDENTITY and n not in DERIVED}
        res = _channel_partials(arrays["image"][ci], codes, computed,
                                config.channel_scale(ch), config.edges(ch), kernel)
        per_code: dict[int, dict[str, MomentPartial]] = {}
        for code in range(1, N_CODES):
            parts = {name: res.moments[name][code] for name in res.moments}
            for name, (base, factor) in DERIVED.items():
                if name in transforms:
                    parts[name] = mom.scale_partial(parts[base], factor)
            per_code[code] = parts
        channels[ch] = ChannelPartials(
            moments=per_code,
            histograms={code: res.histograms[IDENTITY][code] for code in range(1, N_CODES)},
        )
    first = channels[config.channels[0]].moments
    counts = np.array([0] + [first[code][IDENTITY].n for code in range(1, N_CODES)])
    return CasePartials(case_id, content_hash, config.fingerprint(), channels,
                        label_stats(arrays["label"], codes, config.voxel_ml, counts))


def _channel_partials(image: np.ndarray, codes: np.ndarray, transforms: Mapping[str, Any],
                      scale: float, edges: np.ndarray, kernel: str) -> RegionPartials:
    """Per-code partials of one channel: the fused compiled kernel (`stats.fused`) when
    selected and able, else the numpy kernel (`stats.kernels.region_partials`), which is
    also what decides a region holding NaN or ±inf (the fused kernel declines those)."""
    clamp = (0.0, scale)  # the rule of `clamped`
    if kernel == "numba" and fused.supports(transforms, clamp):
        res = fused.region_partials(image, codes, N_CODES, transforms, edges=edges, clamp=clamp)
        if res is not None:
            return res
    funcs = {n: clamped(t.forward, scale) for n, t in transforms.items()}
    return region_partials(image, codes, N_CODES, funcs, edges=edges)


# ----------------------------------------------------------------------- dataset merge


def moments_summary(p: MomentPartial) -> Moments:
    """Finalise a partial with scipy's conventions (see `stats.summary`)."""
    # Below 4 values kurtosis is undefined (scipy gives NaN for bias=False; we use NaN
    # throughout so that nobody reads a transform choice into 3 numbers).
    return Moments(
        n=p.n,
        mean=mom.mean(p),
        std=mom.std(p),
        skewness=mom.skew_from_partial(p, bias=True),
        kurtosis=mom.kurtosis_from_partial(p, fisher=True, bias=True),
        skewness_unbiased=mom.skew_from_partial(p, bias=False),
        kurtosis_unbiased=mom.kurtosis_from_partial(p, fisher=True, bias=False),
        minimum=p.minimum if p.n else math.nan,
        maximum=p.maximum if p.n else math.nan,
    )


def _pct_key(q: float) -> str:
    return f"{q:g}"


def intensity_distributions(cases: Sequence[CasePartials], config: EngineConfig
                            ) -> dict[str, dict[str, Distribution]]:
    """Merge per-case channel partials into channel → region → Distribution."""
    out: dict[str, dict[str, Distribution]] = {}
    for ch in config.channels:
        transforms = config.transforms(ch)
        out[ch] = {}
        for region, codes in REGIONS.items():
            cand_parts: dict[str, list[MomentPartial]] = {}
            hists: list[HistogramPartial] = []
            for case in cases:
                cp = case.channels[ch]
                for code in codes:
                    for cand, p in cp.moments[code].items():
                        cand_parts.setdefault(cand, []).append(p)
                    hists.append(cp.histograms[code])
            merged = {cand: mom.merge_all(ps) for cand, ps in cand_parts.items()}
            hist = _merge_hists(hists)
            raw = merged.pop("identity")
            pct = {_pct_key(q): (percentile(hist, q) if raw.n else math.nan) for q in PERCENTILES}
            dense = None
            if region == "brain":  # what the rules need to see the network's input
                edges = np.asarray(hist.edges)
                dense = Histogram(low=float(edges[0]), high=float(edges[-1]),
                                  counts=np.asarray(hist.counts).tolist(),
                                  underflow=int(hist.underflow), overflow=int(hist.overflow))
            out[ch][region] = Distribution(
                name=f"intensity/{ch}/{region}", kind="intensity", unit="a.u.",
                moments=moments_summary(raw), percentiles=pct,
                candidates={"identity": moments_summary(raw),
                            **{c: moments_summary(p) for c, p in merged.items()}},
                transforms={name: _params(t) for name, t in transforms.items()},
                histogram=dense,
            )
    return out


def _merge_hists(hists: Sequence[HistogramPartial]) -> HistogramPartial:
    total = hists[0]
    for h in hists[1:]:
        total = merge_hist(total, h)
    return total


def value_distribution(name: str, kind: str, unit: str, values: Iterable[float],
                       **transform_options: float) -> Distribution:
    """A distribution of per-case (or per-slice) values, with every candidate transform.

    The values are few (one per case or slice), so the candidates are computed on them
    directly; percentiles are exact (numpy's linear method).
    """
    x = np.asarray(list(values), dtype=np.float64)
    transforms = candidates_for(kind, **transform_options)  # type: ignore[arg-type]
    cands: dict[str, Moments] = {}
    for cand, t in transforms.items():
        try:
            y = x if cand == "identity" else t.forward(x)
        except ValueError:
            continue  # outside the transform's domain: not a candidate for these values
        cands[cand] = moments_summary(MomentPartial.from_values(y))
    pct = {_pct_key(q): (float(np.percentile(x, q)) if x.size else math.nan) for q in PERCENTILES}
    return Distribution(name=name, kind=kind, unit=unit,  # type: ignore[arg-type]
                        moments=moments_summary(MomentPartial.from_values(x)),
                        percentiles=pct, candidates=cands,
                        transforms={n: _params(t) for n, t in transforms.items() if n in cands})


def label_distributions(cases: Sequence[CasePartials], voxel_ml: float) -> dict[str, Distribution]:
    """Across-case (and across-slice) distributions of the label statistics."""
    labels = [c.labels for c in cases]
    min_brain = min((lab.brain_voxels for lab in labels if lab.brain_voxels), default=1)
    return {
        "tumour_fraction_case": value_distribution(
            "label/tumour_fraction_case", "fraction", "1",
            [lab.tumour_fraction for lab in labels], unit_offset=1.0 / max(min_brain, 1)),
        "tumour_fraction_slice": value_distribution(
            "label/tumour_fraction_slice", "fraction", "1",
            [f for lab in labels for f in lab.slice_fractions], unit_offset=1.0 / max(min_brain, 1)),
        "tumour_volume_ml": value_distribution(
            "label/tumour_volume_ml", "volume", "mL",
            [lab.tumour_volume_ml for lab in labels], unit_offset=voxel_ml),
        "components": value_distribution(
            "label/components", "count", "1", [lab.components for lab in labels], unit_offset=1.0),
    }


def class_frequencies(cases: Sequence[CasePartials]) -> dict[str, float]:
    """Share of annotated brain voxels per class over the dataset."""
    totals = {name: sum(c.labels.class_voxels[name] for c in cases) for name in CLASS_CODES}
    n = sum(totals.values())
    return {name: (v / n if n else math.nan) for name, v in totals.items()}


def dataset_hash(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over sorted (case id, content hash) pairs: the store content the stats describe."""
    h = hashlib.sha256()
    for cid, chash in sorted(pairs):
        h.update(f"{cid}\0{chash}\n".encode())
    return h.hexdigest()
