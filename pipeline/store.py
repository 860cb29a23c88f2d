"""The Zarr (v3) store: one group per dataset, one slot per case, commit marker last.

Layout of ``STORE/<dataset>`` (dimension names are Zarr v3 ``dimension_names``, so
``xarray.open_zarr`` reads the group as one Dataset)::

    image    (case, channel, z, y, x)  float32   chunk = one volume (1, 1, Z, Y, X)
    label    (case, z, y, x)           uint8     dataset label scheme, chunk = one case
    brain    (case, z, y, x)           bool      non-zero in any channel
    annotated(case, z)                 bool      axial slices that carry annotations
    case     (case,)                   str       case id, "" while the slot is not committed
    channel  (channel,)                str       canonical channel names
    _xrai/cases/<key>                  group whose attributes are the case record
    _xrai/quarantine/<key>             group whose attributes say why the case was rejected
    _xrai/stats/<key>                  uint8 array: a case's persisted statistics partials
                                       (an opaque blob, `write_partials`); its attributes
                                       ``content_hash`` and ``config`` say what it is of
    _xrai/lease                        the writer lease while a writer runs (pipeline.lease)

``<key>`` is the case id made safe as a store key (`store_key`: a leading ``.`` or ``_``,
``/``, ``%``, control characters, surrounding spaces and the name ``zarr.json`` are
percent-encoded); the record's ``case_id`` attribute keeps the id itself.

A case is *visible* only through its record under ``_xrai/cases``; the record is written
after every voxel of the case (each Zarr key is written atomically by zarr-python's local
store: temporary file, then rename). A run killed at any moment therefore leaves a store
that opens cleanly, with the case being written invisible; a re-run rewrites that slot.
A changed case loses its record *before* its slot is overwritten, so a reader never sees
a half-updated case under a committed name.

Slots are assigned by the parent process only (``allocate``); workers write disjoint
chunks and their own case's record, so no two processes ever write the same key. Writers
of one dataset exclude each other with the writer lease (`pipeline.lease`).

Nothing outside this module opens the Zarr group: readers and writers go through the
methods of `DatasetStore` (cases: `read_case`, `read_image`, `read_label`; persisted
statistics: `write_partials`, `read_partials`, `partials_current`), so the layout above
can change here alone.

Integrity: every chunk of a committed case is written, zeros included
(``write_empty_chunks``), and the record holds the checksum of each array as written
(``checksums``: XXH3-128, see `checksum`; older records hold SHA-256). A missing chunk therefore never reads silently as zeros: `read_case`
refuses a case whose chunk is absent or cannot be decoded, naming the case and the chunk,
and `verify_case` recomputes the checksums (``xrai verify``). A record that cannot be
parsed hides its case (`damaged_records` lists it) until a re-ingest rewrites it.

After a writing run, `compact` moves committed cases into the slots of cases that were
never committed (quarantined ones), trims the arrays to exactly the committed cases and
writes the store's consolidated metadata (at its root, where xarray looks for it), so
``xarray.open_zarr(store, group=dataset)`` shows the committed cases and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.sync import sync

from pipeline.errors import StoreError
from pipeline.grid import Grid
from pipeline.lease import writer_lease
from pipeline.sources.base import CHANNELS, LABEL_SCHEME

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

STORE_FORMAT = 1
_META = "_xrai"
_STATS = f"{_META}/stats"
# lz4 with byte shuffle: ~2-3x smaller than raw float32 MRI and several times faster
# than zstd to write, which keeps ingest close to the cost of decoding the sources.
_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),)
_SLOT_GROWTH = 16
_PER_CASE = ("image", "label", "brain", "annotated", "case")
# Every chunk is written, zeros included, so an absent chunk always means damage.
_WRITE_ALL = {"write_empty_chunks": True}


@dataclass(frozen=True)
class CaseRecord:
    """A committed case: its slot and the record (provenance, content hash, checks)."""

    case_id: str
    slot: int
    content_hash: str
    attrs: Mapping[str, Any]


class DatasetStore:
    """One dataset's group in a Zarr store.

    Use `DatasetStore.create` to make or reopen a dataset for writing (it checks that
    the grid matches) and `DatasetStore.open` to read one.

    Parameters
    ----------
    url : str
        Path or fsspec URL of the store (the ``.zarr`` folder or bucket prefix).
    dataset : str
        Dataset name; the group ``<url>/<dataset>``.
    storage_options : mapping, optional
        Passed to fsspec for remote stores.
    """

    def __init__(self, url: str, dataset: str, *, mode: str = "r",
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if not dataset or "/" in dataset or dataset.startswith(("_", ".")):
            raise ValueError(f"dataset name must be a plain name, got {dataset!r}")
        self.url = str(url)
        self.dataset = dataset
        self.storage_options = dict(storage_options or {})
        try:
            # Never the consolidated metadata: it is a snapshot for plain readers,
            # written at the end of a run (`compact`); the records change during one.
            self._group = zarr.open_group(self.url, path=dataset, mode=mode,
                                          storage_options=self.storage_options or None,
                                          use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(f"no dataset {dataset!r} in store {self.url!r}") from err
        if mode in ("r", "r+") and "xrai_format" not in self._group.attrs:
            raise StoreError(f"{self.url}/{dataset} is not an XRAI dataset (no 'xrai_format' attribute)")

    # -- creation -------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, dataset: str, *, storage_options: Mapping[str, Any] | None = None,
             writable: bool = False) -> DatasetStore:
        """Open an existing dataset (read-only unless ``writable``)."""
        return cls(url, dataset, mode="r+" if writable else "r", storage_options=storage_options)

    @classmethod
    def create(cls, url: str, dataset: str, *, grid: Grid, channels: tuple[str, ...] = CHANNELS,
               skull_stripped: bool = True, collection: str = "",
               storage_options: Mapping[str, Any] | None = None) -> DatasetStore:
        """Create the dataset's group, or reopen it after checking that its grid matches.

        Raises
        ------
        StoreError
            If the dataset exists with another grid or other channels.
        """
        self = cls(url, dataset, mode="a", storage_options=storage_options)
        attrs = self._group.attrs
        if "xrai_format" in attrs:
            stored = {"spacing": list(attrs["spacing"]), "shape": list(attrs["shape"])}
            if stored != grid.to_dict() or list(attrs["channels"]) != list(channels):
                raise StoreError(
                    f"dataset {dataset!r} in {url!r} was created with grid {stored} and channels "
                    f"{list(attrs['channels'])}, not {grid.to_dict()} and {list(channels)}; "
                    "use another dataset name or store"
                )
            return self
        z, y, x = grid.zyx
        c = len(channels)
        g = self._group
        g.create_array("image", shape=(0, c, z, y, x), chunks=(1, 1, z, y, x), dtype="float32",
                       fill_value=0.0, compressors=_COMPRESSORS,
                       dimension_names=["case", "channel", "z", "y", "x"])
        g.create_array("label", shape=(0, z, y, x), chunks=(1, z, y, x), dtype="uint8",
                       fill_value=0, compressors=_COMPRESSORS, dimension_names=["case", "z", "y", "x"])
        g.create_array("brain", shape=(0, z, y, x), chunks=(1, z, y, x), dtype="bool",
                       fill_value=False, compressors=_COMPRESSORS,
                       dimension_names=["case", "z", "y", "x"])
        g.create_array("annotated", shape=(0, z), chunks=(1, z), dtype="bool", fill_value=True,
                       dimension_names=["case", "z"])
        g.create_array("case", shape=(0,), chunks=(1,), dtype=str, fill_value="",
                       dimension_names=["case"])
        ch = g.create_array("channel", shape=(c,), chunks=(c,), dtype=str, fill_value="",
                            dimension_names=["channel"])
        ch[:] = np.array(channels, dtype=object)
        meta = g.require_group(_META)
        meta.require_group("cases")
        meta.require_group("quarantine")
        # The format attribute goes last: a group without it is an unfinished creation.
        g.attrs.update({
            **grid.to_dict(),
            "spacing_units": "mm",
            "orientation": "LPS",
            "axes": ["z", "y", "x"],
            "channels": list(channels),
            "label_scheme": {str(k): v for k, v in LABEL_SCHEME.items()},
            "skull_stripped": bool(skull_stripped),
            "collection": collection,
        })
        g.attrs["xrai_format"] = STORE_FORMAT
        return self

    # -- properties -----------------------------------------------------------------

    @property
    def grid(self) -> Grid:
        a = self._group.attrs
        return Grid(spacing=tuple(a["spacing"]), shape=tuple(a["shape"]))  # type: ignore[arg-type]

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._group.attrs["channels"])

    @property
    def label_scheme(self) -> dict[str, str]:
        """The dataset's label values (as strings) and their names."""
        return dict(self._group.attrs["label_scheme"])

    @property
    def n_slots(self) -> int:
        return int(self._group["case"].shape[0])

    def _meta(self, kind: str) -> zarr.Group:
        return self._group[f"{_META}/{kind}"]  # type: ignore[return-value]

    # -- records --------------------------------------------------------------------

    def _records(self, kind: str) -> dict[str, dict[str, Any]]:
        """Attributes of every readable record under ``_xrai/<kind>``, by store key.

        Reads them all at once; when one record cannot be parsed (a truncated
        ``zarr.json``), falls back to one read per record and leaves the damaged ones
        out (see `damaged_records`).
        """
        group = self._meta(kind)
        try:
            return {name: dict(grp.attrs) for name, grp in group.groups()}
        except ValueError:  # json.JSONDecodeError and zarr's metadata errors
            pass
        out: dict[str, dict[str, Any]] = {}
        for name in self._member_names(kind):
            try:
                out[name] = dict(group[name].attrs)
            except (ValueError, KeyError) as err:
                log.warning("unreadable %s record %r in %s/%s: %s", kind, name, self.url,
                            self.dataset, err)
        return out

    def _member_names(self, kind: str) -> list[str]:
        async def names() -> list[str]:
            return [k async for k in self._group.store.list_dir(f"{self._group.path}/{_META}/{kind}")
                    if k != "zarr.json"]

        return sorted(sync(names()))

    def damaged_records(self) -> dict[str, str]:
        """Case records that cannot be parsed: store key -> the error.

        Their cases are not visible (not committed) until a re-ingest rewrites them.
        """
        group = self._meta("cases")
        out: dict[str, str] = {}
        for name in self._member_names("cases"):
            try:
                group[name].attrs  # noqa: B018 - parsing is the check
            except (ValueError, KeyError) as err:
                out[name] = f"{type(err).__name__}: {err}"
        return out

    def committed(self) -> dict[str, CaseRecord]:
        """Committed cases by id (the visible ones)."""
        out: dict[str, CaseRecord] = {}
        for key, attrs in self._records("cases").items():
            try:
                cid = str(attrs.get("case_id", key))
                out[cid] = CaseRecord(cid, int(attrs["slot"]), str(attrs["content_hash"]), attrs)
            except (KeyError, TypeError, ValueError) as err:
                log.warning("case record %r in %s/%s lacks %s; the case is hidden", key,
                            self.url, self.dataset, err)
        return dict(sorted(out.items(), key=lambda kv: kv[1].slot))

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantined cases by id, each with ``reason`` and ``path``."""
        recs = self._records("quarantine")
        return dict(sorted((str(a.get("case_id", k)), a) for k, a in recs.items()))

    def quarantine_record(self, case_id: str) -> dict[str, Any] | None:
        """Why one case is quarantined (``reason``, ``path``, ``content_hash``), or None."""
        group = self._meta("quarantine")
        key = store_key(case_id)
        if key not in group:
            return None
        try:
            return dict(group[key].attrs)
        except ValueError:  # unreadable: as if there were none, so the case is retried
            return None

    def slots(self) -> dict[str, int]:
        """Every slot assignment, committed or not (``_xrai`` attribute ``slots``)."""
        return {str(k): int(v) for k, v in self._meta("cases").attrs.get("slots", {}).items()}

    def allocate(self, case_ids: Iterable[str]) -> dict[str, int]:
        """Give each case a slot, keeping existing ones; grows the arrays as needed.

        Only the parent process calls this, before any worker writes, holding the
        writer lease (`pipeline.lease`).
        """
        slots = self.slots()
        taken = set(slots.values())
        changed = False
        free = 0
        for cid in case_ids:
            store_key(cid)  # raises for an id no key can represent
            if cid not in slots:
                while free in taken:
                    free += 1
                slots[cid] = free
                taken.add(free)
                changed = True
        if changed:
            need = max(slots.values()) + 1
            if need > self.n_slots:
                size = -(-need // _SLOT_GROWTH) * _SLOT_GROWTH
                for name in _PER_CASE:
                    arr = self._group[name]
                    arr.resize((size, *arr.shape[1:]))
            self._meta("cases").attrs["slots"] = slots
        return slots

    def uncommit(self, case_id: str) -> None:
        """Hide a case (before its slot is overwritten); works on a damaged record too."""
        self._drop_record("cases", store_key(case_id))

    def drop_partials(self, case_id: str) -> None:
        """Delete a case's persisted statistics partials (a no-op when there are none);
        the next statistics run computes the case again."""
        self._drop_record("stats", store_key(case_id))

    def _drop_record(self, kind: str, key: str) -> None:
        """Delete ``_xrai/<kind>/<key>`` whatever it holds (a no-op when it is absent).

        A store-level delete of the prefix: it needs no listing of the other records
        (one per commit would make ingest quadratic in the dataset's size) and no parsing
        of this one's metadata (which may be the damaged part).
        """
        sync(self._group.store.delete_dir(f"{self._group.path}/{_META}/{kind}/{key}"))

    def write_case(self, slot: int, *, image: np.ndarray, label: np.ndarray, brain: np.ndarray,
                   annotated: np.ndarray) -> dict[str, str]:
        """Write one case's voxels into its slot (the caller has uncommitted it).

        Returns
        -------
        dict
            The `checksum` of each array as stored (``image/<channel>``, ``label``,
            ``brain``, ``annotated``), for the case record (`commit`).
        """
        z, y, x = self.grid.zyx
        c = len(self.channels)
        if image.shape != (c, z, y, x) or label.shape != (z, y, x) or brain.shape != (z, y, x):
            raise StoreError(
                f"case arrays have shapes image {image.shape}, label {label.shape}, brain "
                f"{brain.shape}; the grid needs ({c}, {z}, {y}, {x}) and ({z}, {y}, {x})"
            )
        checksums: dict[str, str] = {}
        img = self._array("image")
        image = np.ascontiguousarray(image, dtype=img.dtype)
        for ci, ch in enumerate(self.channels):
            checksums[f"image/{ch}"] = checksum(image[ci])
        img[slot] = image  # one selection: zarr encodes the channels' chunks concurrently
        for name, values in (("label", label), ("brain", brain), ("annotated", annotated)):
            arr = self._array(name)
            values = np.ascontiguousarray(values, dtype=arr.dtype)
            checksums[name] = checksum(values)
            arr[slot] = values
        return checksums

    def _array(self, name: str) -> zarr.Array:
        return self._group[name].with_config(_WRITE_ALL)  # type: ignore[union-attr]

    def commit(self, case_id: str, slot: int, content_hash: str, attrs: Mapping[str, Any]) -> None:
        """Make a written case visible: the case id at its slot, then the record last."""
        self._array("case")[slot] = case_id
        record = {**attrs, "case_id": case_id, "slot": int(slot), "content_hash": content_hash}
        key = store_key(case_id)
        self._meta("cases").create_group(key, attributes=_jsonable(record), overwrite=True)
        self._drop_record("quarantine", key)

    def quarantine(self, case_id: str, reason: str, path: str | None = None,
                   content_hash: str | None = None) -> None:
        """Record why a case was rejected (and hide any earlier version of it)."""
        self.uncommit(case_id)
        self._meta("quarantine").create_group(
            store_key(case_id),
            attributes={"case_id": case_id, "reason": reason, "path": path,
                        "content_hash": content_hash},
            overwrite=True,
        )

    # -- reading --------------------------------------------------------------------

    def to_xarray(self) -> xr.Dataset:
        """The committed cases as one xarray Dataset (lazy, dask-backed).

        Dimensions ``case, channel, z, y, x``; per-case provenance in
        ``ds.attrs["cases"]``; quarantined cases in ``ds.attrs["quarantine"]``.
        """
        import xarray as xr  # here: it and pandas cost 0.3 s to import, which only this needs

        records = self.committed()
        ds = xr.open_zarr(self.url, group=self.dataset, consolidated=False,
                          storage_options=self.storage_options or None)
        slots = [r.slot for r in records.values()]
        ds = ds.isel(case=slots)
        ds = ds.assign_coords(case=np.array(list(records), dtype=object))
        ds.attrs = {**dict(self._group.attrs),
                    "cases": {cid: dict(r.attrs) for cid, r in records.items()},
                    "quarantine": self.quarantined()}
        return ds

    def _case_arrays(self) -> dict[str, zarr.Array]:
        """The per-case arrays, opened (each open reads the array's metadata)."""
        return {name: self._group[name] for name in ("image", "label", "brain", "annotated")}  # type: ignore[misc]

    def _chunk_keys(self, slot: int, arrays: Mapping[str, zarr.Array] | None = None
                    ) -> dict[str, tuple[zarr.Array, tuple[int, ...], str]]:
        """Each chunk of a case: name -> (array, selection, store key); one chunk each.
        ``arrays``: `_case_arrays`, opened once for many cases."""
        arrays = arrays or self._case_arrays()
        out: dict[str, tuple[zarr.Array, tuple[int, ...]]] = {}
        for ci, ch in enumerate(self.channels):
            out[f"image/{ch}"] = (arrays["image"], (slot, ci))
        for name in ("label", "brain", "annotated"):
            out[name] = (arrays[name], (slot,))
        return {name: (arr, sel, self._key(arr, sel)) for name, (arr, sel) in out.items()}

    @staticmethod
    def _key(arr: zarr.Array, selection: tuple[int, ...]) -> str:
        coords = selection + (0,) * (arr.ndim - len(selection))
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def missing_chunks(self, records: Iterable[CaseRecord]) -> dict[str, list[str]]:
        """Store keys of absent chunks, per case that has any (one existence check per
        chunk, all at once).

        Only cases committed with checksums are checked: older stores did not write
        chunks equal to the fill value, so an absent chunk there may be a legitimate zero.
        """
        arrays = self._case_arrays()
        wanted = [(rec.case_id, key) for rec in records if "checksums" in rec.attrs
                  for _, _, key in self._chunk_keys(rec.slot, arrays).values()]
        absent = set(self._absent([key for _, key in wanted]))
        out: dict[str, list[str]] = {}
        for cid, key in wanted:
            if key in absent:
                out.setdefault(cid, []).append(key)
        return out

    def _absent(self, keys: list[str]) -> list[str]:
        """The store keys among `keys` that do not exist (one check each, all at once)."""
        import asyncio

        store = self._group.store

        async def check() -> list[bool]:
            return list(await asyncio.gather(*(store.exists(key) for key in keys)))

        return [key for key, present in zip(keys, sync(check()) if keys else [], strict=True)
                if not present]

    def read_case(self, case_id: str, *, record: CaseRecord | None = None,
                  verify: bool = False) -> dict[str, np.ndarray]:
        """The arrays of one committed case: ``image`` (C, Z, Y, X), ``label``, ``brain``.

        Parameters
        ----------
        record : CaseRecord, optional
            The case's record, when the caller holds it (saves listing the records).
        verify : bool
            Also compare each array with the checksum recorded at commit.

        Raises
        ------
        KeyError
            The case is not committed.
        CaseDamaged
            A chunk of the case is absent, cannot be decoded, or (``verify``) does not
            match its checksum; the message names the case and the chunk.
        """
        if record is None:
            record = self._record(case_id)
        chunks = self._chunk_keys(record.slot)
        self._check_present(case_id, record, chunks)
        try:
            # The image in one selection: zarr decodes its channel chunks concurrently
            # into one (C, Z, Y, X) array (reading them one by one and stacking them
            # cost a copy of the image: a fifth of the read).
            arrays = {"image": self._group["image"][record.slot],
                      **{name: self._group[name][record.slot]
                         for name in ("label", "brain", "annotated")}}
        except Exception:  # the codecs raise RuntimeError, ValueError, ...
            # chunk by chunk, to name the one that cannot be decoded (CaseDamaged)
            self._read_chunks(case_id, None, record=record)
            raise
        if verify:
            expected = record.attrs.get("checksums", {})
            for name, (_, selection, key) in chunks.items():
                values = arrays["image"][selection[1]] if name.startswith("image/") \
                    else arrays[name]
                if name in expected:
                    self._check_checksum(case_id, key, values, expected[name])
        return arrays

    def read_image(self, case_id: str, channel: str, *,
                   record: CaseRecord | None = None) -> np.ndarray:
        """One channel (Z, Y, X) of a committed case; reads that chunk only.

        Raises
        ------
        KeyError
            The case is not committed.
        ValueError
            `channel` is not a channel of the dataset.
        CaseDamaged
            The chunk is absent or cannot be decoded.
        """
        if channel not in self.channels:
            raise ValueError(f"channel {channel!r} is not one of {list(self.channels)} of "
                             f"{self.url}/{self.dataset}")
        return self._read_chunks(case_id, (f"image/{channel}",), record=record)[
            f"image/{channel}"]

    def read_label(self, case_id: str, *, record: CaseRecord | None = None) -> np.ndarray:
        """The label (Z, Y, X) of a committed case; reads that chunk only.

        Raises
        ------
        KeyError
            The case is not committed.
        CaseDamaged
            The chunk is absent or cannot be decoded.
        """
        return self._read_chunks(case_id, ("label",), record=record)["label"]

    def _record(self, case_id: str) -> CaseRecord:
        records = self.committed()
        if case_id not in records:
            raise KeyError(f"case {case_id!r} is not committed in {self.url}/{self.dataset}")
        return records[case_id]

    def _check_present(self, case_id: str, record: CaseRecord,
                       chunks: Mapping[str, tuple[zarr.Array, tuple[int, ...], str]]) -> None:
        """`CaseDamaged` when a chunk is absent (zarr would read its fill value instead);
        only for cases committed with checksums (see `missing_chunks`)."""
        missing = self._absent([key for _, _, key in chunks.values()]) \
            if "checksums" in record.attrs else []
        if missing:
            raise CaseDamaged(case_id, f"chunk {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                              self)

    def _check_checksum(self, case_id: str, key: str, values: np.ndarray,
                        recorded: str) -> None:
        """`CaseDamaged` naming the chunk when ``values`` do not match ``recorded``."""
        try:
            same = checksum_matches(values, recorded)
        except ValueError as err:
            raise CaseDamaged(case_id, f"chunk {key!r} cannot be checked: {err}",
                              self) from err
        if not same:
            raise CaseDamaged(case_id, f"chunk {key!r} does not match the checksum "
                              "recorded at commit", self)

    def _read_chunks(self, case_id: str, names: tuple[str, ...] | None, *,
                     record: CaseRecord | None) -> dict[str, np.ndarray]:
        """Chosen chunks (all when `names` is None) of a committed case, by name
        (``image/<channel>``, ``label``, ``brain``, ``annotated``); see `read_case`."""
        if record is None:
            record = self._record(case_id)
        chunks = self._chunk_keys(record.slot)
        if names is not None:
            chunks = {name: chunks[name] for name in names}
        self._check_present(case_id, record, chunks)
        parts: dict[str, np.ndarray] = {}
        for name, (arr, selection, key) in chunks.items():
            try:
                parts[name] = arr[selection]
            except Exception as err:  # the codecs raise RuntimeError, ValueError, ...
                raise CaseDamaged(case_id, f"chunk {key!r} cannot be decoded "
                                  f"({type(err).__name__}: {err})", self) from err
        return parts

    def verify_case(self, case_id: str, *, record: CaseRecord | None = None) -> str | None:
        """What is wrong with a committed case (absent, undecodable or changed chunks),
        or None when every chunk is present, decodes and matches its checksum."""
        try:
            self.read_case(case_id, record=record, verify=True)
        except CaseDamaged as err:
            return err.reason
        return None

    # -- persisted statistics -------------------------------------------------------

    def write_partials(self, case_id: str, blob: bytes, *, content_hash: str,
                       fingerprint: str) -> None:
        """Persist a case's statistics partials (`pipeline.stats_runner` serialises them).

        The blob is one array chunk (written atomically), its attributes naming the
        case's content hash and the engine fingerprint written with the array's metadata
        (one write). A write stopped between the two leaves metadata without a chunk,
        whose blob then does not decode; readers also check that the decoded partials
        name the same case, content hash and fingerprint
        (`pipeline.stats_runner.load_persisted`).

        Parameters
        ----------
        blob : bytes
            The serialised partials; not empty.
        content_hash, fingerprint : str
            What the partials were computed from: the case's content hash and the
            statistics engine's configuration fingerprint.
        """
        if not blob:
            raise ValueError(f"the statistics partials of case {case_id!r} are empty")
        data = np.frombuffer(blob, dtype=np.uint8)
        group = self._group.require_group(_STATS)
        arr = group.create_array(store_key(case_id), shape=data.shape, dtype="uint8",
                                 chunks=data.shape, overwrite=True, compressors=None,
                                 attributes={"content_hash": content_hash,
                                             "config": fingerprint})
        arr[:] = data

    def read_partials(self, case_id: str) -> bytes | None:
        """The blob persisted by `write_partials` for a case, or None when there is none
        or it cannot be read (logged; the caller recomputes the partials)."""
        arr = self._partials_array(case_id)
        if arr is None:
            return None
        try:
            return arr[:].tobytes()
        except Exception as err:  # the codecs raise RuntimeError, ValueError, ...
            log.warning("unreadable statistics partials of case %r in %s/%s: %s", case_id,
                        self.url, self.dataset, err)
            return None

    def partials_current(self, case_id: str, content_hash: str, fingerprint: str) -> bool:
        """Whether the persisted partials of a case were computed from this content hash
        with this engine fingerprint (reads their attributes only)."""
        arr = self._partials_array(case_id)
        if arr is None:
            return False
        attrs = arr.attrs
        return attrs.get("content_hash") == content_hash and attrs.get("config") == fingerprint

    def _partials_array(self, case_id: str) -> zarr.Array | None:
        key = store_key(case_id)
        try:
            group = self._group.get(_STATS)
            if group is None or key not in group:
                return None
            return group[key]  # type: ignore[return-value]
        except ValueError as err:  # an unparsable zarr.json: as if there were none
            log.warning("unreadable statistics partials of case %r in %s/%s: %s", case_id,
                        self.url, self.dataset, err)
            return None

    # -- compaction -----------------------------------------------------------------

    def compact(self) -> int:
        """Move committed cases into free slots, trim the arrays, consolidate metadata.

        Call at the end of a writing run, holding the writer lease. Each move copies the
        case into the lower slot, re-points the slot table, rewrites the record (one
        atomic write) and only then clears the old slot, so a kill at any moment leaves
        every committed case readable. Returns the number of cases moved.
        """
        records = self.committed()
        n = len(records)
        used = {r.slot for r in records.values()}
        holes = [s for s in range(n) if s not in used]
        movers = sorted((r for r in records.values() if r.slot >= n), key=lambda r: r.slot)
        slots = {cid: r.slot for cid, r in records.items()}
        for hole, rec in zip(holes, movers, strict=True):
            for name in ("image", "label", "brain", "annotated"):
                arr = self._array(name)
                arr[hole] = arr[rec.slot]
            self._array("case")[hole] = rec.case_id
            slots[rec.case_id] = hole
            self._meta("cases").attrs["slots"] = slots
            attrs = {**rec.attrs, "slot": hole}
            self._meta("cases").create_group(store_key(rec.case_id), attributes=_jsonable(attrs),
                                             overwrite=True)
            self._array("case")[rec.slot] = ""
        self._meta("cases").attrs["slots"] = slots
        if self.n_slots != n:
            for name in _PER_CASE:
                arr = self._group[name]
                arr.resize((n, *arr.shape[1:]))
                self._drop_chunks_from(arr, n)
        self.consolidate()
        return len(holes)

    def _drop_chunks_from(self, arr: zarr.Array, n: int) -> None:
        """Delete the chunks of slots >= n (zarr's resize leaves them on disk)."""
        store = arr.store
        prefix = f"{arr.path}/c"

        async def drop() -> None:
            async for name in store.list_dir(prefix):
                if name.isdigit() and int(name) >= n:
                    await store.delete_dir(f"{prefix}/{name}")

        sync(drop())

    def consolidate(self, wait: float = 120.0) -> None:
        """Write the store's consolidated metadata, for plain ``xarray.open_zarr``.

        xarray reads consolidated metadata from the root of the store, so the root's
        ``zarr.json`` holds that of every dataset's arrays; the ``_xrai`` bookkeeping
        (records, leases) is left out, as it changes during runs and no plain reader
        needs it. Writers of different datasets take turns through the store's own lease.
        """
        from zarr.core.buffer import default_buffer_prototype

        store = self._group.store
        zarr.open_group(store, path=_META, mode="a")  # the store-level lease lives here
        with writer_lease(self.url, None, wait=wait, storage_options=self.storage_options):
            with warnings.catch_warnings():
                # zarr warns that consolidated metadata is not in the v3 spec yet; xarray
                # reads it, and warns without it.
                warnings.simplefilter("ignore", UserWarning)
                zarr.consolidate_metadata(store)
            proto = default_buffer_prototype()
            raw = sync(store.get("zarr.json", prototype=proto))
            doc = json.loads(raw.to_bytes())
            flat = doc["consolidated_metadata"]["metadata"]
            doc["consolidated_metadata"]["metadata"] = {
                k: v for k, v in flat.items() if _META not in k.split("/")}
            sync(store.set("zarr.json", proto.buffer.from_bytes(json.dumps(doc).encode())))


_SAFE = re.compile(r"[A-Za-z0-9._ ()+,=@~-]")


def store_key(case_id: str) -> str:
    """The store key of a case id: the id itself when it is safe, else percent-encoded.

    Encoded: ``%``, ``/``, ``\\``, control characters and every other character outside
    a conservative set (letters, digits, ``._ ()+,=@~-``), a leading ``.``, ``_`` or
    space (hidden or reserved names), trailing spaces, and the dots of Zarr's metadata
    names (``zarr.json``, ``.zattrs``, ...). The mapping is injective (``%`` itself is
    encoded), so two ids never share a key.

    Raises
    ------
    ValueError
        For an empty id.

    Examples
    --------
    >>> store_key("UPENN-GBM-00001_11"), store_key("_scratch"), store_key("case 1 ")
    ('UPENN-GBM-00001_11', '%5Fscratch', 'case 1%20')
    """
    if not case_id:
        raise ValueError("a case id cannot be empty")
    chars = [ch if _SAFE.fullmatch(ch) else _pct(ch) for ch in case_id]
    if case_id[0] in "._ ":
        chars[0] = _pct(case_id[0])
    for i in range(len(case_id) - 1, 0, -1):  # trailing spaces
        if case_id[i] != " ":
            break
        chars[i] = _pct(" ")
    key = "".join(chars)
    if key in ("zarr.json", ".zarray", ".zgroup", ".zattrs"):
        key = key.replace(".", "%2E")
    return key


def _pct(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


#: The checksum of a stored array: XXH3-128 of its bytes, written ``xxh3-128:<hex>``. It
#: detects damage (lost, truncated or flipped bits), not tampering (whoever can rewrite a
#: chunk can rewrite its record), so a non-cryptographic hash serves: 30 GB/s here
#: against SHA-256's 1.9 GB/s, which was 13 % of an ingest (``make bench-ingest``).
CHECKSUM = "xxh3-128"


def checksum(values: np.ndarray) -> str:
    """The checksum (`CHECKSUM`) of an array's bytes in C order."""
    import xxhash

    digest = xxhash.xxh3_128_hexdigest(memoryview(np.ascontiguousarray(values)).cast("B"))
    return f"{CHECKSUM}:{digest}"


def checksum_matches(values: np.ndarray, recorded: str) -> bool:
    """Whether an array matches the checksum a record holds: ``xxh3-128:<hex>`` (see
    `checksum`), or a bare SHA-256 hex digest (what stores ingested before XXH3 hold).

    Raises
    ------
    ValueError
        The record names a checksum algorithm this version does not know.
    """
    algorithm, sep, _ = recorded.partition(":")
    if not sep:
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        return hashlib.sha256(data).hexdigest() == recorded
    if algorithm != CHECKSUM:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} in {recorded!r}; this "
                         f"version computes {CHECKSUM!r} and reads bare SHA-256 digests")
    return checksum(values) == recorded


class CaseDamaged(StoreError):
    """A committed case whose stored chunks are absent, undecodable or changed.

    ``xrai verify`` lists these; re-ingesting the case (``xrai ingest --recompute`` or
    after a source change) rewrites it.
    """

    def __init__(self, case_id: str, reason: str, store: DatasetStore) -> None:
        self.case_id = case_id
        self.reason = reason
        super().__init__(f"case {case_id!r} in {store.url}/{store.dataset}: {reason}; "
                         "run `xrai verify` to list damaged cases, re-ingest them with "
                         "`xrai ingest --recompute` to repair")


def _jsonable(value: Any) -> Any:
    """Plain JSON types for Zarr attributes (numpy scalars and tuples converted)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
