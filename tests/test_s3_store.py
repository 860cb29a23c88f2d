"""The store on object storage: ingest and statistics through s3:// (moto on loopback).

The same code path serves any fsspec URL; this checks the one a cluster would use.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from pipeline.ingest import ingest
from pipeline.sources.phantom import write_phantom
from pipeline.stats_runner import run_stats
from pipeline.store import DatasetStore, Grid

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

GRID = Grid(spacing=(1.5, 1.5, 1.5), shape=(48, 48, 32))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="xrai")
    options = {"key": "test", "secret": "test", "endpoint_url": endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}
    yield options
    server.stop()


def _intensity_json(stats) -> str:
    return json.dumps({ch: {r: d.model_dump(mode="json") for r, d in regions.items()}
                       for ch, regions in stats.intensity.items()}, sort_keys=True, default=str)


def test_ingest_and_stats_on_s3_equal_the_local_store(s3, tmp_path):
    src = tmp_path / "src"
    write_phantom(src, cases=3, seed=21, shape=(40, 40, 32))
    local = str(tmp_path / "local.zarr")
    remote = "s3://xrai/store.zarr"
    assert ingest(src, local, "ds", grid=GRID).exit_code == 0
    report = ingest(src, remote, "ds", grid=GRID, storage_options=s3)
    assert report.exit_code == 0
    again = ingest(src, remote, "ds", grid=GRID, storage_options=s3)
    assert {o.status for o in again.outcomes} == {"unchanged"}
    a = DatasetStore.open(local, "ds")
    b = DatasetStore.open(remote, "ds", storage_options=s3)
    assert list(a.committed()) == list(b.committed())
    for cid in a.committed():
        np.testing.assert_array_equal(a.read_case(cid)["image"], b.read_case(cid)["image"])
    ds = b.to_xarray()
    assert ds.sizes["case"] == 3
    ref = run_stats(local, "ds", scheduler="synchronous")
    got = run_stats(remote, "ds", scheduler="synchronous", storage_options=s3)
    assert _intensity_json(got) == _intensity_json(ref)
    seen = []
    run_stats(remote, "ds", scheduler="synchronous", storage_options=s3, on_done=seen.append)
    assert seen == []  # partials persisted on S3 and reused


def test_cli_takes_storage_options(s3, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    src = tmp_path / "src"
    write_phantom(src, cases=2, seed=4, shape=(40, 40, 32))
    opts = [arg for k in ("key", "secret", "endpoint_url")
            for arg in ("--storage-option", f"{k}={s3[k]}")]
    runner = CliRunner()
    store = ["--store", "s3://xrai/cli.zarr", "--dataset", "ds"]
    ingested = runner.invoke(app, ["ingest", str(src), *store, "--spacing", "1.5", "1.5", "1.5",
                                   "--shape", "48", "48", "32", *opts])
    assert ingested.exit_code == 0, ingested.output
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["stats", *store, "--scheduler", "synchronous", "--out", str(out),
                                 *opts])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n_cases"] == 2
    bad = runner.invoke(app, ["stats", *store, "--storage-option", "novalue"])
    assert bad.exit_code == 2
    assert "expected KEY=VALUE, got 'novalue'" in bad.output


def test_the_writer_lease_is_exclusive_on_s3(s3):
    """Eight writers released together: S3's conditional create lets exactly one in."""
    from tests.conftest import race_for_lease

    for _ in range(5):
        won, busy = race_for_lease("s3://xrai/lease.zarr", "ds", storage_options=s3)
        assert len(won) == 1
        assert len(busy) == 7
        assert "is being written by pid" in busy[0]
        won[0].release()
