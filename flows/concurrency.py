"""One writer per dataset in Prefect: a global concurrency slot per (store, dataset).

Every flow section that writes a dataset holds its *write slot* (`dataset_write_slot`):
the ``ingest`` flow from slot allocation to the last commit or quarantine, the
``stats`` flow from its plan to the statistics JSON, the ``pipeline`` and
``reprocess`` flows from ingest to the manifest. The slot is a Prefect global
concurrency limit of one slot named by `write_limit_name`::

    xrai-write:<12 hex digits of sha256(store identity)>:<dataset>

where the store identity is the resolved store location (`store_identity`: a local
path made absolute with symbolic links resolved, an fsspec URL with its scheme in
lower case and no trailing slash), so two spellings of one store share a slot. A
dataset name outside ``[A-Za-z0-9._-]`` (Prefect bans ``/ % & > <`` in names, and the
name also appears in API paths) has those characters replaced by ``_`` and a hash
of the real name appended, as has a name longer than `MAX_DATASET_PART`.

A second run that writes the same dataset therefore *waits* in Prefect, with a log
line naming the dataset, the store and the limit (and the limit shows one active
slot on the UI's Concurrency page), until the first releases the slot; runs on
other datasets do not wait. The limit is created with one slot the first time it is
needed; an existing limit is left as it is, so an operator may raise it, set it to 0
(writers then refuse with an `XraiError` that says so) or deactivate it (writers no
longer wait) in the UI. Holding is re-entrant within one call stack: the ``ingest``
and ``stats`` subflows of a ``pipeline`` run that holds the slot do not ask again.

The slot is a lease of `LEASE_SECONDS` renewed in the background while held; if the
process dies, the slot frees itself when the lease expires. A renewal that fails
(the server was unreachable) is logged by Prefect and the run goes on: the store's
own writer lease (`pipeline.lease`) is what guarantees that two writers never corrupt
a dataset, for the CLI and the flows alike; this slot only makes flows queue in
Prefect instead of running into that lease. The plain CLI (``xrai ingest``) does not
import Prefect and does not take this slot.

Each scheduled ``reprocess-<dataset>`` deployment also has a deployment concurrency
limit of one run with the ``ENQUEUE`` collision strategy (`flows.deployments`): a
scheduled run that fires while the previous one still runs is held in the
``AwaitingConcurrencySlot`` state, shown in the UI, until it finishes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from contextvars import ContextVar
from typing import Any

from flows.tasks import run_logger
from pipeline.errors import XraiError

#: Slots of a dataset's write limit when this module creates it.
WRITE_SLOTS = 1
#: Lease of a held slot, in seconds; renewed at three quarters of it while held.
LEASE_SECONDS = 300.0
#: Prefix of every write limit's name.
PREFIX = "xrai-write"
#: Longest dataset name kept as it is in a limit name (longer ones are cut and hashed).
MAX_DATASET_PART = 80

_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

#: Names of the write slots held by the current call stack (re-entrancy).
_HELD: ContextVar[frozenset[str]] = ContextVar("xrai_write_slots_held", default=frozenset())


def store_identity(store: str) -> str:
    """The store's location in one canonical spelling.

    A local path (or a ``file://`` URL) becomes ``file://`` and the absolute path with
    ``~`` expanded and symbolic links resolved; any other fsspec URL keeps its path and
    loses a trailing slash, its scheme in lower case.

    Examples
    --------
    >>> store_identity("S3://bucket/xrai.zarr/")
    's3://bucket/xrai.zarr'
    """
    text = str(store)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() == "file":
        path = rest if sep else text
        return "file://" + os.path.realpath(os.path.expanduser(path))
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def _dataset_part(dataset: str) -> str:
    if _SAFE.fullmatch(dataset) and len(dataset) <= MAX_DATASET_PART:
        return dataset
    digest = hashlib.sha256(dataset.encode("utf-8")).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', dataset)[:MAX_DATASET_PART]}~{digest}"


def write_limit_name(store: str, dataset: str) -> str:
    """The name of the global concurrency limit that serialises writers of a dataset.

    Parameters
    ----------
    store : str
        Zarr store path or fsspec URL; spellings of one location give one name
        (`store_identity`).
    dataset : str
        The dataset (group) name.

    Returns
    -------
    str
        ``xrai-write:<sha256 of the store identity, 12 hex digits>:<dataset>``, with a
        dataset name outside ``[A-Za-z0-9._-]`` or longer than `MAX_DATASET_PART`
        characters made safe and suffixed with ``~`` and 8 hex digits of its hash.

    Raises
    ------
    ValueError
        `dataset` is empty.

    Examples
    --------
    >>> write_limit_name("s3://bucket/xrai.zarr", "BraTS-2023")
    'xrai-write:f0e9b022a039:BraTS-2023'
    >>> write_limit_name("s3://bucket/xrai.zarr/", "a b%c")   # unsafe characters
    'xrai-write:f0e9b022a039:a_b_c~0c7aee8a'
    """
    if not dataset:
        raise ValueError(f"dataset name must not be empty, got {dataset!r} for store {store!r}")
    digest = hashlib.sha256(store_identity(store).encode("utf-8")).hexdigest()[:12]
    return f"{PREFIX}:{digest}:{_dataset_part(dataset)}"


def ensure_write_limit(name: str) -> Any:
    """Create the global concurrency limit `name` with `WRITE_SLOTS` slots if missing.

    An existing limit (created by another run, or changed by an operator) is kept.

    Returns
    -------
    prefect.client.schemas.responses.GlobalConcurrencyLimitResponse
        The limit as it is now (its ``limit``, ``active`` and ``active_slots``).
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        # Read first: a create that collides is answered 409, but the server logs it
        # with a traceback, which every run after the first would add to its log.
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it meanwhile: keep it
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=WRITE_SLOTS))
        return client.read_global_concurrency_limit_by_name(name)


