"""One training configuration for ``xrai train`` and the flows (issue 12, item 1).

The CLI and the flows' ``benchmark`` task both build the trainer's configuration with
`pipeline.train.options.run_training`. These tests set every option to a value other
than its default, run both paths up to `run_benchmark` and compare what it receives, and
fail when an option exists on one side only. No Prefect server: the task body runs
with ``.fn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from flows.config import TrainOptions as FlowTrainOptions
from flows.config import parse_config
from pipeline.train.cli import RUN_PARAMETERS, train
from pipeline.train.options import TrainOptions, train_config

#: Every option of `xrai train` (but the run's inputs and outputs) with a value that is
#: not its default, as the command line spells it and as a flow's ``train:`` block does.
#: A new option must be added here, to the CLI and to `TrainOptions`, or the first test
#: fails.
NON_DEFAULT: dict[str, tuple[list[str], Any]] = {
    "losses": (["--losses", "dice,bce"], ["dice", "bce"]),
    "folds": (["--folds", "2"], 2),
    "epochs": (["--epochs", "3"], 3),
    "dim": (["--dim", "3d"], "3d"),
    "patch_size": (["--patch-size", "8", "16", "16"], [8, 16, 16]),
    "fg_fraction": (["--fg-fraction", "0.5"], 0.5),
    "affine": (["--affine"], True),
    "target": (["--target", "multiclass"], "multiclass"),
    "batch_size": (["--batch-size", "3"], 3),
    "batches_per_epoch": (["--batches-per-epoch", "7"], 7),
    "lr": (["--lr", "0.02"], 0.02),
    "val_every": (["--val-every", "2"], 2),
    "features": (["--features", "4"], 4),
    "levels": (["--levels", "4"], 4),
    "workers": (["--workers", "1"], 1),
    "device": (["--device", "cpu"], "cpu"),
    "amp": (["--amp", "off"], "off"),
    "seed": (["--seed", "7"], 7),
    "resume": (["--no-resume"], False),
}


def _train_app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)  # two commands: "train" is a sub-command
    return app


def _cli_options() -> dict[str, Any]:
    """The options of `xrai train` (name -> default), the run's inputs and outputs left out."""
    command = typer.main.get_command(_train_app()).commands["train"]  # type: ignore[attr-defined]
    return {p.name: p.default for p in command.params
            if p.name not in RUN_PARAMETERS and p.name != "help"}


class _Captured(Exception):
    """Raised by the stand-in for `run_benchmark` once it has recorded its arguments."""


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_run_benchmark(store_url: str, dataset: str, losses: Any, **kwargs: Any) -> Any:
        calls.append({"losses": list(losses), **kwargs})
        raise _Captured

    import pipeline.train.benchmark

    monkeypatch.setattr(pipeline.train.benchmark, "run_benchmark", fake_run_benchmark)
    return calls


@pytest.fixture
def run_inputs(tmp_path: Path) -> tuple[Path, str, str]:
    """A real manifest and a two-case store it trains on: (manifest, store URL, dataset)."""
    pytest.importorskip("tests.stats.test_rules")
    from pipeline.manifest_io import write_manifest
    from stats.manifest import build_manifest
    from tests.stats.test_rules import small_tumour_stats
    from tests.train.test_loop import make_store_with_channels

    manifest = build_manifest(small_tumour_stats(np.random.default_rng(0)))

    def modify(i: int, case: dict[str, np.ndarray]) -> None:
        case["image"] = case["image"][:2] * 8.0

    url, ds = make_store_with_channels(tmp_path, ("t1", "t2"), modify)
    return write_manifest(manifest, tmp_path / "manifest.json"), url, ds


class TestOptionsAreTheSameOnBothSides:
    def test_every_option_is_listed_once(self) -> None:
        """The CLI's options, the flow's fields and this table are one set."""
        cli = set(_cli_options())
        assert cli == set(TrainOptions.model_fields), "xrai train and TrainOptions differ"
        assert set(FlowTrainOptions.model_fields) == set(TrainOptions.model_fields), \
            "the flow's TrainOptions adds or lacks a field"
        assert set(NON_DEFAULT) == cli, "NON_DEFAULT must name every option of xrai train"

    @pytest.mark.parametrize("name", sorted(NON_DEFAULT))
    def test_value_is_not_a_default(self, name: str) -> None:
        value = NON_DEFAULT[name][1]
        cli_default = _cli_options()[name]
        if name == "losses":
            cli_default = cli_default.split(",")
        assert value != cli_default
        for model in (TrainOptions, FlowTrainOptions):
            default = model.model_fields[name].default
            assert value != (list(default) if isinstance(default, tuple) else default)

    @pytest.mark.parametrize("name", sorted(NON_DEFAULT))
    def test_every_option_reaches_the_trainer(self, name: str) -> None:
        """Changing one option changes what `run_benchmark` gets (none is dropped)."""
        base = {"dim": "3d"} if name == "patch_size" else {}
        value = NON_DEFAULT[name][1]

        def run(options: TrainOptions) -> tuple[Any, ...]:
            return options.losses, options.folds, options.resume, train_config(options)

        assert run(TrainOptions(**base, **{name: value})) != run(TrainOptions(**base))


def test_cli_and_flow_give_the_trainer_equal_configurations_issue_12(
        capture: list[dict[str, Any]], run_inputs: tuple[Path, str, str],
        tmp_path: Path) -> None:
    """Every option at a non-default value, through `xrai train` and through a flow's
    ``train:`` block and its ``benchmark`` task: `run_benchmark` receives the same."""
    from flows.tasks import benchmark

    manifest, url, ds = run_inputs
    args = ["train", "--manifest", str(manifest), "--store", url, "--dataset", ds,
            "--out", str(tmp_path / "cli")]
    for cli_args, _ in NON_DEFAULT.values():
        args += cli_args
    result = CliRunner().invoke(_train_app(), args)
    assert isinstance(result.exception, _Captured), result.output

    block = {name: value for name, (_, value) in NON_DEFAULT.items()}
    config = parse_config({"datasets": [{
        "name": ds, "source": {"kind": "local", "path": str(tmp_path)}, "store": url,
        "out_dir": str(tmp_path / "flow"), "train": block}]})
    options = config.datasets[0].train
    assert options is not None
    with pytest.raises(_Captured):
        benchmark.fn(str(manifest), url, ds, str(tmp_path / "flow"), options)

    from_cli, from_flow = capture
    for call in (from_cli, from_flow):
        call.pop("out_dir")
        call.pop("progress")
        call["manifest_path"] = str(call["manifest_path"])
    assert from_cli == from_flow
    assert from_cli["cfg"] == train_config(TrainOptions(**block))


def test_more_folds_than_cases_is_a_usage_error_before_the_header(
        run_inputs: tuple[Path, str, str], tmp_path: Path) -> None:
    manifest, url, ds = run_inputs  # two cases
    result = CliRunner().invoke(_train_app(), [
        "train", "--manifest", str(manifest), "--store", url, "--dataset", ds,
        "--out", str(tmp_path / "run"), "--folds", "3", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "3 folds need at least 3 cases" in " ".join(result.output.replace("│", " ").split())
    assert "training" not in result.output
    assert "Traceback" not in result.output
