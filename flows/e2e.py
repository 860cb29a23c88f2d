"""``make e2e``: the pipeline flow against a real Prefect server, checked through its API
and in a headless Chromium.

1. starts ``prefect server start`` on a free loopback port (analytics off, a private
   ``PREFECT_HOME``, ``PREFECT_SERVER_UI_API_URL`` pointing the UI at that port);
2. runs ``python -m flows pipeline`` on the phantom against it with a short training
   (the manifest's loss, Dice and BCE, 2 folds × `--epochs`), per-case work on a local
   Dask cluster;
3. asks the API (`check_run`) that the pipeline run and its ``ingest``, ``stats``,
   ``manifest`` and ``train`` subflow runs completed; that every artifact of the run
   exists and belongs to the run (the ``verdict`` to the pipeline run itself, the others
   to its subflow runs); and that the ``verdict``, ``statistics``, ``transforms`` and
   ``training-comparison``/``-curves``/``-overlays`` artifacts embed PNG data URIs that
   decode as PNG (`png_pictures`); then that the UI page answers with settings pointing
   at this API (`check_ui`);
4. opens each of those artifact pages in headless Chromium at 1400 × 1000 (`check_pages`,
   driven over the DevTools protocol, `Chromium`): every embedded picture loaded
   (``naturalWidth > 0``), as many as the artifact holds, and the verdict table's last
   column (``decision``) lies inside the viewport and is clipped by no scrolling pane;
   ``--screenshots DIR`` saves the verdict and the training-curves pages there
   (``docs/ui-verdict.png``, ``docs/ui-training.png``);
5. stops the server it started (its process group) whatever happened.

Exit status 0 when every check passes; the failed check is printed otherwise. About a
minute on two cores (50 s measured: server 7 s, pipeline 32 s, Chromium 8 s).
``tests/flows/test_e2e.py`` runs step 4 against a server given in ``XRAI_E2E_SERVER``
(and skips without it or without ``chromium``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.errors import XraiError

#: The artifacts a pipeline run with training publishes (`flows.artifacts.KINDS`).
ARTIFACT_KINDS = ("dataset-summary", "quarantine", "statistics", "transforms", "loss-config",
                  "verdict", "training-summary", "training-cases", "training-paired",
                  "training-comparison", "training-outliers", "training-curves",
                  "training-overlays")
#: The artifacts that embed pictures, checked through the API and opened in Chromium.
PICTURE_KINDS = ("verdict", "statistics", "transforms", "training-comparison",
                 "training-curves", "training-overlays")
#: The subflows of a pipeline run with training.
STAGES = ("ingest", "stats", "manifest", "train")
#: The browser window, in CSS pixels (the README's screenshots are taken at this size).
VIEWPORT = (1400, 1000)
#: The verdict table's last column, the one that must stay in view.
DECISION_HEADER = "decision"
#: Screenshot file → the artifact kind it shows (``--screenshots``).
SCREENSHOTS = {"ui-verdict.png": "verdict", "ui-training.png": "training-curves"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DATA_URI = re.compile(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


class CheckFailed(XraiError):
    """One end-to-end check did not pass."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0
         ) -> tuple[int, bytes]:
    """Status and body of one request (no proxies: loopback only)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def api_post(api: str, path: str, body: dict) -> list[dict[str, Any]]:
    """The JSON list a ``POST <api><path>`` filter answers (`CheckFailed` unless 200)."""
    status, raw = http("POST", f"{api}{path}", body)
    if status != 200:
        raise CheckFailed(f"POST {api}{path} answered HTTP {status}: {raw[:200]!r}")
    return json.loads(raw)


def server_env(home: Path, port: int) -> dict[str, str]:
    """Environment of the server and of the flow run: no telemetry, this server only."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,stats",
    })
    return env


def wait_healthy(api: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``/health`` answers 200 (`CheckFailed` if the server dies or is slow)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise CheckFailed(f"the server exited with status {proc.returncode} before answering")
        try:
            if http("GET", f"{api}/health", timeout=2)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"{api}/health did not answer within {timeout:.0f} s")


# ------------------------------------------------------------------ API checks
@dataclass(frozen=True)
class ArtifactRef:
    """An artifact as the API lists it: key, id, the flow run it belongs to, its data."""

    kind: str
    key: str
    id: str
    flow_run_id: str
    data: str


