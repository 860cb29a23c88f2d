"""The per-case outlier rule (`case_outliers`, issue 13 item 3) and the run folder's
optional outputs."""

from __future__ import annotations

import math

import pytest

from pipeline.train.benchmark import case_outliers


def rows(values: dict[str, dict[str, float]]) -> list[dict]:
    """``{case: {loss: dice}}`` as metrics_per_case rows."""
    return [{"loss": loss, "fold": 0, "case": case, "dice": d}
            for case, by_loss in values.items() for loss, d in by_loss.items()]


class TestRule:
    @pytest.mark.parametrize(("a", "b", "flagged"), [
        (0.05, 0.80, True),   # A below 0.1, B above 0.5
        (0.39, 0.80, True),   # A below half of B (0.40)
        (0.41, 0.80, False),  # A above half of B and above 0.1
        (0.05, 0.50, False),  # B not above 0.5: nobody succeeds
        (0.24, 0.51, True),   # A below half of B (0.255)
    ])
    def test_thresholds(self, a: float, b: float, flagged: bool) -> None:
        found = case_outliers(rows({"c": {"A": a, "B": b}}))
        assert [(o["failing"], o["succeeding"]) for o in found] == (
            [("A", "B")] if flagged else [])

    def test_every_failing_pair_sorted_by_difference(self) -> None:
        found = case_outliers(rows({"c1": {"m": 0.9, "dice": 0.6, "bce": 0.02},
                                    "c0": {"m": 0.7, "dice": 0.7, "bce": 0.7}}))
        assert [(o["case"], o["failing"], o["succeeding"]) for o in found] == [
            ("c1", "bce", "m"), ("c1", "bce", "dice")]
        assert found[0]["difference"] == pytest.approx(0.88)

    def test_undefined_values_are_skipped(self) -> None:
        assert case_outliers(rows({"c": {"A": math.nan, "B": 0.9}})) == []


def test_stale_optional_outputs_are_removed(tmp_path) -> None:
    """A one-loss run leaves no paired table of an earlier two-loss run in its folder."""
    from pipeline.train.benchmark import OPTIONAL_OUTPUTS, run_benchmark
    from tests.train.test_data import make_store, plan_for
    from tests.train.test_loop import tiny_cfg

    url, ds = make_store(tmp_path, 2)
    out = tmp_path / "run"
    out.mkdir()
    for name in OPTIONAL_OUTPUTS:
        (out / name).write_text("stale")
    run_benchmark(url, ds, ["dice"], plan=plan_for(), cfg=tiny_cfg(epochs=1, n_overlays=0),
                  folds=2, out_dir=out)
    assert not any((out / name).exists() for name in OPTIONAL_OUTPUTS)
    assert (out / "curves.png").stat().st_size > 0


def test_a_run_folder_is_resumed_only_under_the_same_options(tmp_path, caplog) -> None:
    """Finished folds are reused when nothing that shaped them changed, trained again when
    the training options (or a loss's spec) differ, with a warning saying which."""
    import logging

    from pipeline.train.benchmark import run_benchmark
    from tests.train.test_data import make_store, plan_for
    from tests.train.test_loop import tiny_cfg

    url, ds = make_store(tmp_path, 2)
    out = tmp_path / "run"

    def run(**cfg):
        return run_benchmark(url, ds, ["dice"], plan=plan_for(),
                             cfg=tiny_cfg(epochs=1, n_overlays=0, **cfg), folds=2, out_dir=out)

    run()
    result = out / "dice" / "fold0" / "result.json"
    first = result.stat().st_mtime_ns
    run()  # the same options: the fold is reused, its result untouched
    assert result.stat().st_mtime_ns == first
    with caplog.at_level(logging.WARNING, logger="pipeline.train.benchmark"):
        run(lr=0.5)  # another learning rate: the folds answer another question
    assert result.stat().st_mtime_ns != first
    assert "written with other train" in caplog.text
