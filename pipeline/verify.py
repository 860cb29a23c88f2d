"""``xrai verify``: check every committed case of a dataset against its commit record.

A case is *intact* when each of its chunks is present, decodes, and matches the checksum
recorded when it was committed (`pipeline.store.DatasetStore.write_case`). Anything else
is named with the case and the chunk. Verification only reads; re-ingesting repairs
(a plain ``xrai ingest`` re-ingests cases whose chunks are missing, ``--recompute``
every case, including those whose chunks are present but changed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.store import DatasetStore


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying one dataset.

    Attributes
    ----------
    intact : tuple of str
        Cases whose every chunk is present, decodable and unchanged.
    damaged : dict
        Case id -> what is wrong (names the chunk).
    unreadable_records : dict
        Store key -> parse error, for case records that cannot be read (their cases are
        hidden until re-ingested).
    unchecked : tuple of str
        Cases committed before checksums were recorded: decodable, not comparable.
    """

    dataset: str
    store: str
    intact: tuple[str, ...] = ()
    damaged: dict[str, str] = field(default_factory=dict)
    unreadable_records: dict[str, str] = field(default_factory=dict)
    unchecked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.unreadable_records


def verify_dataset(store: DatasetStore,
                   progress: Callable[[str, str | None], None] | None = None) -> VerifyReport:
    """Verify every committed case (see module notes).

    Parameters
    ----------
    progress : callable, optional
        Called with (case id, problem or None) as each case is checked.
    """
    intact: list[str] = []
    unchecked: list[str] = []
    damaged: dict[str, str] = {}
    for cid, record in store.committed().items():
        problem = store.verify_case(cid, record=record)
        if problem is not None:
            damaged[cid] = problem
        elif "checksums" in record.attrs:
            intact.append(cid)
        else:
            unchecked.append(cid)
        if progress is not None:
            progress(cid, problem)
    return VerifyReport(dataset=store.dataset, store=store.url, intact=tuple(intact),
                        damaged=damaged, unreadable_records=store.damaged_records(),
                        unchecked=tuple(unchecked))
