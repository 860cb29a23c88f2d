"""Training cost of the manifest's loss against ``dice_ce``: through the trainer, and per loss.

    make bench-train        # or: .venv/bin/python -m benchmarks.bench_train --dim 2d

Two sections, in one run (``--section trainer`` or ``--section fixed`` runs one):

**Trainer path** (the headline; issue 14's aim: the manifest loss's training step
<= 1.2x ``dice_ce``'s). On a cached phantom store (``--cases`` cases on the demo's
96x96x64 grid at 1 mm, written and ingested once under ``.bench/train``; the marker is
written only once the store is complete), the statistics and the manifest are computed
with the project's own functions (``run_stats``, the manifest builder,
``load_training_manifest``: the loss spec and normalization plan ``xrai train`` uses), or
taken from ``--manifest``. For the manifest loss and for ``dice_ce`` the run is built as
``train_fold`` builds it (``_setup``: model, loss, AdamW, PolyLR, the gradient scaler and
autocast of ``--amp`` on CUDA; ``TrainSamples`` of fold 0's training cases), with the
``TrainConfig`` of ``xrai train``'s options (``train_config(TrainOptions(...))``): in 2D
its own epoch of 25 batches of 8 whole slices, in 3D 8 batches of 8 patches of 64^3
(``--batches``, ``--train-batch``); only the number of epochs is the benchmark's
(the warm-up and the rounds). What is timed is a whole ``_train_epoch`` call: the
DataLoader and its worker processes (``--workers``, the trainer's default 2; as in the
trainer, started once per fold, so in the untimed warm-up epoch, and reused), reading and
normalizing cases from the Zarr store, sampling and augmentation (and distance maps when
the loss needs them), the transfer to the device, the steps and the per-step logging.
One untimed warm-up epoch per loss, then ``--train-rounds`` rounds, each one epoch of every
loss in turn (epochs numbered as the trainer numbers them, the scheduler stepped after
each); medians over rounds, so a busy machine slows both losses alike. Printed: ms per
step (epoch seconds / batches), voxels/s, the ratio manifest / ``dice_ce`` and whether it
meets the aim.

**Fixed batch**, per loss of the registry: on one fixed batch (seeded random images; a
sphere of tumour as target) in memory, with the trainer's default U-Net (``--features``,
``--levels``), timed in interleaved rounds (``--rounds``, medians):

- ``loss only``: ``loss(logits, target).backward()`` on fixed logits;
- ``U-Net step``: U-Net forward (with autocast on CUDA) + loss + backward, without data
  loading or optimizer step: what the loss itself adds to a step.

The boundary loss gets its distance map precomputed, as the data loader does. The manifest
loss there is the trainer section's (or ``--manifest``'s); with ``--section fixed`` and no
``--manifest``, a representative one (adaptive Tversky + focal + Barron, SoftAdapt
weighting). Then ``--steps`` training steps (AdamW) on that batch with the manifest loss
give voxels/s without data loading.

On a GPU (``--device cuda``), ``--dim 2d`` and ``--dim 3d`` give the 2D and 3D throughput
under mixed precision (``--amp``, bf16 where supported).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline.train.loop import TrainConfig, amp_mode, needs_distance_map, select_device
from pipeline.train.losses import LOSSES, build_loss, signed_distance_map
from pipeline.train.models import build_unet

DEFAULT_MANIFEST_SPEC: dict[str, Any] = {
    "name": "manifest",
    "terms": [{"name": "adaptive_tversky", "weight": 1.0, "params": {"A": 0.3, "B": 0.4}},
              {"name": "focal", "weight": 1.0, "params": {"gamma": 2.0}},
              {"name": "barron", "weight": 0.5, "params": {"alpha": 1.0, "scale": 0.1}}],
    "weighting": {"method": "softadapt", "params": {"beta": 0.1}},
}
#: The trainer path's row for `DEFAULT_MANIFEST_SPEC`: a heavy manifest loss (adaptive
#: Tversky and focal, which the rules write for multifocal and heavy-tailed data, plus
#: Barron, with adaptive weighting), since a store's own manifest may be as light as
#: ``dice + bce``.
HEAVIEST = "manifest, heavy form"
#: The trainer section's store: the demo's grid (X Y Z, 1 mm), its dataset name, the aim.
TRAIN_GRID: tuple[int, int, int] = (96, 96, 64)
TRAIN_DATASET = "bench"
TRAIN_WORK = Path(".bench/train")
AIM = 1.2


# -- trainer path --------------------------------------------------------------------------


def prepare_train_store(work: Path, *, cases: int = 8,
                        shape: tuple[int, int, int] = TRAIN_GRID, seed: int = 0,
                        workers: int = 2, quiet: bool = False) -> str:
    """A phantom store of ``cases`` cases on a ``shape`` grid at 1 mm, cached under ``work``.

    Written once (`write_phantom`, `discover(layout="brats")`, `ingest_cases`); the
    completion marker is written atomically only after every case is ingested, so an
    interrupted run is redone. Returns the store's URL (dataset `TRAIN_DATASET`).
    """
    from pipeline.fsio import write_text_atomic
    from pipeline.ingest import ingest_cases
    from pipeline.sources.local import discover
    from pipeline.sources.phantom import write_phantom
    from pipeline.store import Grid

    tag = f"{cases}x{'x'.join(map(str, shape))}-seed{seed}"
    root = Path(work) / tag
    url = str(root / "store.zarr")
    marker = root / ".complete"
    if not marker.exists():
        if not quiet:
            print(f"generating {cases} phantom cases of {'x'.join(map(str, shape))} and "
                  f"ingesting them (cached under {root}) ...", flush=True)
        write_phantom(root / "source", cases=cases, seed=seed, shape=shape)
        found = discover(root / "source", layout="brats")
        report = ingest_cases(found, url, TRAIN_DATASET,
                              grid=Grid(spacing=(1.0, 1.0, 1.0), shape=shape), workers=workers)
        bad = [o for o in report.outcomes if o.status == "quarantined"]
        if bad or len(report.outcomes) != cases:
            raise RuntimeError(f"ingest of the benchmark store failed: {bad!r}")
        write_text_atomic(marker, "ok\n")
    return url


def training_manifest(url: str, work: Path, manifest: str | Path | None = None) -> Any:
    """The loss spec and normalization plan the trainer would use on the store.

    Without ``manifest``: the statistics (`run_stats`, reusing the partials kept in the
    store) and the manifest (`pipeline.manifest_io.manifest_command`) are written next to
    the store, as ``make demo`` does. Then `load_training_manifest`, as ``xrai train``.
    Returns a `pipeline.train.benchmark.TrainingManifest`.
    """
    from pipeline.manifest_io import load_manifest, manifest_command
    from pipeline.stats_runner import run_stats, write_stats
    from pipeline.store import DatasetStore
    from pipeline.train.benchmark import load_training_manifest

    root = Path(url).parent
    if manifest is None:
        write_stats(run_stats(url, TRAIN_DATASET), str(root / "stats.json"))
        manifest = root / "manifest.json"
        loaded = manifest_command(root / "stats.json", manifest, seed=0)
    else:
        loaded = load_manifest(manifest)
    channels = DatasetStore.open(url, TRAIN_DATASET).channels
    return load_training_manifest(manifest, channels, manifest=loaded)


def trainer_config(dim: str, *, batches: int, epochs: int, device: str, amp: str,
                   workers: int | None = None, batch_size: int | None = None,
                   seed: int = 0) -> Any:
    """``xrai train``'s `TrainConfig` (`train_config(TrainOptions(...))`) for a short run."""
    from pipeline.train.options import TrainOptions, train_config

    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["workers"] = workers
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    options = TrainOptions(losses=("manifest", "dice_ce"), dim=dim, epochs=epochs,
                           batches_per_epoch=batches, device=device, amp=amp, seed=seed,
                           **overrides)
    return train_config(options)


