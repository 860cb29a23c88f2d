"""Training and validation data read straight from the Zarr store.

Reading strategy
----------------
The store chunks images as one volume per case and channel, so reading any slice or patch
costs a whole-volume decode. The training dataset therefore reads **each case once per
epoch** and draws all of that case's samples from it: every epoch the training cases are
shuffled (seeded by ``(seed, epoch)``) and dealt round-robin to the data-loader workers;
a worker reads one case (all channels, label, brain, annotated flags), normalizes it with
the manifest's plan, draws ``ceil(share / n_cases)`` samples from it, and passes them
through a shuffle buffer so that a batch mixes several cases. Memory per worker: one case
plus the buffer. Validation reads whole cases (one per item).

Sampling
--------
- ``"2d"``: axial slices ``(C, Y, X)`` (optionally cropped to ``patch_size`` (Y, X)).
  Only slices that are annotated and contain brain are drawn; slices whose ``annotated``
  flag is False are never used, neither as tumour nor as background.
- ``"3d"``: patches ``(C, *patch_size)`` whose z-range lies entirely in annotated slices.
- Tumour oversampling: each sample is, with probability ``fg_fraction`` (default 1/3, as
  in nnU-Net), centred on a voxel drawn uniformly from the case's tumour voxels (2D: a
  slice drawn from those containing tumour, and the crop centred on one of its tumour
  voxels); otherwise it is drawn uniformly among the eligible positions. A case without
  tumour gets uniform samples only.
- Augmentation (training only): a flip of each spatial axis with probability
  ``flip_prob``; additive Gaussian noise N(0, ``noise_std``²) on the normalized image
  with probability ``noise_prob``; optionally (``affine_prob`` > 0) an in-plane (y, x)
  rotation by U(-``rotate_deg``, ``rotate_deg``) and isotropic scaling by U(``scale``),
  linear for the image and nearest for the target.

Targets: ``"wt"`` (whole tumour, label > 0) gives a ``(1, *spatial)`` binary target for a
sigmoid output; ``"multiclass"`` a ``(4, *spatial)`` one-hot of 0 background, 1 NCR,
2 ED, 3 ET for a softmax output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.ndimage import affine_transform
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pipeline.store import CaseRecord, DatasetStore
from pipeline.train.losses import signed_distance_map
from pipeline.train.normalize import NormalizationPlan

Target = Literal["wt", "multiclass"]
N_CLASSES = 4  # background, NCR, ED, ET


def n_output_channels(target: Target) -> int:
    """Network output channels for a target: 1 (sigmoid) for ``wt``, 4 for ``multiclass``."""
    if target == "wt":
        return 1
    if target == "multiclass":
        return N_CLASSES
    raise ValueError(f"target must be 'wt' or 'multiclass', got {target!r}")


def make_target(label: NDArray[np.integer], target: Target) -> NDArray[np.float32]:
    """The float target ``(C', *spatial)`` of a label map (see the module docstring)."""
    if target == "wt":
        return (np.asarray(label) > 0)[None].astype(np.float32)
    if target == "multiclass":
        lab = np.asarray(label)
        if lab.size and int(lab.max()) >= N_CLASSES:
            raise ValueError(f"label value {int(lab.max())!r} is outside the scheme 0-3")
        return np.stack([lab == k for k in range(N_CLASSES)]).astype(np.float32)
    raise ValueError(f"target must be 'wt' or 'multiclass', got {target!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """How training samples are drawn and augmented (see the module docstring).

    Parameters
    ----------
    dim : {"2d", "3d"}
    patch_size : tuple of int or None
        3D: (Z, Y, X), required. 2D: (Y, X) crop, or None for whole slices.
    fg_fraction : float in [0, 1], default 1/3
        Probability that a sample is centred on tumour.
    flip_prob, noise_prob, noise_std, affine_prob, rotate_deg, scale
        Augmentation (``affine_prob`` 0 disables the affine part).
    shuffle_buffer : int, default 64
        Samples held by each worker to mix cases within batches.
    """

    dim: Literal["2d", "3d"] = "2d"
    patch_size: tuple[int, ...] | None = None
    fg_fraction: float = 1.0 / 3.0
    flip_prob: float = 0.5
    noise_prob: float = 0.3
    noise_std: float = 0.1
    affine_prob: float = 0.0
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    shuffle_buffer: int = 64

    def __post_init__(self) -> None:
        if self.dim not in ("2d", "3d"):
            raise ValueError(f"dim must be '2d' or '3d', got {self.dim!r}")
        want = 2 if self.dim == "2d" else 3
        if self.patch_size is None:
            if self.dim == "3d":
                raise ValueError("3d sampling needs patch_size (Z, Y, X)")
        elif len(self.patch_size) != want or any(int(s) < 1 for s in self.patch_size):
            raise ValueError(f"patch_size for {self.dim} must be {want} positive ints, "
                             f"got {self.patch_size!r}")
        for name in ("fg_fraction", "flip_prob", "noise_prob", "affine_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")
        if self.noise_std < 0 or self.rotate_deg < 0:
            raise ValueError(f"noise_std and rotate_deg must be >= 0, got {self.noise_std!r}, "
                             f"{self.rotate_deg!r}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale!r}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer!r}")


@dataclass(frozen=True)
class CaseArrays:
    """One case ready for sampling: normalized image, label, masks."""

    case_id: str
    image: NDArray[np.float32]  # (C, Z, Y, X), normalized
    label: NDArray[np.uint8]  # (Z, Y, X)
    brain: NDArray[np.bool_]  # (Z, Y, X)
    annotated: NDArray[np.bool_]  # (Z,)


_STORES: dict[tuple[int, str, str], DatasetStore] = {}


def _open(url: str, dataset: str) -> DatasetStore:
    """One read-only store handle per process (workers open their own)."""
    key = (os.getpid(), url, dataset)
    if key not in _STORES:
        _STORES[key] = DatasetStore.open(url, dataset)
    return _STORES[key]


#: Bytes of normalized cases a training dataset keeps in memory between epochs.
CASE_CACHE_BYTES = 2**30


def case_records(store: DatasetStore, case_ids: Sequence[str]) -> dict[str, CaseRecord]:
    """Records of committed cases; ``KeyError`` naming the first case that is not committed."""
    records = store.committed()
    missing = [c for c in case_ids if c not in records]
    if missing:
        raise KeyError(f"case {missing[0]!r} is not committed in {store.url}/{store.dataset}")
    return {c: records[c] for c in case_ids}


def load_case(store: DatasetStore, record: CaseRecord, plan: NormalizationPlan) -> CaseArrays:
    """Read one case (whole volumes, one chunk per channel) and normalize it.

    Raises `pipeline.store.CaseDamaged`, naming the case and the chunk, when a chunk is
    absent or cannot be decoded.
    """
    arrays = store.read_case(record.case_id, record=record)
    brain = np.asarray(arrays["brain"], dtype=bool)
    image = plan.apply(np.asarray(arrays["image"]), brain).numpy()
    return CaseArrays(record.case_id, image, np.asarray(arrays["label"], dtype=np.uint8), brain,
                      np.asarray(arrays["annotated"], dtype=bool))


def _pad_to(arr: NDArray[Any], size: Sequence[int], axes_from: int) -> NDArray[Any]:
    """Zero-pad the trailing axes (from ``axes_from``) of ``arr`` up to ``size``."""
    pad = [(0, 0)] * axes_from
    for have, want in zip(arr.shape[axes_from:], size, strict=True):
        extra = max(0, int(want) - have)
        pad.append((extra // 2, extra - extra // 2))
    return np.pad(arr, pad) if any(p != (0, 0) for p in pad) else arr


def _start(center: int, size: int, extent: int) -> int:
    return int(min(max(center - size // 2, 0), extent - size))


class _Sampler:
    """Draws training samples from one loaded case (numpy in, numpy out)."""

    def __init__(self, case: CaseArrays, cfg: SamplingConfig, target: Target) -> None:
        self.cfg, self.target, self.case_id = cfg, target, case.case_id
        image, label = case.image, case.label
        annotated = case.annotated.copy()
        if cfg.dim == "3d":
            assert cfg.patch_size is not None  # checked by SamplingConfig
            pz = cfg.patch_size[0]
            extra = max(0, pz - image.shape[1])
            # padded slices carry no tumour and no annotation issue: treat as annotated
            annotated = np.pad(annotated, (extra // 2, extra - extra // 2), constant_values=True)
            image = _pad_to(image, cfg.patch_size, 1)
            label = _pad_to(label, cfg.patch_size, 0)
            run = np.convolve(annotated.astype(int), np.ones(pz, dtype=int), mode="valid")
            self.z_starts = np.flatnonzero(run == pz)
            self.fg = np.argwhere(label > 0)
        else:
            brain_slices = case.brain.any(axis=(1, 2))
            self.slices = np.flatnonzero(annotated & brain_slices)
            self.fg_slices = np.flatnonzero(annotated & (label > 0).any(axis=(1, 2)))
            if cfg.patch_size is not None:
                image = _pad_to(image, cfg.patch_size, 2)
                label = _pad_to(label, cfg.patch_size, 1)
        self.image, self.label = image, label

    @property
    def usable(self) -> bool:
        return bool(self.z_starts.size if self.cfg.dim == "3d" else self.slices.size)

    def draw(self, rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        cfg = self.cfg
        if cfg.dim == "2d":
            fg = rng.random() < cfg.fg_fraction and self.fg_slices.size > 0
            z = int(rng.choice(self.fg_slices if fg else self.slices))
            img, lab = self.image[:, z], self.label[z]
            if cfg.patch_size is not None:
                if fg:
                    pts = np.argwhere(lab > 0)
                    center = pts[rng.integers(len(pts))]
                else:
                    center = [rng.integers(s) for s in lab.shape]
                sl = tuple(slice(_start(int(c), p, s), _start(int(c), p, s) + p)
                           for c, p, s in zip(center, cfg.patch_size, lab.shape, strict=True))
                img, lab = img[(slice(None), *sl)], lab[sl]
        else:
            assert cfg.patch_size is not None
            shape = self.label.shape
            if rng.random() < cfg.fg_fraction and len(self.fg):
                center = self.fg[rng.integers(len(self.fg))]
                z0 = _start(int(center[0]), cfg.patch_size[0], shape[0])
                z0 = int(self.z_starts[np.argmin(np.abs(self.z_starts - z0))])
                yx = [_start(int(c), p, s) for c, p, s
                      in zip(center[1:], cfg.patch_size[1:], shape[1:], strict=True)]
            else:
                z0 = int(rng.choice(self.z_starts))
                yx = [int(rng.integers(s - p + 1)) for p, s
                      in zip(cfg.patch_size[1:], shape[1:], strict=True)]
            sl = tuple(slice(a, a + p) for a, p in zip([z0, *yx], cfg.patch_size, strict=True))
            img, lab = self.image[(slice(None), *sl)], self.label[sl]
        tgt = make_target(lab, self.target)
        return augment(np.ascontiguousarray(img), tgt, cfg, rng)


def augment(image: NDArray[np.float32], target: NDArray[np.float32], cfg: SamplingConfig,
            rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Flips, intensity noise and the optional affine of one sample ``(C, *spatial)``."""
    nd = image.ndim - 1
    if cfg.affine_prob > 0 and rng.random() < cfg.affine_prob:
        angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        zoom = rng.uniform(*cfg.scale)
        rot = np.array([[math.cos(angle), -math.sin(angle)],
                        [math.sin(angle), math.cos(angle)]]) / zoom
        matrix = np.eye(nd)
        matrix[-2:, -2:] = rot  # in-plane (y, x)
        center = (np.array(image.shape[1:]) - 1) / 2.0
        offset = center - matrix @ center
        image = np.stack([affine_transform(c, matrix, offset, order=1, mode="constant")
                          for c in image]).astype(np.float32)
        target = np.stack([affine_transform(c, matrix, offset, order=0, mode="constant")
                           for c in target]).astype(np.float32)
        if target.shape[0] > 1:  # one-hot: voxels rotated in from outside are background
            target[0] = np.maximum(target[0], 1.0 - target[1:].sum(axis=0))
    for axis in range(1, nd + 1):
        if rng.random() < cfg.flip_prob:
            image, target = np.flip(image, axis), np.flip(target, axis)
    if cfg.noise_prob > 0 and rng.random() < cfg.noise_prob:
        image = image + rng.normal(0.0, cfg.noise_std, image.shape).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target)


class TrainSamples(IterableDataset):
    """Seeded, tumour-oversampled training samples of one fold, read case by case.

    Each epoch yields exactly ``batches_per_epoch * batch_size`` samples in total over all
    workers, each worker whole batches, so a ``DataLoader(batch_size=batch_size)`` gives
    ``batches_per_epoch`` full batches. Items are dicts of tensors: ``image``
    ``(C, *spatial)``, ``target`` ``(C', *spatial)`` and, with ``distance_maps``,
    ``distance_map`` (Kervadec's signed map of the target, for the boundary loss).
    Call ``set_epoch(e)`` before iterating. The epoch lives in a shared-memory tensor
    (handed to worker processes by handle when they start, also under ``forkserver`` and
    ``spawn``), and each worker reads it when its iteration starts, so a loader with
    ``persistent_workers=True`` sees every ``set_epoch`` and its workers keep their case
    cache between epochs; a sample depends only on (seed, epoch, worker id, worker count),
    never on whether the workers are new.
    """

    def __init__(self, store_url: str, dataset: str, case_ids: Sequence[str],
                 plan: NormalizationPlan, *, sampling: SamplingConfig, target: Target = "wt",
                 batch_size: int, batches_per_epoch: int, seed: int = 0,
                 distance_maps: bool = False) -> None:
        super().__init__()
        if not case_ids:
            raise ValueError("no training cases")
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"batch_size and batches_per_epoch must be >= 1, got "
                             f"{batch_size!r}, {batches_per_epoch!r}")
        n_output_channels(target)
        store = _open(store_url, dataset)
        plan.check_channels(store.channels)
        self.records = case_records(store, list(case_ids))
        self.store_url, self.dataset = store_url, dataset
        self.case_ids = sorted(case_ids)
        self.plan, self.sampling, self.target = plan, sampling, target
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.seed, self.distance_maps = int(seed), bool(distance_maps)
        # The epoch, in shared memory: set_epoch in the main process reaches workers that
        # were started before it (persistent workers); torch's multiprocessing pickler
        # passes the storage to them by handle, not by value.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Normalized cases kept between epochs (in the process that iterates: the main
        # one with workers=0, else each worker, for as long as the worker lives: a fold
        # with persistent workers), up to CASE_CACHE_BYTES per process: reading and
        # normalizing every case again each epoch was a fifth of a small 2D run's time.
        self._cache: dict[str, CaseArrays] = {}
        self._cached_bytes = 0

    def _load(self, store: DatasetStore, cid: str) -> CaseArrays:
        case = self._cache.get(cid)
        if case is None:
            case = load_case(store, self.records[cid], self.plan)
            size = case.image.nbytes + case.label.nbytes + case.brain.nbytes
            if self._cached_bytes + size <= CASE_CACHE_BYTES:
                self._cache[cid] = case
                self._cached_bytes += size
        return case

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws (shared with the worker processes)."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.batch_size * self.batches_per_epoch

    def _share(self, worker: int, n_workers: int, epoch: int) -> tuple[list[str], int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.case_ids))
        cases = [self.case_ids[i] for i in order[worker::n_workers]]
        n_batches = self.batches_per_epoch // n_workers + (worker < self.batches_per_epoch % n_workers)
        if not cases and n_batches:  # more workers than cases: reuse the case list
            cases = [self.case_ids[i] for i in order]
        return cases, n_batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch  # read once, when this worker's iteration starts
        cases, n_samples = self._share(worker, n_workers, epoch)
        if n_samples == 0:
            return
        rng = np.random.default_rng([self.seed, epoch, worker, 1])
        store = _open(self.store_url, self.dataset)
        per_case = math.ceil(n_samples / len(cases))
        buffer: list[dict[str, torch.Tensor]] = []
        emitted, i = 0, 0
        skipped: set[str] = set()
        while emitted < n_samples:
            cid = cases[i % len(cases)]
            i += 1
            if cid in skipped:
                if len(skipped) == len(cases):
                    raise ValueError(f"no case of {sorted(skipped)!r} has an annotated "
                                     f"{self.sampling.dim} sample position")
                continue
            sampler = _Sampler(self._load(store, cid), self.sampling, self.target)
            if not sampler.usable:
                skipped.add(cid)
                continue
            for _ in range(min(per_case, n_samples - emitted - len(buffer))):
                img, tgt = sampler.draw(rng)
                item = {"image": torch.from_numpy(img), "target": torch.from_numpy(tgt)}
                if self.distance_maps:
                    item["distance_map"] = signed_distance_map(tgt[None])[0]
                buffer.append(item)
                if len(buffer) >= self.sampling.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
                    emitted += 1
            if emitted + len(buffer) >= n_samples:
                while buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
                    emitted += 1


