"""The evidence study behind the manifest (``xrai evidence``, ``make evidence``).

Does a loss chosen from the data's distribution do better than the losses researchers
already use? The study answers it under control: phantom families in which one property
changes at a time (`pipeline.evidence.families`), each arm taken through the real
pipeline (phantom → ingest → statistics → manifest), then

1. **decisions**: what each rule decided against what the arm was built to trigger;
2. **training**: the manifest's loss, the usual baselines (bce, dice, dice_ce, focal,
   tversky) and ablations of the manifest (each term removed in turn, the other
   weighting, identity instead of the chosen normalization) under one paired k-fold
   protocol (same split, same seed, same sampling and schedule; every case validated once
   per seed), several seeds;
3. **paired statistics**: per case (averaged over seeds), the difference manifest −
   comparator in Dice, HD95, precision and recall, with a bootstrap 95 % interval and the
   Wilcoxon signed-rank p-value (`stats.paired`), and a forest plot per metric.

The report (``docs/evidence.md`` by default) states the scale, device and time it ran
with, every table, and the issue's acceptance checks computed from the numbers. Runs
resume: the stores and the per-case statistics are reused, and each finished
(variant, seed, fold) keeps its ``result.json`` (`pipeline.train.loop.train_fold`) in a
folder keyed by a hash of what it trained (`run_key`), so nothing stale is reused after
the rules change.

The families of the units property are not trained: the study checks that their manifests
are identical (same transforms, same loss, same clip percentiles); identical manifests and
identically z-scored inputs make training on them a repetition.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evidence.families import FAMILIES, Arm, Family, write_arm
from pipeline.fsio import write_text_atomic
from stats.paired import PairedComparison, paired_comparison

__all__ = [
    "BASELINES",
    "METRICS",
    "SCALES",
    "ArmData",
    "StudyScale",
    "Variant",
    "run_study",
    "variants_for",
]

#: The losses researchers already use, compared with the manifest's.
BASELINES: tuple[str, ...] = ("bce", "dice", "dice_ce", "focal", "tversky")
#: Per-case metrics compared, and whether higher is better.
METRICS: dict[str, bool] = {"dice": True, "hd95": False, "precision": True, "recall": True}
#: The acceptance margin of the issue: the manifest may trail the best baseline by at
#: most one Dice point (upper end of the 95 % interval of the deficit).
DICE_MARGIN = 0.01
#: Steps between greedy searches in the greedy variant (each search costs 9 trial steps).
GREEDY_EVERY = 5
#: Families whose arms also train the greedy variant.
GREEDY_FAMILIES: tuple[str, ...] = ("imbalance",)
#: Dataset name of every arm's store.
DATASET = "evidence"


@dataclass(frozen=True)
class StudyScale:
    """How big the study is: data, protocol, seeds.

    Attributes
    ----------
    name : str
    cases : int
        Phantom cases per arm.
    shape : tuple of 3 int
        Phantom field of view (voxels at 1 mm, X Y Z); the store grid is the same.
    folds : int
        k of the k-fold split (every case is validated once per seed).
    seeds : tuple of int
        Training seeds (the split, the initialisation and the sampling follow each).
    train : TrainConfig
        The common protocol (its seed is replaced by each study seed).
    families : tuple of str or None
        Families to run (None: all).
    """

    name: str
    cases: int
    shape: tuple[int, int, int]
    folds: int
    seeds: tuple[int, ...]
    train: Any
    families: tuple[str, ...] | None = None
    description: str = ""


def _scales() -> dict[str, StudyScale]:
    from pipeline.train.data import SamplingConfig
    from pipeline.train.loop import TrainConfig

    # 2D on the CPU: 32 x 32 crops of the axial slices, tumour-centred sampling 0.7 and
    # 400 steps, a small U-Net: the budget at which every baseline learns the 0.1 %
    # family (measured while sizing it: with 64 x 64 crops at 0.5 and 150 or 400 steps
    # bce stayed at Dice 0 there).
    cpu = TrainConfig(
        sampling=SamplingConfig(dim="2d", patch_size=(32, 32), fg_fraction=0.7,
                                noise_prob=0.2),
        epochs=8, batch_size=16, batches_per_epoch=50, lr=3e-3, val_every=8, features=8,
        levels=3, workers=0, device="cpu", n_overlays=0)
    smoke = TrainConfig(
        sampling=SamplingConfig(dim="2d", patch_size=(32, 32), fg_fraction=0.5),
        epochs=1, batch_size=4, batches_per_epoch=2, val_every=1, features=4, levels=3,
        workers=0, device="cpu", n_overlays=0)
    gpu = TrainConfig(
        sampling=SamplingConfig(dim="3d", patch_size=(48, 64, 64), fg_fraction=0.5),
        epochs=40, batch_size=4, batches_per_epoch=50, lr=2e-3, val_every=40, features=16,
        levels=4, workers=4, device="cuda", n_overlays=0)
    return {
        "smoke": StudyScale("smoke", cases=6, shape=(96, 96, 64), folds=2, seeds=(0,),
                            train=smoke, families=("imbalance", "units"),
                            description="a minute; for tests: the machinery, not evidence"),
        "default": StudyScale("default", cases=16, shape=(96, 96, 64), folds=2, seeds=(0, 1),
                              train=cpu,
                              description="2D, 2 CPU cores, within an hour"),
        "full": StudyScale("full", cases=32, shape=(96, 96, 64), folds=4, seeds=(0, 1, 2),
                           train=gpu, description="3D patches on a GPU"),
    }


SCALES: dict[str, StudyScale] = {}


def get_scale(name: str) -> StudyScale:
    """The named scale (``smoke``, ``default``, ``full``)."""
    if not SCALES:
        SCALES.update(_scales())
    if name not in SCALES:
        raise ValueError(f"unknown study scale {name!r}; known: {sorted(SCALES)}")
    return SCALES[name]


# ----------------------------------------------------------------------------- one arm
@dataclass(frozen=True)
class ArmData:
    """One arm taken through the pipeline: its store, statistics and manifest."""

    family: str
    arm: str
    store: str
    stats_path: Path
    manifest_path: Path
    manifest: Any
    stats: Any
    case_ids: tuple[str, ...]


def prepare_arm(root: Path, family: Family, arm: Arm, scale: StudyScale, *,
                seed: int = 0) -> ArmData:
    """Write the arm's phantom and ingest it (skipped when the store already holds every
    case), then measure it and build its manifest."""
    from pipeline.ingest import ingest
    from pipeline.manifest_io import load_manifest, load_stats, write_manifest
    from pipeline.stats_runner import run_stats
    from pipeline.store import DatasetStore, Grid
    from stats.manifest import build_manifest

    folder = root / f"{family.name}-{arm.name}"
    store = str(folder / "store.zarr")
    stats_path, manifest_path = folder / "stats.json", folder / "manifest.json"
    have = 0
    if (folder / "store.zarr").exists():
        try:
            have = len(DatasetStore.open(store, DATASET).committed())
        except Exception:  # a store from an interrupted first run: ingest finishes it
            have = 0
    if have < scale.cases:
        source = folder / "source"
        write_arm(source, family, arm, cases=scale.cases, seed=seed, shape=scale.shape)
        report = ingest(source, store, DATASET, layout="brats",
                        grid=Grid(spacing=(1.0, 1.0, 1.0), shape=scale.shape),
                        workers=1, recompute=False)
        if report.exit_code != 0:
            bad = [f"{o.case_id}: {o.reason}" for o in report.by_status("quarantined")]
            raise RuntimeError(f"evidence arm {family.name}/{arm.name}: ingest exited "
                               f"{report.exit_code}; quarantined: {bad}")
    # Statistics (incremental: persisted per-case partials are reused) and the manifest
    # are rebuilt on every run, so a change of the rules is always seen.
    stats = run_stats(store, DATASET, scheduler="synchronous")
    write_text_atomic(stats_path, stats.model_dump_json(indent=1))
    write_manifest(build_manifest(stats, seed=seed), manifest_path)
    stats = load_stats(stats_path)
    manifest = load_manifest(manifest_path)
    return ArmData(family.name, arm.name, store, stats_path, manifest_path, manifest, stats,
                   tuple(stats.cases))


def decision_rows(data: ArmData, arm: Arm) -> list[dict[str, Any]]:
    """One row per rule: measured value, decision, what the arm expects, and a match."""
    rows = []
    for d in data.manifest.loss.decisions:
        expected = arm.expected.get(d.rule)
        rows.append({"family": data.family, "arm": data.arm, "rule": d.rule,
                     "title": d.title, "measured": d.measured, "outcome": d.outcome,
                     "expected": expected,
                     "match": None if expected is None else d.outcome == expected,
                     "text": d.text})
    return rows


def manifest_signature(manifest: Any) -> dict[str, Any]:
    """What must not depend on the units: transforms, clip percentiles, loss spec."""
    return {
        "transforms": {ch: (n.transform.name, tuple(n.percentiles))
                       for ch, n in manifest.normalization.items()},
        "loss": manifest.loss_spec(),
        "decisions": [(d.rule, d.outcome, json.dumps(d.params, sort_keys=True))
                      for d in manifest.loss.decisions if d.rule != "R2"
                      ] + [(d.rule, d.outcome, d.params.get("gamma"))
                           for d in manifest.loss.decisions if d.rule == "R2"],
    }


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One trained configuration: a loss spec and the normalization plan it sees."""

    name: str
    kind: str  # "manifest", "baseline" or "ablation"
    spec: Mapping[str, Any]
    plan: Any
    description: str = ""


