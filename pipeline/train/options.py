"""The options of a training run, and the one translation of them into the trainer's.

`xrai train` (``pipeline.train.cli``) and a flow's ``train:`` block (``flows.config``)
both hold a `TrainOptions`; both hand it to `run_training`, which builds the trainer's
`TrainConfig` with `train_config` and calls `run_benchmark`. An option therefore means
the same on the command line and in a scheduled retrain, and a test
(``tests/flows/test_train_options.py``) keeps the two option lists equal.

Nothing here imports torch at import time (the flows' configuration imports this
module); the trainer and the loss registry are imported where they are used.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from pipeline.train.benchmark import BenchmarkResult
    from pipeline.train.loop import TrainConfig
    from pipeline.train.normalize import NormalizationPlan

__all__ = [
    "AFFINE_PROB",
    "DEFAULT_LOSSES",
    "DEFAULT_PATCH_SIZE",
    "DEVICE_PATTERN",
    "TrainOptions",
    "check_loss_names",
    "known_loss_names",
    "run_training",
    "train_config",
]

#: Losses trained when none are named: the manifest's against three usual ones.
DEFAULT_LOSSES: tuple[str, ...] = ("manifest", "bce", "dice", "focal")
#: 3D patch (Z, Y, X) when ``patch_size`` is not given.
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (64, 64, 64)
#: Probability of the affine augmentation when ``affine`` is on.
AFFINE_PROB = 0.3
#: Device names `TrainOptions.device` accepts (whether CUDA is present is checked where
#: the run starts, `pipeline.train.loop.select_device`).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def known_loss_names() -> list[str]:
    """``"manifest"`` and every name of the loss registry, sorted.

    Read from the manifest schema's enumeration (`stats.rules.LOSS_NAMES`, which a test
    keeps equal to the registry), so that ``xrai --help`` does not import torch.
    """
    from stats.rules import LOSS_NAMES

    return sorted({"manifest", *LOSS_NAMES})


def check_loss_names(names: Iterable[str]) -> tuple[str, ...]:
    """The loss names, stripped, checked against the registry.

    Raises
    ------
    ValueError
        No name, a repeated name, or an unknown one (with the closest known name and
        the list of known names, written for people).
    """
    out = tuple(n.strip() for n in names if n.strip())
    if not out:
        raise ValueError("no loss named; e.g. manifest,bce,dice,focal")
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise ValueError(f"loss names repeat: {', '.join(repeated)}")
    known = known_loss_names()
    for name in out:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown loss {name!r}.{hint} Known losses: {', '.join(known)}")
    return out


class TrainOptions(BaseModel):
    """Every option of a k-fold training run (``xrai train``; a flow's ``train:``).

    Parameters
    ----------
    losses : tuple of str, default ("manifest", "bce", "dice", "focal")
        Registry names; ``"manifest"`` is the manifest's compound loss.
    folds : int, default 3
        k of the k-fold split by case.
    epochs : int, default 10
        Epochs per fold.
    dim : {"2d", "3d"}, default "2d"
        Axial slices or 3D patches.
    patch_size : (int, int, int) or None, default None
        3D patch (Z, Y, X); None gives `DEFAULT_PATCH_SIZE`. Ignored in 2D.
    fg_fraction : float in [0, 1], default 1/3
        Fraction of samples centred on tumour.
    affine : bool, default False
        Affine augmentation with probability `AFFINE_PROB`.
    target : {"wt", "multiclass"}, default "wt"
        Whole tumour (one sigmoid channel) or the three tumour classes.
    batch_size, batches_per_epoch : int, default 8, 25
    lr : float > 0, default 1e-3
        Initial AdamW learning rate (PolyLR, p = 0.9).
    val_every : int, default 5
        Validate every `val_every` epochs (and after the last).
    features, levels : int, default 16, 3
        U-Net features at level 1 and resolution levels (DynUNet needs 3 or more).
    workers : int, default 2
        Data-loader worker processes (0: load in the training process).
    device : str, default "auto"
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    amp : {"auto", "bf16", "fp16", "off"}, default "auto"
        Mixed precision on CUDA.
    seed : int >= 0, default 0
        Seed of the split, the sampling and the weights.
    resume : bool, default True
        Continue from the checkpoints in the run directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    losses: tuple[str, ...] = Field(
        default=DEFAULT_LOSSES, min_length=1,
        description="Losses to train and compare: 'manifest' (the manifest's loss, the "
                    "reference A of the paired table) or registry names (bce, dice, focal, "
                    "tversky, dice_ce, ...).")
    folds: int = Field(default=3, ge=2, description="k of the k-fold split by case.")
    epochs: int = Field(default=10, ge=1, description="Epochs per fold.")
    dim: Literal["2d", "3d"] = Field(default="2d",
                                     description="2d (axial slices) or 3d (patches).")
    patch_size: tuple[int, int, int] | None = None
    fg_fraction: float = Field(default=1.0 / 3.0, ge=0.0, le=1.0)
    affine: bool = False
    target: Literal["wt", "multiclass"] = "wt"
    batch_size: int = Field(default=8, ge=1)
    batches_per_epoch: int = Field(default=25, ge=1)
    lr: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    val_every: int = Field(default=5, ge=1)
    features: int = Field(default=16, ge=1)
    levels: int = Field(default=3, ge=3)  # MONAI's DynUNet needs 3 or more
    workers: int = Field(default=2, ge=0)
    device: str = Field(default="auto", pattern=DEVICE_PATTERN,
                        description="auto (CUDA when present), cpu, cuda or cuda:N.")
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    seed: int = Field(default=0, ge=0)
    resume: bool = True

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_loss_names(v)

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(s < 1 for s in v):
            raise ValueError(f"patch_size must be three positive voxel counts, got "
                             f"{' '.join(map(str, v))}")
        return v


def train_config(options: TrainOptions) -> TrainConfig:
    """The trainer's configuration (`pipeline.train.loop.TrainConfig`) for `options`.

    The one place where options become the trainer's protocol: ``xrai train`` and the
    flows' ``benchmark`` task both come here (through `run_training`).
    """
    from pipeline.train.data import SamplingConfig
    from pipeline.train.loop import TrainConfig

    affine_prob = AFFINE_PROB if options.affine else 0.0
    if options.dim == "3d":
        sampling = SamplingConfig(dim="3d", patch_size=options.patch_size or DEFAULT_PATCH_SIZE,
                                  fg_fraction=options.fg_fraction, affine_prob=affine_prob)
    else:
        sampling = SamplingConfig(dim="2d", fg_fraction=options.fg_fraction,
                                  affine_prob=affine_prob)
    return TrainConfig(sampling=sampling, target=options.target, epochs=options.epochs,
                       batch_size=options.batch_size,
                       batches_per_epoch=options.batches_per_epoch, lr=options.lr,
                       val_every=options.val_every, features=options.features,
                       levels=options.levels, workers=options.workers, device=options.device,
                       amp=options.amp, seed=options.seed)


def run_training(options: TrainOptions, *, store_url: str, dataset: str, out_dir: str | Path,
                 plan: NormalizationPlan, manifest_spec: Mapping[str, Any] | None,
                 manifest_path: str | Path | None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> BenchmarkResult:
    """`run_benchmark` of `options.losses` with `train_config(options)`.

    Parameters
    ----------
    options : TrainOptions
    store_url, dataset : str
        The store and dataset (every committed case takes part).
    out_dir : str or Path
        The run directory.
    plan, manifest_spec, manifest_path
        The manifest's normalization plan and loss spec, and its file
        (`pipeline.train.benchmark.load_training_manifest`).
    progress : callable, optional
        Receives the trainer's progress events.
    """
    from pipeline.train.benchmark import run_benchmark

    return run_benchmark(store_url, dataset, list(options.losses), plan=plan,
                         cfg=train_config(options), folds=options.folds, out_dir=Path(out_dir),
                         manifest_spec=manifest_spec, manifest_path=manifest_path,
                         resume=options.resume, progress=progress)
