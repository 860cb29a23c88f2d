"""The training loader's workers live for the whole fold and draw exactly the samples that
loaders made anew each epoch drew; they are stopped when the fold ends or fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.train import loop
from pipeline.train.data import SamplingConfig, TrainSamples
from pipeline.train.loop import (
    CHECKPOINT,
    Fold,
    TrainingDiverged,
    _Loader,
    load_checkpoint,
    train_fold,
)
from tests.train.test_data import make_store, plan_for
from tests.train.test_loop import SPACING, tiny_cfg

CPU = torch.device("cpu")
EPOCHS = (0, 1, 2)
BATCH = 2


def samples(url: str, ds: str) -> TrainSamples:
    # 3 batches over 2 workers: unequal shares; default augmentation (flips, noise)
    return TrainSamples(url, ds, ["case00", "case01", "case02"], plan_for(),
                        sampling=SamplingConfig(dim="2d", patch_size=(24, 24)),
                        batch_size=BATCH, batches_per_epoch=3, seed=5)


def fresh_epoch(data: TrainSamples, epoch: int, workers: int) -> list[dict]:
    """An epoch as the trainer drew it before: a new loader, new workers."""
    data.set_epoch(epoch)
    return list(DataLoader(data, batch_size=BATCH, num_workers=workers,
                           persistent_workers=False,
                           multiprocessing_context="forkserver" if workers else None))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True))


def workers_now() -> set[int]:
    """Live grandchildren of this process: data-loader workers (children of the fork
    server, which is a child of this process)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            parent[int(entry.name)] = int(fields[1])
    me = os.getpid()
    children = {p for p, pp in parent.items() if pp == me}
    return {p for p, pp in parent.items() if pp in children}


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> dict:
    """Epochs 0-2 with two workers: fresh loaders per epoch, then one persistent loader."""
    url, ds = make_store(tmp_path_factory.mktemp("persistent"), 3)
    torch.manual_seed(11)
    fresh = [fresh_epoch(samples(url, ds), e, 2) for e in EPOCHS]
    fresh_rng = torch.get_rng_state()
    data = samples(url, ds)
    loader = _Loader(data, batch_size=BATCH, workers=2, device=CPU)
    torch.manual_seed(11)
    persistent, pids = [], []
    for e in EPOCHS:
        data.set_epoch(e)
        persistent.append(list(loader))
        pids.append(workers_now())
    rng = torch.get_rng_state()
    loader.close()
    return {"fresh": fresh, "persistent": persistent, "pids": pids, "fresh_rng": fresh_rng,
            "rng": rng, "after_close": workers_now()}


class TestPersistentWorkers:
    def test_three_epochs_give_the_batches_of_fresh_loaders(self, two_workers) -> None:
        assert [len(b) for b in two_workers["persistent"]] == [3, 3, 3]
        for fresh, persistent in zip(two_workers["fresh"], two_workers["persistent"],
                                     strict=True):
            assert same_batches(fresh, persistent)

    def test_set_epoch_reaches_the_running_workers(self, two_workers) -> None:
        e0, e1, e2 = two_workers["persistent"]
        assert not torch.equal(e0[0]["image"], e1[0]["image"])
        assert not torch.equal(e1[0]["image"], e2[0]["image"])
        assert same_batches(e1, two_workers["fresh"][1])

    def test_the_same_two_workers_serve_every_epoch_and_stop_on_close(self, two_workers) -> None:
        pids = two_workers["pids"]
        assert len(pids[0]) == 2
        assert pids[0] == pids[1] == pids[2]
        assert not (pids[0] & two_workers["after_close"])

    def test_main_process_rng_stream_is_that_of_fresh_loaders(self, two_workers) -> None:
        assert torch.equal(two_workers["rng"], two_workers["fresh_rng"])


