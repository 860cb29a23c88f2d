"""The ``download`` flow: plan a TCIA collection, fetch each item as a retried task.

Planning and fetching are `pipeline.download`'s (``xrai download``'s) functions; each
item is one task (`flows.tasks.download_item`) that raises on failure so that Prefect
retries it with exponential backoff, on top of the HTTP client's own retries. Items
already complete and verified are skipped, so a re-run fetches only what is new.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from flows.artifacts import markdown_table, publish_markdown
from flows.config import DownloadSource
from flows.tasks import download_item, plan_download
from pipeline.download.errors import DownloadError

#: Items fetched at once (network-bound: threads).
CONCURRENT_DOWNLOADS = 4


class DownloadResult(BaseModel):
    """Where the files are and what happened to each item (by key)."""

    model_config = ConfigDict(frozen=True)

    dest: str
    downloaded: list[str]
    skipped: list[str]
    failed: dict[str, str]


@flow(name="download", task_runner=ThreadPoolTaskRunner(max_workers=CONCURRENT_DOWNLOADS))
def download_flow(source: DownloadSource) -> DownloadResult:
    """Download `source.collection` into `source.dest`.

    Raises
    ------
    DownloadError
        Nothing usable came out (every item failed after its retries).
    """
    logger = get_run_logger()
    items = plan_download(source)
    futures = download_item.map(unmapped(source), items)
    futures.wait()
    downloaded, skipped, failed = [], [], {}
    for item, fut in zip(items, futures, strict=True):
        if fut.state.is_completed():
            (downloaded if fut.result().status == "downloaded" else skipped).append(item.key)
        else:
            failed[item.key] = str(fut.state.message)
    rows = [(k, "downloaded") for k in downloaded] + [(k, "skipped (complete)") for k in skipped]
    rows += [(k, f"failed: {why}") for k, why in failed.items()]
    publish_markdown("download-summary", source.collection,
                     f"# Download of `{source.collection}` ({source.service})\n\n"
                     f"Into `{source.dest}`: {len(downloaded)} downloaded, {len(skipped)} "
                     f"already complete, {len(failed)} failed.\n\n"
                     + markdown_table(("item", "status"), rows),
                     f"Download of {source.collection}: items and their status")
    logger.info("download of %s: %d downloaded, %d skipped, %d failed", source.collection,
                len(downloaded), len(skipped), len(failed))
    if items and len(failed) == len(items):
        raise DownloadError(source.collection, f"every item failed: {failed}")
    return DownloadResult(dest=source.dest, downloaded=downloaded, skipped=skipped,
                          failed=failed)
