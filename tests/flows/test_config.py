"""The installation configuration file (flows.config); no Prefect server needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import (
    ConfigError,
    DownloadSource,
    GridOptions,
    LocalSource,
    PhantomSource,
    load_config,
    parse_config,
    parse_source,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "flows" / "xrai-deployments.example.yaml"


def _dataset(**overrides: object) -> dict:
    base = {"name": "ph", "source": {"kind": "phantom", "path": "src"}, "store": "s.zarr",
            "out_dir": "out"}
    return {**base, **overrides}


class TestExample:
    def test_example_file_loads(self) -> None:
        config = load_config(EXAMPLE)
        ds = config.dataset("phantom")
        assert isinstance(ds.source, PhantomSource)
        assert ds.schedule is not None
        assert ds.schedule.interval_seconds == 3600
        assert ds.grid_options() == GridOptions(shape=(48, 48, 32))
        assert Path(ds.store).is_absolute()
        assert Path(ds.out_dir).is_absolute()

    def test_unknown_dataset_lists_the_known_ones(self) -> None:
        with pytest.raises(ConfigError, match=r"no dataset 'nope' .* known: \['phantom'\]"):
            load_config(EXAMPLE).dataset("nope")


class TestValidation:
    def test_both_schedule_kinds_rejected_naming_file_and_field(self) -> None:
        data = {"datasets": [_dataset(schedule={"interval_seconds": 60, "cron": "0 3 * * *"})]}
        with pytest.raises(ConfigError,
                           match=r"here\.yaml: field datasets\.0\.schedule: .*exactly one"):
            parse_config(data, where="here.yaml")

    def test_duplicate_dataset_names(self) -> None:
        with pytest.raises(ConfigError, match=r"\['ph'\] occur more than once"):
            parse_config({"datasets": [_dataset(), _dataset()]})

    def test_unknown_field_is_named(self) -> None:
        with pytest.raises(ConfigError, match=r"field datasets\.0\.stroe: .*\(got 'x'\)"):
            parse_config({"datasets": [_dataset(stroe="x")]})

    def test_http_download_needs_a_file_list(self) -> None:
        src = {"kind": "download", "service": "http", "collection": "c", "dest": "d"}
        with pytest.raises(ConfigError, match=r"datasets\.0\.source\.download.*needs file_list"):
            parse_config({"datasets": [_dataset(source=src)]})

    def test_not_yaml(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("datasets: [\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
            load_config(bad)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"configuration file .*none\.yaml"):
            load_config(tmp_path / "none.yaml")

    def test_cron_schedule_and_default_grid(self) -> None:
        src = {"kind": "local", "path": "/data/x", "layout": "upenn"}
        ds = parse_config({"datasets": [_dataset(source=src, schedule={"cron": "0 3 * * *"})]
                           }).datasets[0]
        assert ds.schedule is not None
        assert ds.schedule.cron == "0 3 * * *"
        assert ds.grid_options() == GridOptions(shape=(240, 240, 155))


class TestParseSource:
    def test_phantom(self, tmp_path: Path) -> None:
        src = parse_source("phantom", work_dir=str(tmp_path), cases=3, shape=(40, 40, 32))
        assert src == PhantomSource(path=str(tmp_path / "phantom"), cases=3, shape=(40, 40, 32))

    def test_local_folder(self, tmp_path: Path) -> None:
        assert parse_source(str(tmp_path), work_dir="w") == LocalSource(path=str(tmp_path))

    @pytest.mark.parametrize(("text", "service", "collection"),
                             [("nbia:ReMIND", "nbia", "ReMIND"), ("idc:upenn_gbm", "idc",
                                                                  "upenn_gbm")])
    def test_archives(self, tmp_path: Path, text: str, service: str, collection: str) -> None:
        src = parse_source(text, work_dir=str(tmp_path))
        assert isinstance(src, DownloadSource)
        assert (src.service, src.collection, src.layout) == (service, collection, "dicom")
        assert src.dest == str(tmp_path / "download")

    def test_file_list(self, tmp_path: Path) -> None:
        src = parse_source("http:/lists/ucsf.csv", work_dir=str(tmp_path))
        assert isinstance(src, DownloadSource)
        assert (src.file_list, src.collection) == ("/lists/ucsf.csv", "ucsf")

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"SOURCE '.*nowhere' is neither 'phantom'"):
            parse_source(str(tmp_path / "nowhere"), work_dir="w")


def test_server_url_prints_nothing_without_a_server() -> None:
    import socket

    from typer.testing import CliRunner

    from flows.__main__ import app

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(app, ["server-url", "--port", str(port)])
    assert result.exit_code == 0
    assert result.output == ""


def test_serve_without_a_config_file_says_where_to_start(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.__main__ import app

    result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "none.yaml' does not exist" in result.output
    assert "flows/xrai-deployments.example.yaml" in result.output
