"""``xrai download`` through typer's CliRunner, registered as the main CLI registers it."""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.download.cli import download

from ._fakes import FakeNbia, FakeSeries

FAST = ["--backoff", "0", "--max-wait", "0.01", "--retries", "3", "--timeout", "2"]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("download")(download)

    @app.command("other")  # a second command, so that "download" is a subcommand as in xrai
    def other() -> None:
        pass

    return app


def run(app: typer.Typer, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["download", *args], env=env)


def test_dry_run_prints_the_plan_and_downloads_nothing(app, nbia: FakeNbia,
                                                       tmp_path: Path) -> None:
    result = run(app, "UPENN-GBM", "--dest", str(tmp_path / "d"), "--base-url", nbia.api,
                 "--dry-run", "--modality", "MR,SEG")
    assert result.exit_code == 0, result.output
    assert "2 patients, 4 series" in result.output
    assert "dry run: nothing downloaded" in result.output
    assert not (tmp_path / "d").exists()
    assert not [p for p, _, _ in nbia.log if p.endswith("getImage")]


def test_download_then_rerun_skips(app, nbia: FakeNbia, archive: list[FakeSeries],
                                   tmp_path: Path) -> None:
    dest = tmp_path / "d"
    first = run(app, "UPENN-GBM", "--dest", str(dest), *FAST, env={"XRAI_NBIA_URL": nbia.api})
    assert first.exit_code == 0, first.output
    assert "xrai ingest" in first.output
    assert "--layout dicom" in first.output
    for s in archive:
        assert sorted(p.name for p in (dest / s.patient / s.uid).iterdir()) == sorted(s.files)
    second = run(app, "UPENN-GBM", "--dest", str(dest), *FAST, env={"XRAI_NBIA_URL": nbia.api})
    assert second.exit_code == 0
    assert "skipped" in second.output


def test_partial_failure_exits_3_and_names_the_series(app, nbia: FakeNbia,
                                                      archive: list[FakeSeries],
                                                      tmp_path: Path) -> None:
    nbia.fault("getImage", "500", "500", "500")
    result = run(app, "UPENN-GBM", "--dest", str(tmp_path), "--base-url", nbia.api, *FAST)
    assert result.exit_code == 3
    assert archive[0].uid in result.output
    assert "HTTP 500" in result.output


def test_everything_failing_exits_1(app, nbia: FakeNbia, tmp_path: Path) -> None:
    nbia.fault("getImage", *["500"] * 12)
    result = run(app, "UPENN-GBM", "--dest", str(tmp_path), "--base-url", nbia.api, *FAST)
    assert result.exit_code == 1


def test_controlled_access_is_a_message_not_a_traceback(app, nbia: FakeNbia,
                                                        tmp_path: Path) -> None:
    result = run(app, "LGG-1p19qDeletion", "--dest", str(tmp_path), "--base-url", nbia.api)
    assert result.exit_code == 1
    assert "controlled-access" in result.output
    assert "xrai ingest" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_token_never_appears_even_on_failure(app, archive: list[FakeSeries], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    secret = "tok-9f8e7d6c5b4a"
    caplog.set_level(logging.DEBUG)
    with FakeNbia(list(archive), token=secret) as server:
        server.fault("getImage", *["500"] * 3)
        ok = run(app, "UPENN-GBM", "--dest", str(tmp_path / "a"), "--base-url", server.api,
                 *FAST, env={"XRAI_TCIA_TOKEN": secret})
        refused = run(app, "UPENN-GBM", "--dest", str(tmp_path / "b"), "--base-url",
                      server.api, *FAST, env={"XRAI_TCIA_TOKEN": secret + "-old"})
    assert ok.exit_code == 3
    assert refused.exit_code == 1
    assert "XRAI_TCIA_TOKEN was refused" in refused.output
    for text in (ok.output, refused.output, caplog.text):
        assert secret not in text
    assert all(secret.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_idc_dry_run_is_offline(app, tmp_path: Path) -> None:
    pytest.importorskip("idc_index_data")
    result = run(app, "ReMIND", "--source", "idc", "--dest", str(tmp_path), "--dry-run",
                 "--patients", "ReMIND-001", "--modality", "MR",
                 env={"XRAI_S3_ENDPOINT": "http://127.0.0.1:9"})  # unreachable: not used
    assert result.exit_code == 0, result.output
    assert "ReMIND-001" in result.output
    assert "1 patients" in result.output


def test_http_source_needs_a_file_list(app, tmp_path: Path) -> None:
    result = run(app, "UCSF-PDGM", "--source", "http", "--dest", str(tmp_path))
    assert result.exit_code == 2
    assert "--source http needs --file-list" in result.output


def test_too_little_disk_space_stops_before_downloading(app, nbia: FakeNbia, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10, 10, 1000))
    result = run(app, "UPENN-GBM", "--dest", str(tmp_path), "--base-url", nbia.api)
    assert result.exit_code == 1
    assert "1000 B free, the plan needs" in result.output
    assert not [p for p, _, _ in nbia.log if p.endswith("getImage")]
