"""``xrai train``: every named loss under one protocol on a store, with progress.

On a terminal (or with ``XRAI_PROGRESS`` set) progress is two rich bars; otherwise a
line per epoch on stderr (`pipeline.train.progress.ProgressLog`), so a log file or a CI
job shows the loss, term weights, validation Dice and time left as training goes.

The lead registers it with ``app.command("train")(train)``; ``make demo`` may call
``train(...)`` directly as a function.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli_checks import check_dataset_name, check_device, check_store, people
from pipeline.errors import XraiError
from pipeline.train.options import (
    AFFINE_PROB,
    DEFAULT_LOSSES,
    DEFAULT_PATCH_SIZE,
    TrainOptions,
    check_loss_names,
    known_loss_names,
    run_training,
)
from pipeline.train.progress import LOGGER_NAME, ProgressLog

if TYPE_CHECKING:  # torch and MONAI load only when training runs (`xrai --help` < 1 s)
    from pipeline.train.benchmark import BenchmarkResult, PairedRow

console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, soft_wrap=True)


def summary_table(result: BenchmarkResult, title: str = "validation metrics") -> Table:
    """The summary as a rich table (mean ± std over folds; ratios in %, distances in mm)."""
    from pipeline.train.benchmark import TABLE_COLUMNS, format_cell

    table = Table(title=f"{title}: mean ± std over folds")
    table.add_column("Loss")
    for _, label in TABLE_COLUMNS:
        table.add_column(label, justify="right")
    for entry in result.summary:
        table.add_row(entry["loss"], *(format_cell(m, entry[m]) for m, _ in TABLE_COLUMNS))
    return table


def paired_rich_table(rows: Sequence[PairedRow]) -> Table:
    """The paired table: A − B per validation case, interval, Wilcoxon p and verdict."""
    from pipeline.train.benchmark import TABLE_COLUMNS, format_difference, format_p

    labels = dict(TABLE_COLUMNS)
    conf = rows[0].comparison.confidence if rows else 0.95
    table = Table(title=f"paired by validation case: {rows[0].loss if rows else 'A'} − each "
                        f"loss (ratios in percentage points, distances in mm)")
    for name, justify in (("A − B", "left"), ("Metric", "left"), ("n", "right"),
                          (f"mean [{conf:.0%} CI]", "right"), ("Wilcoxon p", "right"),
                          ("verdict for A", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    previous = None
    for r in rows:
        if previous is not None and r.other != previous:
            table.add_section()
        previous = r.other
        c = r.comparison
        n = f"{c.n}" + (f" ({c.n_dropped} undef.)" if c.n_dropped else "")
        table.add_row(escape(f"{r.loss} − {r.other}"), labels.get(r.metric, r.metric), n,
                      format_difference(r.metric, c), format_p(c.p_value),
                      escape(r.verdict_text()))
    return table


def print_paired(rows: Sequence[PairedRow], out: Console | None = None) -> None:
    """Print the paired table and, when it is not evidence, say so plainly."""
    from pipeline.train.benchmark import paired_caveat

    if not rows:
        return
    out = out or console
    out.print(paired_rich_table(rows))
    caveat = paired_caveat(rows)
    if caveat:
        out.print(f"[bold yellow]{caveat}[/]", highlight=False)


def _bars_wanted() -> bool:
    """Progress bars on a terminal (or with ``XRAI_PROGRESS`` set); log lines otherwise."""
    return err_console.is_terminal or "XRAI_PROGRESS" in os.environ


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err_console,
                    disable=not _bars_wanted())


@contextmanager
def _progress_lines() -> Iterator[ProgressLog]:
    """`ProgressLog` on ``pipeline.train``, printed to stderr for the run's duration.

    The logger gets its own stderr handler (INFO) and stops propagating while the run
    lasts, so each line is printed once whatever the root logger's configuration
    (``xrai -v`` or not); both are restored afterwards.
    """
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield ProgressLog(logger)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _check_losses(value: str) -> str:
    """``--losses``: comma-separated names, each ``manifest`` or a registry name."""
    try:
        check_loss_names(value.split(","))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    return value


def _check_patch_size(value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    if value is not None and any(s < 1 for s in value):
        raise typer.BadParameter(f"a patch is three positive voxel counts, got {people(value)}")
    return value


#: Options of `train` that name the run's inputs and outputs, not how it trains; every
#: other option is a field of `TrainOptions` (tests/flows/test_train_options.py checks this).
RUN_PARAMETERS = ("manifest", "store", "out", "dataset")


def train(
    manifest: Annotated[Path, typer.Option(
        exists=True, dir_okay=False, help="Loss manifest (JSON) from `xrai manifest`.")],
    store: Annotated[str, typer.Option(help="Zarr store path or fsspec URL.",
                                       callback=check_store)],
    out: Annotated[Path, typer.Option(
        file_okay=False, help="Run directory for results and checkpoints.")],
    dataset: Annotated[str | None, typer.Option(
        help="Dataset in the store; default: the manifest's dataset.",
        callback=check_dataset_name)] = None,
    losses: Annotated[str, typer.Option(
        help="Comma-separated loss names: 'manifest' (the manifest's loss) or registry names "
             "(" + ", ".join(n for n in known_loss_names() if n != "manifest") + ").",
        callback=_check_losses)] = ",".join(DEFAULT_LOSSES),
    folds: Annotated[int, typer.Option(
        min=2, help="k of k-fold cross-validation (at most the number of cases).")] = 3,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per fold.")] = 10,
    dim: Annotated[Literal["2d", "3d"], typer.Option(
        help="2d (axial slices) or 3d (patches).")] = "2d",
    device: Annotated[str, typer.Option(
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
        callback=check_device)] = "auto",
    amp: Annotated[Literal["auto", "bf16", "fp16", "off"], typer.Option(
        help="Mixed precision on CUDA (auto: bf16 where supported, else fp16).")] = "auto",
    target: Annotated[Literal["wt", "multiclass"], typer.Option(
        help="wt (whole tumour, sigmoid) or multiclass (NCR, ED, ET).")] = "wt",
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per training batch.")] = 8,
    batches_per_epoch: Annotated[int, typer.Option(
        min=1, help="Training batches per epoch.")] = 25,
    lr: Annotated[float, typer.Option(
        help="Initial AdamW learning rate, > 0 (PolyLR, p=0.9).")] = 1e-3,
    val_every: Annotated[int, typer.Option(min=1, help="Validate every m epochs.")] = 5,
    features: Annotated[int, typer.Option(min=1, help="U-Net features at level 1.")] = 16,
    levels: Annotated[int, typer.Option(min=3, help="U-Net resolution levels.")] = 3,
    patch_size: Annotated[tuple[int, int, int] | None, typer.Option(
        help=f"3d patch Z Y X (default {people(DEFAULT_PATCH_SIZE)}); ignored in 2d.",
        callback=_check_patch_size)] = None,
    fg_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, show_default="1/3",
        help="Fraction of samples centred on tumour.")] = 1.0 / 3.0,
    affine: Annotated[bool, typer.Option(
        help=f"Add affine augmentation (p = {AFFINE_PROB:g}).")] = False,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader worker processes.")] = 2,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the split, sampling and weights.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from checkpoints in --out.")] = True,
) -> None:
    """Train every named loss under the same k-fold protocol and print the summary table.

    Writes to --out: config.json, metrics_per_case.csv/.json, metrics_per_fold.csv/.json,
    summary.md/.json, paired.md/.json and paired_dice.png (the first loss against each
    other one, paired by validation case), curves.png, adaptive.png, overlays.png, and per
    loss and fold a checkpoint (last.pt) that --resume continues from.

    Exit codes: 0 every loss and fold trained; 3 some folds failed (listed), the rest
    reported; 1 an invalid manifest or store; 2 usage error.
    """
    try:
        options = TrainOptions(
            losses=tuple(losses.split(",")), folds=folds, epochs=epochs, dim=dim,
            patch_size=patch_size, fg_fraction=fg_fraction, affine=affine, target=target,
            batch_size=batch_size, batches_per_epoch=batches_per_epoch, lr=lr,
            val_every=val_every, features=features, levels=levels, workers=workers,
            device=device, amp=amp, seed=seed, resume=resume)
    except ValidationError as err:  # the options' own checks, where typer's do not reach
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "losses"
        raise typer.BadParameter(first["msg"], param_hint=f"'--{name.replace('_', '-')}'"
                                 ) from err
    from pipeline.manifest_io import load_manifest
    from pipeline.store import DatasetStore
    from pipeline.train.benchmark import load_training_manifest
    from pipeline.train.loop import amp_mode, select_device

    try:
        # the check of `xrai manifest validate`, once: bad bytes or JSON, a field or loss
        # parameter the trainer rejects (ManifestError)
        loaded = load_manifest(manifest)
        ds_name = dataset or loaded.dataset.name
        ds = DatasetStore.open(store, ds_name)
        checked = load_training_manifest(manifest, ds.channels, manifest=loaded)
        n_cases = len(ds.committed())
    except (XraiError, FileNotFoundError, KeyError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from err
    if folds > n_cases:
        raise typer.BadParameter(f"{folds} folds need at least {folds} cases; dataset "
                                 f"{ds_name!r} has {n_cases}", param_hint="'--folds'")
    names = list(options.losses)
    dev = select_device(device)
    console.print(
        f"training {', '.join(names)} on [bold]{ds_name}[/] ({n_cases} cases), "
        f"{folds} folds × {epochs} epochs, {dim}, device {dev} "
        f"(mixed precision {amp_mode(dev, amp).name})", highlight=False)
    t0 = time.perf_counter()
    try:
        if not _bars_wanted():
            with _progress_lines() as lines:
                result = run_training(options, store_url=store, dataset=ds_name, out_dir=out,
                                      plan=checked.plan, manifest_spec=checked.loss_spec,
                                      manifest_path=manifest, progress=lines)
        else:
            result = _train_with_bars(options, store=store, dataset=ds_name, out=out,
                                      checked=checked, manifest=manifest)
    except (XraiError, FileNotFoundError, KeyError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from err
    console.print(summary_table(result))
    print_paired(result.paired)
    for key, reason in result.failures.items():
        err_console.print(f"[bold red]{key} failed:[/] {reason}", highlight=False)
    console.print(f"results in {out} ({time.perf_counter() - t0:.0f} s)", highlight=False)
    if result.failures:
        raise typer.Exit(3)


def _train_with_bars(options: TrainOptions, *, store: str, dataset: str, out: Path,
                     checked: Any, manifest: Path) -> BenchmarkResult:
    """`run_training` with rich progress bars (epochs of the whole run, steps of one)."""
    names, folds, epochs = list(options.losses), options.folds, options.epochs
    with _progress() as bar:
        runs = bar.add_task("epochs", total=len(names) * folds * epochs, last="")
        steps = bar.add_task("steps", total=options.batches_per_epoch, last="")

        def progress(ev: dict[str, Any]) -> None:
            if ev["kind"] == "start":
                return
            label = f"{ev['loss']} fold {ev['fold']}"
            if ev["kind"] == "step":
                bar.update(steps, completed=ev["step"],
                           last=f"{label} epoch {ev['epoch'] + 1}: loss {ev['value']:.4f}")
            elif ev["kind"] == "epoch":
                dice = f", val Dice {ev['val_dice']:.3f}" if "val_dice" in ev else ""
                bar.update(runs, advance=1, last=f"{label}: loss {ev['train_loss']:.4f}{dice}")
                bar.reset(steps, total=options.batches_per_epoch)
            elif ev["kind"] == "fold_done":
                done = (names.index(ev["loss"]) * folds + ev["fold"] + 1) * epochs
                bar.update(runs, completed=done, last=f"{label}: Dice {ev['dice']:.3f}")

        return run_training(options, store_url=store, dataset=dataset, out_dir=out,
                            plan=checked.plan, manifest_spec=checked.loss_spec,
                            manifest_path=manifest, progress=progress)


__all__ = ["RUN_PARAMETERS", "paired_rich_table", "print_paired", "summary_table", "train"]
