"""The installation's configuration file: datasets, their sources, stores and schedules.

One YAML file per installation (example: ``flows/xrai-deployments.example.yaml``)::

    schema_version: 1
    datasets:
      - name: phantom                       # dataset (Zarr group) name
        source: {kind: phantom, path: runs/scheduled/phantom-src, cases: 4, shape: [48, 48, 32]}
        store: runs/scheduled/store.zarr    # local path or fsspec URL (s3://...)
        out_dir: runs/scheduled/phantom     # stats.json, manifest.json, train/
        grid: {spacing: [1, 1, 1], shape: [48, 48, 32]}   # default: the phantom's, else BraTS
        dask: {address: null, workers: 2}   # null: a local cluster; else tcp://host:8786
        train: null                         # or {losses: [manifest, dice], folds: 2, ...}
                                            # (the options of `xrai train`)
        schedule: {interval_seconds: 3600}  # or {cron: "0 3 * * *", timezone: UTC}

Sources (``kind``): ``phantom`` (the embedded synthetic dataset, written once into
``path``), ``local`` (a folder in one of the collections' layouts) and ``download``
(``service`` nbia, idc or http; downloaded into ``dest``, then ingested from there).

Relative local paths are resolved against the working directory when the file is
loaded (``make serve`` runs from the repository root), so a scheduled run does not
depend on the directory its worker process starts in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import XraiError
from pipeline.store import Grid
from pipeline.train.options import TrainOptions as PipelineTrainOptions

CONFIG_SCHEMA_VERSION = 1
#: Phantom field of view the flows use by default (the `make demo` grid).
DEFAULT_GRID_SHAPE: tuple[int, int, int] = (96, 96, 64)


class ConfigError(XraiError):
    """The configuration file is missing, not YAML, or does not validate; the message names
    the file, the field path and the offending value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(path: str) -> str:
    """A local path made absolute against the working directory; URLs are kept."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


class GridOptions(_Frozen):
    """The dataset grid (`pipeline.store.Grid`): spacing (x, y, z) mm, shape (x, y, z);
    the default is the BraTS grid (240 x 240 x 155 at 1 mm)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] = (240, 240, 155)

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not s > 0 for s in v):
            raise ValueError(f"spacing must be three positive mm values, got {v!r}")
        return v

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 1 for s in v):
            raise ValueError(f"shape must be three positive voxel counts, got {v!r}")
        return v

    def to_grid(self) -> Grid:
        return Grid(spacing=self.spacing, shape=self.shape)


class DaskOptions(_Frozen):
    """Where per-case work runs: an existing scheduler, or a local cluster of `workers`.

    ``processes=False`` runs the local cluster's workers as threads of the flow's process
    (tests; no extra Prefect client per worker). With ``address`` set the other fields
    are ignored.
    """

    address: str | None = None
    workers: int = Field(default=2, ge=1)
    processes: bool = True


class PhantomSource(_Frozen):
    """The embedded phantom (`pipeline.sources.phantom.write_phantom`), written to `path`."""

    kind: Literal["phantom"] = "phantom"
    path: str
    cases: int = Field(default=8, ge=1)
    seed: int = Field(default=0, ge=0)
    shape: tuple[int, int, int] = DEFAULT_GRID_SHAPE

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _absolute(v)


class LocalSource(_Frozen):
    """A local folder in one of the collections' layouts (`pipeline.sources.local`)."""

    kind: Literal["local"] = "local"
    path: str
    layout: Literal["auto", "brats", "upenn", "ucsf", "dicom"] = "auto"

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _absolute(v)


class DownloadSource(_Frozen):
    """A TCIA collection downloaded into `dest` (`pipeline.download`), then read from there.

    ``service``: ``nbia`` (TCIA REST API), ``idc`` (Imaging Data Commons buckets) or
    ``http`` (a checksummed `file_list`). ``layout`` is the one `dest` is read with
    (``dicom`` for nbia and idc).
    """

    kind: Literal["download"] = "download"
    service: Literal["nbia", "idc", "http"]
    collection: str = Field(min_length=1)
    dest: str
    file_list: str | None = None
    base_url: str | None = None
    s3_endpoint: str | None = None
    patients: list[str] | None = None
    modality: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)
    layout: Literal["auto", "brats", "upenn", "ucsf", "dicom"] = "auto"

    @field_validator("dest")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _absolute(v)

    @model_validator(mode="after")
    def _file_list_for_http(self) -> DownloadSource:
        if self.service == "http" and not self.file_list:
            raise ValueError("service 'http' needs file_list (a CSV or sha256sum list)")
        if self.service != "http" and self.file_list:
            raise ValueError(f"file_list applies to service 'http', not {self.service!r}")
        return self


Source = Annotated[PhantomSource | LocalSource | DownloadSource, Field(discriminator="kind")]


