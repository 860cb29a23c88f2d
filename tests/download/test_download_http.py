"""The retrying client: backoff, Retry-After, Range resume, caps, redaction."""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.download.errors import DownloadError
from pipeline.download.http import HttpClient, RetryPolicy, parse_retry_after, redact

from ._fakes import FakeFileServer, Recorder

DATA = bytes(random.Random(1).randbytes(200_000))


@pytest.fixture
def files():
    with FakeFileServer({"big.bin": DATA}) as server:
        yield server


class TestPolicy:
    def test_backoff_is_full_jitter_under_a_doubling_ceiling(self) -> None:
        policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
        rng = random.Random(0)
        for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
            draws = [policy.delay(attempt, rng=rng) for _ in range(200)]
            assert min(draws) >= 0.0
            assert max(draws) <= ceiling
            assert max(draws) > 0.8 * ceiling  # spread over the whole interval

    def test_retry_after_replaces_the_draw_within_its_cap(self) -> None:
        policy = RetryPolicy(max_retry_after=10.0)
        assert policy.delay(1, retry_after=3.0) == 3.0
        assert policy.delay(1, retry_after=99.0) == 10.0

    def test_invalid_policy(self) -> None:
        with pytest.raises(ValueError, match=r"max_attempts must be >= 1, got 0"):
            RetryPolicy(max_attempts=0)

    def test_parse_retry_after_http_date(self) -> None:
        now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
        assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
        assert parse_retry_after(None) is None

    def test_redact(self) -> None:
        assert redact("Bearer abc at abc", ["abc", None, ""]) == "Bearer *** at ***"


class TestDownload:
    def test_dropped_connection_resumes_with_range(self, files: FakeFileServer, http: HttpClient,
                                                   tmp_path: Path) -> None:
        files.fault("big.bin", "drop", "drop")
        part = tmp_path / "big.part"
        seen: list[int] = []
        n = http.download(f"{files.url}/big.bin", part, what="file big.bin",
                          expected_size=len(DATA), progress=seen.append)
        assert n == len(DATA)
        assert part.read_bytes() == DATA
        ranges = [h.get("Range") for _, _, h in files.log]
        assert ranges[0] is None
        assert all(r.startswith("bytes=") for r in ranges[1:])
        assert ranges[1] != "bytes=0-"
        assert sum(seen) == len(DATA)

    def test_server_ignoring_range_restarts_cleanly(self, files: FakeFileServer,
                                                    http: HttpClient, tmp_path: Path) -> None:
        part = tmp_path / "big.part"
        part.write_bytes(DATA[:5000])
        files.fault("big.bin", "norange")
        http.download(f"{files.url}/big.bin", part, what="file big.bin", expected_size=len(DATA))
        assert part.read_bytes() == DATA

    def test_corrupt_body_is_dropped_and_fetched_again(self, files: FakeFileServer,
                                                       http: HttpClient, tmp_path: Path) -> None:
        files.fault("big.bin", "corrupt")
        digest = hashlib.sha256(DATA).hexdigest()

        def validate(p: Path) -> None:
            from pipeline.download.errors import ChecksumError

            if hashlib.sha256(p.read_bytes()).hexdigest() != digest:
                raise ChecksumError("file big.bin", "sha256 mismatch")

        part = tmp_path / "big.part"
        http.download(f"{files.url}/big.bin", part, what="file big.bin", validate=validate)
        assert part.read_bytes() == DATA

    def test_slow_server_times_out_and_is_retried(self, files: FakeFileServer, http: HttpClient,
                                                  waits: Recorder, tmp_path: Path) -> None:
        files.fault("big.bin", "slow")
        part = tmp_path / "big.part"
        http.download(f"{files.url}/big.bin", part, what="file big.bin")
        assert part.read_bytes() == DATA
        assert len(waits.waits) == 1

    def test_cap_is_stated_in_the_final_error(self, files: FakeFileServer, http: HttpClient,
                                              waits: Recorder, tmp_path: Path) -> None:
        files.fault("big.bin", *["503"] * 10)
        with pytest.raises(DownloadError, match=r"file big.bin: gave up after 4 attempts "
                                                r"\(retry cap 4\); last error: HTTP 503"):
            http.download(f"{files.url}/big.bin", tmp_path / "p", what="file big.bin")
        assert len(waits.waits) == 3
        assert all(0 <= w <= 0.05 for w in waits.waits)

    def test_404_is_not_retried(self, files: FakeFileServer, http: HttpClient,
                                tmp_path: Path) -> None:
        with pytest.raises(DownloadError, match=r"HTTP 404"):
            http.download(f"{files.url}/nope", tmp_path / "p", what="file nope")
        assert len(files.log) == 1

    def test_429_waits_for_retry_after(self, files: FakeFileServer, http: HttpClient,
                                       waits: Recorder, tmp_path: Path) -> None:
        files.fault("big.bin", "429")
        http.download(f"{files.url}/big.bin", tmp_path / "p", what="file big.bin")
        assert waits.waits == [3.0]

    def test_connection_refused_is_retried_then_named(self, http: HttpClient,
                                                      tmp_path: Path) -> None:
        from .conftest import free_port

        url = f"http://127.0.0.1:{free_port()}/x"
        with pytest.raises(DownloadError, match=r"file x: gave up after 4 attempts.*connection failed"):
            http.download(url, tmp_path / "p", what="file x")
