"""The ``train`` flow and deployment (issue 13, items 3 and 5): the UI's form, the
training artifacts and the progress lines in the run's logs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.artifacts import MAX_IMAGE_BYTES, artifact_key, png_markdown
from flows.config import TrainOptions, parse_config, quick_train_options
from flows.train_artifacts import TRAIN_KINDS

from .conftest import PlainRun

TINY = TrainOptions(losses=("manifest", "dice"), folds=2, epochs=1, batch_size=2,
                    batches_per_epoch=1, val_every=1, features=4, levels=3, workers=0,
                    device="cpu")
PNG_1PX = base64.b64decode(  # a 1 x 1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def artifacts(key: str) -> list:
    from tests.flows.test_flows import artifacts as read

    return read(key)


class TestHelpers:
    def test_png_markdown_is_a_data_uri(self, tmp_path: Path) -> None:
        (tmp_path / "a.png").write_bytes(PNG_1PX)
        md = png_markdown(tmp_path / "a.png", "a [tiny] picture")
        assert md == f"![a  tiny  picture](data:image/png;base64,{base64.b64encode(PNG_1PX).decode()})\n"
        assert png_markdown(PNG_1PX, "x") == md.replace("a  tiny  picture", "x")

    def test_png_markdown_refuses_other_bytes(self) -> None:
        with pytest.raises(ValueError, match=r"is not a PNG"):
            png_markdown(b"GIF89a...", "x")

    def test_paired_rows_in_paired_md_units(self) -> None:
        from flows.train_artifacts import paired_rows

        def row(metric: str, diff: float, verdict: str, separated: bool) -> dict:
            return {"loss": "m", "other": "dice", "metric": metric, "verdict": verdict,
                    "separated": separated,
                    "comparison": {"n": 8, "mean_diff": diff, "ci_low": diff - 0.01,
                                   "ci_high": diff + 0.01, "confidence": 0.95,
                                   "p_value": 0.3}}

        rows = paired_rows({"rows": [row("dice", 0.05, "better", False),
                                     row("hd95", -2.0, "better", True)]})
        assert [(r["unit"], r["mean A − B"], r["CI low"]) for r in rows] == [
            ("percentage points", "5", "4"), ("mm", "-2", "-2.01")]
        assert [r["verdict for A"] for r in rows] == ["better? (interval only)", "better"]

    def test_case_rows_leave_a_failed_fold_empty(self) -> None:
        from flows.train_artifacts import case_rows

        rows = case_rows([{"loss": "m", "fold": 0, "case": "c", "dice": 0.75},
                          {"loss": "dice", "fold": 0, "case": "c", "dice": 0.5},
                          {"loss": "m", "fold": 1, "case": "d", "dice": 0.5}],
                         ["m", "dice"])
        assert rows == [
            {"case": "c", "fold": 0, "dice m": "0.75", "dice dice": "0.5", "m − dice": "+0.2500"},
            {"case": "d", "fold": 1, "dice m": "0.5", "dice dice": "", "m − dice": ""}]

    def test_keys(self) -> None:
        key = artifact_key("training-cases", "Ph_Flow.2", "s3://b/x.zarr")
        assert key.startswith("training-cases-ph-flow-2-")
        assert len(key.rsplit("-", 1)[1]) == 12  # the store's id
        assert all(artifact_key(kind, "x", "s").startswith(kind) for kind in TRAIN_KINDS)

    def test_example_configuration_trains_the_quick_way(self) -> None:
        from flows.config import load_config

        example = Path(__file__).parents[2] / "flows" / "xrai-deployments.example.yaml"
        assert load_config(example).dataset("phantom").train == quick_train_options()

    def test_quick_options_are_small(self) -> None:
        q = quick_train_options()
        assert (q.folds, q.epochs, q.device) == (2, 1, "cpu")
        assert q.losses[0] == "manifest"
        assert len(q.losses) >= 2


@pytest.mark.usefixtures("prefect_server")
def test_train_deployment_form_has_the_options(tmp_path: Path) -> None:
    from prefect import get_client

    from flows.deployments import build_deployments, train_deployment_name

    config = parse_config({"datasets": [
        {"name": "ui-train", "source": {"kind": "phantom", "path": str(tmp_path / "p")},
         "store": str(tmp_path / "s.zarr"), "out_dir": str(tmp_path / "o")}]})
    for deployment in build_deployments(config):
        deployment.apply()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"train/{train_deployment_name('ui-train')}")
    schema = dep.parameter_openapi_schema
    assert {"manifest_path", "store", "dataset", "out_dir", "options"} <= set(schema["properties"])
    options = schema["definitions"]["TrainOptions"]["properties"]
    assert {"losses", "folds", "epochs", "dim", "device"} <= set(options)
    assert options["dim"]["enum"] == ["2d", "3d"]
    assert "description" in options["losses"]
    assert dep.parameters["manifest_path"] == str(tmp_path / "o" / "manifest.json")
    assert dep.parameters["store"] == str(tmp_path / "s.zarr")
    assert dep.parameters["run_folder"] is True
    assert TrainOptions.model_validate(dep.parameters["options"]) == quick_train_options()


@pytest.fixture(scope="module")
def trained(prefect_server: str, plain_run: PlainRun,
            tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from flows.train_flow import train_flow
    from pipeline.manifest_io import write_manifest

    root = tmp_path_factory.mktemp("train-flow")
    manifest = write_manifest(plain_run.manifest, root / "manifest.json")
    state = train_flow(str(manifest), plain_run.store_url, plain_run.dataset,
                       str(root / "runs"), options=TINY, run_folder=True, return_state=True)
    return SimpleNamespace(root=root, state=state, result=state.result())


@pytest.mark.slow
class TestTrainFlow:
    def test_runs_in_a_folder_of_its_own(self, trained: SimpleNamespace) -> None:
        out = Path(trained.result.out_dir)
        assert out.parent == trained.root / "runs"
        assert (out / "summary.md").is_file()
        assert [e["loss"] for e in trained.result.summary] == ["manifest", "dice"]

    def test_publishes_every_training_artifact(self, trained: SimpleNamespace) -> None:
        keys = trained.result.artifacts
        assert set(keys) == set(TRAIN_KINDS)
        for kind in TRAIN_KINDS:
            assert artifacts(keys[kind]), kind
        cases = json.loads(artifacts(keys["training-cases"])[0].data)
        assert len(cases) == 3  # every committed case validated once
        assert {"case", "fold", "dice manifest", "dice dice", "manifest − dice"} == set(cases[0])
        paired = json.loads(artifacts(keys["training-paired"])[0].data)
        assert [(r["comparison"], r["metric"]) for r in paired] == [
            ("manifest − dice", m) for m in ("dice", "hd95", "precision", "recall")]
        assert {"mean A − B", "CI low", "CI high", "Wilcoxon p", "verdict for A"} <= set(paired[0])
        outliers = artifacts(keys["training-outliers"])[0]
        assert "Dice < 0.1" in outliers.description
        comparison = artifacts(keys["training-comparison"])[0].data
        assert "too few to separate" in comparison

    def test_pictures_are_embedded_and_small(self, trained: SimpleNamespace) -> None:
        keys = trained.result.artifacts
        curves = artifacts(keys["training-curves"])[0].data
        overlays = artifacts(keys["training-overlays"])[0].data
        comparison = artifacts(keys["training-comparison"])[0].data
        for md in (curves, overlays, comparison):
            assert "](data:image/png;base64," in md
        for name in ("curves.png", "overlays.png", "paired_dice.png", "adaptive.png"):
            size = (Path(trained.result.out_dir) / name).stat().st_size
            assert size < MAX_IMAGE_BYTES, (name, size)

    def test_progress_lines_in_the_run_logs(self, trained: SimpleNamespace) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send the queued log batches
        run_id = trained.state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        lines = [log.message for log in logs if " epoch 1/1: loss " in log.message]
        assert len(lines) == 4, [log.message for log in logs]
        assert any("weights " in ln for ln in lines if ln.startswith("manifest"))
        assert all("val Dice " in ln and "epochs" in ln for ln in lines)