def _identity_manifest(manifest: Any, stats: Any) -> Any:
    """The manifest with identity transforms and the default 0.5/99.5 clip."""
    from stats.manifest import CLIP_PERCENTILES, channel_normalization

    norm = {}
    for ch in manifest.dataset.channels:
        sel = manifest.transforms[f"intensity/{ch}/brain"]
        ident = sel.model_copy(update={"chosen": "identity", "params": {}, "expression": "x"})
        norm[ch] = channel_normalization(stats, ch, ident, CLIP_PERCENTILES)
    return manifest.model_copy(update={"normalization": norm})


def variants_for(data: ArmData, channels: Sequence[str], *, greedy: bool = False,
                 aliases: dict[str, str] | None = None) -> list[Variant]:
    """The manifest, the baselines and the manifest's ablations for one arm.

    ``greedy`` adds the manifest with greedy adaptation of its Tversky term's alpha and
    beta (the thesis' recommendation; it costs about twice a plain run, so the study
    runs it on the imbalance family only, the regime it is meant for).

    An ablation that leaves exactly a baseline's loss (``tversky + bce`` without its
    Tversky term is ``bce``) is not trained again: it is recorded in ``aliases``
    (ablation name → baseline name) and the report reads the baseline's results.
    """
    from pipeline.train.normalize import NormalizationPlan
    from stats.manifest import CLIP_PERCENTILES

    m = data.manifest
    aliases = {} if aliases is None else aliases
    plan = NormalizationPlan.from_manifest(m, channels)
    spec = m.loss_spec()
    out = [Variant("manifest", "manifest", spec, plan, "the manifest's loss and plan")]
    out += [Variant(b, "baseline", {"name": b}, plan, "baseline, the manifest's plan")
            for b in BASELINES]
    terms = spec["terms"]
    method = spec["weighting"]["method"]
    if len(terms) >= 2:
        for i, t in enumerate(terms):
            rest = [u for j, u in enumerate(terms) if j != i]
            weighting = spec["weighting"] if len(rest) >= 2 else {"method": "static",
                                                                   "params": {}}
            ablated = {**spec, "terms": rest, "weighting": weighting}
            adapt = spec.get("adaptation")
            if adapt is not None:  # the adapted term moves up one place, or goes
                if adapt["term"] == i:
                    ablated.pop("adaptation")
                elif adapt["term"] > i:
                    ablated["adaptation"] = {**adapt, "term": adapt["term"] - 1}
            same = next((b for b in BASELINES if _same_loss(ablated, {"name": b})), None)
            if same is not None:  # e.g. tversky + bce without tversky is bce: no retraining
                aliases[f"manifest − {t['name']}"] = same
                continue
            out.append(Variant(f"manifest − {t['name']}", "ablation", ablated, plan,
                               f"the manifest without its {t['name']} term"))
        other = "static" if method != "static" else "softadapt"
        out.append(Variant(f"manifest, {other} weights", "ablation",
                           {**spec, "weighting": {"method": other, "params": {}}}, plan,
                           f"{other} weighting instead of {method}"))
    region = [i for i, t in enumerate(terms) if t["name"] == "tversky"]
    if greedy and region and "adaptation" not in spec:
        out.append(Variant(
            "manifest + greedy α/β", "ablation",
            {**spec, "adaptation": {"method": "greedy", "term": region[0],
                                    "params": ["alpha", "beta"],
                                    "factors": [0.9, 1.0, 1.1], "every": GREEDY_EVERY}},
            plan, f"Tversky alpha/beta adapted greedily (Seo et al.; thesis section 5.1), "
                  f"a search every {GREEDY_EVERY} steps"))
    default_plan = all(n.transform.name == "identity" and tuple(n.percentiles) ==
                       tuple(CLIP_PERCENTILES) for n in m.normalization.values())
    if not default_plan:
        ident = NormalizationPlan.from_manifest(_identity_manifest(m, data.stats), channels)
        out.append(Variant("manifest, identity plan", "ablation", spec, ident,
                           "identity transforms and the 0.5/99.5 clip instead of the "
                           "manifest's plan"))
    return out