@dataclass(frozen=True)
class TrainerPathResult:
    """Medians of the timed epochs of each loss (see `measure_trainer_path`)."""

    losses: tuple[str, ...]
    epoch_seconds: dict[str, list[float]]
    voxels: dict[str, int]
    batches: int
    batch_shape: tuple[int, ...]
    device: str
    amp: str
    workers: int

    def ms_per_step(self, loss: str) -> float:
        return statistics.median(self.epoch_seconds[loss]) / self.batches * 1e3

    def voxels_per_s(self, loss: str) -> float:
        return self.voxels[loss] / statistics.median(self.epoch_seconds[loss])

    @property
    def ratio(self) -> float:
        """Median manifest step over median ``dice_ce`` step."""
        return self.ms_per_step("manifest") / self.ms_per_step("dice_ce")


def measure_trainer_path(url: str, dataset: str, *, loss_spec: Mapping[str, Any], plan: Any,
                         cfg: Any, rounds: int, folds: int = 3,
                         losses: Sequence[str] = ("manifest", "dice_ce"),
                         extra: Mapping[str, Mapping[str, Any]] | None = None,
                         progress: Callable[[str], None] | None = None) -> TrainerPathResult:
    """Time ``_train_epoch`` of each loss as ``train_fold`` runs it (module docstring).

    Parameters
    ----------
    url, dataset : str
        The store and dataset; fold 0 of ``kfold_split(cases, folds, cfg.seed)`` (as
        ``run_benchmark`` splits) gives the training cases.
    loss_spec, plan
        The manifest's loss spec and normalization plan.
    cfg : TrainConfig
        ``cfg.epochs`` must be at least ``rounds + 1`` (the warm-up epoch and the rounds).
    rounds : int
        Timed epochs per loss, interleaved (round r: one epoch of every loss in turn).
    losses : sequence of str
        Must hold ``"manifest"`` and ``"dice_ce"`` for `TrainerPathResult.ratio`.
    extra : mapping of str to spec, optional
        More losses to time alongside, by row name (`build_loss` specs).
    """
    from pipeline.store import DatasetStore
    from pipeline.train.benchmark import resolve_loss_specs
    from pipeline.train.data import TrainSamples
    from pipeline.train.loop import _LossInfo, _setup, _train_epoch, kfold_split

    if rounds < 1 or cfg.epochs < rounds + 1:
        raise ValueError(f"need rounds >= 1 and cfg.epochs >= rounds + 1, got {rounds!r}, "
                         f"{cfg.epochs!r}")
    specs = {**resolve_loss_specs(list(losses), loss_spec),
             **{name: dict(spec) for name, spec in (extra or {}).items()}}
    store = DatasetStore.open(url, dataset)
    case_ids = list(store.committed())
    fold = kfold_split(case_ids, min(folds, len(case_ids)), cfg.seed)[0]
    runs: dict[str, tuple[Any, Any, Any]] = {}
    for name, spec in specs.items():  # as train_fold: _setup, _LossInfo, TrainSamples
        run = _setup(spec, plan, cfg, fold.index)
        info = _LossInfo.of(run.loss_fn)
        ds = TrainSamples(url, dataset, fold.train, plan, sampling=cfg.sampling,
                          target=cfg.target, batch_size=cfg.batch_size,
                          batches_per_epoch=cfg.batches_per_epoch, seed=run.seed,
                          distance_maps=info.distance_maps)
        runs[name] = (run, info, ds)

    def on_step(_event: Mapping[str, Any]) -> None:  # the trainer's progress hook, a no-op
        return None

    def epoch(name: str, e: int) -> tuple[float, int]:
        run, info, ds = runs[name]
        t0 = time.perf_counter()
        stats = _train_epoch(run, info, ds, cfg, e, loss_name=name, fold_index=fold.index,
                             progress=on_step)  # synchronizes CUDA at its end
        seconds = time.perf_counter() - t0
        run.scheduler.step()  # as train_fold, after every epoch
        return seconds, stats.voxels

    seconds: dict[str, list[float]] = {n: [] for n in specs}
    voxels: dict[str, int] = {}
    try:
        for name in specs:  # warm-up: allocations, caches, the loader's worker processes
            if progress:
                progress(f"warm-up epoch: {name}")
            epoch(name, 0)
        for r in range(1, rounds + 1):
            if progress:
                progress(f"round {r}/{rounds}")
            for name in specs:
                sec, vox = epoch(name, r)
                seconds[name].append(sec)
                voxels[name] = vox
    finally:
        for run, _, _ in runs.values():
            run.close()  # as train_fold: the loaders' workers end with the measurement
    run0 = next(iter(runs.values()))[0]
    zyx = tuple(store.grid.shape[::-1])
    spatial = tuple(cfg.sampling.patch_size or zyx[1:])
    return TrainerPathResult(tuple(specs), seconds, voxels, cfg.batches_per_epoch,
                             (cfg.batch_size, len(plan.channels), *spatial), str(run0.device),
                             run0.amp.name, cfg.workers)


