"""The loss-configuration manifest: a versioned pydantic model, its JSON Schema, I/O.

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
(``{"name": "manifest", "terms": [...], "weighting": {...}}``). `load_manifest` turns
every validation failure into a `ManifestError` naming the file, the field path and the
offending value. The JSON Schema of the model is committed as
``stats/manifest.schema.json`` (`export_schema`; a test keeps it current).

NaN (undefined skewness of a constant sample, for instance) is written as JSON ``null``
and read back as NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    "MANIFEST_SCHEMA_VERSION",
    "SCHEMA_PATH",
    "TERM_NAMES",
    "WEIGHTING_METHODS",
    "ChannelNormalization",
    "DatasetInfo",
    "LossConfig",
    "Manifest",
    "ManifestError",
    "Provenance",
    "build_manifest",
    "channel_normalization",
    "decisions_table",
    "export_schema",
    "load_manifest",
    "load_stats",
    "manifest_command",
    "manifest_json_schema",
    "stats_fingerprint",
    "validate_command",
    "write_manifest",
]

MANIFEST_SCHEMA_VERSION = 1
#: Percentiles of the intensity clip before the z-score (thesis 6.3, after nnU-Net).
CLIP_PERCENTILES = (0.5, 99.5)
#: The committed JSON Schema of `Manifest`.
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
#: Packages whose versions the provenance records (import-free look-ups).
PACKAGES = ("xrai-pipeline", "numpy", "scipy", "pydantic", "dask", "zarr", "torch")


class ManifestError(ValueError):
    """A manifest (or the statistics it is built from) is invalid; the message names the
    file, the field path and the offending value."""


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


# ------------------------------------------------------------------ I/O
def _describe(err: ValidationError, path: Path | str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = repr(e.get("input"))
        if len(shown) > 200:
            shown = shown[:200] + "..."
        lines.append(f"field {where}: {e['msg']} (got {shown})")
    more = f" (and {len(lines) - 1} more: " + "; ".join(lines[1:]) + ")" if len(lines) > 1 else ""
    return f"{path}: {lines[0]}{more}"


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ManifestError
        If it is not JSON or does not validate: the message names the file, the field
        path (``loss.terms.0.name``) and the offending value.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{p}: not valid JSON: {err}") from err
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as err:
        raise ManifestError(_describe(err, p)) from err


def write_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> Path:
    """Write a manifest atomically (temporary file in the same folder, then ``os.replace``).

    Returns the path written.
    """
    return write_text_atomic(path, manifest.model_dump_json(indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically: a temporary file in the same folder, fsync, rename.

    A run killed at any moment leaves either the old file or the new one, never half.
    Used for manifests and statistics files.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_stats(path: str | os.PathLike[str]) -> DatasetStats:
    """Read a statistics file (``xrai stats --out``).

    Raises
    ------
    FileNotFoundError
    ManifestError
        Not JSON or not valid statistics (file, field path, value).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"statistics file {str(p)!r} does not exist")
    try:
        return DatasetStats.model_validate_json(p.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise ManifestError("statistics " + _describe(err, p)) from err


def manifest_command(stats_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     seed: int = 0) -> Manifest:
    """``xrai manifest --stats STATS --out OUT``: build from a statistics file and write.

    Raises
    ------
    FileNotFoundError, ManifestError
        Unreadable statistics, or statistics the rules cannot use (the message names
        the statistics file).
    """
    stats = load_stats(stats_path)
    try:
        manifest = build_manifest(stats, seed=seed)
    except ValueError as err:
        raise ManifestError(f"{stats_path}: {err}") from err
    write_manifest(manifest, out_path)
    return manifest


def validate_command(path: str | os.PathLike[str]) -> Manifest:
    """``xrai manifest validate FILE``: the manifest, or `ManifestError` naming the field."""
    return load_manifest(path)


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


def export_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Write the JSON Schema of `Manifest` (sorted keys, 2-space indent, final newline)."""
    p = Path(path)
    p.write_text(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n",
                 encoding="utf-8")
    return p


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
