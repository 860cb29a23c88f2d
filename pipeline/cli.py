"""The ``xrai`` command."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import XraiError
from pipeline.store import DatasetStore, Grid

app = typer.Typer(
    name="xrai",
    help="Brain-tumour MRI statistics, the data-driven loss manifest, and its trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the BraTS-layout dataset into.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; equal seeds give identical files.")] = 0,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        help="Voxels (X Y Z) at 1 mm; default keeps the demo quick.")] = None,
) -> None:
    """Write the embedded phantom dataset (BraTS 2023 layout)."""
    from pipeline.sources.phantom import write_phantom

    kwargs = {} if shape is None else {"shape": tuple(shape)}
    folders = write_phantom(out_dir, cases=cases, seed=seed, **kwargs)
    console.print(f"wrote {len(folders)} phantom cases to {out_dir}")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err_console,
                    transient=False, disable=not err_console.is_terminal and "XRAI_PROGRESS" not in os.environ)


def run_ingest(source_dir: Path, store: str, dataset: str, *, layout: str, grid: Grid,
               workers: int, recompute: bool, discover_options: dict | None = None):
    """Ingest with a progress bar and print the summary; returns the report."""
    from pipeline.ingest import ingest

    with _progress() as bar:
        task = bar.add_task("ingest", total=None, last="")

        def discovered(n: int) -> None:
            bar.update(task, total=n)

        def advance(outcome) -> None:
            bar.update(task, advance=1, last=f"{outcome.case_id}: {outcome.status}")

        report = ingest(source_dir, store, dataset, layout=layout, grid=grid, workers=workers,
                        recompute=recompute, discover_options=discover_options or {},
                        progress=advance,
                        on_discovered=discovered)
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


@app.command()
def ingest(
    source_dir: Annotated[Path, typer.Argument(help="Folder in a collection's layout.")],
    store: Annotated[str, typer.Option(help="Zarr store path or fsspec URL.")],
    dataset: Annotated[str, typer.Option(help="Dataset (group) name in the store.")],
    layout: Annotated[str, typer.Option(help="auto, brats, upenn, ucsf or dicom.")] = "auto",
    spacing: Annotated[tuple[float, float, float], typer.Option(help="Target spacing X Y Z (mm).")] = (1.0, 1.0, 1.0),
    shape: Annotated[tuple[int, int, int], typer.Option(help="Target shape X Y Z (voxels).")] = (240, 240, 155),
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    recompute: Annotated[bool, typer.Option(help="Re-ingest unchanged cases too.")] = False,
    use_automated: Annotated[bool, typer.Option(
        help="UPENN-GBM: use automated masks where no manual one exists (flagged).")] = False,
    tumour_segment: Annotated[list[str] | None, typer.Option(
        help="DICOM SEG / ReMIND: segment description(s) that mean tumour (repeatable).")] = None,
    partial_annotation: Annotated[bool, typer.Option(
        help="Only some slices are annotated (LGG-1p19qDeletion): record which.")] = False,
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
                            workers=workers, recompute=recompute, discover_options=options)
    except (XraiError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    raise typer.Exit(report.exit_code)


def print_dataset_summary(store: str, dataset: str) -> None:
    """Cases, grid, channels and per-case label volumes of a stored dataset."""
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
        label = ds.group["label"][rec.slot]
        tumour_ml = float(np.count_nonzero(label)) * grid.voxel_ml
        vol = next(iter(rec.attrs.get("volumes", {}).values()), {})
        table.add_row(cid, vol.get("orientation", "?"),
                      "×".join(f"{s:g}" for s in vol.get("spacing", [])),
                      f"{tumour_ml:.2f}", ", ".join(rec.attrs.get("flags", [])))
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo.")] = Path("runs/demo"),
    cases: Annotated[int, typer.Option(min=2, help="Phantom cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 0,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """The main job on the embedded phantom: write it, ingest it, summarise it."""
    from pipeline.sources.phantom import write_phantom

    source = out / "phantom"
    store = str(out / "store.zarr")
    console.rule("[bold]1. phantom dataset")
    write_phantom(source, cases=cases, seed=seed)
    console.print(f"{cases} cases in BraTS 2023 layout under {source}")
    console.rule("[bold]2. ingest into the Zarr store")
    grid = Grid(spacing=(1.0, 1.0, 1.0), shape=(128, 128, 96))
    report = run_ingest(source, store, "phantom", layout="brats", grid=grid, workers=workers,
                        recompute=False)
    if report.exit_code == 1:
        _fail("no phantom case could be ingested")
    console.rule("[bold]3. dataset summary")
    print_dataset_summary(store, "phantom")


from pipeline.download.cli import download as _download  # noqa: E402

app.command("download")(_download)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
