"""The writer lease: at most one process writes a dataset at a time.

Two ingests into one dataset (two terminals, an overlapping scheduled run, a flow beside
the CLI) would otherwise both allocate slots from the same snapshot and commit two cases
into one slot. Every writer of a dataset (ingest, the statistics that persist partials,
compaction) therefore holds its lease for the whole run; readers need none.

The lease is one small object, ``<store>/<dataset>/_xrai/lease/zarr.json``: a Zarr group
document whose attributes name the holder (so zarr and xarray see an ordinary group, not
a foreign file). It is taken by an *exclusive create* through fsspec
(a hard link of a complete file on a local or NFS path, ``If-None-Match: *`` on
S3), so two writers released at the same instant cannot both succeed. (Object stores
without conditional writes get fsspec's exists-then-write, which narrows the race but
cannot close it.) The holder renews the lease every ``ttl / 4`` seconds from a daemon
thread and deletes it when done.

A lease whose holder is gone is broken by the next writer: at once when the holder ran on
this host and its process no longer exists (a ``kill -9``), otherwise once it has not
been renewed for ``ttl`` seconds (the holder's clock; hosts are assumed NTP-synchronised).
Breaking a stale lease re-reads it first and deletes it only if it is still the stale
one, then competes for the exclusive create like anyone else.

Why not a library: file locks (``fcntl.flock``, ``filelock``) do not exist on object
storage, and a lock service (Redis, etcd) is a dependency the pipeline otherwise has no
need for. Prefect's global concurrency limits serialise *flow runs* per dataset on top of
this (see ``flows``), but the CLI runs without a Prefect server.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.errors import StoreError
from pipeline.fsio import write_bytes_atomic

log = logging.getLogger(__name__)

#: Seconds after its last renewal that a lease from another host counts as abandoned.
LEASE_TTL = 60.0
#: How often a waiting writer looks again.
POLL_SECONDS = 0.5


class StoreBusy(StoreError):
    """Another process holds the dataset's writer lease (and we did not wait for it)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in it."""

    token: str
    host: str
    pid: int
    user: str
    command: str
    started: str
    renewed: float
    ttl: float

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Holder:
        return cls(token=str(attrs["token"]), host=str(attrs["host"]), pid=int(attrs["pid"]),
                   user=str(attrs.get("user", "")), command=str(attrs.get("command", "")),
                   started=str(attrs.get("started", "")), renewed=float(attrs["renewed"]),
                   ttl=float(attrs["ttl"]))

    def describe(self) -> str:
        return (f"pid {self.pid} on host {self.host!r} (user {self.user!r}, "
                f"{self.command!r}, since {self.started})")

    def stale_reason(self, now: float) -> str | None:
        """Why this lease is abandoned, or None while its holder may be alive."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host no longer exists"
        age = now - self.renewed
        if age > self.ttl:
            return f"it was last renewed {age:.0f} s ago (lease time {self.ttl:.0f} s)"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _command() -> str:
    # The program and its sub-command only: later arguments may hold paths a colleague
    # need not see, and never a secret (tokens come from the environment).
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:2]] if sys.argv and sys.argv[0] else []
    return " ".join(argv) or "python"


class WriterLease:
    """The exclusive right to write one dataset of a store.

    Use as a context manager (`writer_lease`); `acquire` waits up to ``wait`` seconds
    (0: refuse at once) and raises `StoreBusy` naming the holder.

    Parameters
    ----------
    url : str
        Path or fsspec URL of the store.
    dataset : str
        Dataset (group) name.
    storage_options : mapping, optional
        fsspec options for remote stores.
    ttl : float
        Seconds without renewal after which another host may break the lease.
    """

    def __init__(self, url: str, dataset: str | None, *,
                 storage_options: Mapping[str, Any] | None = None, ttl: float = LEASE_TTL) -> None:
        import fsspec

        self.url, self.dataset, self.ttl = str(url), dataset, float(ttl)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        # dataset None: the store's own lease, for what spans datasets (the root's
        # consolidated metadata).
        group = root.rstrip("/") if dataset is None else f"{root.rstrip('/')}/{dataset}"
        self.path = f"{group}/_xrai/lease/zarr.json"
        self.what = (f"store {self.url!r}" if dataset is None
                     else f"dataset {dataset!r} in store {self.url!r}")
        self.token = uuid.uuid4().hex
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- the lease object -------------------------------------------------------------

    def _document(self) -> bytes:
        attrs = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                 "user": _user(), "command": _command(), "started": self._started,
                 "renewed": time.time(), "ttl": self.ttl}
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {"xrai_lease": attrs}}
        return json.dumps(doc).encode()

    def _read(self) -> Holder | None:
        """The current holder; None when there is no lease."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return Holder.from_attrs(json.loads(raw)["attributes"]["xrai_lease"])
        except (ValueError, KeyError, TypeError):
            # A lease being renewed on a store without atomic overwrite, or debris:
            # an unreadable lease is treated as held until it is old enough to break.
            return Holder(token="?", host="?", pid=-1, user="?", command="?", started="?",
                          renewed=self._mtime(), ttl=self.ttl)

    def _mtime(self) -> float:
        try:
            modified = self.fs.modified(self.path)
        except (FileNotFoundError, NotImplementedError, OSError):
            return time.time()
        return modified.timestamp() if isinstance(modified, datetime) else float(modified)

    @property
    def _local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def _try_create(self) -> bool:
        if self._local:
            # Write the whole document beside it, then hard-link it into place: link(2)
            # fails with EEXIST atomically (also on NFS), and nobody sees half a lease.
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{self.token}.partial"
            with open(tmp, "wb") as f:
                f.write(self._document())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            # s3fs sends If-None-Match: *, an atomic create; other filesystems fall back
            # to fsspec's exists-then-write (documented in the module docstring).
            self.fs.pipe_file(self.path, self._document(), mode="create")
        except FileExistsError:
            return False
        return True

    def _renew(self) -> None:
        holder = self._read()
        if holder is None or holder.token != self.token:
            if not self.lost:
                log.error("the writer lease of %s was taken over by %s; this run stops "
                          "writing", self.what,
                          "nobody" if holder is None else holder.describe())
            self.lost = True
            return
        data = self._document()
        if self._local:
            # Local: write beside it and rename, so a reader never sees half a lease.
            write_bytes_atomic(self.path, data)
        else:
            self.fs.pipe_file(self.path, data)  # one PUT: atomic on object storage

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew()
            except OSError as err:  # a storage hiccup; the next beat tries again
                log.warning("could not renew the writer lease of %s: %s", self.what, err)

    # -- public -----------------------------------------------------------------------

    def acquire(self, wait: float = 0.0) -> WriterLease:
        """Take the lease, waiting up to ``wait`` seconds for the current holder.

        Raises
        ------
        StoreBusy
            When another live writer still holds it after ``wait`` seconds.
        """
        deadline = time.monotonic() + max(0.0, wait)
        announced = False
        while True:
            if self._try_create():
                break
            holder = self._read()
            if holder is None:
                continue  # released between our create and our read
            stale = holder.stale_reason(time.time())
            if stale is not None:
                self._break(holder, stale)
                continue
            if time.monotonic() >= deadline:
                raise StoreBusy(
                    f"{self.what} is being written by "
                    f"{holder.describe()}; wait for it to finish, or pass --wait SECONDS to "
                    "queue behind it"
                )
            if not announced:
                log.warning("waiting for the writer of %s: %s", self.what, holder.describe())
                announced = True
            time.sleep(POLL_SECONDS)
        self._thread = threading.Thread(target=self._heartbeat, name="xrai-lease", daemon=True)
        self._thread.start()
        log.debug("writer lease of %s taken (%s)", self.what, self.token)
        return self

    def _break(self, holder: Holder, reason: str) -> None:
        again = self._read()
        if again is None or again != holder:
            return  # renewed or replaced meanwhile: not ours to break
        log.warning("breaking the writer lease of %s held by %s: %s", self.what,
                    holder.describe(), reason)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def check(self) -> None:
        """Raise `StoreBusy` if the lease was lost (taken over after a long stall)."""
        if self.lost:
            raise StoreBusy(f"the writer lease of {self.what} was lost (another writer broke it after a stall); stopping")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
            if self._local:  # an empty folder would look like a broken Zarr node
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.path))

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


@contextlib.contextmanager
def writer_lease(url: str, dataset: str | None, *, wait: float = 0.0,
                 storage_options: Mapping[str, Any] | None = None,
                 ttl: float = LEASE_TTL) -> Iterator[WriterLease]:
    """Hold the writer lease of ``url/dataset`` for the ``with`` block (see `WriterLease`).

    ``dataset=None`` takes the store's own lease instead.
    """
    lease = WriterLease(url, dataset, storage_options=storage_options, ttl=ttl).acquire(wait)
    try:
        yield lease
    finally:
        lease.release()