def _holder() -> object | None:
    """The current flow run as the lease holder (shown with the lease), if any."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)


@contextmanager
def dataset_write_slot(store: str, dataset: str, *,
                       timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold the write slot of ``store/dataset`` for the body of a ``with`` block.

    Must run where the Prefect API is reachable (inside a flow run, or with
    ``PREFECT_API_URL`` set); see the module notes for the name and the semantics.

    Parameters
    ----------
    store, dataset : str
        The dataset being written (`write_limit_name`).
    timeout_seconds : float, optional
        Longest wait for the slot; None (the default) waits for as long as the
        other writer runs.

    Yields
    ------
    str
        The limit's name.

    Raises
    ------
    TimeoutError
        The slot was not free within `timeout_seconds` (the message names the dataset,
        the store and the limit).
    XraiError
        The limit has 0 slots: an operator has paused writes to the dataset.
    prefect.concurrency.asyncio.ConcurrencySlotAcquisitionError
        The server refused the slot otherwise (the limit was deleted meanwhile).
    """
    from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError
    from prefect.concurrency.sync import concurrency

    name = write_limit_name(store, dataset)
    held = _HELD.get()
    if name in held:  # an enclosing section of this call stack holds it already
        yield name
        return
    limit = ensure_write_limit(name)
    logger = run_logger()
    if limit.active and limit.limit < WRITE_SLOTS:
        raise XraiError(
            f"writes to dataset {dataset!r} in store {store!r} are paused: global concurrency "
            f"limit {name!r} has {limit.limit!r} slots (set it to 1 on the UI's Concurrency "
            f"page or with `prefect gcl update {name} --limit 1`)")
    waiting = limit.active and limit.active_slots >= limit.limit
    if waiting:  # only for the log line: the acquisition below is what decides
        logger.info("waiting for the write slot of dataset %r in %r: another run is writing "
                    "it (global concurrency limit %r)", dataset, store, name)
    start = time.monotonic()
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(
                name, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS,
                strict=True, holder=_holder(), raise_on_lease_renewal_failure=False))
        except AcquireConcurrencySlotTimeoutError as timeout:
            raise TimeoutError(
                f"dataset {dataset!r} in store {store!r} is being written by another run: "
                f"its write slot (global concurrency limit {name!r}) was not free within "
                f"{timeout_seconds!r} s") from timeout
        if waiting:
            logger.info("write slot of dataset %r acquired after %.1f s", dataset,
                        time.monotonic() - start)
        token = _HELD.set(held | {name})
        try:
            yield name
        finally:
            _HELD.reset(token)