def print_trainer_path(console: Console, res: TrainerPathResult, *, dim: str,
                       manifest_source: str, loss_spec: Mapping[str, Any]) -> None:
    """The trainer-path table, the ratio and the verdict."""
    shape = "x".join(map(str, res.batch_shape))
    table = Table(title=f"TRAINER PATH (headline): _train_epoch as train_fold runs it, {dim}, "
                        f"batches {shape}, {res.batches} batches/epoch, {res.workers} loader "
                        f"workers, {res.device}, amp {res.amp}; median of "
                        f"{len(next(iter(res.epoch_seconds.values())))} interleaved rounds")
    for col in ("loss", "ms / step", "voxels/s", "ratio", "epochs (s)"):
        table.add_column(col, justify="left" if col in ("loss", "epochs (s)") else "right")
    base = res.ms_per_step("dice_ce")
    for name in res.losses:
        ms = res.ms_per_step(name)
        table.add_row(name, f"{ms:.1f}", f"{res.voxels_per_s(name):,.0f}", f"{ms / base:.2f}x",
                      " ".join(f"{s:.2f}" for s in res.epoch_seconds[name]))
    console.print(table)
    terms = " + ".join(f"{t['weight']:g}*{t['name']}" for t in loss_spec.get("terms", []))
    weighting = loss_spec.get("weighting", {}).get("method", "")
    console.print(f"manifest loss ({manifest_source}): {terms or loss_spec.get('name')}"
                  f"{f', {weighting} weighting' if weighting else ''}", highlight=False)
    ratio = res.ratio
    verdict = "meets" if ratio <= AIM else "misses"
    console.print(f"trainer path: manifest loss step {ratio:.2f}x dice_ce "
                  f"({res.ms_per_step('manifest'):.1f} ms vs {base:.1f} ms per step, data "
                  f"loading included): {verdict} the <= {AIM}x aim", highlight=False)
    if HEAVIEST in res.losses:
        heavy = res.ms_per_step(HEAVIEST) / base
        console.print(f"trainer path: {HEAVIEST} (adaptive Tversky + focal + Barron, SoftAdapt "
                      f"weighting) {heavy:.2f}x dice_ce: "
                      f"{'meets' if heavy <= AIM else 'misses'} the <= {AIM}x aim",
                      highlight=False)