def png_pictures(markdown: str, where: str) -> list[tuple[int, int]]:
    """Width and height of each ``![…](data:image/png;base64,…)`` picture of `markdown`.

    Raises
    ------
    CheckFailed
        A data URI that is not base64, or whose bytes are not a PNG (signature and
        ``IHDR`` chunk); `where` names the artifact in the message.
    """
    sizes = []
    for i, match in enumerate(_DATA_URI.finditer(markdown)):
        try:
            png = base64.b64decode(match.group(1), validate=True)
        except binascii.Error as err:
            raise CheckFailed(f"{where}: picture {i} is not valid base64: {err}") from err
        if not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
            raise CheckFailed(f"{where}: picture {i} is not a PNG (starts with {png[:16]!r})")
        width, height = struct.unpack(">II", png[16:24])
        if width == 0 or height == 0:
            raise CheckFailed(f"{where}: picture {i} is {width} × {height} pixels")
        sizes.append((width, height))
    return sizes


def latest_pipeline_run(api: str) -> dict[str, Any]:
    """The most recent ``pipeline`` flow run (`CheckFailed` when there is none)."""
    runs = api_post(api, "/flow_runs/filter", {
        "flows": {"name": {"any_": ["pipeline"]}}, "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise CheckFailed(f"no pipeline flow run in the API at {api}")
    return runs[0]


def subflow_runs(api: str, run_id: str) -> list[dict[str, Any]]:
    """Every flow run below `run_id` (children, their children, …), with ``flow_name``."""
    flows = {f["id"]: f["name"] for f in api_post(api, "/flows/filter", {})}
    found, frontier = [], [run_id]
    while frontier:
        children = api_post(api, "/flow_runs/filter", {
            "flow_runs": {"parent_flow_run_id": {"any_": frontier}}, "limit": 200})
        for child in children:
            child["flow_name"] = flows.get(child["flow_id"], "?")
        found += children
        frontier = [c["id"] for c in children]
    return found


def run_artifacts(api: str, run: Mapping[str, Any], keys: Mapping[str, str]
                  ) -> dict[str, ArtifactRef]:
    """The artifact of each kind → key of `keys` that the run `run` or one of its subflow
    runs created (`CheckFailed` for one that is missing, empty, or belongs elsewhere)."""
    tree = {run["id"]} | {r["id"] for r in subflow_runs(api, run["id"])}
    found = {}
    for kind, key in keys.items():
        rows = api_post(api, "/artifacts/filter", {
            "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": sorted(tree)}},
            "sort": "CREATED_DESC", "limit": 1})
        if not rows:
            raise CheckFailed(f"artifact {key!r} is missing from pipeline run {run['name']} "
                              "and its subflow runs")
        row = rows[0]
        if row.get("data") in (None, ""):
            raise CheckFailed(f"artifact {key!r} of run {run['name']} is empty")
        data = row["data"] if isinstance(row["data"], str) else json.dumps(row["data"])
        found[kind] = ArtifactRef(kind=kind, key=key, id=str(row["id"]),
                                  flow_run_id=str(row["flow_run_id"]), data=data)
    return found


def check_run(api: str, dataset: str, store: str) -> tuple[list[str], dict[str, ArtifactRef]]:
    """The API's view of the latest pipeline run: the lines to print and its artifacts."""
    from flows.artifacts import artifact_key  # imports Prefect: only once the server runs

    run = latest_pipeline_run(api)
    if run["state_type"] != "COMPLETED":
        raise CheckFailed(f"pipeline run {run['name']} is {run['state_type']}")
    lines = [f"pipeline run {run['name']} ({run['id']}): COMPLETED"]
    subs = subflow_runs(api, run["id"])
    for stage in STAGES:
        mine = [r for r in subs if r["flow_name"] == stage]
        if not mine or mine[0]["state_type"] != "COMPLETED":
            raise CheckFailed(f"pipeline run {run['name']} has no completed {stage!r} subflow "
                              f"run (found {[(r['flow_name'], r['state_type']) for r in subs]})")
        lines.append(f"subflow {stage} {mine[0]['name']}: COMPLETED")
    artifacts = run_artifacts(api, run,
                              {kind: artifact_key(kind, dataset, store) for kind in ARTIFACT_KINDS})
    if artifacts["verdict"].flow_run_id != run["id"]:
        raise CheckFailed(f"artifact {artifacts['verdict'].key!r} belongs to flow run "
                          f"{artifacts['verdict'].flow_run_id}, not to the pipeline run "
                          f"{run['id']}")
    lines.append(f"artifact {artifacts['verdict'].key}: on the pipeline run itself")
    for kind, ref in artifacts.items():
        pictures = png_pictures(ref.data, ref.key)
        if kind in PICTURE_KINDS and not pictures:
            raise CheckFailed(f"artifact {ref.key!r} embeds no PNG picture")
        shown = (", pictures " + ", ".join(f"{w}×{h}" for w, h in pictures)) if pictures else ""
        lines.append(f"artifact {ref.key}: {len(ref.data)} chars{shown}")
    return lines, artifacts


