"""``make e2e``: the pipeline flow against a real Prefect server, checked through its API.

1. starts ``prefect server start`` on a free loopback port (analytics off, a private
   ``PREFECT_HOME``, ``PREFECT_SERVER_UI_API_URL`` pointing the UI at that port);
2. runs ``python -m flows pipeline`` on the phantom against it, per-case work on a local
   Dask cluster of two worker processes;
3. asks the API that the pipeline run and its subflow runs completed and that every
   artifact exists (dataset summary, quarantine list, statistics, transforms, loss
   configuration), and that the UI page answers HTTP 200;
4. stops the server it started (its process group) whatever happened.

Exit status 0 when every check passes; the failed check is printed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import XraiError

ARTIFACT_KINDS = ("dataset-summary", "quarantine", "statistics", "transforms", "loss-config",
                  "verdict")
STAGES = ("ingest", "stats", "manifest")


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


def check_run(api: str, dataset: str, store: str) -> list[str]:
    """The API's view of the latest pipeline run; the lines to print."""
    from flows.artifacts import artifact_key  # imports Prefect: only once the server runs

    status, body = http("POST", f"{api}/flow_runs/filter", {
        "flows": {"name": {"any_": ["pipeline"]}}, "sort": "START_TIME_DESC", "limit": 1})
    runs = json.loads(body) if status == 200 else []
    if not runs:
        raise CheckFailed(f"no pipeline flow run in the API (HTTP {status})")
    run = runs[0]
    if run["state_type"] != "COMPLETED":
        raise CheckFailed(f"pipeline run {run['name']} is {run['state_type']}")
    lines = [f"pipeline run {run['name']} ({run['id']}): COMPLETED"]
    status, body = http("POST", f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC",
                                                           "limit": 50})
    flows_status, flows_body = http("POST", f"{api}/flows/filter", {})
    names = {f["id"]: f["name"] for f in json.loads(flows_body)} if flows_status == 200 else {}
    for stage in STAGES:
        sub = [r for r in json.loads(body) if names.get(r["flow_id"]) == stage]
        if not sub or sub[0]["state_type"] != "COMPLETED":
            raise CheckFailed(f"subflow {stage!r} has no completed run")
        lines.append(f"subflow {stage}: COMPLETED")
    for kind in ARTIFACT_KINDS:
        key = artifact_key(kind, dataset, store)
        status, body = http("POST", f"{api}/artifacts/filter",
                            {"artifacts": {"key": {"any_": [key]}}, "limit": 1})
        found = json.loads(body) if status == 200 else []
        if not found or not found[0].get("data"):
            raise CheckFailed(f"artifact {key!r} is missing or empty (HTTP {status})")
        lines.append(f"artifact {key}: {found[0]['type']}, {len(str(found[0]['data']))} chars")
    return lines


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="Working folder (default: a temporary one, removed after).")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--run-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="xrai-e2e-")
    work = Path(args.work or tmp.name).resolve()  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = server_env(work / "prefect-home", port)
    dataset = "e2e"
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--analytics-off"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        print(f"server: starting on {base} (PREFECT_HOME {env['PREFECT_HOME']})", flush=True)
        print(f"server: healthy after {wait_healthy(api, server, args.startup_timeout):.1f} s",
              flush=True)
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "flows", "pipeline", "--dataset", dataset,
             "--source", "phantom", "--out", str(work / dataset), "--cases", str(args.cases),
             "--shape", "40", "40", "32", "--workers", "2"],
            env=env, capture_output=True, text=True, timeout=args.run_timeout)
        if run.returncode != 0:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise CheckFailed(f"the pipeline flow exited with status {run.returncode}")
        print(f"pipeline: finished in {time.monotonic() - t0:.1f} s: {run.stdout.strip()}",
              flush=True)
        store = str(work / dataset / "store.zarr")  # the pipeline command's default
        for line in check_run(api, dataset, store) + check_ui(base, api):
            print("ok   " + line, flush=True)
    except (CheckFailed, subprocess.TimeoutExpired) as err:
        print(f"FAIL {err} (server log: {work / 'server.log'})", file=sys.stderr, flush=True)
        return 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if tmp is not None:
            tmp.cleanup()
    print("e2e: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
