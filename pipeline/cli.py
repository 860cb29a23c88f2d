"""The ``xrai`` command."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli_checks import check_dataset_name, check_device, check_store, people
from pipeline.errors import XraiError
from pipeline.grid import Grid

app = typer.Typer(
    name="xrai",
    help="Brain-tumour MRI statistics, the data-driven loss manifest, and its trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the tables when the output is a file or a CI log (rich assumes 80).
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")


def _phantom_shape(value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """``phantom --shape``: at least the phantom's smallest head (`MIN_SHAPE`)."""
    from pipeline.sources.phantom import MIN_SHAPE

    if value is not None and any(v < m for v, m in zip(value, MIN_SHAPE, strict=True)):
        raise typer.BadParameter(f"the phantom needs at least {people(MIN_SHAPE)} voxels at "
                                 f"1 mm, got {people(value)}")
    return value


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(
        file_okay=False, help="Folder to write the BraTS-layout dataset into.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; equal seeds give identical files.")] = 0,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        help="Voxels (X Y Z) at 1 mm, each at least 40 40 32; default keeps the demo "
             "quick.", callback=_phantom_shape)] = None,
) -> None:
    """Write the embedded phantom dataset (BraTS 2023 layout)."""
    from pipeline.sources.phantom import write_phantom

    kwargs = {} if shape is None else {"shape": tuple(shape)}
    try:
        folders = write_phantom(out_dir, cases=cases, seed=seed, **kwargs)
    except (XraiError, OSError, ValueError) as err:
        _fail(str(err))
    console.print(f"wrote {len(folders)} phantom cases to {out_dir}")


StoreArg = Annotated[str, typer.Option(help="Zarr store path or fsspec URL.",
                                       callback=check_store)]
DatasetArg = Annotated[str, typer.Option(help="Dataset (group) name in the store.",
                                         callback=check_dataset_name)]
StorageOptionArg = Annotated[list[str] | None, typer.Option(
    "--storage-option", metavar="KEY=VALUE",
    help="fsspec option for a remote store, KEY=VALUE (repeatable), e.g. "
    "endpoint_url=http://127.0.0.1:9000 or anon=true; credentials may also come from the "
    "usual environment variables.")]


def parse_storage_options(pairs: list[str] | None) -> dict:
    """``["endpoint_url=http://h:9000", "anon=true"]`` to a dict (JSON values where they parse)."""
    import json

    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}",
                                     param_hint="--storage-option")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err_console,
                    transient=False, disable=not err_console.is_terminal and "XRAI_PROGRESS" not in os.environ)


def run_ingest(source_dir: Path, store: str, dataset: str, *, layout: str, grid: Grid,
               workers: int, recompute: bool, discover_options: dict | None = None,
               storage_options: dict | None = None, wait: float = 0.0):
    """Ingest with a progress bar and print the summary; returns the report."""
    from pipeline.ingest import ingest
    from pipeline.malloc import INGEST_THRESHOLD, tune_this_process

    tune_this_process(INGEST_THRESHOLD)  # this process (or its workers) standardizes case after case

    with _progress() as bar:
        task = bar.add_task("ingest", total=None, last="")

        def discovered(n: int) -> None:
            bar.update(task, total=n)

        def advance(outcome) -> None:
            bar.update(task, advance=1, last=f"{outcome.case_id}: {outcome.status}")

        report = ingest(source_dir, store, dataset, layout=layout, grid=grid, workers=workers,
                        recompute=recompute, discover_options=discover_options or {},
                        storage_options=storage_options or None, progress=advance,
                        on_discovered=discovered, wait=wait)
    print_ingest_report(report)
    return report


def print_ingest_report(report) -> None:
    counts = {s: len(report.by_status(s)) for s in ("ingested", "unchanged", "quarantined")}
    console.print(
        f"dataset [bold]{report.dataset}[/] in {report.store}: "
        f"{counts['ingested']} ingested, {counts['unchanged']} unchanged, "
        f"{counts['quarantined']} quarantined", highlight=False)
    bad = report.by_status("quarantined")
    if bad:
        table = Table(title="quarantined", show_lines=False)
        table.add_column("case")
        table.add_column("file")
        table.add_column("reason", overflow="fold")
        for o in bad:
            table.add_row(o.case_id, o.path or "", o.reason)
        console.print(table)


