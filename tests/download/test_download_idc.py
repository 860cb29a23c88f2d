"""IDC: offline discovery from an index in idc-index's format, download from moto's S3 server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from pipeline.download.errors import NotFoundError
from pipeline.download.http import RetryPolicy
from pipeline.download.idc import (
    IdcFetcher,
    idc_collection_id,
    idc_index_path,
    parse_s3_url,
    plan_idc,
)
from pipeline.download.plan import STATE_DIR, run_plan

from ._fakes import FakeSeries, Recorder

boto3 = pytest.importorskip("boto3")
BUCKET = "idc-open-data"


def write_index(path: Path, archive: list[FakeSeries], *, counts: dict[str, int] | None = None
                ) -> Path:
    """A parquet file with the idc-index columns the planner reads."""
    rows = [{
        "collection_id": "upenn_gbm", "PatientID": s.patient, "StudyInstanceUID": s.study,
        "SeriesInstanceUID": s.uid, "Modality": s.modality, "SeriesDescription": s.description,
        "SeriesDate": "2021-03-17", "instanceCount": (counts or {}).get(s.uid, len(s.files)),
        "series_size_MB": sum(len(b) for b in s.files.values()) / 2**20,
        "series_aws_url": f"s3://{BUCKET}/crdc-{s.uid}/*",
    } for s in archive]
    rows.append({**rows[0], "collection_id": "remind", "PatientID": "ReMIND-001",
                 "SeriesInstanceUID": "9.9.9"})
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str, archive: list[FakeSeries]) -> str:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=BUCKET)
    public_read = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(public_read))  # like IDC's buckets
    for s in archive:
        for i, data in enumerate(s.files.values()):
            s3.put_object(Bucket=BUCKET, Key=f"crdc-{s.uid}/instance-{i}.dcm", Body=data)
    return moto_endpoint


class FlakyS3:
    """Passes calls to a real client; get_object fails as told first (timeouts, short bodies)."""

    def __init__(self, client, faults: list[str]) -> None:
        self.client, self.faults = client, list(faults)

    def get_paginator(self, name: str):
        return self.client.get_paginator(name)

    def get_object(self, **kw):
        fault = self.faults.pop(0) if self.faults else None
        if fault == "timeout":
            from botocore.exceptions import ReadTimeoutError

            raise ReadTimeoutError(endpoint_url="http://fake")
        if fault == "throttle":
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "SlowDown"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
        answer = self.client.get_object(**kw)
        if fault in ("short", "corrupt"):
            data = answer["Body"].read()
            data = data[:-10] if fault == "short" else bytes([data[0] ^ 1]) + data[1:]
            import io

            from botocore.response import StreamingBody

            answer["Body"] = StreamingBody(io.BytesIO(data), len(data))
        return answer


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.dcm")
            if STATE_DIR not in p.parts}


def expected(archive: list[FakeSeries]) -> dict[str, bytes]:
    return {f"{s.patient}/{s.uid}/instance-{i}.dcm": d
            for s in archive for i, d in enumerate(s.files.values())}


class TestPlan:
    def test_plan_is_offline_from_the_index(self, tmp_path: Path,
                                            archive: list[FakeSeries]) -> None:
        index = write_index(tmp_path / "idx.parquet", archive)
        plan = plan_idc("UPENN-GBM", index=index, modality=["mr"])
        assert [i.key for i in plan.items] == [s.uid for s in archive if s.modality == "MR"]
        assert plan.items[0].n_files == 3
        assert plan.items[0].ref == f"s3://{BUCKET}/crdc-{archive[0].uid}/*"
        assert plan_idc("upenn_gbm", index=index, limit=1).patients == [archive[0].patient]

    def test_unknown_collection_suggests(self, tmp_path: Path, archive: list[FakeSeries]) -> None:
        index = write_index(tmp_path / "idx.parquet", archive)
        with pytest.raises(NotFoundError, match=r"'UPENN-GMB'.*Did you mean 'upenn_gbm'"):
            plan_idc("UPENN-GMB", index=index)

    def test_shipped_index_has_the_collections(self) -> None:
        # the index that ships with idc-index (no network): UPENN-GBM and ReMIND are there
        pytest.importorskip("idc_index_data")
        plan = plan_idc("ReMIND", patients=["ReMIND-001"], modality=["SEG"])
        assert plan.items
        assert all(i.modality == "SEG" for i in plan.items)
        assert idc_index_path().is_file()

    def test_names(self) -> None:
        assert idc_collection_id("UPENN-GBM") == "upenn_gbm"
        assert parse_s3_url("s3://idc-open-data/abc/*") == ("idc-open-data", "abc/")
        with pytest.raises(ValueError, match=r"is not of the form s3://"):
            parse_s3_url("http://x")


class TestDownload:
    def test_download_from_s3_with_faults(self, bucket: str, tmp_path: Path,
                                          archive: list[FakeSeries]) -> None:
        index = write_index(tmp_path / "idx.parquet", archive)
        plan = plan_idc("UPENN-GBM", index=index)
        fetcher = IdcFetcher(endpoint_url=bucket, sleep=Recorder(),
                             policy=RetryPolicy(max_attempts=5, base_delay=0.0))
        # four faults in a row on the first object, within the cap of five attempts
        fetcher.s3 = FlakyS3(fetcher.s3, ["timeout", "throttle", "short", "corrupt"])
        dest = tmp_path / "dest"
        summary = run_plan(plan, fetcher, dest)
        assert summary.exit_code == 0, summary.of("failed")
        assert tree(dest) == expected(archive)
        again = run_plan(plan, fetcher, dest)
        assert {o.status for o in again.outcomes} == {"skipped"}

    def test_count_mismatch_fails_the_series(self, bucket: str, tmp_path: Path,
                                             archive: list[FakeSeries]) -> None:
        index = write_index(tmp_path / "idx.parquet", archive, counts={archive[0].uid: 5})
        plan = plan_idc("UPENN-GBM", index=index, limit=1)
        fetcher = IdcFetcher(endpoint_url=bucket, sleep=Recorder(),
                             policy=RetryPolicy(max_attempts=2, base_delay=0.0))
        summary = run_plan(plan, fetcher, tmp_path / "dest")
        failed = summary.of("failed")
        assert [o.item.key for o in failed] == [archive[0].uid]
        assert "holds 3 DICOM objects for it, instanceCount is 5" in failed[0].reason
        assert not (tmp_path / "dest" / archive[0].patient / archive[0].uid).exists()

    def test_unreachable_endpoint_is_retried_then_named(self, tmp_path: Path,
                                                        archive: list[FakeSeries]) -> None:
        from .conftest import free_port

        index = write_index(tmp_path / "idx.parquet", archive)
        plan = plan_idc("UPENN-GBM", index=index, limit=1, modality=["SEG"])
        waits = Recorder()
        fetcher = IdcFetcher(endpoint_url=f"http://127.0.0.1:{free_port()}", sleep=waits,
                             policy=RetryPolicy(max_attempts=3, base_delay=0.0), timeout=1.0,
                             rng=random.Random(0))
        summary = run_plan(plan, fetcher, tmp_path / "dest")
        assert "gave up after 3 attempts" in summary.of("failed")[0].reason
        assert len(waits.waits) == 2
