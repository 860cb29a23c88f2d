"""The k-fold loop: splits, device/AMP choice, PolyLR, overfitting one case, checkpoints and
resume, the benchmark's run directory, the manifest adapter and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.errors import ManifestError
from pipeline.train.benchmark import resolve_loss_specs, run_benchmark, summary_markdown
from pipeline.train.data import SamplingConfig
from pipeline.train.loop import (
    CHECKPOINT,
    Fold,
    TrainConfig,
    amp_mode,
    kfold_split,
    load_checkpoint,
    select_device,
    train_fold,
)
from pipeline.train.normalize import ChannelNorm, NormalizationPlan
from tests.train.test_data import make_store, plan_for

SPACING = (1.0, 1.0, 1.0)


def tiny_cfg(**kw) -> TrainConfig:
    base = {"sampling": SamplingConfig(dim="2d", fg_fraction=0.5), "epochs": 2,
            "batch_size": 4, "batches_per_epoch": 2, "features": 4, "levels": 3,
            "workers": 0, "device": "cpu", "val_every": 1, "lr": 1e-2}
    return TrainConfig(**{**base, **kw})


class TestFolds:
    def test_folds_partition_the_cases_reproducibly(self) -> None:
        ids = [f"c{i}" for i in range(10)]
        folds = kfold_split(ids, 3, seed=5)
        vals = [set(f.val) for f in folds]
        assert sorted(len(v) for v in vals) == [3, 3, 4]
        assert set().union(*vals) == set(ids)
        assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
        assert all(set(f.train) == set(ids) - set(f.val) for f in folds)
        assert kfold_split(list(reversed(ids)), 3, seed=5) == folds  # order-independent
        assert kfold_split(ids, 3, seed=6) != folds

    def test_too_few_cases(self) -> None:
        with pytest.raises(ValueError, match=r"2 cases cannot fill 3 folds; use --folds <= 2"):
            kfold_split(["a", "b"], 3)

    def test_k_below_two(self) -> None:
        with pytest.raises(ValueError, match=r"needs k >= 2 folds, got 1"):
            kfold_split(["a", "b"], 1)


class TestDevice:
    def test_cpu_and_auto(self) -> None:
        assert select_device("cpu") == torch.device("cpu")
        want = "cuda" if torch.cuda.is_available() else "cpu"
        assert select_device("auto").type == want

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_without_cuda_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available"):
            select_device("cuda")

    def test_bad_device_name(self) -> None:
        with pytest.raises(ValueError, match=r"--device 'gpu0' is not a torch device"):
            select_device("gpu0")

    def test_no_mixed_precision_on_cpu(self) -> None:
        assert amp_mode(torch.device("cpu"), "bf16").dtype is None

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_mixed_precision_on_cuda(self) -> None:
        mode = amp_mode(torch.device("cuda"), "fp16")
        assert mode.dtype == torch.float16
        assert mode.scaler
        assert amp_mode(torch.device("cuda"), "auto").dtype in (torch.bfloat16, torch.float16)


class TestTrainFold:
    def test_overfit_one_case_loss_falls_and_dice_rises(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 1, radius=6.0)
        fold = Fold(0, ("case00",), ("case00",))
        cfg = tiny_cfg(epochs=8, batches_per_epoch=4, features=8, lr=2e-2)
        res = train_fold(url, ds, fold, "dice_ce", {"name": "dice_ce"}, plan_for(), cfg,
                         tmp_path / "run", spacing_zyx=SPACING)
        losses = [h["train_loss"] for h in res.history]
        dice = [h["val_dice"] for h in res.history]
        assert losses[-1] < 0.6 * losses[0]
        assert dice[-1] > dice[0]
        assert dice[-1] > 0.8
        assert res.cases[0]["dice"] == dice[-1]
        assert res.voxels_per_s > 0

    def test_poly_lr_schedule(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 2)
        cfg = tiny_cfg(epochs=4, batches_per_epoch=1, lr=1e-3, val_every=10)
        res = train_fold(url, ds, Fold(0, ("case00",), ("case01",)), "bce", {"name": "bce"},
                         plan_for(), cfg, tmp_path / "run", spacing_zyx=SPACING)
        # thesis eq. 8.1: lr_e = lr_0 (1 - e / E)^0.9, e = 0 .. E - 1
        expected = [1e-3 * (1 - e / 4) ** 0.9 for e in range(4)]
        np.testing.assert_allclose([h["lr"] for h in res.history], expected, rtol=1e-12)
        assert [("val_dice" in h) for h in res.history] == [False, False, False, True]

    def test_checkpoint_loads_weights_only_and_resume_continues(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 2)
        fold = Fold(0, ("case00",), ("case01",))
        spec = {"name": "manifest",
                "terms": [{"name": "adaptive_tversky"}, {"name": "focal"}],
                "weighting": {"method": "cov"}}
        run = tmp_path / "run"
        first = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=2),
                           run, spacing_zyx=SPACING)
        state = load_checkpoint(run / CHECKPOINT)  # torch.load(weights_only=True)
        assert state["epoch"] == 1
        assert len(state["history"]) == 2
        assert state["weighting"]["step"] == 4  # CoV state: 2 epochs x 2 steps
        (run / "result.json").unlink()  # as if stopped after epoch 2 of 3
        resumed = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=3),
                             run, spacing_zyx=SPACING)
        assert len(resumed.history) == 3
        assert resumed.history[:2] == first.history
        assert load_checkpoint(run / CHECKPOINT)["weighting"]["step"] == 6
        # manifest weights and adaptive-Tversky alpha/beta are logged per epoch
        assert len(resumed.history[0]["weights"]) == 2
        assert 0.3 <= resumed.history[0]["alpha"] <= 0.7
        # a finished fold is not retrained
        again = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=3),
                           run, spacing_zyx=SPACING)
        assert again.history == resumed.history

    def test_3d_training_runs(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 2)
        cfg = tiny_cfg(sampling=SamplingConfig(dim="3d", patch_size=(8, 16, 16)),
                       batch_size=2, epochs=1)
        res = train_fold(url, ds, Fold(0, ("case00",), ("case01",)), "dice", {"name": "dice"},
                         plan_for(), cfg, tmp_path / "run", spacing_zyx=SPACING)
        assert set(res.cases[0]) >= {"dice", "hd95", "case"}


class TestBenchmark:
    def test_run_directory(self, tmp_path) -> None:
        url, ds = make_store(tmp_path, 4)
        spec = {"name": "manifest", "terms": [{"name": "tversky"}, {"name": "bce"}],
                "weighting": {"method": "softadapt", "params": {"beta": 0.1}}}
        out = tmp_path / "run"
        res = run_benchmark(url, ds, ["manifest", "bce"], plan=plan_for(),
                            cfg=tiny_cfg(epochs=1), folds=2, out_dir=out, manifest_spec=spec)
        for name in ("config.json", "metrics_per_case.csv", "metrics_per_case.json",
                     "metrics_per_fold.csv", "summary.md", "summary.json", "curves.png",
                     "adaptive.png", "overlays.png", "paired.md", "paired.json",
                     "paired_dice.png"):
            assert (out / name).stat().st_size > 0, name
        config = json.loads((out / "config.json").read_text())
        assert config["losses"]["manifest"] == spec
        assert sorted(c for f in config["folds"] for c in f["val"]) == [f"case{i:02d}" for i in range(4)]
        per_case = json.loads((out / "metrics_per_case.json").read_text())
        assert len(per_case) == 2 * 4  # every case validated once per loss
        assert [e["loss"] for e in res.summary] == ["manifest", "bce"]
        dice = [r["dice"] for r in json.loads((out / "metrics_per_fold.json").read_text())
                if r["loss"] == "bce"]
        assert res.summary[1]["dice"]["mean"] == pytest.approx(np.mean(dice))
        assert res.summary[1]["dice"]["std"] == pytest.approx(np.std(dice, ddof=1))
        assert res.markdown().splitlines()[0].startswith("| Loss | Acc | Dice |")
        # the first loss against the other, paired by case: 4 cases are too few
        assert [(r.loss, r.other, r.metric) for r in res.paired] == [
            ("manifest", "bce", m) for m in ("dice", "hd95", "precision", "recall")]
        assert res.paired[0].comparison.n + res.paired[0].comparison.n_dropped == 4
        assert "n=4 cases: too few to separate" in (out / "paired.md").read_text()

    def test_markdown_cells(self) -> None:
        entry = {"loss": "x", **{m: {"mean": 0.5, "std": 0.1, "n_folds": 2}
                                 for m in ("accuracy", "dice", "f2", "iou", "precision",
                                           "recall", "specificity")},
                 "hd95": {"mean": 3.0, "std": math.nan, "n_folds": 1},
                 "hd": {"mean": math.nan, "std": math.nan, "n_folds": 0}}
        row = summary_markdown([entry]).splitlines()[2]
        assert row == "| x | 50.00 ± 10.00 | 50.00 ± 10.00 | 50.00 ± 10.00 | 50.00 ± 10.00 | " \
                      "50.00 ± 10.00 | 50.00 ± 10.00 | 50.00 ± 10.00 | 3.00 | – |"

    def test_unknown_loss_fails_before_training(self) -> None:
        with pytest.raises(ValueError, match=r"unknown loss 'dcie'\. Did you mean 'dice'\?"):
            resolve_loss_specs(["dcie"])

    def test_manifest_loss_needs_a_manifest(self) -> None:
        with pytest.raises(ValueError, match=r"loss 'manifest' needs a manifest"):
            resolve_loss_specs(["manifest", "bce"])


class TestNormalizationPlan:
    def test_transform_clip_zscore(self) -> None:
        norm = ChannelNorm("t1", clip_low=math.log(2.0), clip_high=math.log(50.0), mean=1.0,
                           std=2.0, transform="ln", forward=np.log)
        x = np.array([1.0, 10.0, 100.0])
        expected = (np.clip(np.log(x), math.log(2.0), math.log(50.0)) - 1.0) / 2.0
        np.testing.assert_allclose(norm.apply(x), expected, rtol=1e-6)

    def test_brain_mask_zeroes_the_outside(self) -> None:
        plan = NormalizationPlan((ChannelNorm("a", 0, 10, 1.0, 1.0),))
        out = plan.apply(np.full((1, 2, 2), 5.0), np.array([[True, False], [False, True]]))
        np.testing.assert_array_equal(out.numpy(), [[[4.0, 0.0], [0.0, 4.0]]])

    def test_bad_std(self) -> None:
        with pytest.raises(ValueError, match=r"channel 'a': std must be > 0, got 0\.0"):
            ChannelNorm("a", 0.0, 1.0, 0.0, 0.0)


class TestWithTheRealManifest:
    """Integration with stats.manifest (skipped if that module is not importable)."""

    @pytest.fixture
    def manifest(self):
        pytest.importorskip("stats.manifest")
        rules = pytest.importorskip("tests.stats.test_rules")
        from stats.manifest import build_manifest

        return build_manifest(rules.small_tumour_stats(np.random.default_rng(0)))

    def test_plan_matches_channel_normalization_apply(self, manifest) -> None:
        plan = NormalizationPlan.from_manifest(manifest)
        rng = np.random.default_rng(1)
        x = rng.uniform(500.0, 2000.0, size=(len(plan.channels), 5, 6))
        expected = np.stack([manifest.normalization[c].apply(x[i])
                             for i, c in enumerate(plan.names)])
        np.testing.assert_allclose(plan.apply(x).numpy(), expected, rtol=1e-5, atol=1e-5)

    def test_missing_channel_names_the_field(self, manifest) -> None:
        with pytest.raises(ManifestError, match=r"src\.json: field normalization\.t2f: no normalization plan"):
            NormalizationPlan.from_manifest(manifest, ["t1", "t2f"], source="src.json")

    def test_cli_trains_and_prints_the_summary(self, manifest, tmp_path) -> None:
        from typer import Typer
        from typer.testing import CliRunner

        from pipeline.manifest_io import write_manifest
        from pipeline.train.cli import train

        def modify(i, case):  # intensities inside the manifest's ranges
            case["image"] = case["image"][:2] * 8.0

        url, ds = make_store_with_channels(tmp_path, ("t1", "t2"), modify)
        path = write_manifest(manifest, tmp_path / "manifest.json")
        app = Typer()
        app.command("train")(train)
        app.command("noop")(lambda: None)  # two commands: "train" is a sub-command
        result = CliRunner().invoke(app, [
            "train", "--manifest", str(path), "--store", url, "--dataset", ds,
            "--losses", "manifest,dice", "--folds", "2", "--epochs", "1",
            "--batches-per-epoch", "1", "--batch-size", "2", "--features", "4",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        assert "mean ± std over folds" in result.output
        assert "manifest − dice" in result.output  # the paired table
        assert "cases: too few to separate these losses" in result.output
        assert (tmp_path / "run" / "summary.md").exists()


def make_store_with_channels(tmp_path, channels, modify):
    from pipeline.store import DatasetStore, Grid
    from tests.train.test_data import sphere_case

    url = str(tmp_path / "store2.zarr")
    store = DatasetStore.create(url, "ds", grid=Grid(shape=(32, 32, 16)), channels=channels)
    ids = ["a", "b"]
    slots = store.allocate(ids)
    rng = np.random.default_rng(0)
    for i, cid in enumerate(ids):
        case = sphere_case(rng, store.grid.zyx)
        modify(i, case)
        store.write_case(slots[cid], **case)
        store.commit(cid, slots[cid], cid, {})
    return url, "ds"
