"""``python -m flows``: run the pipeline flow, reprocess a configured dataset, serve schedules.

``make pipeline``, ``make serve`` and ``make e2e`` call these. Without a running server
(``PREFECT_API_URL`` unset) Prefect starts a temporary one for the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

app = typer.Typer(help="XRAI Prefect flows.", no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def pipeline(
    dataset: Annotated[str, typer.Option(help="Dataset (group) name in the store.")],
    source: Annotated[str, typer.Option(
        help="phantom, a local folder, nbia:COLLECTION, idc:COLLECTION or http:FILE_LIST.")
    ] = "phantom",
    store: Annotated[str | None, typer.Option(
        help="Zarr store path or fsspec URL (default OUT/store.zarr).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default runs/DATASET).")] = None,
    layout: Annotated[str, typer.Option(help="Layout of a local folder (default: detect).")
    ] = "auto",
    cases: Annotated[int, typer.Option(min=1, help="Phantom cases.")] = 8,
    shape: Annotated[tuple[int, int, int], typer.Option(help="Phantom field of view (mm).")
    ] = (96, 96, 64),
    dask_address: Annotated[str | None, typer.Option(
        help="Existing Dask scheduler (tcp://host:8786); default a local cluster.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local Dask workers.")] = 2,
    train: Annotated[bool, typer.Option(
        help="Train after the manifest (a short run: the training artifacts, not "
             "conclusions; the train-DATASET deployment trains longer).")] = True,
    losses: Annotated[str, typer.Option(
        help="Comma-separated losses to train ('manifest' or registry names).")
    ] = "manifest,dice,bce",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per fold when training.")] = 1,
    folds: Annotated[int, typer.Option(min=2, help="Folds when training.")] = 2,
    recompute: Annotated[bool, typer.Option(help="Redo unchanged cases too.")] = False,
) -> None:
    """Source → ingest → stats → manifest (→ train) for one dataset."""
    from flows.config import (
        DaskOptions,
        DatasetConfig,
        LocalSource,
        parse_source,
        quick_train_options,
    )
    from flows.pipeline_flow import pipeline_flow

    out_dir = out or Path("runs") / dataset
    src = parse_source(source, work_dir=str(out_dir), cases=cases, shape=shape)
    if isinstance(src, LocalSource) and layout != "auto":
        src = src.model_copy(update={"layout": layout})
    config = DatasetConfig(
        name=dataset, source=src, store=store or str(out_dir / "store.zarr"),
        out_dir=str(out_dir), dask=DaskOptions(address=dask_address, workers=workers),
        train=quick_train_options(losses=tuple(losses.split(",")), epochs=epochs,
                                  folds=folds) if train else None)
    result = pipeline_flow(config, recompute=recompute)
    typer.echo(f"{dataset}: {len(result.ingest.ingested)} ingested, "
               f"{len(result.ingest.unchanged)} unchanged, "
               f"{len(result.ingest.quarantined)} quarantined; manifest {result.manifest.path}; "
               f"loss {result.manifest.loss}")
    if result.train is not None:
        typer.echo(f"{dataset}: trained {', '.join(e['loss'] for e in result.train.summary)} "
                   f"in {result.train.out_dir}; artifacts "
                   f"{', '.join(result.train.artifacts.values())}")


@app.command()
def reprocess(
    dataset: Annotated[str, typer.Argument(help="A dataset of the configuration file.")],
    config: Annotated[Path, typer.Option(help="Installation configuration (YAML).")
    ] = Path("xrai-deployments.yaml"),
) -> None:
    """Reprocess one configured dataset now (what its schedule runs)."""
    from flows.config import ConfigError, load_config
    from flows.reprocess_flow import reprocess_flow

    try:
        ds = load_config(config).dataset(dataset)
    except (FileNotFoundError, ConfigError) as err:
        _fail(f"{err} (start from flows/xrai-deployments.example.yaml)")
    result = reprocess_flow(ds)
    typer.echo(f"{dataset}: {len(result.changed)} new or changed cases; decisions changed: "
               f"{result.decision_changes}; retrained: {result.retrained}")


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="Installation configuration (YAML).")
    ] = Path("xrai-deployments.yaml"),
) -> None:
    """Serve the scheduled reprocess deployments of CONFIG against the Prefect server."""
    from flows.config import ConfigError, load_config
    from flows.deployments import build_deployments

    try:
        deployments = build_deployments(load_config(config))
    except (FileNotFoundError, ConfigError) as err:
        _fail(f"{err} (start from flows/xrai-deployments.example.yaml)")
    from prefect import serve as prefect_serve

    prefect_serve(*deployments)


@app.command("server-url")
def server_url(
    port: Annotated[int, typer.Option(help="Port of a Prefect server on 127.0.0.1.")] = 4200,
) -> None:
    """Print the server's API URL if it answers on 127.0.0.1:PORT, else nothing.

    ``make pipeline`` uses it to run against ``make server`` when one is up, and with a
    temporary server otherwise.
    """
    from flows.e2e import http

    url = f"http://127.0.0.1:{port}/api"
    try:
        healthy = http("GET", f"{url}/health", timeout=2)[0] == 200
    except OSError:
        healthy = False
    if healthy:
        typer.echo(url)


if __name__ == "__main__":
    app()
