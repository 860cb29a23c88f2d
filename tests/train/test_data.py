"""Training data from the store: sampling, oversampling, annotation flags, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.store import DatasetStore, Grid
from pipeline.train.data import (
    SamplingConfig,
    TrainSamples,
    ValidationCases,
    augment,
    make_target,
)
from pipeline.train.normalize import ChannelNorm, NormalizationPlan

CHANNELS = ("t1n", "t1c", "t2w", "t2f")


def sphere_case(rng: np.random.Generator, zyx: tuple[int, int, int], *, radius: float = 5.0,
                tumour: bool = True) -> dict[str, np.ndarray]:
    """A case with a bright sphere of tumour (labels 1-3 in shells) in a noisy brain."""
    z, _y, _x = zyx
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in zyx), indexing="ij")
    c = [rng.uniform(radius + 1, n - radius - 1) for n in zyx]
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    label = np.zeros(zyx, dtype=np.uint8)
    if tumour:
        label[r < radius] = 2
        label[r < 0.7 * radius] = 3
        label[r < 0.4 * radius] = 1
    brain = np.ones(zyx, dtype=bool)
    brain[:, :2] = brain[:, -2:] = False
    image = np.stack([100.0 + 10.0 * rng.standard_normal(zyx) + 80.0 * (label > 0) * (i + 1) / 4
                      for i in range(len(CHANNELS))]).astype(np.float32)
    image[:, ~brain] = 0.0
    return {"image": image, "label": label, "brain": brain,
            "annotated": np.ones(z, dtype=bool)}


def make_store(path, n_cases: int = 4, shape_xyz: tuple[int, int, int] = (32, 32, 16), *,
               seed: int = 0, spacing=(1.0, 1.0, 1.0), radius: float = 5.0,
               modify=None) -> tuple[str, str]:
    """A store with ``n_cases`` sphere cases (``modify(i, case)`` may edit each)."""
    url = str(path / "store.zarr")
    store = DatasetStore.create(url, "ds", grid=Grid(spacing=spacing, shape=shape_xyz))
    ids = [f"case{i:02d}" for i in range(n_cases)]
    slots = store.allocate(ids)
    rng = np.random.default_rng(seed)
    for i, cid in enumerate(ids):
        case = sphere_case(rng, store.grid.zyx, radius=radius)
        if modify is not None:
            modify(i, case)
        store.write_case(slots[cid], **case)
        store.commit(cid, slots[cid], f"hash-{cid}", {})
    return url, "ds"


def plan_for(channels=CHANNELS, mean: float = 100.0, std: float = 40.0) -> NormalizationPlan:
    return NormalizationPlan(tuple(ChannelNorm(c, 0.0, 400.0, mean, std) for c in channels))


NO_AUG = {"flip_prob": 0.0, "noise_prob": 0.0}


def draw_all(ds: TrainSamples, workers: int = 0, batch_size: int = 4) -> list[dict]:
    return list(DataLoader(ds, batch_size=batch_size, num_workers=workers,
                           multiprocessing_context="forkserver" if workers else None))


class TestTargets:
    def test_whole_tumour_and_one_hot(self) -> None:
        label = np.array([[0, 1], [2, 3]], dtype=np.uint8)
        np.testing.assert_array_equal(make_target(label, "wt")[0], [[0, 1], [1, 1]])
        onehot = make_target(label, "multiclass")
        assert onehot.shape == (4, 2, 2)
        np.testing.assert_array_equal(onehot.argmax(0), label)
        np.testing.assert_array_equal(onehot.sum(0), 1)

    def test_unknown_target_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"target must be 'wt' or 'multiclass', got 'et'"):
            make_target(np.zeros((2, 2), np.uint8), "et")  # type: ignore[arg-type]


class TestTrainSamples:
    def test_epoch_has_exactly_the_requested_full_batches(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 3)
        data = TrainSamples(url, ds, ["case00", "case01", "case02"], plan_for(),
                            sampling=SamplingConfig(dim="2d"), batch_size=4,
                            batches_per_epoch=5, seed=1)
        batches = draw_all(data)
        assert len(batches) == 5
        assert all(b["image"].shape == (4, 4, 32, 32) for b in batches)
        assert all(b["target"].shape == (4, 1, 32, 32) for b in batches)

    def test_two_workers_give_full_batches_too(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 3)
        data = TrainSamples(url, ds, ["case00", "case01", "case02"], plan_for(),
                            sampling=SamplingConfig(dim="2d"), batch_size=2,
                            batches_per_epoch=3, seed=1)
        batches = draw_all(data, workers=2, batch_size=2)
        assert [b["image"].shape[0] for b in batches] == [2, 2, 2]

    def test_same_seed_and_epoch_give_the_same_samples(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 2)

        def run(epoch: int) -> torch.Tensor:
            data = TrainSamples(url, ds, ["case00", "case01"], plan_for(),
                                sampling=SamplingConfig(dim="2d"), batch_size=4,
                                batches_per_epoch=2, seed=7)
            data.set_epoch(epoch)
            return torch.cat([b["image"] for b in draw_all(data)])

        torch.testing.assert_close(run(0), run(0))
        assert not torch.equal(run(0), run(1))

    @pytest.mark.parametrize(("fg_fraction", "low", "high"), [(1.0, 1.0, 1.0), (0.0, 0.0, 0.6)])
    def test_foreground_oversampling_fraction(self, tmp_path, fg_fraction, low, high) -> None:
        # sphere radius 3 in 16 slices: tumour in <= 7 of 16 slices (~0.4 of uniform draws)
        url, ds = make_store(tmp_path, 2, radius=3.0)
        data = TrainSamples(url, ds, ["case00", "case01"], plan_for(),
                            sampling=SamplingConfig(dim="2d", fg_fraction=fg_fraction, **NO_AUG),
                            batch_size=10, batches_per_epoch=10, seed=3)
        targets = torch.cat([b["target"] for b in draw_all(data, batch_size=10)])
        has_fg = (targets.flatten(1).sum(1) > 0).float().mean().item()
        assert low <= has_fg <= high

    def test_unannotated_slices_are_never_drawn(self, tmp_path) -> None:
        marker = 1e4  # raw intensity only on unannotated slices

        def modify(i, case):
            case["annotated"][:8] = False
            case["image"][:, :8][:, case["brain"][:8]] = marker

        url, ds = make_store(tmp_path, 2, modify=modify)
        plan = NormalizationPlan(tuple(ChannelNorm(c, 0.0, 2e4, 0.0, 1.0) for c in CHANNELS))
        data = TrainSamples(url, ds, ["case00", "case01"], plan,
                            sampling=SamplingConfig(dim="2d", fg_fraction=0.0, **NO_AUG),
                            batch_size=8, batches_per_epoch=8, seed=0)
        images = torch.cat([b["image"] for b in draw_all(data, batch_size=8)])
        assert images.max() < marker

    def test_3d_patches_stay_in_annotated_slices_and_centre_on_tumour(self, tmp_path) -> None:
        def modify(i, case):
            case["annotated"][:4] = False

        url, ds = make_store(tmp_path, 2, modify=modify)
        data = TrainSamples(url, ds, ["case00", "case01"], plan_for(),
                            sampling=SamplingConfig(dim="3d", patch_size=(8, 16, 16),
                                                    fg_fraction=1.0, **NO_AUG),
                            batch_size=2, batches_per_epoch=4, seed=0)
        batches = draw_all(data, batch_size=2)
        assert batches[0]["image"].shape == (2, 4, 8, 16, 16)
        # every fg-centred patch contains tumour
        assert all(t.sum() > 0 for b in batches for t in b["target"])

    def test_boundary_distance_maps_come_with_the_samples(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 1)
        data = TrainSamples(url, ds, ["case00"], plan_for(),
                            sampling=SamplingConfig(dim="2d", fg_fraction=1.0, **NO_AUG),
                            batch_size=2, batches_per_epoch=1, distance_maps=True)
        batch = draw_all(data, batch_size=2)[0]
        dm, tgt = batch["distance_map"], batch["target"]
        assert dm.shape == tgt.shape
        assert (dm[tgt > 0] <= 0).all()
        assert (dm[tgt == 0] > 0).all()

    def test_plan_channels_must_match_the_store(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 1)
        with pytest.raises(ValueError, match=r"plan channels \['a'\] differ from the store"):
            TrainSamples(url, ds, ["case00"], plan_for(channels=("a",)),
                         sampling=SamplingConfig(), batch_size=1, batches_per_epoch=1)

    def test_uncommitted_case_is_named(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 1)
        with pytest.raises(KeyError, match=r"case 'nope' is not committed"):
            TrainSamples(url, ds, ["case00", "nope"], plan_for(), sampling=SamplingConfig(),
                         batch_size=1, batches_per_epoch=1)


class TestValidationCases:
    def test_whole_normalized_case(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 2)
        item = ValidationCases(url, ds, ["case01"], plan_for(), target="multiclass")[0]
        assert item["case_id"] == "case01"
        assert item["image"].shape == (4, 16, 32, 32)
        assert item["target"].shape == (4, 16, 32, 32)
        raw = DatasetStore.open(url, ds).read_case("case01")
        # plan: clip to [0, 400], (x - 100) / 40, 0 outside the brain
        expected = (np.clip(raw["image"], 0, 400) - 100.0) / 40.0
        expected[:, ~raw["brain"]] = 0.0
        np.testing.assert_allclose(item["image"].numpy(), expected, rtol=1e-6, atol=1e-6)


class TestAugment:
    def test_flip_moves_image_and_target_together(self) -> None:
        img = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
        tgt = (img[:1] > 20).astype(np.float32)
        cfg = SamplingConfig(flip_prob=1.0, noise_prob=0.0)
        out_img, out_tgt = augment(img, tgt, cfg, np.random.default_rng(0))
        np.testing.assert_array_equal(out_img, img[:, ::-1, ::-1])
        np.testing.assert_array_equal(out_tgt, tgt[:, ::-1, ::-1])

    def test_noise_has_the_configured_std(self) -> None:
        img = np.zeros((1, 64, 64), dtype=np.float32)
        cfg = SamplingConfig(flip_prob=0.0, noise_prob=1.0, noise_std=0.2)
        out, _ = augment(img, img.copy(), cfg, np.random.default_rng(0))
        assert abs(out.std() - 0.2) < 0.01  # 4096 draws: std error ~ 0.2 / sqrt(2 * 4096)

    def test_affine_keeps_the_target_binary(self) -> None:
        tgt = np.zeros((1, 32, 32), np.float32)
        tgt[0, 10:20, 12:22] = 1
        cfg = SamplingConfig(flip_prob=0.0, noise_prob=0.0, affine_prob=1.0, rotate_deg=30.0)
        _, out = augment(tgt.copy(), tgt, cfg, np.random.default_rng(1))
        assert set(np.unique(out)) <= {0.0, 1.0}
        assert 60 < out.sum() < 140  # 100 voxels, scaled by 1/zoom^2 in [0.83, 1.23]

    def test_bad_probability_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"fg_fraction must be a probability in \[0, 1\]"):
            SamplingConfig(fg_fraction=1.5)