def check_ui(base: str, api: str) -> list[str]:
    """The UI page answers 200 and its settings point it at this API."""
    status, body = http("GET", f"{base}/")
    if status != 200 or b"<html" not in body.lower():
        raise CheckFailed(f"UI page {base}/ answered HTTP {status}")
    status, body = http("GET", f"{base}/ui-settings")
    if status != 200:
        raise CheckFailed(f"UI settings {base}/ui-settings answered HTTP {status}")
    if json.loads(body).get("api_url") != api:
        raise CheckFailed(f"UI settings point at {json.loads(body).get('api_url')!r}, not {api!r}"
                          " (PREFECT_SERVER_UI_API_URL)")
    return [f"UI {base}/: HTTP 200 (api_url {api})"]


# ------------------------------------------------------------------ the browser
class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol.

    Starts ``chromium --headless --remote-debugging-port=0`` with a private profile,
    reads the port it chose from the profile's ``DevToolsActivePort`` and talks to the
    page's websocket (the ``websockets`` package, a dependency of Prefect). The
    viewport is fixed with ``Emulation.setDeviceMetricsOverride`` (device scale 1).
    Use as a context manager; leaving it stops the browser.
    """

    def __init__(self, binary: str, viewport: tuple[int, int] = VIEWPORT,
                 startup_timeout: float = 60.0) -> None:
        self.binary, self.viewport, self.startup_timeout = binary, viewport, startup_timeout
        self._next_id = 0

    def __enter__(self) -> Chromium:
        from websockets.sync.client import connect

        self._profile = tempfile.TemporaryDirectory(prefix="xrai-chromium-")
        width, height = self.viewport
        self._log = open(Path(self._profile.name) / "chromium.log", "w")
        self._proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             f"--window-size={width},{height}", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            port = self._devtools_port()
            targets = json.loads(http("GET", f"http://127.0.0.1:{port}/json/list")[1])
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                raise CheckFailed(f"chromium on port {port} lists no page target: {targets!r}")
            self._ws = connect(page["webSocketDebuggerUrl"], proxy=None, max_size=None,
                               open_timeout=self.startup_timeout)
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _devtools_port(self) -> int:
        active = Path(self._profile.name) / "DevToolsActivePort"
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self._proc.poll() is not None:
                raise CheckFailed(f"{self.binary} exited with status {self._proc.returncode}: "
                                  + self._log_tail())
            if active.is_file() and active.read_text().strip():
                return int(active.read_text().split()[0])
            time.sleep(0.2)
        raise CheckFailed(f"{self.binary} opened no DevTools port within "
                          f"{self.startup_timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self._log.flush()
        return (Path(self._profile.name) / "chromium.log").read_text()[-1000:]

    def _stop(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        _stop_group(self._proc, timeout=10)
        self._log.close()
        self._profile.cleanup()

    def call(self, method: str, params: Mapping[str, Any] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one DevTools command and return its result (events are skipped)."""
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method,
                                  "params": dict(params or {})}))
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = self._ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError as err:
                raise CheckFailed(f"DevTools {method} got no answer within {timeout:.0f} s"
                                  ) from err
            except ConnectionClosed as err:
                raise CheckFailed(f"chromium closed the DevTools connection during {method}: "
                                  f"{self._log_tail()}") from err
            message = json.loads(raw)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise CheckFailed(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CheckFailed(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate to `url` (returns before the page has rendered)."""
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CheckFailed(f"chromium could not open {url}: {result['errorText']}")

    def screenshot(self, path: Path) -> None:
        """The viewport as a PNG file."""
        shot = self.call("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


#: Evaluated in the artifact page: its pictures, and where the decision column is.
PAGE_PROBE = """(() => {
  const imgs = [...document.querySelectorAll('img[src^="data:image/png"]')];
  const out = {
    width: window.innerWidth, height: window.innerHeight,
    oops: /\\bOops\\b/.test(document.body ? document.body.innerText : ""),
    pictures: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    pending: imgs.filter(i => !i.complete).length,
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    decision: null,
  };
  const th = [...document.querySelectorAll('th')]
    .find(h => h.textContent.trim() === __HEADER__ && !h.nextElementSibling);
  if (th) {
    const r = th.getBoundingClientRect();
    const clippers = [];
    for (let a = th.parentElement; a; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if (ox !== 'visible' && a.getBoundingClientRect().right < r.right - 0.5) {
        clippers.push(a.tagName.toLowerCase() + (a.className ? '.' +
          String(a.className).trim().split(/\\s+/).join('.') : '') + ' (overflow-x ' + ox +
          ', right ' + Math.round(a.getBoundingClientRect().right) + ')');
      }
    }
    out.decision = {left: r.left, right: r.right, clippers: clippers};
  }
  return out;
})()""".replace("__HEADER__", json.dumps(DECISION_HEADER))


@dataclass(frozen=True)
class PageReport:
    """What the probe found on one artifact page once it had rendered."""

    kind: str
    url: str
    pictures: int
    loaded: int
    sizes: list[list[int]]
    decision_right: float | None
    clippers: list[str]


def probe_page(browser: Chromium, url: str, kind: str, expected_pictures: int,
               timeout: float = 45.0) -> PageReport:
    """Open `url` and wait (up to `timeout` s) until it shows `expected_pictures` loaded
    pictures and, for the verdict, its table; return what the page then shows.

    Raises
    ------
    CheckFailed
        The UI shows its "Oops" page (its API URL is wrong), or the pictures or the table
        did not appear in time.
    """
    browser.open(url)
    t0, seen = time.monotonic(), {}
    while time.monotonic() - t0 < timeout:
        seen = browser.evaluate(PAGE_PROBE) or {}
        if seen.get("oops"):
            raise CheckFailed(f"{url} shows the UI's 'Oops' page (is PREFECT_UI_API_URL / "
                              "PREFECT_SERVER_UI_API_URL this server's API?)")
        ready = (seen.get("pictures", 0) >= expected_pictures and seen.get("pending", 1) == 0
                 and (kind != "verdict" or seen.get("decision") is not None))
        if ready:
            time.sleep(0.5)  # let layout settle after the last picture decoded
            seen = browser.evaluate(PAGE_PROBE)
            break
        time.sleep(0.5)
    else:
        raise CheckFailed(f"{url} ({kind}) did not render within {timeout:.0f} s: {seen}")
    decision = seen.get("decision")
    return PageReport(kind=kind, url=url, pictures=seen["pictures"], loaded=seen["loaded"],
                      sizes=seen["sizes"],
                      decision_right=None if decision is None else float(decision["right"]),
                      clippers=[] if decision is None else list(decision["clippers"]))


def check_pages(base: str, artifacts: Mapping[str, ArtifactRef], *, chromium: str,
                screenshots: Path | None = None,
                viewport: tuple[int, int] = VIEWPORT) -> list[str]:
    """Open each picture artifact's page in headless Chromium and check what it shows.

    Every embedded picture has loaded (``naturalWidth > 0``) and the page shows as many
    as the artifact's markdown holds; on the verdict page the ``decision`` header (the
    table's last column) ends inside the viewport and no scrolling pane clips it. With
    `screenshots`, the pages of `SCREENSHOTS` are saved there as PNG.

    Parameters
    ----------
    base : str
        The server's root URL (``http://127.0.0.1:PORT``), whose UI serves the pages.
    artifacts : mapping of str to ArtifactRef
        The artifacts by kind (`run_artifacts`); those of `PICTURE_KINDS` are opened.
    chromium : str
        The Chromium executable.
    screenshots : Path, optional
        A folder for `SCREENSHOTS`.
    viewport : (int, int)
        Width and height of the window, CSS pixels.

    Returns
    -------
    list of str
        One line per page.

    Raises
    ------
    CheckFailed
        A picture that did not load, a missing one, the decision column outside the view.
    """
    lines = []
    with Chromium(chromium, viewport) as browser:
        for kind in PICTURE_KINDS:
            ref = artifacts.get(kind)
            if ref is None:
                continue
            expected = len(_DATA_URI.findall(ref.data))
            url = f"{base}/artifacts/artifact/{ref.id}"
            page = probe_page(browser, url, kind, expected)
            if page.loaded != page.pictures or page.pictures != expected:
                raise CheckFailed(f"{url} ({ref.key}): {page.loaded} of {page.pictures} "
                                  f"pictures loaded, the artifact embeds {expected}")
            text = f"page {kind}: {page.loaded}/{expected} pictures loaded " + ", ".join(
                f"{w}×{h}" for w, h in page.sizes)
            if kind == "verdict":
                right = page.decision_right
                if right is None or right > viewport[0] or page.clippers:
                    raise CheckFailed(
                        f"{url}: the verdict's {DECISION_HEADER!r} column ends at x = "
                        + ("(no such column)" if right is None else f"{right:.0f} px")
                        + f" in a {viewport[0]} px window"
                        + (f", clipped by {'; '.join(page.clippers)}" if page.clippers else ""))
                text += f"; decision column ends at x = {right:.0f} ≤ {viewport[0]} px"
            if screenshots is not None:
                for name, shown in SCREENSHOTS.items():
                    if shown == kind:
                        browser.screenshot(screenshots / name)
                        text += f"; screenshot {screenshots / name}"
            lines.append(text)
    return lines


def find_chromium() -> str | None:
    """``chromium`` (Debian's package) or ``chromium-browser`` on PATH, else None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------ main
@dataclass
class _Server:
    proc: subprocess.Popen
    log: Any


def _start_server(env: Mapping[str, str], port: int, log_path: Path) -> _Server:
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--analytics-off"],
        env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return _Server(proc, log)


def _stop_group(proc: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM the process group started with ``proc``, SIGKILL it after ``timeout`` s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stop_server(server: _Server) -> None:
    _stop_group(server.proc, timeout=30)
    server.log.close()


def _say(lines: Sequence[str]) -> None:
    for line in lines:
        print("ok   " + line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="Working folder (default: a temporary one, removed after).")
    parser.add_argument("--dataset", default="phantom", help="Dataset name in the store.")
    parser.add_argument("--cases", type=int, default=8, help="Phantom cases.")
    parser.add_argument("--epochs", type=int, default=3,
                        help="Epochs per fold of the short training (2 folds).")
    parser.add_argument("--workers", type=int, default=2, help="Local Dask workers.")
    parser.add_argument("--chromium", default=None,
                        help="Chromium executable (default: chromium on PATH).")
    parser.add_argument("--no-browser", action="store_true",
                        help="Skip the Chromium checks (API checks only).")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help=f"Save {', '.join(SCREENSHOTS)} of the run here (e.g. docs/).")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--run-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    chromium = None if args.no_browser else (args.chromium or find_chromium())
    if not args.no_browser and chromium is None:
        print("FAIL no chromium on PATH (apt-get install chromium, or --no-browser)",
              file=sys.stderr)
        return 1
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="xrai-e2e-")
    work = Path(args.work or tmp.name).resolve()  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = server_env(work / "prefect-home", port)
    t_start = time.monotonic()
    server = _start_server(env, port, work / "server.log")
    try:
        print(f"server: starting on {base} (PREFECT_HOME {env['PREFECT_HOME']})", flush=True)
        print(f"server: healthy after {wait_healthy(api, server.proc, args.startup_timeout):.1f} s",
              flush=True)
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "flows", "pipeline", "--dataset", args.dataset,
             "--source", "phantom", "--out", str(work / args.dataset), "--cases",
             str(args.cases), "--shape", "40", "40", "32", "--workers", str(args.workers),
             "--train", "--epochs", str(args.epochs), "--folds", "2"],
            env=env, capture_output=True, text=True, timeout=args.run_timeout)
        if run.returncode != 0:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise CheckFailed(f"the pipeline flow exited with status {run.returncode}")
        print(f"pipeline: finished in {time.monotonic() - t0:.1f} s: {run.stdout.strip()}",
              flush=True)
        store = str(work / args.dataset / "store.zarr")  # the pipeline command's default
        lines, artifacts = check_run(api, args.dataset, store)
        _say(lines + check_ui(base, api))
        if chromium is not None:
            t0 = time.monotonic()
            _say(check_pages(base, artifacts, chromium=chromium, screenshots=args.screenshots))
            print(f"chromium: pages checked in {time.monotonic() - t0:.1f} s", flush=True)
    except (CheckFailed, subprocess.TimeoutExpired) as err:
        print(f"FAIL {err} (server log: {work / 'server.log'})", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop_server(server)
        if tmp is not None:
            tmp.cleanup()
    print(f"e2e: all checks passed in {time.monotonic() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
