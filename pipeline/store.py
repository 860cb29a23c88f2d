"""The Zarr (v3) store: one group per dataset, one slot per case, commit marker last.

Layout of ``STORE/<dataset>`` (dimension names are Zarr v3 ``dimension_names``, so
``xarray.open_zarr`` reads the group as one Dataset)::

    image    (case, channel, z, y, x)  float32   chunk = one volume (1, 1, Z, Y, X)
    label    (case, z, y, x)           uint8     dataset label scheme, chunk = one case
    brain    (case, z, y, x)           bool      non-zero in any channel
    annotated(case, z)                 bool      axial slices that carry annotations
    case     (case,)                   str       case id, "" while the slot is not committed
    channel  (channel,)                str       canonical channel names
    _xrai/cases/<case_id>              group whose attributes are the case record
    _xrai/quarantine/<case_id>         group whose attributes say why the case was rejected

A case is *visible* only through its record under ``_xrai/cases``; the record is written
after every voxel of the case (each Zarr key is written atomically by zarr-python's local
store: temporary file, then rename). A run killed at any moment therefore leaves a store
that opens cleanly, with the case being written invisible; a re-run rewrites that slot.
A changed case loses its record *before* its slot is overwritten, so a reader never sees
a half-updated case under a committed name.

Slots are assigned by the parent process only (``allocate``); workers write disjoint
chunks and their own case's record, so no two processes ever write the same key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from pipeline.errors import StoreError
from pipeline.sources.base import CHANNELS, LABEL_SCHEME

log = logging.getLogger(__name__)

STORE_FORMAT = 1
_META = "_xrai"
# lz4 with byte shuffle: ~2-3x smaller than raw float32 MRI and several times faster
# than zstd to write, which keeps ingest close to the cost of decoding the sources.
_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),)
_SLOT_GROWTH = 16


@dataclass(frozen=True)
class Grid:
    """The dataset's common grid, in the canonical LPS orientation.

    Parameters
    ----------
    spacing : tuple of float
        Voxel size (x, y, z) in mm.
    shape : tuple of int
        Voxels along (x, y, z). Arrays are stored (z, y, x).
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] = (240, 240, 155)

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(not s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing!r}")
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"shape must be three positive voxel counts, got {self.shape!r}")

    @property
    def zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return (int(self.shape[2]), int(self.shape[1]), int(self.shape[0]))

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm³)."""
        return float(np.prod(self.spacing)) / 1000.0

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {"spacing": [float(s) for s in self.spacing], "shape": [int(s) for s in self.shape]}


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
            self.group = zarr.open_group(self.url, path=dataset, mode=mode,
                                         storage_options=self.storage_options or None)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(f"no dataset {dataset!r} in store {self.url!r}") from err
        if mode in ("r", "r+") and "xrai_format" not in self.group.attrs:
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
        attrs = self.group.attrs
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
        g = self.group
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
        a = self.group.attrs
        return Grid(spacing=tuple(a["spacing"]), shape=tuple(a["shape"]))  # type: ignore[arg-type]

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.group.attrs["channels"])

    @property
    def n_slots(self) -> int:
        return int(self.group["case"].shape[0])

    def _meta(self, kind: str) -> zarr.Group:
        return self.group[f"{_META}/{kind}"]  # type: ignore[return-value]

    # -- records --------------------------------------------------------------------

    def committed(self) -> dict[str, CaseRecord]:
        """Committed cases by id (the visible ones)."""
        out: dict[str, CaseRecord] = {}
        for name, grp in self._meta("cases").groups():
            attrs = dict(grp.attrs)
            out[name] = CaseRecord(name, int(attrs["slot"]), str(attrs["content_hash"]), attrs)
        return dict(sorted(out.items(), key=lambda kv: kv[1].slot))

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantined cases by id, each with ``reason`` and ``path``."""
        return {name: dict(grp.attrs) for name, grp in sorted(self._meta("quarantine").groups())}

    def quarantine_record(self, case_id: str) -> dict[str, Any] | None:
        """Why one case is quarantined (``reason``, ``path``, ``content_hash``), or None."""
        group = self._meta("quarantine")
        return dict(group[case_id].attrs) if case_id in group else None

    def slots(self) -> dict[str, int]:
        """Every slot assignment, committed or not (``_xrai`` attribute ``slots``)."""
        return {str(k): int(v) for k, v in self._meta("cases").attrs.get("slots", {}).items()}

    def allocate(self, case_ids: Iterable[str]) -> dict[str, int]:
        """Give each case a slot, keeping existing ones; grows the arrays as needed.

        Only the parent process calls this, before any worker writes.
        """
        slots = self.slots()
        changed = False
        for cid in case_ids:
            _check_case_id(cid)
            if cid not in slots:
                slots[cid] = len(slots)
                changed = True
        if changed:
            need = len(slots)
            if need > self.n_slots:
                size = -(-need // _SLOT_GROWTH) * _SLOT_GROWTH
                for name in ("image", "label", "brain", "annotated", "case"):
                    arr = self.group[name]
                    arr.resize((size, *arr.shape[1:]))
            self._meta("cases").attrs["slots"] = slots
        return slots

    def uncommit(self, case_id: str) -> None:
        """Hide a case (before its slot is overwritten)."""
        cases = self._meta("cases")
        if case_id in cases:
            del cases[case_id]

    def write_case(self, slot: int, *, image: np.ndarray, label: np.ndarray, brain: np.ndarray,
                   annotated: np.ndarray) -> None:
        """Write one case's voxels into its slot (the caller has uncommitted it)."""
        z, y, x = self.grid.zyx
        c = len(self.channels)
        if image.shape != (c, z, y, x) or label.shape != (z, y, x) or brain.shape != (z, y, x):
            raise StoreError(
                f"case arrays have shapes image {image.shape}, label {label.shape}, brain "
                f"{brain.shape}; the grid needs ({c}, {z}, {y}, {x}) and ({z}, {y}, {x})"
            )
        img = self.group["image"]
        for ci in range(c):
            img[slot, ci] = image[ci]
        self.group["label"][slot] = label
        self.group["brain"][slot] = brain
        self.group["annotated"][slot] = annotated

    def commit(self, case_id: str, slot: int, content_hash: str, attrs: Mapping[str, Any]) -> None:
        """Make a written case visible: the case id at its slot, then the record last."""
        self.group["case"][slot] = case_id
        record = {**attrs, "slot": int(slot), "content_hash": content_hash}
        self._meta("cases").create_group(case_id, attributes=_jsonable(record), overwrite=True)
        quarantine = self._meta("quarantine")
        if case_id in quarantine:
            del quarantine[case_id]

    def quarantine(self, case_id: str, reason: str, path: str | None = None,
                   content_hash: str | None = None) -> None:
        """Record why a case was rejected (and hide any earlier version of it)."""
        self.uncommit(case_id)
        self._meta("quarantine").create_group(
            case_id, attributes={"reason": reason, "path": path, "content_hash": content_hash},
            overwrite=True,
        )

    # -- reading --------------------------------------------------------------------

    def to_xarray(self) -> xr.Dataset:
        """The committed cases as one xarray Dataset (lazy, dask-backed).

        Dimensions ``case, channel, z, y, x``; per-case provenance in
        ``ds.attrs["cases"]``; quarantined cases in ``ds.attrs["quarantine"]``.
        """
        records = self.committed()
        ds = xr.open_zarr(self.url, group=self.dataset, consolidated=False,
                          storage_options=self.storage_options or None)
        slots = [r.slot for r in records.values()]
        ds = ds.isel(case=slots)
        ds = ds.assign_coords(case=np.array(list(records), dtype=object))
        ds.attrs = {**dict(self.group.attrs),
                    "cases": {cid: dict(r.attrs) for cid, r in records.items()},
                    "quarantine": self.quarantined()}
        return ds

    def read_case(self, case_id: str) -> dict[str, np.ndarray]:
        """The arrays of one committed case: ``image`` (C, Z, Y, X), ``label``, ``brain``."""
        records = self.committed()
        if case_id not in records:
            raise KeyError(f"case {case_id!r} is not committed in {self.url}/{self.dataset}")
        s = records[case_id].slot
        return {
            "image": self.group["image"][s],
            "label": self.group["label"][s],
            "brain": self.group["brain"][s],
            "annotated": self.group["annotated"][s],
        }


def _check_case_id(case_id: str) -> None:
    if not case_id or "/" in case_id or case_id.startswith((".", "_")) or case_id.strip() != case_id:
        raise ValueError(f"case id {case_id!r} cannot name a store entry (no '/', no leading '.' or '_')")


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
