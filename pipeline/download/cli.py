"""``xrai download``: fetch a TCIA collection from NBIA, IDC or a checksummed file list.

Registered by the main CLI with ``app.command("download")(download)``.

Exit codes (as ``xrai ingest``): 0 every item downloaded or already complete (and
``--dry-run``); 3 some items failed, the others are usable; 1 nothing usable: every item
failed, an unknown or controlled-access collection, or too little disk space; 2 usage error.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pipeline.download.errors import DownloadError, InsufficientSpaceError
from pipeline.download.http import HttpClient, RetryPolicy, redact
from pipeline.download.plan import (
    Fetcher,
    Outcome,
    Plan,
    PlanItem,
    Summary,
    check_disk_space,
    format_bytes,
    run_plan,
)
from pipeline.errors import XraiError

__all__ = ["EXIT_NOTHING", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "TOKEN_ENV", "Source", "download"]

TOKEN_ENV = "XRAI_TCIA_TOKEN"
# The same codes as `xrai ingest`: 0 ok, 3 partial, 1 nothing usable, 2 usage error.
EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class Source(str, enum.Enum):
    """Where a collection is downloaded from."""

    nbia = "nbia"
    idc = "idc"
    http = "http"


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated option values, flattened."""
    if not values:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return out or None


class _RichReporter:
    """Progress bars by bytes: one for the whole plan, one for the current item."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        self.progress = progress
        self.overall = progress.add_task("total", total=total or None)
        self.current: TaskID | None = None

    def start(self, item: PlanItem) -> None:
        name = item.key if len(item.key) <= 40 else "…" + item.key[-39:]
        self.current = self.progress.add_task(name, total=item.size_bytes)

    def advance(self, n: int) -> None:
        self.progress.advance(self.overall, n)
        if self.current is not None:
            self.progress.advance(self.current, n)

    def finish(self, outcome: Outcome) -> None:
        if outcome.status == "skipped" and outcome.item.size_bytes:
            self.progress.advance(self.overall, outcome.item.size_bytes)
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None


def _plan_table(plan: Plan) -> Table:
    table = Table(title=plan.describe(), title_justify="left")
    for col in ("patient", "item", "modality", "files", "size", "description"):
        table.add_column(col, overflow="fold")
    for item in plan.items:
        table.add_row(item.patient_id, item.key, item.modality or "",
                      "" if item.n_files is None else str(item.n_files),
                      format_bytes(item.size_bytes), item.description or "")
    return table


def _summary_table(summary: Summary) -> Table:
    table = Table(title="download summary", title_justify="left")
    for col in ("status", "items", "bytes"):
        table.add_column(col)
    for status in ("downloaded", "skipped", "failed"):
        outs = summary.of(status)
        table.add_row(status, str(len(outs)), format_bytes(sum(o.bytes for o in outs)))
    return table


def _failed_lines(summary: Summary, token: str | None) -> list[str]:
    """One unwrapped line per failed item (whole UIDs stay greppable)."""
    return [f"failed: {o.item.label} (patient {o.item.patient_id}): "
            f"{redact(o.reason, (token,))}" for o in summary.of("failed")]


def download(
    collection: Annotated[str, typer.Argument(
        help="Collection name as the archive spells it, e.g. UPENN-GBM, ReMIND, UCSF-PDGM.")],
    dest: Annotated[Path, typer.Option(
        "--dest", file_okay=False, help="Folder to download into (DICOM: DEST/<PatientID>/<SeriesUID>/).")],
    source: Annotated[Source, typer.Option(
        "--source", help="nbia (TCIA REST API), idc (Imaging Data Commons buckets) or "
                         "http (a checksummed file list).")] = Source.nbia,
    patients: Annotated[list[str] | None, typer.Option(
        "--patients", metavar="ID", help="Only these patients (repeat or comma-separate).")] = None,
    modality: Annotated[list[str] | None, typer.Option(
        "--modality", metavar="MODALITY", help="Only series of these modalities, e.g. MR, SEG (DICOM sources).")
    ] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="At most N patients (the first in ID order).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (patients, series, total size); download nothing. "
                          "Offline with --source idc.")] = False,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="NBIA API root up to /nbia-api/services/v4 (default $XRAI_NBIA_URL, "
                           "else TCIA); with --source http the prefix of relative paths.")
    ] = None,
    s3_endpoint: Annotated[str | None, typer.Option(
        "--s3-endpoint", help="S3 endpoint of the IDC buckets (default $XRAI_S3_ENDPOINT, "
                              "else AWS).")] = None,
    file_list: Annotated[str | None, typer.Option(
        "--file-list", help="--source http: CSV (path,sha256[,url,size,patient]) or sha256sum "
                            "list, a local path or an http(s) URL.")] = None,
    retries: Annotated[int, typer.Option(
        "--retries", min=1, help="Attempts per request, the first included (the cap).")] = 6,
    backoff: Annotated[float, typer.Option(
        "--backoff", min=0.0, help="Base backoff in seconds (doubles per attempt, jittered).")
    ] = 1.0,
    max_wait: Annotated[float, typer.Option(
        "--max-wait", min=0.0, help="Longest single wait, backoff or Retry-After, in seconds.")
    ] = 60.0,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.001, help="Read timeout in seconds (longest silence mid-transfer).")
    ] = 120.0,
) -> None:
    """Download a TCIA collection into a folder that `xrai ingest` reads.

    Resumable and idempotent: verified items are skipped on a re-run, partial ones are
    fetched again (file lists resume with HTTP Range). A bearer token for a mirror that
    needs one is read from $XRAI_TCIA_TOKEN and never printed; it is sent over https only,
    and only to the archive's host (--base-url, $XRAI_NBIA_URL or TCIA) and the hosts
    listed in $XRAI_TOKEN_HOSTS (comma-separated), never to other hosts a file list names.

    Exit codes (as `xrai ingest`): 0 all downloaded or already complete (or --dry-run);
    3 some failed, the rest usable; 1 nothing usable, an unknown or controlled-access
    collection, or too little disk space; 2 usage error.
    """
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    token = os.environ.get(TOKEN_ENV) or None

    def fail(message: str, code: int = EXIT_NOTHING) -> None:
        err.print(f"error: {redact(message, (token,))}", markup=False, soft_wrap=True)
        raise typer.Exit(code)

    patients_, modality_ = _split(patients), _split(modality)
    if source is Source.http and file_list is None:
        fail("--source http needs --file-list (a CSV or sha256sum list of the files)", EXIT_USAGE)
    if source is Source.http and modality_:
        fail("--modality applies to DICOM sources (nbia, idc), not to file lists", EXIT_USAGE)
    if source is not Source.http and file_list is not None:
        fail(f"--file-list applies to --source http, not {source.value}", EXIT_USAGE)

    policy = RetryPolicy(max_attempts=retries, base_delay=backoff, max_delay=max_wait,
                         max_retry_after=max_wait)
    try:
        http = HttpClient(token=token, timeout=(min(10.0, timeout), timeout), policy=policy)
    except ValueError as error:  # a malformed $XRAI_TOKEN_HOSTS
        fail(str(error), EXIT_USAGE)
    fetcher: Fetcher | None
    try:
        if source is Source.nbia:
            from pipeline.download.nbia import NbiaClient, NbiaFetcher, plan_nbia

            client = NbiaClient(http, base_url)
            plan = plan_nbia(client, collection, patients=patients_, modality=modality_,
                             limit=limit)
            fetcher = NbiaFetcher(client)
        elif source is Source.idc:
            from pipeline.download.idc import IdcFetcher, plan_idc

            plan = plan_idc(collection, patients=patients_, modality=modality_, limit=limit)
            fetcher = None  # built after --dry-run, which must not need boto3
        else:
            from pipeline.download.filelist import FileListFetcher, plan_filelist

            if base_url:  # the operator's archive; hosts named only by the list get no token
                http.allow_token_host(base_url)
            plan = plan_filelist(collection, file_list or "", http=http, base_url=base_url,
                                 patients=patients_, limit=limit)
            fetcher = FileListFetcher(http)
    except (XraiError, ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        fail(str(error))

    out.print(_plan_table(plan))
    if dry_run:
        out.print(f"dry run: nothing downloaded ({plan.describe()})")
        raise typer.Exit(EXIT_OK)
    if not plan.items:
        fail(f"nothing to download for {collection!r}")
    if fetcher is None:
        from pipeline.download.idc import IdcFetcher

        fetcher = IdcFetcher(endpoint_url=s3_endpoint, policy=policy, timeout=timeout)

    try:
        pending = [i for i in plan.items if not fetcher.is_complete(i, dest)]
        check_disk_space(dest, pending, staging_factor=1.0 if source is Source.nbia else 0.0)
    except (InsufficientSpaceError, DownloadError) as error:
        fail(str(error))
    dest.mkdir(parents=True, exist_ok=True)

    show = err.is_terminal or "XRAI_PROGRESS" in os.environ
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                  disable=not show) as progress:
        reporter = _RichReporter(progress, plan.total_bytes)
        summary = run_plan(plan, fetcher, dest, reporter=reporter)

    out.print(_summary_table(summary))
    for line in _failed_lines(summary, token):
        out.print(line, soft_wrap=True, markup=False)
    layout = "dicom" if source is not Source.http else "upenn, ucsf or brats"
    if summary.exit_code != EXIT_NOTHING:
        out.print(f"ingest with: xrai ingest {dest} --layout {layout} --store <store> "
                  "--dataset <name>")
    raise typer.Exit(summary.exit_code)