def _same_loss(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two loss specs compute the same loss: equal values and gradients on a fixed
    random whole-tumour batch (cheap, and exact for the registry's deterministic losses)."""
    import torch

    from pipeline.train.losses import build_loss

    gen = torch.Generator().manual_seed(20261130)
    logits = torch.randn(2, 1, 16, 16, generator=gen)
    target = (torch.rand(2, 1, 16, 16, generator=gen) < 0.1).float()
    out = []
    for spec in (a, b):
        x = logits.clone().requires_grad_(True)
        loss = build_loss(dict(spec)).train()(x, target)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return bool(torch.allclose(out[0][0], out[1][0], atol=1e-6)
                and torch.allclose(out[0][1], out[1][1], atol=1e-7))


# ----------------------------------------------------------------------------- training
@dataclass
class StudyResult:
    """Everything the report needs."""

    scale: StudyScale
    out_dir: Path
    decisions: list[dict[str, Any]] = field(default_factory=list)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_case: list[dict[str, Any]] = field(default_factory=list)
    variants: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    same_data: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""
    trained: int = 0
    reused: int = 0
    train_seconds: float = 0.0


Progress = Callable[[str], None]


def train_arm(data: ArmData, scale: StudyScale, out_dir: Path, result: StudyResult,
              progress: Progress | None = None) -> None:
    """Train every variant of one arm on the same folds, for every seed."""
    from pipeline.store import DatasetStore
    from pipeline.train.loop import TrainingDiverged, kfold_split, train_fold

    store = DatasetStore.open(data.store, DATASET)
    channels = list(store.channels)
    spacing_zyx = tuple(float(s) for s in store.grid.spacing[::-1])
    aliases: dict[str, str] = {}
    variants = variants_for(data, channels, greedy=data.family in GREEDY_FAMILIES,
                            aliases=aliases)
    key = f"{data.family}/{data.arm}"
    result.variants[key] = [{"name": v.name, "kind": v.kind, "description": v.description}
                            for v in variants]
    result.aliases[key] = aliases
    case_ids = list(store.committed())
    for seed in scale.seeds:
        cfg = replace(scale.train, seed=seed)
        for fold in kfold_split(case_ids, scale.folds, seed):
            for v in variants:
                fold_dir = (out_dir / "runs" / f"{data.family}-{data.arm}" / run_key(v, cfg)
                            / f"seed{seed}" / f"fold{fold.index}")
                t0 = time.perf_counter()
                if (fold_dir / "result.json").exists():
                    result.reused += 1
                else:
                    result.trained += 1
                try:
                    res = train_fold(data.store, DATASET, fold, v.name, dict(v.spec), v.plan,
                                     cfg, fold_dir, spacing_zyx=spacing_zyx, resume=True)
                except TrainingDiverged as err:
                    result.failures.append(f"{key} {v.name} seed {seed} fold {fold.index}: "
                                           f"{err}")
                    continue
                result.train_seconds += res.train_seconds
                for c in res.cases:
                    result.per_case.append({
                        "family": data.family, "arm": data.arm, "variant": v.name,
                        "kind": v.kind, "seed": seed, "fold": fold.index,
                        "case_id": c["case"],
                        **{m: _float(c.get(m)) for m in METRICS}})
                if progress:
                    dice = np.nanmean([_float(c.get("dice")) for c in res.cases])
                    progress(f"{key} seed {seed} fold {fold.index} {v.name}: Dice "
                             f"{100 * dice:.1f} ({time.perf_counter() - t0:.0f} s)")


def copy_arm(result: StudyResult, source: str, target: str) -> None:
    """Give arm ``target`` the training results of arm ``source`` (``family/arm`` keys),
    which was built from the same phantom options and seed: the same data, hence (the
    trainer is deterministic) the same results. Recorded in ``result.same_data``."""
    family, arm = target.split("/")
    src_family, src_arm = source.split("/")
    result.per_case += [{**r, "family": family, "arm": arm} for r in result.per_case
                        if r["family"] == src_family and r["arm"] == src_arm]
    result.variants[target] = result.variants[source]
    result.aliases[target] = result.aliases[source]
    result.same_data[target] = source


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def run_key(variant: Variant, cfg: Any) -> str:
    """Folder name of a variant's runs: its name and a hash of what it trains (loss spec,
    normalization plan, protocol without the seed), so that a re-run after the rules or
    the protocol changed never reuses a stale result, and one after nothing changed
    reuses every finished fold."""
    protocol = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    blob = json.dumps({"spec": variant.spec, "plan": variant.plan.to_dict(),
                       "train": protocol}, sort_keys=True, default=str)
    return f"{_slug(variant.name)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- analysis
def case_means(rows: Sequence[Mapping[str, Any]], family: str, arm: str, variant: str,
               metric: str) -> dict[str, float]:
    """Case id → the metric averaged over seeds (NaN seeds ignored; NaN if all are)."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["family"] == family and r["arm"] == arm and r["variant"] == variant:
            acc.setdefault(r["case_id"], []).append(r[metric])
    return {c: (float(np.nanmean(v)) if np.isfinite(v).any() else math.nan)
            for c, v in acc.items()}


def compare(rows: Sequence[Mapping[str, Any]], family: str, arm: str, a: str, b: str,
            metric: str, *, seed: int = 0) -> PairedComparison:
    """Paired comparison of variants ``a`` and ``b`` on the cases both were validated on."""
    ma = case_means(rows, family, arm, a, metric)
    mb = case_means(rows, family, arm, b, metric)
    cases = sorted(set(ma) & set(mb))
    return paired_comparison([ma[c] for c in cases], [mb[c] for c in cases], seed=seed)


def best_baseline(rows: Sequence[Mapping[str, Any]], family: str, arm: str) -> str | None:
    """The baseline with the highest mean Dice on this arm."""
    means = {}
    for b in BASELINES:
        vals = list(case_means(rows, family, arm, b, "dice").values())
        if vals and np.isfinite(vals).any():
            means[b] = float(np.nanmean(vals))
    return max(means, key=lambda k: means[k]) if means else None


# ----------------------------------------------------------------------------- the study
def run_study(out_dir: Path, scale: StudyScale, *, report: Path | None = None,
              families: Sequence[str] | None = None, progress: Progress | None = None
              ) -> StudyResult:
    """Run the study at ``scale`` in ``out_dir`` and write the report.

    Parameters
    ----------
    out_dir : Path
        Working folder (data, stores, runs, raw results); reused by a re-run.
    scale : StudyScale
    report : Path, optional
        Where to write the markdown report (its plots go to ``<report stem>/`` beside
        it); default ``out_dir / "evidence.md"``.
    families : sequence of str, optional
        Restrict to these families (default: the scale's).
    progress : callable, optional
        Receives one line per finished step.
    """
    from pipeline.evidence.report import write_report
    from pipeline.train.loop import select_device

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(families or scale.families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown!r}; known: {sorted(FAMILIES)}")
    result = StudyResult(scale=scale, out_dir=out_dir,
                         device=str(select_device(scale.train.device)))
    trained: dict[Any, str] = {}  # phantom options -> the arm that trained on them
    for name in names:
        family = FAMILIES[name]
        for arm in family.arms:
            data = prepare_arm(out_dir / "data", family, arm, scale)
            result.decisions += decision_rows(data, arm)
            result.signatures[f"{family.name}/{arm.name}"] = manifest_signature(data.manifest)
            if progress:
                loss = " + ".join(t["name"] for t in data.manifest.loss_spec()["terms"])
                progress(f"{family.name}/{arm.name}: manifest {loss}, weighting "
                         f"{data.manifest.loss.weighting.method}")
            if family.invariant:
                continue
            key = f"{family.name}/{arm.name}"
            same = trained.get(arm.options)
            if same is not None:  # the same phantom as an earlier arm: its results stand
                copy_arm(result, same, key)
                if progress:
                    progress(f"{key}: the same data as {same}; its results are reused")
                continue
            trained[arm.options] = key
            train_arm(data, scale, out_dir, result, progress)
    result.seconds = time.perf_counter() - t0
    raw = out_dir / "per_case.json"
    write_text_atomic(raw, json.dumps({"per_case": result.per_case,
                                       "decisions": result.decisions,
                                       "failures": result.failures}, indent=1, default=str))
    write_report(result, report or out_dir / "evidence.md", environment())
    return result


def environment() -> dict[str, str]:
    """Machine, versions and time, for the report's header."""
    import torch

    from pipeline import code_version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpu": gpu, "code_version": code_version(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