def test_no_workers_is_unchanged(tmp_path) -> None:
    url, ds = make_store(tmp_path, 3)
    torch.manual_seed(3)
    fresh = [fresh_epoch(samples(url, ds), e, 0) for e in EPOCHS]
    fresh_rng = torch.get_rng_state()
    data = samples(url, ds)
    loader = _Loader(data, batch_size=BATCH, workers=0, device=CPU)
    torch.manual_seed(3)
    for e, ref in zip(EPOCHS, fresh, strict=True):
        data.set_epoch(e)
        assert same_batches(list(loader), ref)
    assert torch.equal(torch.get_rng_state(), fresh_rng)
    loader.close()


class _PerEpochLoader(_Loader):
    """The loader before this change: new workers at every iteration."""

    def __init__(self, ds, *, batch_size, workers, device) -> None:
        self.workers, self.batch_size = workers, batch_size
        self.loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                 persistent_workers=False,
                                 multiprocessing_context="forkserver" if workers else None)

    def __iter__(self):
        return iter(self.loader)


def fold_setup(tmp_path):
    url, ds = make_store(tmp_path, 3)
    fold = Fold(0, ("case00", "case01"), ("case02",))
    cfg = tiny_cfg(epochs=2, workers=2, val_every=2)
    return url, ds, fold, cfg


def test_fold_with_two_workers_matches_per_epoch_workers_and_leaves_no_process(
        tmp_path, monkeypatch) -> None:
    url, ds, fold, cfg = fold_setup(tmp_path)
    seen: dict[int, set[int]] = {}

    def progress(event) -> None:
        if event["kind"] == "step":
            seen.setdefault(event["epoch"], set()).update(workers_now())

    new = train_fold(url, ds, fold, "dice_ce", {"name": "dice_ce"}, plan_for(), cfg,
                     tmp_path / "new", spacing_zyx=SPACING, progress=progress)
    assert not workers_now()
    assert len(seen[0]) == 2
    assert seen[0] == seen[1]  # one pair of workers for the fold
    with monkeypatch.context() as m:
        m.setattr(loop, "_Loader", _PerEpochLoader)
        old = train_fold(url, ds, fold, "dice_ce", {"name": "dice_ce"}, plan_for(), cfg,
                         tmp_path / "old", spacing_zyx=SPACING)
    assert new.history == old.history
    assert new.cases == old.cases
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("new", "old"))
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_workers_stop_when_training_diverges(tmp_path, monkeypatch) -> None:
    url, ds, fold, cfg = fold_setup(tmp_path)
    real_step = loop._step
    seen: list[set[int]] = []

    def step(run, x, y, extras, *, where):
        seen.append(workers_now())
        if "epoch 1" in where:
            raise TrainingDiverged(f"{where}: training loss is nan")
        return real_step(run, x, y, extras, where=where)

    monkeypatch.setattr(loop, "_step", step)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train_fold(url, ds, fold, "dice_ce", {"name": "dice_ce"}, plan_for(), cfg,
                   tmp_path / "fold", spacing_zyx=SPACING)
    assert len(seen[0]) == 2
    assert not workers_now()


class Killed(Exception):
    pass


def test_resume_after_a_kill_with_two_workers_gives_the_uninterrupted_run(tmp_path) -> None:
    url, ds, fold, _ = fold_setup(tmp_path)
    cfg = tiny_cfg(epochs=3, workers=2, val_every=3)
    spec = {"name": "dice_ce"}
    whole = train_fold(url, ds, fold, "dice_ce", spec, plan_for(), cfg, tmp_path / "whole",
                       spacing_zyx=SPACING)

    def kill_after_two(event) -> None:  # after epoch 2's checkpoint
        if event["kind"] == "epoch" and event["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train_fold(url, ds, fold, "dice_ce", spec, plan_for(), cfg, tmp_path / "cut",
                   spacing_zyx=SPACING, progress=kill_after_two)
    assert not workers_now()
    resumed = train_fold(url, ds, fold, "dice_ce", spec, plan_for(), cfg, tmp_path / "cut",
                         spacing_zyx=SPACING)
    assert resumed.history == whole.history
    assert resumed.cases == whole.cases
