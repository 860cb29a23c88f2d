"""The k-fold training loop: splits, device and mixed precision, training, validation,
checkpoints with resume.

Protocol (thesis, Hun 2021, chapter 8): cases are split into k folds by case with a fixed
seed; for each fold a fresh U-Net is trained on the other folds with AdamW and the PolyLR
schedule ``lr_e = lr_0 (1 - e / E)^0.9`` (eq. 8.1, stepped once per epoch), validated every
``val_every`` epochs and after the last epoch on whole validation cases, and the metrics
of the **final** model are reported (not the best validation step, which would be an
optimistic choice on the validation data).

Checkpoints: ``<fold_dir>/last.pt`` after every epoch holds only tensors and plain Python
values (model, optimizer, scheduler, scaler, loss parameters, the weighting state, the
history, the RNG state, the greedily adapted loss parameters), so it loads with
``torch.load(weights_only=True)``. A fold whose ``result.json`` exists is complete and is
not retrained on resume.

A manifest loss with an ``adaptation`` (Seo et al.'s greedy parameter search, thesis 5.1)
has ``pipeline.train.greedy.greedy_search`` run before the training step whenever the
fold's global step ``epoch * batches_per_epoch + step`` (0-based) is a multiple of
``adaptation.every``; the step is then taken with the chosen parameters.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.errors import XraiError
from pipeline.fsio import open_atomic, write_text_atomic
from pipeline.train.data import (
    SamplingConfig,
    Target,
    TrainSamples,
    ValidationCases,
    n_output_channels,
)
from pipeline.train.greedy import greedy_search
from pipeline.train.losses import ManifestLoss, build_loss
from pipeline.train.losses.region import AdaptiveTverskyLoss
from pipeline.train.metrics import segmentation_metrics
from pipeline.train.models import build_unet
from pipeline.train.normalize import NormalizationPlan

Progress = Callable[[Mapping[str, Any]], None]
AmpOption = Literal["auto", "bf16", "fp16", "off"]
CHECKPOINT = "last.pt"
RESULT = "result.json"
OVERLAYS = "overlays.npz"


class TrainingDiverged(XraiError):
    """The training loss became NaN or infinite (the thesis stops such a run)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run of one loss on one fold.

    Parameters
    ----------
    sampling : SamplingConfig
        Slices or patches, tumour oversampling, augmentation; ``sampling.dim`` is the
        network's dimensionality.
    target : {"wt", "multiclass"}, default "wt"
    epochs : int, default 10
    batch_size, batches_per_epoch : int, default 8, 25
    lr : float, default 1e-3
        Initial learning rate (the thesis: 1e-3 / 2e-3).
    weight_decay : float, default 1e-4
        AdamW's decoupled weight decay.
    poly_power : float, default 0.9
        PolyLR exponent p.
    val_every : int, default 5
        Validation every ``val_every`` epochs (and always after the last).
    features, levels : int, default 16, 3
        U-Net width and depth.
    workers : int, default 2
        Data-loader worker processes (0: load in the main process).
    device : str, default "auto"
        "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
    amp : {"auto", "bf16", "fp16", "off"}, default "auto"
        Mixed precision on CUDA: auto picks bf16 where supported, else fp16 with a
        gradient scaler. Ignored (off) on the CPU.
    seed : int, default 0
    val_batch : int, default 16
        Slices (2D) or windows (3D) per forward pass in validation.
    n_overlays : int, default 2
        Validation cases per fold kept for overlay plots.
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    target: Target = "wt"
    epochs: int = 10
    batch_size: int = 8
    batches_per_epoch: int = 25
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    val_every: int = 5
    features: int = 16
    levels: int = 3
    workers: int = 2
    device: str = "auto"
    amp: AmpOption = "auto"
    seed: int = 0
    val_batch: int = 16
    n_overlays: int = 2

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "batches_per_epoch", "val_every", "features",
                     "val_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.levels < 3:  # MONAI's DynUNet needs at least three resolution levels
            raise ValueError(f"levels must be >= 3, got {self.levels!r}")
        if self.workers < 0 or self.n_overlays < 0:
            raise ValueError(f"workers and n_overlays must be >= 0, got {self.workers!r}, "
                             f"{self.n_overlays!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.poly_power > 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, poly_power > 0; got "
                             f"{self.lr!r}, {self.weight_decay!r}, {self.poly_power!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be one of auto, bf16, fp16, off; got {self.amp!r}")
        n_output_channels(self.target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- folds, seeds, device --------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One split: ``index`` (0-based), training and validation case ids."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]


def kfold_split(case_ids: Sequence[str], k: int, seed: int = 0) -> list[Fold]:
    """Split cases into ``k`` folds by case, reproducibly.

    The ids are sorted, permuted with ``numpy.random.default_rng(seed)`` and cut into
    ``k`` nearly equal validation folds (``numpy.array_split``); each fold trains on the
    others. The result depends only on the set of ids, ``k`` and ``seed``.

    Raises
    ------
    ValueError
        If ``k < 2``, ids repeat, or there are fewer cases than folds.
    """
    ids = sorted(case_ids)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2 folds, got {k!r}")
    if len(set(ids)) != len(ids):
        dup = next(c for c in ids if ids.count(c) > 1)
        raise ValueError(f"case id {dup!r} appears more than once")
    if len(ids) < k:
        raise ValueError(f"{len(ids)} cases cannot fill {k} folds; use --folds <= {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, k)
    folds = []
    for i, part in enumerate(parts):
        val = tuple(sorted(ids[j] for j in part))
        folds.append(Fold(i, tuple(c for c in ids if c not in set(val)), val))
    return folds


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def select_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device.

    Raises
    ------
    ValueError
        If the name is not a device, or CUDA is requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device (use auto, cpu, cuda, "
                         f"cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


@dataclass(frozen=True)
class AmpMode:
    """Autocast dtype (None: full precision) and whether a gradient scaler is used."""

    dtype: torch.dtype | None
    scaler: bool

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def amp_mode(device: torch.device, amp: AmpOption = "auto") -> AmpMode:
    """Mixed-precision mode: bf16 (no scaler) or fp16 (with scaler) on CUDA, off on CPU."""
    if device.type != "cuda" or amp == "off":
        return AmpMode(None, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return AmpMode(torch.bfloat16, False) if amp == "bf16" else AmpMode(torch.float16, True)


# -- losses ----------------------------------------------------------------------------


def _accepts(module: nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params


def needs_distance_map(loss: nn.Module) -> bool:
    """Whether the loss (or a term of a manifest loss) takes ``distance_map=``."""
    if isinstance(loss, ManifestLoss):
        return any(_accepts(t, "distance_map") for t in loss.terms)
    return _accepts(loss, "distance_map")


def adaptive_tversky_terms(loss: nn.Module) -> list[tuple[str, AdaptiveTverskyLoss]]:
    """``[(label, module)]`` for the adaptive Tversky loss or terms of a manifest loss."""
    if isinstance(loss, AdaptiveTverskyLoss):
        return [("adaptive_tversky", loss)]
    if isinstance(loss, ManifestLoss):
        return [(f"{name}[{i}]", t) for i, (name, t) in enumerate(zip(loss.term_names, loss.terms,
                                                                        strict=True))
                if isinstance(t, AdaptiveTverskyLoss)]
    return []


def _weighting_state(loss: nn.Module) -> dict[str, Any]:
    if not isinstance(loss, ManifestLoss):
        return {}
    return {k: v for k, v in vars(loss.weighting).items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def _restore_weighting(loss: nn.Module, state: Mapping[str, Any]) -> None:
    if isinstance(loss, ManifestLoss):
        for k, v in state.items():
            setattr(loss.weighting, k, v)


# -- inference ---------------------------------------------------------------------------


@torch.no_grad()
def predict_volume(model: nn.Module, image: Tensor, cfg: TrainConfig, device: torch.device,
                   amp: AmpMode) -> Tensor:
    """Logits ``(C', Z, Y, X)`` (float32, CPU) of one normalized case ``(C, Z, Y, X)``.

    2D: every axial slice, ``cfg.val_batch`` per forward pass. 3D: MONAI's sliding-window
    inference with the training patch size, 50 % overlap and Gaussian blending.
    """
    model.eval()
    with torch.autocast(device.type, dtype=amp.dtype or torch.float32,
                        enabled=amp.dtype is not None):
        if cfg.sampling.dim == "2d":
            slices = image.permute(1, 0, 2, 3)  # (Z, C, Y, X)
            outs = [model(slices[i:i + cfg.val_batch].to(device)).float().cpu()
                    for i in range(0, slices.shape[0], cfg.val_batch)]
            return torch.cat(outs).permute(1, 0, 2, 3).contiguous()
        from monai.inferers import sliding_window_inference

        roi = cfg.sampling.patch_size
        out = sliding_window_inference(image[None].to(device), roi_size=roi,
                                       sw_batch_size=cfg.val_batch, predictor=model,
                                       overlap=0.5, mode="gaussian")
        return out[0].float().cpu()


def tumour_mask(logits: Tensor) -> np.ndarray:
    """Whole-tumour mask from logits ``(C', ...)``: logit > 0 (p > 0.5) for C' = 1, argmax > 0
    otherwise."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).numpy()
    return (logits.argmax(dim=0) > 0).numpy()


def evaluate(model: nn.Module, loss_fn: nn.Module, loader: Iterable[Mapping[str, Any]],
             cfg: TrainConfig, device: torch.device, amp: AmpMode, spacing_zyx: Sequence[float],
             *, keep: int = 0, overlay_channel: int = 0) -> tuple[list[dict[str, Any]], float,
                                                                  dict[str, np.ndarray]]:
    """Validate on whole cases: per-case metrics, mean loss, and ``keep`` overlays.

    Metrics are of the whole tumour (label > 0) on annotated slices: predictions on
    slices whose ``annotated`` flag is False are set to background, where the label is
    background too, and those slices are left out of the loss.
    """
    loss_fn.eval()
    rows, losses = [], []
    overlays: dict[str, np.ndarray] = {}
    for item in loader:
        logits = predict_volume(model, item["image"], cfg, device, amp)
        ann = item["annotated"].bool()
        pred = tumour_mask(logits)
        pred[~ann.numpy()] = False
        truth = item["label"].numpy() > 0
        metrics = segmentation_metrics(pred, truth, spacing_zyx)
        if ann.any():
            with torch.no_grad():
                lg, tg = logits[:, ann], item["target"][:, ann]
                if cfg.sampling.dim == "2d":
                    lg, tg = lg.permute(1, 0, 2, 3), tg.permute(1, 0, 2, 3)
                else:
                    lg, tg = lg[None], tg[None]
                value = float(loss_fn(lg, tg))
            losses.append(value)
        rows.append({"case": item["case_id"], **metrics})
        if len(overlays) < 3 * keep:
            area = truth.sum(axis=(1, 2))
            z = int(area.argmax()) if area.any() else truth.shape[0] // 2
            cid = item["case_id"]
            overlays[f"{cid}/image"] = item["image"][overlay_channel, z].numpy()
            overlays[f"{cid}/truth"] = truth[z]
            overlays[f"{cid}/pred"] = pred[z]
    loss_fn.train()
    return rows, float(np.mean(losses)) if losses else math.nan, overlays


# -- one fold ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldResult:
    """What one (loss, fold) run produced.

    ``history``: one dict per epoch (``epoch``, ``lr``, ``train_loss``, ``components``,
    ``weights``, ``alpha``, ``beta``, with a greedy adaptation ``adapted``, and on
    validation epochs ``val_loss``, ``val_dice``); ``cases``: final per-case metrics;
    ``train_seconds`` and ``voxels_per_s``: training time and throughput (validation
    excluded). Values are epoch means over the training steps. ``alpha`` and ``beta``
    are those of the adaptive Tversky term; without one, those of the greedily adapted
    term when it has ``alpha`` and ``beta`` and adapts either (so the plots of the
    adaptive loss show the greedy trajectory); else None. ``adapted``: the adapted
    parameters ``{name: mean}`` used by the steps (after each step's search).
    """

    loss: str
    fold: int
    history: list[dict[str, Any]]
    cases: list[dict[str, Any]]
    train_seconds: float
    voxels_per_s: float
    term_names: tuple[str, ...] = ()
    overlays: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "fold": self.fold, "history": self.history,
                "cases": self.cases, "train_seconds": self.train_seconds,
                "voxels_per_s": self.voxels_per_s, "term_names": list(self.term_names)}


class _Loader:
    """A DataLoader built once per fold and iterated every epoch (or evaluation).

    With ``workers`` > 0 its worker processes are persistent: started by the first
    iteration, reused by every later one (a `TrainSamples` learns each new epoch through
    its shared-memory ``set_epoch``; a worker keeps its cache of normalized cases), and
    stopped by `close` (``train_fold`` closes its loaders when the fold ends or fails).
    Starting two workers cost about 3 s per epoch on two CPU cores, and each new worker
    read and normalized its cases again.

    Workers start from a fork server, not a fork of this process: zarr's event-loop
    thread (and Prefect's, inside a flow) do not survive a plain fork.
    """

    def __init__(self, ds: Any, *, batch_size: int | None, workers: int,
                 device: torch.device) -> None:
        self.workers, self.batch_size = workers, batch_size
        self.loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                 pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 multiprocessing_context="forkserver" if workers > 0 else None)
        self._iterated = False

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __iter__(self) -> Iterator[Any]:
        if self._iterated and self.workers > 0:
            # A new DataLoader iterator draws its workers' base seed from torch's global
            # generator; the persistent one is made once and reused. Draw it anyway, so
            # the main process's torch RNG stream (saved in checkpoints) stays the one
            # of a loader made per epoch, and the same as with workers=0.
            torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        self._iterated = True
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes (idempotent; a later iteration starts new ones)."""
        # torch keeps a persistent loader's live iterator in ``_iterator`` and has no
        # public close; `_shutdown_workers` is what the iterator's finalizer calls, and
        # calling it here does not wait for the garbage collector (a traceback that
        # holds the loader would keep the workers alive).
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self.loader._iterator = None


def _mean(values: Sequence[Sequence[float]]) -> list[float]:
    return [float(v) for v in np.mean(np.asarray(values, dtype=np.float64), axis=0)] if values else []


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (`pipeline.fsio.open_atomic`)."""
    with open_atomic(path, "wb") as fh:
        torch.save(dict(state), fh)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: ``torch.load(weights_only=True)`` (no arbitrary objects)."""
    return torch.load(path, map_location=device, weights_only=True)


def train_fold(store_url: str, dataset: str, fold: Fold, loss_name: str,
               loss_spec: Mapping[str, Any], plan: NormalizationPlan, cfg: TrainConfig,
               fold_dir: Path, *, spacing_zyx: Sequence[float], resume: bool = True,
               progress: Progress | None = None, overlay_channel: int = 0) -> FoldResult:
    """Train one loss on one fold and validate the final model; see the module docstring.

    `progress` receives a ``"step"`` event after every training step and an ``"epoch"``
    event after every epoch: ``loss``, ``fold`` (0-based), ``epoch`` (1-based),
    ``epochs``, ``train_loss``, ``weights`` and ``term_names`` (a manifest loss's term
    weights, epoch means; else empty), ``alpha`` and ``beta`` (None without an adaptive
    Tversky term) and, on validation epochs, ``val_dice``
    (`pipeline.train.progress.ProgressLog` logs them).

    Raises
    ------
    TrainingDiverged
        If the training loss becomes NaN or infinite.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    if resume and (fold_dir / RESULT).exists():
        return _read_result(fold_dir)
    run = _setup(loss_spec, plan, cfg, fold.index)
    ckpt = fold_dir / CHECKPOINT
    start = _restore(ckpt, run) if resume and ckpt.exists() else _Start()
    info = _LossInfo.of(run.loss_fn)
    train_ds = TrainSamples(store_url, dataset, fold.train, plan, sampling=cfg.sampling,
                            target=cfg.target, batch_size=cfg.batch_size,
                            batches_per_epoch=cfg.batches_per_epoch, seed=run.seed,
                            distance_maps=info.distance_maps)
    val_loader = run.loaders["val"] = _Loader(
        ValidationCases(store_url, dataset, fold.val, plan, target=cfg.target),
        batch_size=None, workers=min(cfg.workers, len(fold.val)), device=run.device)
    try:
        return _train_and_validate(run, info, train_ds, val_loader, fold, loss_name, cfg,
                                   start, ckpt, fold_dir, spacing_zyx=spacing_zyx,
                                   progress=progress, overlay_channel=overlay_channel)
    finally:
        run.close()  # the loaders' worker processes end with the fold, also when it fails


# -- the sections of train_fold ------------------------------------------------------------


def _train_and_validate(run: _Run, info: _LossInfo, train_ds: TrainSamples, val_loader: _Loader,
                        fold: Fold, loss_name: str, cfg: TrainConfig, start: _Start, ckpt: Path,
                        fold_dir: Path, *, spacing_zyx: Sequence[float],
                        progress: Progress | None, overlay_channel: int) -> FoldResult:
    """`train_fold`'s epochs from ``start``, the final validation and ``result.json``."""
    history = list(start.history)
    train_seconds, voxels = start.train_seconds, start.voxels
    cases: list[dict[str, Any]] = []
    overlays: dict[str, np.ndarray] = {}
    for epoch in range(start.epoch, cfg.epochs):
        stats = _train_epoch(run, info, train_ds, cfg, epoch, loss_name=loss_name,
                             fold_index=fold.index, progress=progress)
        train_seconds += stats.seconds
        voxels += stats.voxels
        run.scheduler.step()
        record = _epoch_record(epoch, stats, info)
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.val_every == 0:
            cases, val_loss, overlays = evaluate(
                run.model, run.loss_fn, val_loader, cfg, run.device, run.amp, spacing_zyx,
                keep=cfg.n_overlays if last else 0, overlay_channel=overlay_channel)
            record["val_loss"] = val_loss
            record["val_dice"] = float(np.mean([c["dice"] for c in cases]))
        history.append(record)
        _save_state(ckpt, run, epoch=epoch, history=history, train_seconds=train_seconds,
                    voxels=voxels)
        if progress:
            progress({"kind": "epoch", "loss": loss_name, "fold": fold.index, "epoch": epoch + 1,
                      "epochs": cfg.epochs, "term_names": list(info.term_names),
                      **{k: v for k, v in record.items()
                         if k in ("train_loss", "val_dice", "weights", "alpha", "beta")}})
    if not cases:  # resumed after the last epoch's checkpoint but before result.json
        cases, _, overlays = evaluate(run.model, run.loss_fn, val_loader, cfg, run.device,
                                      run.amp, spacing_zyx, keep=cfg.n_overlays,
                                      overlay_channel=overlay_channel)
    result = FoldResult(loss_name, fold.index, history, cases, train_seconds,
                        voxels / train_seconds if train_seconds > 0 else math.nan,
                        info.term_names, overlays)
    _write_result(fold_dir, result)
    return result


def _read_result(fold_dir: Path) -> FoldResult:
    """Load the result of a completed fold.

    Parameters
    ----------
    fold_dir : Path
        The fold's folder, holding ``result.json`` and, when kept, ``overlays.npz``.

    Returns
    -------
    FoldResult
        As `train_fold` returned it when the fold was trained.
    """
    data = json.loads((fold_dir / RESULT).read_text())
    ov = fold_dir / OVERLAYS
    overlays = dict(np.load(ov, allow_pickle=False)) if ov.exists() else {}
    return FoldResult(data["loss"], data["fold"], data["history"], data["cases"],
                      data["train_seconds"], data["voxels_per_s"],
                      tuple(data.get("term_names", ())), overlays)


def _write_result(fold_dir: Path, result: FoldResult) -> None:
    """Write ``overlays.npz`` (when there are overlays), then ``result.json``, atomically.

    Parameters
    ----------
    fold_dir : Path
        The fold's folder.
    result : FoldResult
        The finished fold; ``result.json`` marks it complete for a resume.
    """
    if result.overlays:
        with open_atomic(fold_dir / OVERLAYS, "wb") as fh:
            np.savez_compressed(fh, **result.overlays)
    write_text_atomic(fold_dir / RESULT, json.dumps(result.to_json(), indent=1, allow_nan=True))


@dataclass(frozen=True)
class _Run:
    """What trains one fold: device, precision, seed, and the stateful training objects."""

    device: torch.device
    amp: AmpMode
    seed: int
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loaders: dict[str, _Loader] = field(default_factory=dict, compare=False, repr=False)

    def train_loader(self, ds: TrainSamples, cfg: TrainConfig) -> _Loader:
        """The loader of `ds`: made on first use, then reused (with its workers) every
        epoch until `close`."""
        current = self.loaders.get("train")
        if current is not None and (current.dataset is not ds or current.workers != cfg.workers
                                    or current.batch_size != cfg.batch_size):
            current.close()
            current = None
        if current is None:
            current = self.loaders["train"] = _Loader(ds, batch_size=cfg.batch_size,
                                                      workers=cfg.workers, device=self.device)
        return current

    def close(self) -> None:
        """Stop the worker processes of the run's loaders."""
        for loader in self.loaders.values():
            loader.close()
        self.loaders.clear()

    def autocast(self) -> torch.autocast:
        """A fresh autocast context for this run's device and precision (off: float32)."""
        return torch.autocast(self.device.type, dtype=self.amp.dtype or torch.float32,
                              enabled=self.amp.dtype is not None)


def _setup(loss_spec: Mapping[str, Any], plan: NormalizationPlan, cfg: TrainConfig,
           fold_index: int) -> _Run:
    """Seed, then build the model, loss, AdamW, PolyLR schedule and gradient scaler.

    Parameters
    ----------
    loss_spec : mapping
        ``{"name": ..., **parameters}`` for `build_loss`.
    plan : NormalizationPlan
        Its channels are the network's input channels.
    cfg : TrainConfig
    fold_index : int
        The fold's seed is ``cfg.seed * 1000 + fold_index``.

    Returns
    -------
    _Run
        Fresh (untrained) objects, on the selected device, the loss in training mode.
    """
    device = select_device(cfg.device)
    amp = amp_mode(device, cfg.amp)
    seed = cfg.seed * 1000 + fold_index
    seed_everything(seed)
    in_channels = len(plan.channels)
    model = build_unet(cfg.sampling.dim, in_channels, n_output_channels(cfg.target),
                       features=cfg.features, levels=cfg.levels).to(device)
    loss_fn = build_loss(loss_spec).to(device)
    loss_fn.train()
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs,
                                                      power=cfg.poly_power)
    scaler = torch.amp.GradScaler("cuda", enabled=amp.scaler)
    return _Run(device, amp, seed, model, loss_fn, optimizer, scheduler, scaler)


@dataclass(frozen=True)
class _Start:
    """Where training starts: first epoch, the history so far, the time and voxel counters."""

    epoch: int = 0
    history: tuple[dict[str, Any], ...] = ()
    train_seconds: float = 0.0
    voxels: int = 0


def _restore(ckpt: Path, run: _Run) -> _Start:
    """Load ``last.pt`` into the run's objects and the torch RNG.

    Parameters
    ----------
    ckpt : Path
        A checkpoint written by `_save_state`.
    run : _Run
        Freshly set up; its model, optimizer, scheduler, scaler and loss are overwritten.

    Returns
    -------
    _Start
        The epoch after the checkpoint's, and its history and counters.
    """
    state = load_checkpoint(ckpt, run.device)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.loss_fn.load_state_dict(state["loss"])
    _restore_weighting(run.loss_fn, state["weighting"])
    if state.get("adaptation") and isinstance(run.loss_fn, ManifestLoss):
        run.loss_fn.set_adapted_values(state["adaptation"])
    start = _Start(int(state["epoch"]) + 1, tuple(state["history"]),
                   float(state["train_seconds"]), int(state["voxels"]))
    torch.set_rng_state(state["rng"])
    return start


def _save_state(ckpt: Path, run: _Run, *, epoch: int, history: Sequence[dict[str, Any]],
                train_seconds: float, voxels: int) -> None:
    """Write ``last.pt`` after an epoch (tensors and plain values only; see `_restore`).

    Parameters
    ----------
    ckpt : Path
    run : _Run
    epoch : int
        The 0-based epoch just finished.
    history : sequence of dict
        The epoch records so far.
    train_seconds, voxels : float, int
        The training counters so far.
    """
    loss_fn = run.loss_fn
    save_checkpoint(ckpt, {
        "epoch": epoch, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.amp.scaler else {},
        "loss": loss_fn.state_dict(), "weighting": _weighting_state(loss_fn),
        "adaptation": (loss_fn.adapted_values() if isinstance(loss_fn, ManifestLoss)
                       else {}),
        "history": history, "train_seconds": train_seconds, "voxels": voxels,
        "rng": torch.get_rng_state(),
    })


@dataclass(frozen=True)
class _LossInfo:
    """What the loop needs to know about a loss: inputs, logged terms, greedy adaptation.

    Attributes
    ----------
    distance_maps : bool
        Whether a batch must carry ``distance_map`` (`needs_distance_map`).
    term_names : tuple of str
        A manifest loss's term names; () otherwise.
    tversky : AdaptiveTverskyLoss or None
        The first adaptive Tversky term, whose mean alpha and beta are logged.
    greedy : ManifestLoss or None
        The loss when it has a greedy ``adaptation``.
    greedy_tversky : nn.Module or None
        Without an adaptive Tversky term, the greedily adapted term when it has float
        ``alpha`` and ``beta`` and adapts either: logged as alpha and beta.
    """

    distance_maps: bool
    term_names: tuple[str, ...]
    tversky: AdaptiveTverskyLoss | None
    greedy: ManifestLoss | None
    greedy_tversky: nn.Module | None

    @classmethod
    def of(cls, loss_fn: nn.Module) -> _LossInfo:
        """Inspect `loss_fn` (a built loss; nothing is changed)."""
        tversky = adaptive_tversky_terms(loss_fn)
        term_names = tuple(loss_fn.term_names) if isinstance(loss_fn, ManifestLoss) else ()
        greedy = loss_fn if isinstance(loss_fn, ManifestLoss) and loss_fn.adaptation else None
        adaptation = greedy.adaptation if greedy is not None else None
        greedy_tversky = None
        if greedy is not None and adaptation is not None and not tversky and (
                {"alpha", "beta"} & set(adaptation.params)):
            term = greedy.terms[adaptation.term]
            if all(isinstance(getattr(term, k, None), float) for k in ("alpha", "beta")):
                greedy_tversky = term
        return cls(needs_distance_map(loss_fn), term_names,
                   tversky[0][1] if tversky else None, greedy, greedy_tversky)

    def adapts_at(self, global_step: int) -> bool:
        """Whether the greedy search runs before this (0-based) step of the fold."""
        return (self.greedy is not None and self.greedy.adaptation is not None
                and global_step % self.greedy.adaptation.every == 0)


@dataclass(frozen=True)
class _EpochStats:
    """Per-step values of one training epoch (in step order), its time and voxel count."""

    lr: float
    values: tuple[float, ...]
    components: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    adapted: tuple[dict[str, float], ...]
    seconds: float
    voxels: int


def _train_epoch(run: _Run, info: _LossInfo, train_ds: TrainSamples, cfg: TrainConfig,
                 epoch: int, *, loss_name: str, fold_index: int,
                 progress: Progress | None) -> _EpochStats:
    """Run the training steps of one epoch (greedy search first where it is due).

    Parameters
    ----------
    run : _Run
    info : _LossInfo
    train_ds : TrainSamples
        The fold's training samples; set to `epoch` here and read through
        ``run.train_loader(train_ds, cfg)`` (made at the first epoch, its workers reused).
    cfg : TrainConfig
    epoch : int
        0-based.
    loss_name, fold_index : str, int
        For the progress events and the divergence message.
    progress : callable, optional
        Called with a ``"step"`` event after each step.

    Returns
    -------
    _EpochStats
        The learning rate of the epoch and what each step logged. The scheduler is not
        stepped here.

    Raises
    ------
    TrainingDiverged
        If a step's loss is NaN or infinite (before its update).
    """
    run.model.train()
    train_ds.set_epoch(epoch)
    loader = run.train_loader(train_ds, cfg)
    lr = run.optimizer.param_groups[0]["lr"]
    loss_fn, device = run.loss_fn, run.device
    values, comps, weights, alphas, betas = [], [], [], [], []
    adapted: list[dict[str, float]] = []
    voxels = 0
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["target"].to(device, non_blocking=True)
        extras = ({"distance_map": batch["distance_map"].to(device, non_blocking=True)}
                  if info.distance_maps else {})
        if info.greedy is not None and info.adapts_at(epoch * cfg.batches_per_epoch + step):
            greedy_search(run.model, info.greedy, run.optimizer, x, y, extras=extras,
                          scaler=run.scaler if run.amp.scaler else None,
                          autocast=run.autocast)
        logits, value = _step(run, x, y, extras,
                              where=f"loss {loss_name!r}, fold {fold_index}, epoch {epoch}, "
                                    f"step {step}")
        voxels += x.numel() // x.shape[1]
        values.append(value)
        if isinstance(loss_fn, ManifestLoss):
            comps.append(loss_fn.last_values)
            weights.append(loss_fn.weights)
        if info.tversky is not None:
            with torch.no_grad():
                a, b = info.tversky.weights(logits.detach().float(), y)
            alphas.append(float(a.mean()))
            betas.append(float(b.mean()))
        if info.greedy is not None:
            adapted.append(info.greedy.adapted_values())
        if info.greedy_tversky is not None:
            alphas.append(float(info.greedy_tversky.alpha))
            betas.append(float(info.greedy_tversky.beta))
        if progress:
            progress({"kind": "step", "loss": loss_name, "fold": fold_index, "epoch": epoch,
                      "step": step + 1, "steps": cfg.batches_per_epoch, "value": value})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _EpochStats(lr, tuple(values), tuple(comps), tuple(weights), tuple(alphas),
                       tuple(betas), tuple(adapted), time.perf_counter() - t0, voxels)


def _step(run: _Run, x: Tensor, y: Tensor, extras: Mapping[str, Tensor], *,
          where: str) -> tuple[Tensor, float]:
    """One optimisation step: forward under autocast, loss in float32, scaled backward.

    Parameters
    ----------
    run : _Run
    x, y : Tensor
        The batch's images and one-hot targets, on the run's device.
    extras : mapping of str to Tensor
        Further loss inputs (``distance_map``).
    where : str
        Names the loss, fold, epoch and step in the divergence message.

    Returns
    -------
    logits : Tensor
        The forward pass's output (before the update).
    value : float
        The loss value.

    Raises
    ------
    TrainingDiverged
        If the loss is NaN or infinite; the model is then not updated.
    """
    with run.autocast():
        logits = run.model(x)
    loss = run.loss_fn(logits.float(), y, **extras)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(f"{where}: training loss is {value!r}")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return logits, value


def _epoch_record(epoch: int, stats: _EpochStats, info: _LossInfo) -> dict[str, Any]:
    """The history entry of a training epoch (before validation adds its keys).

    Parameters
    ----------
    epoch : int
        0-based; the record's ``epoch`` is 1-based.
    stats : _EpochStats
    info : _LossInfo

    Returns
    -------
    dict
        ``epoch``, ``lr``, the epoch means ``train_loss``, ``components``, ``weights``,
        ``alpha``, ``beta`` (None without values) and, with a greedy adaptation, the mean
        ``adapted`` value of each adapted parameter.
    """
    record: dict[str, Any] = {
        "epoch": epoch + 1, "lr": stats.lr, "train_loss": float(np.mean(stats.values)),
        "components": _mean(stats.components), "weights": _mean(stats.weights),
        "alpha": float(np.mean(stats.alphas)) if stats.alphas else None,
        "beta": float(np.mean(stats.betas)) if stats.betas else None,
    }
    if info.greedy is not None and info.greedy.adaptation is not None:
        record["adapted"] = {p: float(np.mean([a[p] for a in stats.adapted]))
                             for p in info.greedy.adaptation.params}
    return record


__all__ = [
    "AmpMode",
    "Fold",
    "FoldResult",
    "TrainConfig",
    "TrainingDiverged",
    "amp_mode",
    "evaluate",
    "kfold_split",
    "load_checkpoint",
    "needs_distance_map",
    "predict_volume",
    "save_checkpoint",
    "seed_everything",
    "select_device",
    "train_fold",
]
