"""Progress lines (issue 13, item 5): a log line per epoch when output is not a terminal.

`ProgressLog` is fed events by hand (a fake clock makes the times exact); the benchmark
and the CLI are run on a tiny store to check that the lines come out of real training.
"""

from __future__ import annotations

import logging

import pytest

from pipeline.train.progress import LOGGER_NAME, ProgressLog, epoch_line, format_duration
from tests.train.test_data import make_store, plan_for
from tests.train.test_loop import tiny_cfg


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def epoch_event(loss: str, fold: int, epoch: int, epochs: int = 2, **kw) -> dict:
    return {"kind": "epoch", "loss": loss, "fold": fold, "epoch": epoch, "epochs": epochs,
            "train_loss": 0.5, "term_names": [], "weights": [], "alpha": None, "beta": None,
            **kw}


class TestFormat:
    @pytest.mark.parametrize(("seconds", "text"), [
        (0, "0s"), (59.4, "59s"), (60, "1m00s"), (185, "3m05s"), (7620, "2h07m"),
        (float("nan"), "?"), (-1, "?")])
    def test_durations(self, seconds: float, text: str) -> None:
        assert format_duration(seconds) == text

    def test_line_has_weights_tversky_and_dice(self) -> None:
        ev = epoch_event("manifest", 0, 3, epochs=10, train_loss=0.43125,
                         term_names=["dice", "bce"], weights=[0.5, 0.5], alpha=0.31,
                         beta=0.69, val_dice=0.8123)
        assert epoch_line(ev, folds=2) == ("manifest fold 1/2 epoch 3/10: loss 0.4313, "
                                           "weights dice 0.50 bce 0.50, α 0.31 β 0.69, "
                                           "val Dice 0.812")

    def test_line_without_extras(self) -> None:
        assert epoch_line(epoch_event("bce", 1, 1)) == "bce fold 2 epoch 1/2: loss 0.5000"


class TestProgressLog:
    def test_one_line_per_epoch_with_time_left(self, caplog: pytest.LogCaptureFixture) -> None:
        clock = FakeClock()
        log = ProgressLog(clock=clock)
        caplog.set_level(logging.INFO, logger=LOGGER_NAME)
        log({"kind": "start", "losses": ["manifest", "dice"], "folds": 2, "epochs": 2})
        clock.now += 10.0
        log(epoch_event("manifest", 0, 1))
        log({"kind": "step", "loss": "manifest", "fold": 0, "epoch": 1, "step": 1,
             "steps": 1, "value": 0.4})  # steps are not logged
        clock.now += 10.0
        log(epoch_event("manifest", 0, 2, val_dice=0.5))
        lines = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
        assert lines[0] == "training manifest, dice: 2 folds × 2 epochs (8 epochs in all)"
        # 10 s per epoch so far: 1 of 8 done -> 70 s left; 2 of 8 -> 60 s left
        assert lines[1].endswith("1/8 epochs, 10s elapsed, about 1m10s left")
        assert lines[2] == ("manifest fold 1/2 epoch 2/2: loss 0.5000, val Dice 0.500; "
                            "2/8 epochs, 20s elapsed, about 1m00s left")
        assert len(lines) == 3

    def test_resumed_folds_count_as_done_not_as_time(
            self, caplog: pytest.LogCaptureFixture) -> None:
        clock = FakeClock()
        log = ProgressLog(clock=clock)
        caplog.set_level(logging.INFO, logger=LOGGER_NAME)
        log({"kind": "start", "losses": ["dice"], "folds": 3, "epochs": 2})
        log({"kind": "fold_done", "loss": "dice", "fold": 0, "dice": 0.7})  # from disk
        clock.now += 5.0
        log(epoch_event("dice", 1, 1))
        last = [r.getMessage() for r in caplog.records][-1]
        # 3 of 6 epochs done, one trained in 5 s: 3 left at 5 s each
        assert last.endswith("3/6 epochs, 5s elapsed, about 15s left")

    def test_logs_to_the_given_logger(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="some.run.logger")
        log = ProgressLog(logging.getLogger("some.run.logger"), total_epochs=1)
        log(epoch_event("dice", 0, 1, epochs=1))
        assert [r.name for r in caplog.records] == ["some.run.logger"]


def test_benchmark_logs_every_epoch(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.train.benchmark import run_benchmark

    url, ds = make_store(tmp_path, 4)
    spec = {"name": "manifest", "terms": [{"name": "tversky"}, {"name": "bce"}],
            "weighting": {"method": "softadapt", "params": {"beta": 0.1}}}
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    run_benchmark(url, ds, ["manifest", "dice"], plan=plan_for(), cfg=tiny_cfg(epochs=2),
                  folds=2, out_dir=tmp_path / "run", manifest_spec=spec,
                  progress=ProgressLog())
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == 2 * 2 * 2  # losses × folds × epochs
    assert lines[0].startswith("manifest fold 1/2 epoch 1/2: loss ")
    assert "weights tversky " in lines[0]
    assert " bce " in lines[0]
    assert "val Dice " in lines[0]  # val_every=1
    assert lines[-1].startswith("dice fold 2/2 epoch 2/2: loss ")
    assert "8/8 epochs" in lines[-1]
    assert "about 0s left" in lines[-1]


@pytest.mark.slow
def test_cli_logs_lines_when_not_a_terminal(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner's output is not a terminal: no bars, one log line per epoch on stderr."""
    from typer import Typer
    from typer.testing import CliRunner

    from pipeline.manifest_io import write_manifest
    from pipeline.train.cli import train
    from tests.train.test_loop import make_store_with_channels

    rules = pytest.importorskip("tests.stats.test_rules")
    import numpy as np

    from stats.manifest import build_manifest

    monkeypatch.delenv("XRAI_PROGRESS", raising=False)
    manifest = build_manifest(rules.small_tumour_stats(np.random.default_rng(0)))

    def modify(i, case):  # intensities inside the manifest's ranges
        case["image"] = case["image"][:2] * 8.0

    url, ds = make_store_with_channels(tmp_path, ("t1", "t2"), modify)
    path = write_manifest(manifest, tmp_path / "manifest.json")
    app = Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, [
        "train", "--manifest", str(path), "--store", url, "--dataset", ds,
        "--losses", "manifest,dice", "--folds", "2", "--epochs", "1",
        "--batches-per-epoch", "1", "--batch-size", "2", "--features", "4",
        "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if " epoch 1/1: loss " in ln]
    assert len(lines) == 4, result.stderr
    assert "4/4 epochs" in lines[-1]
    assert "left" in lines[-1]
    assert "━" not in result.stderr  # no progress bar
    assert logging.getLogger(LOGGER_NAME).handlers == []  # the CLI's handler is removed