# -- fixed batch ---------------------------------------------------------------------------


def fixed_batch(dim: str, batch: int, size: int, channels: int = 4, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images ``(N, C, *spatial)`` and a binary sphere target ``(N, 1, *spatial)``."""
    g = torch.Generator().manual_seed(seed)
    spatial = (size, size) if dim == "2d" else (size, size, size)
    x = torch.randn((batch, channels, *spatial), generator=g)
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in spatial),
                           indexing="ij")
    r2 = sum((gr - (s - 1) / 2) ** 2 for gr, s in zip(grids, spatial, strict=True))
    y = (r2 < (size / 5) ** 2).float().expand(batch, 1, *spatial).contiguous()
    return x, y


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def fixed_batch_section(console: Console, *, dim: str, batch: int, size: int, rounds: int,
                        steps: int, device: torch.device, amp_option: str,
                        manifest_spec: Mapping[str, Any], names: Sequence[str],
                        features: int = 16, levels: int = 3) -> None:
    """The per-loss table on one fixed batch, and AdamW steps on it (module docstring)."""
    amp = amp_mode(device, amp_option)
    x, y = fixed_batch(dim, batch, size)
    x, y = x.to(device), y.to(device)
    dmap = signed_distance_map(y).to(device)
    names = list(names)
    if "dice_ce" not in names:
        names = ["dice_ce", *names]
    specs = {n: (dict(manifest_spec) if n == "manifest" else {"name": n}) for n in names}
    losses = {n: build_loss(s).to(device).train() for n, s in specs.items()}
    torch.manual_seed(0)
    model = build_unet(dim, x.shape[1], 1, features=features, levels=levels).to(device).train()
    fixed_logits = model(x).detach().float()

    def loss_only(name: str) -> Callable[[], None]:
        fn = losses[name]
        extras = {"distance_map": dmap} if needs_distance_map(fn) else {}

        def run() -> None:
            logits = fixed_logits.clone().requires_grad_(True)
            fn(logits, y, **extras).backward()
        return run

    def step(name: str) -> Callable[[], None]:
        fn = losses[name]
        extras = {"distance_map": dmap} if needs_distance_map(fn) else {}

        def run() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp.dtype or torch.float32,
                                enabled=amp.dtype is not None):
                logits = model(x)
            fn(logits.float(), y, **extras).backward()
        return run

    for name in names:  # warm-up (allocations, cuDNN choices, MONAI caches)
        loss_only(name)()
        step(name)()
    times: dict[str, dict[str, list[float]]] = {n: {"loss": [], "step": []} for n in names}
    for _ in range(rounds):
        for name in names:
            times[name]["loss"].append(_timed(loss_only(name), device))
            times[name]["step"].append(_timed(step(name), device))
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    base = med["dice_ce"]

    # throughput: AdamW steps on the fixed batch with the manifest loss (or dice_ce)
    train_name = "manifest" if "manifest" in losses else "dice_ce"
    opt = torch.optim.AdamW(list(model.parameters()) + list(losses[train_name].parameters()),
                            lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp.scaler)
    run = step(train_name)

    def train_steps() -> None:
        for _ in range(steps):
            run()
            scaler.step(opt) if amp.scaler else opt.step()
            if amp.scaler:
                scaler.update()
    seconds = _timed(train_steps, device)
    voxels = x.numel() // x.shape[1] * steps

    spatial = "x".join(str(s) for s in x.shape[2:])
    table = Table(title=f"FIXED BATCH: fwd+bwd per loss on a fixed {dim} batch {batch}x"
                        f"{x.shape[1]}x{spatial} (U-Net {features} features, {levels} levels), no data "
                        f"loading, {device}, amp {amp.name}; median of {rounds} rounds")
    for col in ("loss", "loss only (ms)", "ratio", "U-Net step (ms)", "ratio"):
        table.add_column(col, justify="right" if col != "loss" else "left")
    for name in names:
        m = med[name]
        table.add_row(name, f"{m['loss'] * 1e3:.2f}", f"{m['loss'] / base['loss']:.2f}x",
                      f"{m['step'] * 1e3:.1f}", f"{m['step'] / base['step']:.2f}x")
    console.print(table)
    if "manifest" in med:
        console.print(f"fixed batch: manifest loss {med['manifest']['step'] / base['step']:.2f}x "
                      f"dice_ce per fwd+bwd step, loss alone "
                      f"{med['manifest']['loss'] / base['loss']:.2f}x (no data loading; the "
                      f"aim is judged on the trainer path)", highlight=False)
    console.print(f"fixed-batch throughput ({train_name}, {steps} AdamW steps, {device}, "
                  f"amp {amp.name}, no data loading): {voxels / seconds:,.0f} voxels/s",
                  highlight=False)


# -- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=("all", "trainer", "fixed"), default="all")
    parser.add_argument("--dim", choices=("2d", "3d"), default="2d")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="mixed precision on CUDA (both sections)")
    parser.add_argument("--manifest", default=None,
                        help="take the manifest loss (and, trainer path, its normalization) "
                             "from here instead of the benchmark store's own manifest")
    g = parser.add_argument_group("trainer path")
    g.add_argument("--cases", type=int, default=8, help="phantom cases in the store")
    g.add_argument("--batches", type=int, default=None,
                   help="training batches per epoch; default: xrai train's (25) in 2d, 8 in 3d")
    g.add_argument("--train-rounds", type=int, default=5, help="timed epochs per loss")
    g.add_argument("--train-batch", type=int, default=None,
                   help="samples per batch; default: xrai train's (8)")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loader workers; default: xrai train's (2)")
    g.add_argument("--work", type=Path, default=TRAIN_WORK, help="cache of the store")
    g = parser.add_argument_group("fixed batch")
    g.add_argument("--batch", type=int, default=None, help="default 8 (2d) / 2 (3d)")
    g.add_argument("--size", type=int, default=None, help="default 128 (2d) / 64 (3d)")
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--losses", default=None, help="comma-separated; default: all")
    g.add_argument("--features", type=int, default=None,
                   help="U-Net features at level 1; default: xrai train's (16)")
    g.add_argument("--levels", type=int, default=None,
                   help="U-Net resolution levels; default: xrai train's (3)")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    console = Console()
    manifest_spec: Mapping[str, Any] = DEFAULT_MANIFEST_SPEC
    trainer: tuple[TrainerPathResult, str, Mapping[str, Any]] | None = None
    if args.section in ("all", "trainer"):
        url = prepare_train_store(args.work, cases=args.cases)
        checked = training_manifest(url, args.work, args.manifest)
        manifest_spec = checked.loss_spec
        source = args.manifest or "the store's statistics -> manifest"
        batches = args.batches or (TrainConfig.batches_per_epoch if args.dim == "2d" else 8)
        cfg = trainer_config(args.dim, batches=batches, epochs=args.train_rounds + 1,
                             device=args.device, amp=args.amp, workers=args.workers,
                             batch_size=args.train_batch)
        t0 = time.perf_counter()
        res = measure_trainer_path(
            url, TRAIN_DATASET, loss_spec=checked.loss_spec, plan=checked.plan, cfg=cfg,
            rounds=args.train_rounds, extra={HEAVIEST: DEFAULT_MANIFEST_SPEC},
            progress=lambda m: console.print(f"[dim]trainer path: {m}[/]", highlight=False))
        console.print(f"[dim]trainer path: {time.perf_counter() - t0:.0f} s[/]")
        trainer = (res, source, checked.loss_spec)
    elif args.manifest:
        from pipeline.manifest_io import load_manifest

        manifest_spec = load_manifest(args.manifest).loss_spec()
    if args.section in ("all", "fixed"):
        names = args.losses.split(",") if args.losses else sorted(LOSSES)
        fixed_batch_section(console, dim=args.dim,
                            batch=args.batch or (8 if args.dim == "2d" else 2),
                            size=args.size or (128 if args.dim == "2d" else 64),
                            rounds=args.rounds, steps=args.steps, device=device,
                            amp_option=args.amp, manifest_spec=manifest_spec, names=names,
                            features=args.features or TrainConfig.features,
                            levels=args.levels or TrainConfig.levels)
    if trainer is not None:  # the headline last
        res, source, spec = trainer
        print_trainer_path(console, res, dim=args.dim, manifest_source=source, loss_spec=spec)
        if not all(math.isfinite(s) for v in res.epoch_seconds.values() for s in v):
            raise SystemExit("non-finite epoch time")


if __name__ == "__main__":
    main()