def _grid_spacing(value: tuple[float, float, float]) -> tuple[float, float, float]:
    """``--spacing`` checked by `Grid` (with the default shape): a usage error naming it."""
    try:
        Grid(spacing=value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    return value


def _grid_shape(value: tuple[int, int, int]) -> tuple[int, int, int]:
    """``--shape`` checked by `Grid` (with the default spacing): a usage error naming it."""
    try:
        Grid(shape=value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    return value


@app.command()
def ingest(
    source_dir: Annotated[Path, typer.Argument(
        exists=True, file_okay=False, help="Folder in a collection's layout.")],
    store: StoreArg,
    dataset: DatasetArg,
    layout: Annotated[Literal["auto", "brats", "upenn", "ucsf", "dicom"], typer.Option(
        help="The collection's layout; auto detects it.")] = "auto",
    spacing: Annotated[tuple[float, float, float], typer.Option(
        help="Target spacing X Y Z (mm), each in [0.05, 20].", show_default="1 1 1",
        callback=_grid_spacing)] = (1.0, 1.0, 1.0),
    shape: Annotated[tuple[int, int, int], typer.Option(
        help="Target shape X Y Z (voxels), each in [1, 2048].", show_default="240 240 155",
        callback=_grid_shape)] = (240, 240, 155),
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    recompute: Annotated[bool, typer.Option(help="Re-ingest unchanged cases too.")] = False,
    use_automated: Annotated[bool, typer.Option(
        help="UPENN-GBM: use automated masks where no manual one exists (flagged).")] = False,
    tumour_segment: Annotated[list[str] | None, typer.Option(
        metavar="TEXT",
        help="DICOM SEG / ReMIND: segment description(s) that mean tumour (repeatable).")] = None,
    partial_annotation: Annotated[bool, typer.Option(
        help="Only some slices are annotated (LGG-1p19qDeletion): record which.")] = False,
    storage_option: StorageOptionArg = None,
    wait: Annotated[float, typer.Option(
        min=0, help="Seconds to wait while another process writes the dataset; 0 refuses "
                    "at once.")] = 0.0,
) -> None:
    """Standardize a collection into the Zarr store.

    Exit codes: 0 all cases ingested or unchanged; 3 some quarantined, the rest
    committed; 1 nothing usable or a fatal error; 2 usage error.
    """
    try:
        grid = Grid(spacing=spacing, shape=shape)
        options: dict = {"use_automated": use_automated, "partial_annotation": partial_annotation}
        if tumour_segment:
            options["tumour_segments"] = tuple(tumour_segment)
        report = run_ingest(source_dir, store, dataset, layout=layout, grid=grid,
                            workers=workers, recompute=recompute, discover_options=options,
                            storage_options=parse_storage_options(storage_option), wait=wait)
    except (XraiError, OSError, ValueError) as err:
        _fail(str(err))
    raise typer.Exit(report.exit_code)


def print_dataset_summary(store: str, dataset: str) -> None:
    """Cases, grid, channels and per-case label volumes of a stored dataset."""
    from pipeline.store import DatasetStore

    ds = DatasetStore.open(store, dataset)
    records = ds.committed()
    grid = ds.grid
    console.print(
        f"[bold]{dataset}[/]: {len(records)} cases, grid {grid.shape[0]}×{grid.shape[1]}×"
        f"{grid.shape[2]} at {'×'.join(f'{s:g}' for s in grid.spacing)} mm (LPS), channels "
        f"{', '.join(ds.channels)}; {len(ds.quarantined())} quarantined", highlight=False)
    table = Table(title=f"{dataset}: cases")
    for col in ("case", "source orientation", "source spacing (mm)", "tumour (mL)", "flags"):
        table.add_column(col)
    import numpy as np

    for cid, rec in records.items():
        label = ds.read_label(cid, record=rec)
        tumour_ml = float(np.count_nonzero(label)) * grid.voxel_ml
        vol = next(iter(rec.attrs.get("volumes", {}).values()), {})
        table.add_row(cid, vol.get("orientation", "?"),
                      "×".join(f"{s:g}" for s in vol.get("spacing", [])),
                      f"{tumour_ml:.2f}", ", ".join(rec.attrs.get("flags", [])))
    console.print(table)


def _fmt(v: float) -> str:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    a = abs(v)
    return f"{v:.3g}" if (a >= 1e4 or (0 < a < 1e-2)) else f"{v:.3f}".rstrip("0").rstrip(".")


def print_stats_summary(stats) -> None:
    """The statistics as two tables: intensities per channel and region, label distributions."""
    table = Table(title=f"{stats.dataset}: intensity over {stats.n_cases} cases "
                        "(skewness g1, excess kurtosis g2)")
    for col in ("channel", "region", "voxels", "mean", "std", "skew", "kurt", "p0.5", "p50",
                "p99.5"):
        table.add_column(col, justify="right" if col not in ("channel", "region") else "left")
    for ch, regions in stats.intensity.items():
        for region in ("brain", "tumour", "background"):
            d = regions[region]
            m = d.moments
            table.add_row(ch, region, str(m.n), _fmt(m.mean), _fmt(m.std), _fmt(m.skewness),
                          _fmt(m.kurtosis), _fmt(d.percentiles["0.5"]), _fmt(d.percentiles["50"]),
                          _fmt(d.percentiles["99.5"]))
    console.print(table)
    table = Table(title=f"{stats.dataset}: label statistics across cases / slices")
    for col in ("statistic", "n", "mean", "std", "skew", "kurt", "p5", "median", "p95"):
        table.add_column(col, justify="left" if col == "statistic" else "right")
    for name, d in stats.labels.items():
        m = d.moments
        table.add_row(f"{name} ({d.unit})", str(m.n), _fmt(m.mean), _fmt(m.std), _fmt(m.skewness),
                      _fmt(m.kurtosis), _fmt(d.percentiles["5"]), _fmt(d.percentiles["50"]),
                      _fmt(d.percentiles["95"]))
    console.print(table)
    freq = ", ".join(f"{k} {v:.2%}" for k, v in stats.class_frequencies.items())
    console.print(f"class frequencies over annotated brain voxels: {freq}", highlight=False)


def run_stats_cli(store: str, dataset: str, *, out: Path | None, scheduler: str | None,
                  recompute: bool, storage_options: dict | None = None, wait: float = 0.0):
    """Compute statistics with a progress bar, write them, print the summary."""
    from pipeline.malloc import tune_this_process
    from pipeline.stats_runner import run_stats, write_stats

    tune_this_process()  # this process reads case after case (see pipeline.malloc)

    with _progress() as bar:
        task = bar.add_task("stats", total=None, last="")

        def start(todo: int, reused: int) -> None:
            bar.update(task, total=todo, last=f"{reused} cases reused from the store")

        def done(case_id: str) -> None:
            bar.update(task, advance=1, last=case_id)

        stats = run_stats(store, dataset, scheduler=scheduler, recompute=recompute,
                          storage_options=storage_options or None, on_start=start,
                          on_done=done, wait=wait)
    if out is not None:
        write_stats(stats, str(out))
        console.print(f"statistics written to {out}")
    print_stats_summary(stats)
    return stats


@app.command("stats")
def stats_command(
    store: StoreArg,
    dataset: DatasetArg,
    out: Annotated[Path, typer.Option(
        dir_okay=False, help="Where to write the statistics JSON.")] = Path("stats.json"),
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address (tcp://…); 'local' starts a local cluster; "
             "'synchronous' runs in this process; default: in this process for a small "
             "job or on up to 2 cores, a local cluster beyond about 1 Gvox.")] = None,
    recompute: Annotated[bool, typer.Option(help="Ignore persisted per-case statistics.")] = False,
    storage_option: StorageOptionArg = None,
    wait: Annotated[float, typer.Option(
        min=0, help="Seconds to wait while another process writes the dataset; 0 refuses "
                    "at once.")] = 0.0,
) -> None:
    """Single-pass intensity and label statistics of a dataset (Dask)."""
    try:
        run_stats_cli(store, dataset, out=out, scheduler=scheduler, recompute=recompute,
                      storage_options=parse_storage_options(storage_option), wait=wait)
    except (XraiError, OSError) as err:
        _fail(str(err))


@app.command()
def verify(
    store: StoreArg,
    dataset: DatasetArg,
    storage_option: StorageOptionArg = None,
) -> None:
    """Check every committed case: each chunk present, decodable, equal to its checksum.

    Exit codes: 0 every case intact; 1 damaged cases (listed) or an unreadable store;
    2 usage error. Repair: re-run `xrai ingest` on the source (cases with missing chunks
    are re-ingested) or `xrai ingest --recompute` (every case).
    """
    from pipeline.store import DatasetStore
    from pipeline.verify import verify_dataset

    try:
        ds = DatasetStore.open(store, dataset,
                               storage_options=parse_storage_options(storage_option))
        with _progress() as bar:
            task = bar.add_task("verify", total=len(ds.committed()), last="")

            def advance(case_id: str, problem: str | None) -> None:
                bar.update(task, advance=1, last=f"{case_id}: {'DAMAGED' if problem else 'ok'}")

            report = verify_dataset(ds, progress=advance)
    except (XraiError, OSError) as err:
        _fail(str(err))
    console.print(
        f"dataset [bold]{dataset}[/] in {store}: {len(report.intact)} intact, "
        f"{len(report.damaged)} damaged, {len(report.unreadable_records)} unreadable "
        f"records, {len(report.unchecked)} without checksums", highlight=False)
    if report.unchecked:
        console.print("cases committed before checksums were recorded decode but cannot be "
                      "compared; `xrai ingest --recompute` records their checksums",
                      highlight=False)
    if not report.ok:
        table = Table(title="damaged")
        table.add_column("case")
        table.add_column("problem", overflow="fold")
        for cid, problem in report.damaged.items():
            table.add_row(cid, problem)
        for key, problem in report.unreadable_records.items():
            table.add_row(key, f"case record cannot be read ({problem})")
        console.print(table)
        console.print("repair: re-run `xrai ingest` on the source (`--recompute` re-ingests "
                      "cases whose chunks are present but changed)", highlight=False)
        raise typer.Exit(1)


manifest_app = typer.Typer(help="Write or check a loss-configuration manifest.",
                           invoke_without_command=True, no_args_is_help=False)
app.add_typer(manifest_app, name="manifest")


def print_decisions(manifest) -> None:
    """The manifest's decisions: each rule, the measured value, what it decided."""
    from stats.manifest import decisions_table

    table = Table(title=f"{manifest.dataset.name}: decisions of the manifest")
    table.add_column("rule")
    table.add_column("measured")
    table.add_column("decision", overflow="fold")
    for row in decisions_table(manifest):
        table.add_row(*row)
    console.print(table)
    spec = manifest.loss_spec()
    terms = " + ".join(f"{t['weight']:g}·{t['name']}" for t in spec["terms"])
    console.print(f"loss: {terms}, weighting {spec['weighting']['method']}", highlight=False)


@manifest_app.callback()
def manifest_command(
    ctx: typer.Context,
    stats: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Statistics JSON from `xrai stats`.")] = None,
    out: Annotated[Path, typer.Option(
        dir_okay=False, help="Where to write the manifest.")] = Path("manifest.json"),
    seed: Annotated[int, typer.Option(help="Seed recorded for the trainer.")] = 0,
) -> None:
    """Build the manifest from statistics: `xrai manifest --stats stats.json --out manifest.json`."""
    if ctx.invoked_subcommand is not None:
        return
    if stats is None:
        _fail("give --stats STATS.json (or the subcommand `validate FILE`)", code=2)
    from pipeline.manifest_io import manifest_command as build

    try:
        manifest = build(stats, out, seed)
    except (XraiError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"manifest written to {out}")
    print_decisions(manifest)


@manifest_app.command("validate")
def manifest_validate(file: Annotated[Path, typer.Argument(help="Manifest JSON to check.")]) -> None:
    """Check a manifest; on failure name the field and the offending value."""
    from pipeline.manifest_io import validate_command

    try:
        manifest = validate_command(file)
    except (XraiError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"{file}: valid manifest (schema {manifest.schema_version}) for dataset "
                  f"{manifest.dataset.name!r}", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(
        file_okay=False, help="Working folder for the demo.")] = Path("runs/demo"),
    cases: Annotated[int, typer.Option(min=2, help="Phantom cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Ingest worker processes.")] = 2,
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler for the statistics (see `xrai stats --help`; default chosen "
             "by the job's size).")] = None,
    epochs: Annotated[int, typer.Option(min=0, help="Training epochs per fold; 0 skips training.")] = 4,
    device: Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda "
                                              "or cuda:N.", callback=check_device)] = "auto",
) -> None:
    """The main job on the embedded phantom: write, ingest, measure, decide, train."""
    from pipeline.sources.phantom import write_phantom

    source = out / "phantom"
    store = str(out / "store.zarr")
    console.rule("[bold]1. phantom dataset")
    write_phantom(source, cases=cases, seed=seed)
    console.print(f"{cases} cases in BraTS 2023 layout under {source}")
    console.rule("[bold]2. ingest into the Zarr store")
    grid = Grid(spacing=(1.0, 1.0, 1.0), shape=(96, 96, 64))
    report = run_ingest(source, store, "phantom", layout="brats", grid=grid, workers=workers,
                        recompute=False)
    if report.exit_code == 1:
        _fail("no phantom case could be ingested")
    console.rule("[bold]3. dataset summary")
    print_dataset_summary(store, "phantom")
    console.rule("[bold]4. statistics (Dask)")
    run_stats_cli(store, "phantom", out=out / "stats.json", scheduler=scheduler, recompute=False)
    console.rule("[bold]5. manifest: transforms and the loss, decided from the data")
    from pipeline.manifest_io import manifest_command as build

    manifest = build(out / "stats.json", out / "manifest.json", seed)
    console.print(f"manifest written to {out / 'manifest.json'}")
    print_decisions(manifest)
    if epochs == 0:
        return
    console.rule("[bold]6. train: the manifest's loss against three baselines (k-fold, CPU)")
    _train(manifest=out / "manifest.json", store=store, dataset="phantom", out=out / "train",
           losses="manifest,bce,dice,focal", folds=2, epochs=epochs, batches_per_epoch=10,
           val_every=epochs, workers=1, device=device, seed=seed)


