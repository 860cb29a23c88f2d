"""flows/e2e.py: the PNG check on artifact markdown, and the artifact pages in Chromium.

`TestArtifactPagesInChromium` opens the artifact pages of the latest pipeline run of a
running server (``XRAI_E2E_SERVER=http://127.0.0.1:PORT``; ``make e2e`` runs the same
check on its own server) in headless Chromium. It is marked ``e2e`` and skips, saying
why, when no server is given or ``chromium`` is not on PATH, so ``make test`` never
needs either:

    make server & make pipeline
    XRAI_E2E_SERVER=http://127.0.0.1:4200 .venv/bin/python -m pytest -m e2e tests/flows/test_e2e.py
"""

from __future__ import annotations

import base64
import os
import struct
import zlib

import pytest

from flows.e2e import (
    PICTURE_KINDS,
    VIEWPORT,
    CheckFailed,
    api_post,
    check_pages,
    find_chromium,
    http,
    latest_pipeline_run,
    png_pictures,
    run_artifacts,
)


def tiny_png(width: int, height: int) -> bytes:
    """A valid grey PNG written by hand (signature, IHDR, IDAT, IEND; PNG spec 1.2)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def image(png: bytes, alt: str = "a picture") -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})\n"


class TestPngPictures:
    def test_sizes_of_every_embedded_png(self) -> None:
        md = "# Title\n\n" + image(tiny_png(3, 2)) + "text\n" + image(tiny_png(5, 7))
        assert png_pictures(md, "verdict-x") == [(3, 2), (5, 7)]

    def test_markdown_without_pictures(self) -> None:
        assert png_pictures("| a | b |\n|---|---|\n", "loss-config-x") == []

    def test_data_uri_that_is_not_a_png(self) -> None:
        md = image(b"GIF89a" + b"\x00" * 30)
        with pytest.raises(CheckFailed, match=r"statistics-x: picture 0 is not a PNG"):
            png_pictures(md, "statistics-x")

    def test_truncated_base64(self) -> None:
        b64 = base64.b64encode(tiny_png(2, 2)).decode("ascii")[:-3]   # no longer a multiple of 4
        with pytest.raises(CheckFailed, match=r"transforms-x: picture 0 is not valid base64"):
            png_pictures(f"![p](data:image/png;base64,{b64})", "transforms-x")


SERVER = os.environ.get("XRAI_E2E_SERVER", "").rstrip("/")


@pytest.mark.e2e
class TestArtifactPagesInChromium:
    """The pages of the latest pipeline run of ``XRAI_E2E_SERVER`` (run with training)."""

    def test_pictures_load_and_the_decision_column_is_in_view(self) -> None:
        chromium = find_chromium()
        if chromium is None:
            pytest.skip("chromium is not on PATH (Debian: apt-get install chromium; "
                        "make e2e installs it)")
        if not SERVER:
            pytest.skip("no server given: set XRAI_E2E_SERVER=http://127.0.0.1:PORT to a "
                        "Prefect server with a pipeline run (make server, make pipeline)")
        api = f"{SERVER}/api"
        try:
            healthy = http("GET", f"{api}/health", timeout=5)[0] == 200
        except OSError:
            healthy = False
        if not healthy:
            pytest.fail(f"XRAI_E2E_SERVER={SERVER!r}: {api}/health does not answer 200")
        run = latest_pipeline_run(api)
        own = api_post(api, "/artifacts/filter", {
            "artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "CREATED_DESC"})
        verdicts = [a["key"] for a in own if a["key"].startswith("verdict-")]
        assert verdicts, f"pipeline run {run['name']} carries no verdict artifact"
        tail = verdicts[0].removeprefix("verdict-")          # <dataset>-<store id>
        artifacts = run_artifacts(api, run, {k: f"{k}-{tail}" for k in PICTURE_KINDS})

        lines = check_pages(SERVER, artifacts, chromium=chromium)

        assert [line.split(":")[0] for line in lines] == [f"page {k}" for k in PICTURE_KINDS]
        assert f"≤ {VIEWPORT[0]} px" in lines[0]