class ValidationCases(Dataset):
    """Whole validation cases, one item per case (use ``batch_size=None`` in the loader).

    Items: ``{"case_id": str, "image": (C, Z, Y, X) float32 tensor, "target":
    (C', Z, Y, X) float32 tensor, "label": (Z, Y, X) uint8 tensor, "annotated": (Z,) bool
    tensor}``.
    """

    def __init__(self, store_url: str, dataset: str, case_ids: Sequence[str],
                 plan: NormalizationPlan, *, target: Target = "wt") -> None:
        store = _open(store_url, dataset)
        plan.check_channels(store.channels)
        n_output_channels(target)
        self.case_ids = list(case_ids)
        self.records = case_records(store, self.case_ids)
        self.store_url, self.dataset, self.plan, self.target = store_url, dataset, plan, target

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cid = self.case_ids[index]
        case = load_case(_open(self.store_url, self.dataset), self.records[cid], self.plan)
        return {"case_id": cid, "image": torch.from_numpy(case.image),
                "target": torch.from_numpy(make_target(case.label, self.target)),
                "label": torch.from_numpy(case.label),
                "annotated": torch.from_numpy(case.annotated)}


__all__ = [
    "CaseArrays",
    "SamplingConfig",
    "TrainSamples",
    "ValidationCases",
    "augment",
    "case_records",
    "load_case",
    "make_target",
    "n_output_channels",
]