class TrainOptions(PipelineTrainOptions):
    """The k-fold benchmark: every option of ``xrai train`` (`pipeline.train.options`),
    which `pipeline.train.options.run_training` turns into the trainer's configuration.

    The flow adds only its default for ``workers``: 0, data loading in the task's own
    process (a Prefect or Dask worker does not fork loader processes by default).
    """

    workers: int = Field(default=0, ge=0)


def quick_train_options(**changes: Any) -> TrainOptions:
    """The short training of ``make pipeline`` and of the ``train-<dataset>`` deployment
    when the dataset has no ``train:`` block: the manifest's loss against Dice and BCE,
    2 folds × 1 epoch of 5 batches of 4 slices at learning rate 0.01, an 8-feature U-Net
    on the CPU; about half a minute on two cores for the 8-case phantom. Enough for
    every training artifact, not for conclusions (the paired table says so); `changes`
    override fields.
    """
    base = {"losses": ("manifest", "dice", "bce"), "folds": 2, "epochs": 1,
            "batch_size": 4, "batches_per_epoch": 5, "lr": 0.01, "val_every": 1,
            "features": 8, "device": "cpu"}
    return TrainOptions(**{**base, **changes})


class ScheduleConfig(_Frozen):
    """When the dataset is reprocessed: every `interval_seconds`, or on a `cron` line."""

    interval_seconds: float | None = Field(default=None, gt=0)
    cron: str | None = None
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleConfig:
        if (self.interval_seconds is None) == (self.cron is None):
            raise ValueError("give exactly one of interval_seconds and cron, got "
                             f"interval_seconds={self.interval_seconds!r}, cron={self.cron!r}")
        return self


class DatasetConfig(_Frozen):
    """One dataset of the installation: where it comes from, where it goes, when."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: Source
    store: str
    out_dir: str
    grid: GridOptions | None = None
    dask: DaskOptions = Field(default_factory=DaskOptions)
    train: TrainOptions | None = None
    seed: int = Field(default=0, ge=0)
    schedule: ScheduleConfig | None = None

    @field_validator("store", "out_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _absolute(v)

    def grid_options(self) -> GridOptions:
        """`grid`, else the phantom's own field of view at 1 mm, else the BraTS grid."""
        if self.grid is not None:
            return self.grid
        if isinstance(self.source, PhantomSource):
            return GridOptions(shape=self.source.shape)
        return GridOptions()


class InstallationConfig(_Frozen):
    """The whole file: its schema version and the datasets."""

    schema_version: Literal[1] = CONFIG_SCHEMA_VERSION
    datasets: list[DatasetConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> InstallationConfig:
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"dataset names must be unique, {dup!r} occur more than once")
        return self

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset called `name` (`ConfigError` listing the known ones otherwise)."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"no dataset {name!r} in the configuration; known: "
                          f"{[d.name for d in self.datasets]!r}")


def _describe(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more errors)" if len(err.errors()) > 1 else ""
    return f"{where}: field {field}: {first['msg']} (got {first.get('input')!r}){more}"


def parse_config(data: Any, *, where: str = "configuration") -> InstallationConfig:
    """Validate an already parsed configuration (a mapping); `where` names it in errors.

    Raises
    ------
    ConfigError
        Naming `where`, the field path and the offending value.
    """
    try:
        return InstallationConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, where)) from err


def load_config(path: str | os.PathLike[str]) -> InstallationConfig:
    """Read and validate an installation configuration file (YAML).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ConfigError
        Not YAML, or invalid: the message names the file, the field and the value.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"configuration file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from err
    return parse_config(data, where=str(p))


def parse_source(text: str, *, work_dir: str, cases: int = 8, seed: int = 0,
                 shape: tuple[int, int, int] = DEFAULT_GRID_SHAPE
                 ) -> PhantomSource | LocalSource | DownloadSource:
    """A source from the short form `make pipeline SOURCE=...` takes.

    ``phantom`` (written to ``work_dir/phantom``), a local folder, or
    ``nbia:<collection>``, ``idc:<collection>`` or ``http:<file list>`` (downloaded to
    ``work_dir/download``).

    Raises
    ------
    ValueError
        The text is empty, or names a local folder that does not exist.
    """
    text = text.strip()
    if not text:
        raise ValueError("SOURCE is empty; give phantom, a folder, nbia:NAME, idc:NAME or "
                         "http:FILE_LIST")
    if text == "phantom":
        return PhantomSource(path=str(Path(work_dir) / "phantom"), cases=cases, seed=seed,
                             shape=shape)
    service, sep, rest = text.partition(":")
    if sep and service in ("nbia", "idc", "http") and rest:
        dest = str(Path(work_dir) / "download")
        if service == "http":
            return DownloadSource(service="http", collection=Path(rest).stem or "files",
                                  file_list=rest, dest=dest)
        return DownloadSource(service=service, collection=rest, dest=dest,  # type: ignore[arg-type]
                              layout="dicom")
    if not Path(text).is_dir():
        raise ValueError(f"SOURCE {text!r} is neither 'phantom', an existing folder, nor "
                         "nbia:NAME / idc:NAME / http:FILE_LIST")
    return LocalSource(path=text)
