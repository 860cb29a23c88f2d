"""Fixtures of the download tests: loopback servers and a client that never really waits."""

from __future__ import annotations

import random
import socket

import pytest

from pipeline.download.http import HttpClient, RetryPolicy

from ._fakes import FakeNbia, FakeSeries, Recorder, make_archive


@pytest.fixture(scope="session")
def archive() -> list[FakeSeries]:
    """Two patients, each with one 3-file MR series and one SEG (built once)."""
    return make_archive()


@pytest.fixture
def nbia(archive: list[FakeSeries]):
    with FakeNbia(list(archive)) as server:
        yield server


@pytest.fixture
def waits() -> Recorder:
    return Recorder()


@pytest.fixture
def policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=60)


@pytest.fixture
def http(policy: RetryPolicy, waits: Recorder) -> HttpClient:
    """Retries recorded, not waited; a short read timeout for the slow-server faults."""
    return HttpClient(timeout=(2.0, 0.3), policy=policy, sleep=waits, rng=random.Random(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """An S3-compatible server (moto's server mode) on loopback."""
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
