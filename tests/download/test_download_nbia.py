"""NBIA v4 client and series download against the loopback fake (tests/download/_fakes.py)."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import pydicom
import pytest

from pipeline.download.errors import ControlledAccessError, DownloadError, NotFoundError
from pipeline.download.http import HttpClient, RetryPolicy
from pipeline.download.nbia import NbiaClient, NbiaFetcher, parse_nbia_date, plan_nbia
from pipeline.download.plan import STATE_DIR, run_plan

from ._fakes import FakeNbia, FakeSeries


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` except the bookkeeping folder, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and STATE_DIR not in p.parts}


def expected_tree(series: list[FakeSeries]) -> dict[str, bytes]:
    return {f"{s.patient}/{s.uid}/{name}": data for s in series for name, data in s.files.items()}


class TestQueries:
    def test_plan_reads_fields_dates_and_absent_keys(self, nbia: FakeNbia, http: HttpClient,
                                                    archive: list[FakeSeries]) -> None:
        plan = plan_nbia(NbiaClient(http, nbia.api), "UPENN-GBM")
        assert [i.key for i in plan.items] == [s.uid for s in archive]
        mr, seg = plan.items[0], plan.items[1]
        assert (mr.modality, mr.n_files, mr.description) == ("MR", 3, "T1")
        assert seg.description is None  # absent key in the answer
        assert mr.series_date == date(2021, 3, 17)  # from "03-17-2021"
        assert plan.total_bytes == sum(len(b) for s in archive for b in s.files.values())
        assert plan.patients == ["UPENN-GBM-00001", "UPENN-GBM-00002"]

    def test_only_known_parameters_are_sent(self, nbia: FakeNbia, http: HttpClient) -> None:
        # the fake answers 400 to any parameter the real API does not know
        plan_nbia(NbiaClient(http, nbia.api), "UPENN-GBM", patients=["UPENN-GBM-00002"],
                  modality=["seg"], limit=1)
        assert all(path.endswith("getSeries") for path, _, _ in nbia.log)

    def test_http_400_is_not_retried_and_says_why(self, nbia: FakeNbia, http: HttpClient) -> None:
        client = NbiaClient(http, nbia.api)
        with pytest.raises(DownloadError, match=r"HTTP 400 .*unknown parameter"):
            client.http.get_json(client.url("getSeries"), {"Colection": "x"}, what="probe")
        assert len(nbia.log) == 1

    def test_empty_body_reads_as_no_result(self, nbia: FakeNbia, http: HttpClient) -> None:
        client = NbiaClient(http, nbia.api)
        assert client.series("UPENN-GBM", "nobody") == []
        assert client.patients("UPENN-GBM") == ["UPENN-GBM-00001", "UPENN-GBM-00002"]
        assert client.studies("UPENN-GBM", "UPENN-GBM-00001")[0]["StudyDate"] == date(2021, 3, 17)

    def test_unknown_collection_suggests_the_spelling(self, nbia: FakeNbia,
                                                      http: HttpClient) -> None:
        with pytest.raises(NotFoundError, match=r"'upenn-gbm' is not on .*Did you mean 'UPENN-GBM'"):
            plan_nbia(NbiaClient(http, nbia.api), "upenn-gbm")

    def test_missing_modality_lists_those_present(self, nbia: FakeNbia, http: HttpClient) -> None:
        with pytest.raises(NotFoundError, match=r"no series of modality \['CT'\]; present: \['MR', 'SEG'\]"):
            plan_nbia(NbiaClient(http, nbia.api), "UPENN-GBM", modality=["CT"])

    def test_controlled_access_collection_gets_instructions(self, nbia: FakeNbia,
                                                            http: HttpClient) -> None:
        with pytest.raises(ControlledAccessError,
                           match=r"LGG-1p19qDeletion.*controlled-access.*xrai ingest"):
            plan_nbia(NbiaClient(http, nbia.api), "LGG-1p19qDeletion")

    def test_limit_keeps_the_first_patients(self, nbia: FakeNbia, http: HttpClient) -> None:
        plan = plan_nbia(NbiaClient(http, nbia.api), "UPENN-GBM", limit=1)
        assert plan.patients == ["UPENN-GBM-00001"]

    @pytest.mark.parametrize(("text", "expected"), [
        ("03-17-2021", date(2021, 3, 17)),
        ("2021-03-17", date(2021, 3, 17)),
        ("2021-03-17 10:11:12.0", date(2021, 3, 17)),
        ("", None),
        (None, None),
        ("someday", None),
    ])
    def test_parse_nbia_date(self, text: str | None, expected: date | None) -> None:
        assert parse_nbia_date(text) == expected


class TestDownload:
    def test_downloads_into_patient_series_folders(self, nbia: FakeNbia, http: HttpClient,
                                                   archive: list[FakeSeries],
                                                   tmp_path: Path) -> None:
        client = NbiaClient(http, nbia.api)
        summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), tmp_path)
        assert summary.exit_code == 0
        assert tree(tmp_path) == expected_tree(archive)
        first = archive[0]
        ds = pydicom.dcmread(tmp_path / first.patient / first.uid / "1-01.dcm")
        assert ds.SeriesInstanceUID == first.uid
        assert not list((tmp_path / STATE_DIR / "tmp").iterdir())  # nothing left behind

    def test_rerun_skips_verified_series_without_requests(self, nbia: FakeNbia,
                                                          http: HttpClient, tmp_path: Path) -> None:
        client = NbiaClient(http, nbia.api)
        plan = plan_nbia(client, "UPENN-GBM")
        run_plan(plan, NbiaFetcher(client), tmp_path)
        n = len(nbia.log)
        again = run_plan(plan, NbiaFetcher(client), tmp_path)
        assert [o.status for o in again.outcomes] == ["skipped"] * 4
        assert len(nbia.log) == n

    def test_damaged_series_is_fetched_again(self, nbia: FakeNbia, http: HttpClient,
                                             archive: list[FakeSeries], tmp_path: Path) -> None:
        client = NbiaClient(http, nbia.api)
        plan = plan_nbia(client, "UPENN-GBM")
        run_plan(plan, NbiaFetcher(client), tmp_path)
        victim = tmp_path / archive[0].patient / archive[0].uid / "1-02.dcm"
        victim.unlink()
        again = run_plan(plan, NbiaFetcher(client), tmp_path)
        assert [o.status for o in again.outcomes] == ["downloaded"] + ["skipped"] * 3
        assert tree(tmp_path) == expected_tree(archive)

    def test_faults_clear_and_data_is_byte_identical(self, nbia: FakeNbia,
                                                     archive: list[FakeSeries], waits,
                                                     tmp_path: Path) -> None:
        # every kind of fault, in a row on the first series (within a cap of 8 attempts)
        nbia.fault("getSeries", "500", "slow")
        nbia.fault("getImage", "500", "429", "drop", "truncate", "badmd5", "slow")
        policy = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.05)
        http = HttpClient(timeout=(2.0, 0.3), policy=policy, sleep=waits)
        client = NbiaClient(http, nbia.api)
        summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), tmp_path)
        assert summary.exit_code == 0, summary.of("failed")
        assert tree(tmp_path) == expected_tree(archive)
        assert 3.0 in waits.waits  # the 429's Retry-After: 3 was honoured

    def test_persistent_fault_fails_the_series_by_name(self, nbia: FakeNbia, http: HttpClient,
                                                       archive: list[FakeSeries],
                                                       tmp_path: Path) -> None:
        nbia.fault("getImage", *["500"] * 4)  # exactly the cap of 4 attempts, first series
        client = NbiaClient(http, nbia.api)
        summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), tmp_path)
        failed = summary.of("failed")
        assert [o.item.key for o in failed] == [archive[0].uid]
        assert "gave up after 4 attempts (retry cap 4)" in failed[0].reason
        assert "HTTP 500" in failed[0].reason
        assert summary.exit_code == 3  # partial: the other series are usable
        assert not (tmp_path / archive[0].patient / archive[0].uid).exists()

    def test_malicious_zip_writes_nothing_outside(self, nbia: FakeNbia, http: HttpClient,
                                                  archive: list[FakeSeries],
                                                  tmp_path: Path) -> None:
        dest = tmp_path / "dest"
        nbia.evil.add(archive[0].uid)
        client = NbiaClient(http, nbia.api)
        summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), dest)
        failed = summary.of("failed")
        assert [o.item.key for o in failed] == [archive[0].uid]
        assert "climbs out" in failed[0].reason or "absolute" in failed[0].reason
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
        assert not list(tmp_path.rglob("evil.dcm"))
        assert not Path("/tmp/abs.dcm").exists()
        assert not (dest / archive[0].patient / archive[0].uid).exists()
        getimage = [p for p, _, _ in nbia.log if p.endswith("getImage")]
        assert len(getimage) == 4  # not retried: 1 for the bad one, 3 for the others


class TestToken:
    def test_token_is_sent_and_never_logged(self, archive: list[FakeSeries], policy, waits,
                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        secret = "s3cr3t-token-value-42"
        caplog.set_level(logging.DEBUG)
        with FakeNbia(list(archive), token=secret) as server:
            server.fault("getImage", *["503"] * 4)
            http = HttpClient(token=secret, timeout=2.0, policy=policy, sleep=waits)
            client = NbiaClient(http, server.api)
            summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), tmp_path)
            sent = [h.get("Authorization") for _, _, h in server.log]
        assert set(sent) == {f"Bearer {secret}"}
        assert summary.exit_code == 3
        assert secret not in caplog.text
        assert all(secret not in o.reason for o in summary.outcomes)
        assert secret not in repr(http)
        assert all(secret.encode() not in p.read_bytes() for p in tmp_path.rglob("*")
                   if p.is_file())

    def test_refused_token_is_named_but_not_shown(self, archive: list[FakeSeries], policy,
                                                  waits) -> None:
        with FakeNbia(list(archive), token="right") as server:
            http = HttpClient(token="wrong-secret", timeout=2.0, policy=policy, sleep=waits)
            with pytest.raises(DownloadError, match=r"HTTP 401.*XRAI_TCIA_TOKEN was refused") as info:
                plan_nbia(NbiaClient(http, server.api), "UPENN-GBM")
        assert "wrong-secret" not in str(info.value)


def test_server_without_include_md5_is_asked_through_get_image_with_md5_hash(
        archive: list[FakeSeries], http: HttpClient, tmp_path: Path) -> None:
    with FakeNbia(list(archive), include_md5=False) as server:
        client = NbiaClient(http, server.api)
        summary = run_plan(plan_nbia(client, "UPENN-GBM"), NbiaFetcher(client), tmp_path)
        paths = [p.rsplit("/", 1)[-1] for p, _, _ in server.log]
    assert summary.exit_code == 0, summary.of("failed")
    assert paths.count("getImage") == 1  # refused once (HTTP 400), then never again
    assert paths.count("getImageWithMD5Hash") == len(archive)
    for s in archive:
        for name, data in s.files.items():
            assert (tmp_path / s.patient / s.uid / name).read_bytes() == data
