"""`make bench-train`'s trainer path: ``_train_epoch`` timed on a phantom store, per loss."""

from __future__ import annotations

import math

from benchmarks.bench_train import (
    TRAIN_DATASET,
    measure_trainer_path,
    prepare_train_store,
    trainer_config,
    training_manifest,
)
from pipeline.sources.phantom import MIN_SHAPE


def test_trainer_path_times_both_losses(tmp_path) -> None:
    url = prepare_train_store(tmp_path, cases=2, shape=MIN_SHAPE, workers=1, quiet=True)
    assert (tmp_path / f"2x{'x'.join(map(str, MIN_SHAPE))}-seed0" / ".complete").exists()
    assert prepare_train_store(tmp_path, cases=2, shape=MIN_SHAPE, quiet=True) == url  # cached
    checked = training_manifest(url, tmp_path)
    assert checked.loss_spec["name"] == "manifest"
    cfg = trainer_config("2d", batches=2, epochs=2, device="cpu", amp="off", workers=0,
                         batch_size=2)
    res = measure_trainer_path(url, TRAIN_DATASET, loss_spec=checked.loss_spec,
                               plan=checked.plan, cfg=cfg, rounds=1)
    assert res.losses == ("manifest", "dice_ce")
    for name in res.losses:
        assert len(res.epoch_seconds[name]) == 1
        ms = res.ms_per_step(name)
        assert math.isfinite(ms)
        assert ms > 0
        assert math.isfinite(res.voxels_per_s(name))
        assert res.voxels_per_s(name) > 0
    assert math.isfinite(res.ratio)
    assert res.ratio > 0
    assert res.batch_shape[:2] == (2, len(checked.plan.channels))