def _evidence_scale(value: str) -> str:
    from pipeline.evidence.study import SCALES, get_scale

    try:
        get_scale(value)
    except ValueError as err:
        raise typer.BadParameter(f"unknown scale {value!r}; known: "
                                 f"{', '.join(sorted(SCALES))}") from err
    return value


@app.command()
def evidence(
    out: Annotated[Path, typer.Option(
        file_okay=False, help="Working folder (data, stores, runs); a re-run resumes "
                              "there.")] = Path("runs/evidence"),
    scale: Annotated[str, typer.Option(help="smoke (a minute, machinery only), default "
                                            "(2D on the CPU, within an hour) or full (3D, "
                                            "GPU).", callback=_evidence_scale)] = "default",
    report: Annotated[Path, typer.Option(help="Markdown report to write; its plots go "
                                              "to a folder of the same name.")]
    = Path("docs/evidence.md"),
    families: Annotated[str | None, typer.Option(help="Comma-separated families (default: "
                                                     "the scale's).")] = None,
) -> None:
    """The controlled study behind the manifest: phantom families, decisions, paired k-fold."""
    from pipeline.evidence.study import get_scale, run_study

    try:
        sc = get_scale(scale)
    except ValueError as err:
        _fail(str(err), 2)
    names = [f.strip() for f in families.split(",") if f.strip()] if families else None
    console.print(f"evidence study, scale {sc.name}: {sc.description}", highlight=False)
    start = time.perf_counter()

    def line(text: str) -> None:
        console.print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}",
                      highlight=False)

    try:
        result = run_study(out, sc, report=report, families=names, progress=line)
    except ValueError as err:
        _fail(str(err), 2)
    console.print(f"report written to {report} ({result.seconds / 60:.1f} min)")


from pipeline.download.cli import download as _download  # noqa: E402
from pipeline.train.cli import train as _train  # noqa: E402

app.command("download")(_download)
app.command("train")(_train)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
