"""Cases in a local folder laid out like one of the TCIA brain-tumour collections.

Layouts (``discover(layout=...)``; ``"auto"`` calls `detect_layout`):

``brats``
    BraTS 2021 names ``<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`` (labels 1 NCR, 2 ED, 4 ET →
    ``label_map={4: 3}``) or BraTS 2023 / BraTS-Africa names
    ``<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (labels already 1, 2, 3 → ``{}``), in case
    folders or flat, anywhere up to `MAX_DEPTH` folders below the root. The naming is
    chosen per case.
``upenn``
    UPENN-GBM NIfTI: ``images_structural/<ID>/<ID>_{T1,T1GD,T2,FLAIR}.nii.gz``, manual
    masks ``images_segm/<ID>_segm.nii.gz``, automatic ones
    ``automated_segm/<ID>_automated_approx_segm.nii.gz`` (labels 1, 2, 4 → ``{4: 3}``).
    The manual mask is preferred; the automatic one is used only with
    ``use_automated=True`` and the case is flagged ``"automated-segmentation"``.
``ucsf``
    UCSF-PDGM: ``<ID>_nifti/<ID>_{T1,T1c,T2,FLAIR}.nii.gz`` and
    ``<ID>_nifti/<ID>_tumor_segmentation.nii.gz`` (labels 1, 2, 4 → ``{4: 3}``).
``dicom``
    One folder per patient holding DICOM MR series and DICOM SEG objects, at any depth
    (NBIA's ``<patient>/<study>/<series>/1-01.dcm`` or flat). See `discover_dicom_case`.

Discovery only lists files (and, for DICOM, reads headers), except with
``partial_annotation=True``, which reads each label once to record its annotated slices.
Anything missing is listed in ``CaseSource.missing`` (``"t1c: <expected path>"``) for the
ingest to quarantine; discovery itself raises only for a root it cannot interpret and for
two cases with the same id.

Junk and odd folders (issue 11):

- Operating-system, file-sharing and tool litter (`is_junk`: hidden ``.*`` entries, among
  them AppleDouble ``._*`` files, ``.DS_Store``, ``.git`` and ``.ipynb_checkpoints``;
  the names in `JUNK_NAMES`, such as ``__MACOSX``, ``Thumbs.db``, ``@eaDir``,
  ``$RECYCLE.BIN`` and ``lost+found``) is skipped at every level discovery looks at,
  with a debug log line, and never makes or hides a case.
- A folder that stands where a case folder would (next to the case folders of the
  ``brats`` and ``ucsf`` layouts, a sub-folder of the ``dicom`` root) but from which no
  case can be made is returned as a case whose id is the folder's name, with
  ``missing = ("volumes: <folder>", "<what it holds>; expected <what the layout looks
  for>")``, so the ingest quarantines it by name instead of dropping it silently. Only a
  folder that holds nothing but metadata or documentation files (`METADATA_SUFFIXES`:
  CSV, JSON, text, PDF, spreadsheets, ...) is skipped, with an info log line, as the
  ``dicom`` layout always skipped a ``metadata`` folder. Every sub-folder of a
  ``upenn`` ``images_structural`` folder and every ``<ID>_nifti`` folder is a case, as
  before (an empty one lists every channel in ``missing``).
- Case ids are taken as they are written on disk: a leading ``_`` or space, a trailing
  space or a name such as ``zarr.json`` is kept (the store maps ids to its own keys).
  The only changes are the documented ones (the channel suffix of ``brats`` file names,
  the ``_nifti`` suffix of ``ucsf`` folders). Two cases with the same id, for instance
  ``P-1_nifti`` and an unusable folder ``P-1`` next to it, are refused with an error
  naming both places.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from pipeline.errors import VolumeError
from pipeline.io import read_label
from pipeline.io.dicom import looks_like_dicom
from pipeline.io.seg import segment_names
from pipeline.sources.base import CHANNELS, CaseSource, VolumeRef

log = logging.getLogger(__name__)

Layout = Literal["auto", "brats", "upenn", "ucsf", "dicom"]

#: Known layouts, in the order `detect_layout` tries them.
LAYOUTS: tuple[str, ...] = ("upenn", "ucsf", "brats", "dicom")

#: How deep below the root detection and NIfTI discovery look for folders and files.
MAX_DEPTH = 4

#: Files `detect_layout` inspects at most before giving up on finding DICOM.
DETECT_MAX_FILES = 5000

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

#: What each layout looks for, quoted in errors.
LOOKED_FOR: dict[str, str] = {
    "upenn": "an 'images_structural' folder (UPENN-GBM)",
    "ucsf": "'<ID>_nifti' folders holding '<ID>_FLAIR.nii.gz' etc. (UCSF-PDGM)",
    "brats": (
        "files named '<ID>_{t1,t1ce,t2,flair,seg}.nii.gz' (BraTS 2021) or "
        "'<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz' (BraTS 2023, BraTS-Africa)"
    ),
    "dicom": "patient folders holding DICOM files ('DICM' marker or .dcm suffix)",
}

#: Where each layout takes a case id from, quoted in the duplicate-id error.
ID_FROM: dict[str, str] = {
    "upenn": "the name of the case folder under 'images_structural'",
    "ucsf": "the name of the '<ID>_nifti' folder without '_nifti', or of an unusable folder",
    "brats": "the file-name prefix before the channel suffix, or the name of an unusable folder",
    "dicom": "the name of the patient folder",
}

#: Names of files and folders that are never data, compared case-insensitively: what
#: operating systems, file-sharing tools and archivers leave behind. Hidden entries
#: (a leading ``.``) are junk as well; see `is_junk`.
JUNK_NAMES: frozenset[str] = frozenset(
    name.casefold()
    for name in (
        "__MACOSX",  # macOS Archive Utility: AppleDouble ``._*`` copies of every file
        "Icon\r",  # macOS custom folder icon
        "Thumbs.db", "ehthumbs.db", "desktop.ini",  # Windows Explorer
        "$RECYCLE.BIN", "RECYCLER", "System Volume Information",  # Windows volumes
        "@eaDir", "#recycle", "#snapshot",  # Synology NAS
        "@Recycle", "@Recently-Snapshot",  # QNAP NAS
        "lost+found",  # ext2/3/4 volumes
        "__pycache__",  # Python
    )
)  # fmt: skip

#: Suffixes (lower case) of metadata and documentation files. A folder that holds only
#: such files is not a case folder and is skipped (logged at info level).
METADATA_SUFFIXES: tuple[str, ...] = (
    ".csv", ".tsv", ".json", ".txt", ".md", ".rst", ".pdf", ".xlsx", ".xls", ".ods",
    ".html", ".htm", ".xml", ".yaml", ".yml", ".doc", ".docx", ".rtf",
)  # fmt: skip


@dataclass(frozen=True)
class NiftiNaming:
    """File-name suffixes (before ``.nii[.gz]``) of one NIfTI naming convention."""

    name: str
    channels: Mapping[str, str]
    label: str
    label_map: Mapping[int, int] = field(default_factory=dict)


BRATS_2021 = NiftiNaming(
    "brats-2021", {"t1n": "_t1", "t1c": "_t1ce", "t2w": "_t2", "t2f": "_flair"}, "_seg", {4: 3}
)
BRATS_2023 = NiftiNaming(
    "brats-2023", {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f"}, "-seg", {}
)
UPENN = NiftiNaming(
    "upenn", {"t1n": "_T1", "t1c": "_T1GD", "t2w": "_T2", "t2f": "_FLAIR"}, "_segm", {4: 3}
)
UPENN_AUTOMATED_SUFFIX = "_automated_approx_segm"
UCSF = NiftiNaming(
    "ucsf",
    {"t1n": "_T1", "t1c": "_T1c", "t2w": "_T2", "t2f": "_FLAIR"},
    "_tumor_segmentation",
    {4: 3},
)


# --------------------------------------------------------------------------- helpers


def is_junk(name: str) -> bool:
    """Whether a file or folder name is system or tool litter that discovery skips.

    Junk is a hidden name (a leading ``.``: AppleDouble ``._*`` resource forks,
    ``.DS_Store``, ``.git``, ``.ipynb_checkpoints``, ``.Trash-1000``, ...) or one of
    `JUNK_NAMES` (``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ``$RECYCLE.BIN``,
    ``System Volume Information``, ``@eaDir``, ``lost+found``, ...), compared
    case-insensitively. Names that are merely unusual (a leading ``_`` or space, a
    trailing space, ``zarr.json``) are not junk.

    Examples
    --------
    >>> [is_junk(n) for n in ["__MACOSX", "._a-t1n.nii.gz", "$Recycle.Bin", "_case01",
    ...                       "case02 ", "zarr.json"]]
    [True, True, True, False, False, False]
    """
    return name.startswith(".") or name.casefold() in JUNK_NAMES


def _keep(folder: Path, names: list[str]) -> list[str]:
    """``names`` (entries of ``folder``) without junk, sorted; logs what it drops."""
    kept = []
    for name in sorted(names):
        if is_junk(name):
            log.debug("skipping %s: system or tool litter, not data", folder / name)
        else:
            kept.append(name)
    return kept


def _subfolders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that are not junk, sorted by name."""
    entries = [p for p in folder.iterdir() if p.is_dir()]
    return [folder / n for n in _keep(folder, [p.name for p in entries])]


def _files_below(folder: Path) -> list[Path]:
    """Every file below ``folder`` (any depth), sorted, outside junk folders and not junk."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = _keep(here, dirnames)
        out.extend(here / f for f in _keep(here, filenames))
    return sorted(out)


def annotated_slices(label_array: NDArray, axis: int) -> tuple[int, ...]:
    """Indices along ``axis`` of the slices that carry any non-zero label.

    Parameters
    ----------
    label_array : ndarray
        Label volume (any integer dtype).
    axis : int
        The slice axis of ``label_array`` (negative values count from the end).

    Returns
    -------
    tuple of int
        Increasing slice indices; empty when nothing is labelled.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((4, 2, 2), np.uint8); a[1, 0, 0] = 2; a[3, 1, 1] = 1
    >>> annotated_slices(a, axis=0)
    (1, 3)
    """
    array = np.asarray(label_array)
    axis = int(axis)
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis!r} is out of range for an array of shape {array.shape!r}")
    others = tuple(a for a in range(array.ndim) if a != axis % array.ndim)
    return tuple(int(i) for i in np.flatnonzero(np.any(array != 0, axis=others)))


def axial_axis(direction: Sequence[float]) -> int:
    """Index axis (0, 1, 2 as in SimpleITK's ``(i, j, k)``) closest to the S axis.

    ``direction`` is SimpleITK's row-major 3×3 direction matrix; column ``c`` is the LPS
    direction of index axis ``c``, so the axial (slice) axis maximizes ``|D[2, c]|``. In
    the ``(k, j, i)`` array from ``GetArrayFromImage`` it is array axis ``2 - c``.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return int(np.argmax(np.abs(d[2])))


def _walk(root: Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk limited to ``max_depth`` folders below ``root``, skipping junk (`is_junk`)."""
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = _keep(here, dirnames)
        if len(here.parts) - base >= max_depth:
            dirnames[:] = []
        yield here, dirnames, _keep(here, filenames)


def _split_nifti(name: str) -> tuple[str, str] | None:
    """``"a_t1.nii.gz"`` → ``("a_t1", ".nii.gz")``; None for other files."""
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return None


def _find_nifti(folder: Path, case_id: str, suffix: str, *, fallback: bool) -> Path | None:
    """``folder/<case_id><suffix>.nii[.gz]``; with ``fallback``, else the only file in
    ``folder`` whose name ends with ``<suffix>.nii[.gz]`` (for ids that differ between
    folder and file names)."""
    for ext in NIFTI_EXTENSIONS:
        path = folder / f"{case_id}{suffix}{ext}"
        if path.is_file():
            return path
    if fallback and folder.is_dir():
        hits = [
            p
            for p in folder.iterdir()
            if p.is_file()
            and not is_junk(p.name)
            and (s := _split_nifti(p.name)) is not None
            and s[0].endswith(suffix)
        ]
        if len(hits) == 1:
            return hits[0]
    return None


def _nifti_case(
    case_id: str,
    folder: Path,
    naming: NiftiNaming,
    *,
    label_folder: Path | None = None,
    fallback: bool = False,
    require_label: bool = True,
) -> CaseSource:
    images: dict[str, VolumeRef] = {}
    missing: list[str] = []
    for channel in CHANNELS:
        suffix = naming.channels[channel]
        path = _find_nifti(folder, case_id, suffix, fallback=fallback)
        if path is None:
            missing.append(f"{channel}: {folder / (case_id + suffix + '.nii.gz')}")
        else:
            images[channel] = VolumeRef("nifti", (path,))
    label_folder = folder if label_folder is None else label_folder
    label_path = _find_nifti(label_folder, case_id, naming.label, fallback=fallback)
    label = None if label_path is None else VolumeRef("nifti", (label_path,))
    if label is None and require_label:
        missing.append(f"label: {label_folder / (case_id + naming.label + '.nii.gz')}")
    return CaseSource(case_id, images, label, dict(naming.label_map), tuple(missing))


def _quarantine_folder(folder: Path, layout: str, why: str) -> CaseSource:
    """A case named after ``folder`` that the ingest quarantines: ``missing`` names the
    folder (``"volumes: <folder>"``), then ``why`` and what ``layout`` looks for."""
    missing = (f"volumes: {folder}", f"{why}; expected {LOOKED_FOR[layout]}")
    return CaseSource(folder.name, {}, None, {}, missing)


def _unusable_folder(
    folder: Path, layout: str, files: Sequence[Path] | None = None
) -> CaseSource | None:
    """The quarantine case of a folder from which ``layout`` makes no case.

    Returns None (and logs at info level) for a folder that holds only metadata or
    documentation files (`METADATA_SUFFIXES`). ``files`` are the folder's non-junk files
    (`_files_below`), listed here when not given.
    """
    files = _files_below(folder) if files is None else files
    if files and all(p.name.lower().endswith(METADATA_SUFFIXES) for p in files):
        log.info(
            "skipping %s: it holds only metadata or documentation files (%d), not a case",
            folder,
            len(files),
        )
        return None
    if not files:
        why = f"{folder.name!r} holds no files (system litter such as .DS_Store ignored)"
    else:
        names = [str(p.relative_to(folder)) for p in files[:5]]
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        why = f"{folder.name!r} holds no {layout} case, only {names!r}{more}"
    return _quarantine_folder(folder, layout, why)


def _unusable_neighbours(root: Path, case_folders: set[Path], layout: str) -> list[CaseSource]:
    """Quarantine cases for the folders next to case folders that hold no case.

    The candidates are the non-junk sub-folders of every folder (at or below ``root``)
    that holds a case folder, other than the case folders and their ancestors.
    """
    ancestors = {a for f in case_folders for a in f.parents}
    parents = sorted({f.parent for f in case_folders if f != root})
    out = []
    for parent in parents:
        for folder in _subfolders(parent):
            if folder not in case_folders and folder not in ancestors:
                case = _unusable_folder(folder, layout)
                if case is not None:
                    out.append(case)
    return out


# --------------------------------------------------------------------------- layouts


def discover_brats(root: Path, *, require_label: bool = True) -> list[CaseSource]:
    """BraTS 2021 and 2023/BraTS-Africa cases, grouped by folder and file-name prefix.

    Folders next to the case folders that hold no case are returned as quarantine cases
    (see the module notes).
    """
    seen: dict[tuple[Path, str], dict[str, int]] = {}
    namings = (BRATS_2021, BRATS_2023)
    for folder, _, files in _walk(root):
        for name in files:
            split = _split_nifti(name)
            if split is None:
                continue
            for naming in namings:
                for suffix in (*naming.channels.values(), naming.label):
                    if split[0].endswith(suffix) and len(split[0]) > len(suffix):
                        key = (folder, split[0][: -len(suffix)])
                        counts = seen.setdefault(key, {})
                        counts[naming.name] = counts.get(naming.name, 0) + 1
    cases = []
    for (folder, case_id), counts in seen.items():
        naming = max(namings, key=lambda n: counts.get(n.name, 0))
        cases.append(_nifti_case(case_id, folder, naming, require_label=require_label))
    if cases:
        cases += _unusable_neighbours(root, {folder for folder, _ in seen}, "brats")
    return cases


def discover_upenn(
    root: Path, *, use_automated: bool = False, require_label: bool = True
) -> list[CaseSource]:
    """UPENN-GBM NIfTI cases (see the module notes for the mask choice)."""
    cases = []
    for folder, dirs, _ in _walk(root):
        if folder.name != "images_structural":
            continue
        dirs[:] = []
        base = folder.parent
        manual_dir, auto_dir = base / "images_segm", base / "automated_segm"
        for case_dir in _subfolders(folder):
            case_id = case_dir.name
            case = _nifti_case(case_id, case_dir, UPENN, fallback=True, require_label=False)
            manual = _find_nifti(manual_dir, case_id, UPENN.label, fallback=False)
            auto = _find_nifti(auto_dir, case_id, UPENN_AUTOMATED_SUFFIX, fallback=False)
            if manual is not None:
                case = replace(case, label=VolumeRef("nifti", (manual,)))
            elif use_automated and auto is not None:
                case = replace(
                    case, label=VolumeRef("nifti", (auto,)), flags=("automated-segmentation",)
                )
            elif require_label:
                note = f"label: {manual_dir / (case_id + UPENN.label + '.nii.gz')}"
                if auto is not None:
                    note += f" (only the automated mask {auto} exists; use_automated=True uses it)"
                case = replace(case, missing=(*case.missing, note))
            cases.append(case)
    return cases


def discover_ucsf(root: Path, *, require_label: bool = True) -> list[CaseSource]:
    """UCSF-PDGM cases: one ``<ID>_nifti`` folder each.

    Folders next to the ``<ID>_nifti`` folders that hold no case, and a folder named
    just ``_nifti``, are returned as quarantine cases (see the module notes).
    """
    cases = []
    case_folders: set[Path] = set()
    for folder, dirs, _ in _walk(root):
        if not folder.name.endswith("_nifti") or folder == root:
            continue
        dirs[:] = []
        case_folders.add(folder)
        case_id = folder.name[: -len("_nifti")]
        if not case_id:
            why = f"{folder.name!r} has no case id before '_nifti'"
            cases.append(_quarantine_folder(folder, "ucsf", why))
            continue
        cases.append(_nifti_case(case_id, folder, UCSF, fallback=True, require_label=require_label))
    if cases:
        cases += _unusable_neighbours(root, case_folders, "ucsf")
    return cases


# --------------------------------------------------------------------------- DICOM

#: Series that are never one of the four structural channels (checked first).
EXCLUDE_KEYWORDS: tuple[str, ...] = (
    "adc", "dwi", "diff", "dti", "trace", "perf", "dsc", "dce", "asl", "swi", "swan",
    "t2*", "t2star", "localizer", "localiser", "scout", "survey", "loc", "mip",
    "sub", "subtraction", "map", "fa", "mosaic", "spectro", "svs",
)  # fmt: skip
#: T1-weighted families (checked before FLAIR, so that "T1 FLAIR" is T1-weighted).
T1_KEYWORDS: tuple[str, ...] = (
    "t1", "t1w", "t1c", "t1ce", "t1gd", "t1post", "t1pre", "mprage", "mp-rage", "spgr",
    "fspgr", "bravo", "tfl", "vibe",
)  # fmt: skip
#: Post-contrast markers of a T1 series.
CONTRAST_KEYWORDS: tuple[str, ...] = (
    "post", "gad", "gd", "gado", "+c", "c+", "+gd", "contrast", "ce", "t1c", "t1ce", "t1gd",
    "t1post", "enhanced",
)  # fmt: skip
#: Pre-contrast markers (win over contrast markers: "T1 pre gad" is t1n).
PRE_KEYWORDS: tuple[str, ...] = ("pre", "precontrast", "t1pre", "native", "without", "noncontrast")
FLAIR_KEYWORDS: tuple[str, ...] = ("flair", "t2flair", "darkfluid", "dark-fluid")
T2_KEYWORDS: tuple[str, ...] = ("t2", "t2w", "t2tse", "t2fse")

_TOKEN_SPLIT = re.compile(r"[\s_/\\()\[\],.;:=]+")


def _tokens(text: str) -> set[str]:
    """Lower-case tokens of a series description, also split at '-' (keeping the whole)."""
    out: set[str] = set()
    for token in _TOKEN_SPLIT.split(text.lower()):
        if token:
            out.add(token)
            out.update(t for t in token.split("-") if t)
    return out


def classify_series(description: str) -> str | None:
    """Canonical channel of an MR series from its SeriesDescription/ProtocolName.

    Keyword table (whole tokens of the lower-cased text, split at spaces, ``_ / ( ) , . ; :
    =`` and ``-``), tried in this order:

    ============================  ===============================================
    rule                          keywords
    ============================  ===============================================
    not structural → None         `EXCLUDE_KEYWORDS` (ADC, DWI, DTI, perfusion, SWI, T2*,
                                  localizer, MIP, subtraction, maps, …)
    T1 family, pre marker → t1n   `T1_KEYWORDS` and `PRE_KEYWORDS` ("pre", "native", …)
                                  or the text "w/o"
    T1 family, contrast → t1c     `T1_KEYWORDS` and `CONTRAST_KEYWORDS` ("post", "gad",
                                  "gd", "+c", "c+", "contrast", "ce", "t1ce", …)
    T1 family otherwise → t1n     `T1_KEYWORDS` ("t1", "t1w", "mprage", "spgr", "bravo", …)
                                  or a token starting "t1" ("t1+c", "t1_se")
    FLAIR → t2f                   `FLAIR_KEYWORDS` (a "T1 FLAIR" is T1-weighted, above)
    T2 → t2w                      `T2_KEYWORDS`
    ============================  ===============================================

    Returns None when nothing matches.

    Examples
    --------
    >>> [classify_series(s) for s in ["AX T1 PRE", "Ax T1 +C", "MPRAGE post gad", "AX FLAIR",
    ...                               "T2 TSE axial", "T1_FLAIR", "ADC map", "Sag T2 FLAIR"]]
    ['t1n', 't1c', 't1c', 't2f', 't2w', 't1n', None, 't2f']
    """
    tokens = _tokens(description)
    if tokens & set(EXCLUDE_KEYWORDS):
        return None
    t1_family = tokens & set(T1_KEYWORDS) or any(
        t.startswith("t1") and (len(t) == 2 or not t[2].isdigit()) for t in tokens
    )
    if t1_family:
        if tokens & set(PRE_KEYWORDS) or "w/o" in description.lower():
            return "t1n"
        if tokens & set(CONTRAST_KEYWORDS) or "+c" in description.lower():
            return "t1c"
        return "t1n"
    if tokens & set(FLAIR_KEYWORDS):
        return "t2f"
    if tokens & set(T2_KEYWORDS):
        return "t2w"
    return None


_HEADER_TAGS = [
    "Modality",
    "SeriesInstanceUID",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
]


@dataclass
class _Series:
    uid: str
    modality: str
    description: str
    number: int
    files: list[Path] = field(default_factory=list)


def _scan_patient(folder: Path) -> tuple[dict[str, _Series], list[str]]:
    """Series of a patient folder (headers only) and the unreadable DICOM files."""
    series: dict[str, _Series] = {}
    bad: list[str] = []
    for path in _files_below(folder):
        if path.name.upper() == "DICOMDIR":
            continue
        claims = looks_like_dicom(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
            if claims:
                bad.append(
                    f"dicom: {path}: not a readable DICOM file ({type(err).__name__}: {err})"
                )
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            if claims:
                bad.append(f"dicom: {path}: has no SeriesInstanceUID")
            continue
        entry = series.get(uid)
        if entry is None:
            text = " ".join(
                str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")
            ).strip()
            number = ds.get("SeriesNumber", None)
            entry = series[uid] = _Series(
                uid,
                str(ds.get("Modality", "") or ""),
                text,
                int(number) if number not in (None, "") else 0,
            )
        entry.files.append(path)
    return series, bad


def _read_seg_header(path: Path) -> pydicom.Dataset | str:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        return f"dicom: {path}: not a readable DICOM file ({type(err).__name__}: {err})"


def discover_dicom_case(
    folder: Path,
    *,
    tumour_segments: Sequence[str] = ("tumor", "tumour"),
    require_label: bool = True,
) -> CaseSource:
    """One patient folder of DICOM MR series and SEG objects as a case.

    Every file below ``folder`` is read (header only, pydicom ``stop_before_pixels``) and
    grouped by SeriesInstanceUID. MR series are mapped to channels by `classify_series`
    on "SeriesDescription ProtocolName".

    Choices, each recorded in ``flags``:

    - the label is a SEG object with a segment whose SegmentLabel/SegmentDescription
      contains one of ``tumour_segments`` (case-insensitive); among several, one whose
      referenced series is a classified MR series is preferred, then the first by path
      (flag ``"several-seg-candidates"``). It becomes ``VolumeRef("dicom-seg", (seg,),
      segments=tumour_segments)`` and the channel of its referenced series is recorded
      as flag ``"seg-reference:<channel>"`` (``"seg-reference:unclassified"`` when that
      series is not one of the chosen channel series; `pipeline.io.read_label` then
      finds it by itself);
    - several series for one channel: the one the SEG references, else the one with
      most files, then the lowest SeriesNumber (flag ``"several-series:<channel>"``).

    Unreadable files: a file that claims to be DICOM ('DICM' marker or a DICOM suffix)
    but cannot be parsed is listed in ``missing`` as ``"dicom: <path>: <reason>"``, so the
    case is quarantined with the file named (discovery never raises for one bad case);
    files that do not claim to be DICOM (notes, CSVs) are ignored. A SEG whose referenced
    series is not in the folder is listed as ``"label: ..."`` in ``missing``.
    """
    series, missing = _scan_patient(folder)
    flags: list[str] = []
    by_channel: dict[str, list[_Series]] = {c: [] for c in CHANNELS}
    for s in series.values():
        if s.modality == "MR" and (channel := classify_series(s.description)) is not None:
            by_channel[channel].append(s)
    classified = {s.uid for group in by_channel.values() for s in group}

    # The label: SEG objects holding a tumour segment.
    label: VolumeRef | None = None
    referenced: str | None = None
    needles = [t.lower() for t in tumour_segments]
    candidates: list[tuple[bool, Path, str]] = []
    seg_seen: list[str] = []
    for s in series.values():
        if s.modality != "SEG":
            continue
        for path in s.files:
            ds = _read_seg_header(path)
            if isinstance(ds, str):
                missing.append(ds)
                continue
            names = segment_names(ds)
            seg_seen.append(f"{path.name}: {sorted(names.values())!r}")
            if not any(w in name.lower() for name in names.values() for w in needles):
                continue
            refs = {str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])}
            ref_uid = next(iter(refs)) if len(refs) == 1 else ""
            candidates.append((ref_uid not in classified, path, ref_uid))
    if candidates:
        candidates.sort()
        if len(candidates) > 1:
            flags.append("several-seg-candidates")
        _, seg_path, referenced = candidates[0]
        if referenced not in series:
            missing.append(
                f"label: the series {referenced!r} referenced by SEG {seg_path} "
                f"is not under {folder}"
            )
        else:
            label = VolumeRef("dicom-seg", (seg_path,), segments=tuple(tumour_segments))
    elif require_label:
        if seg_seen:
            missing.append(
                f"label: no segment of the SEG objects in {folder} matches "
                f"{tuple(tumour_segments)!r} ({'; '.join(seg_seen)})"
            )
        else:
            missing.append(f"label: a DICOM SEG object under {folder}")

    images: dict[str, VolumeRef] = {}
    for channel in CHANNELS:
        group = by_channel[channel]
        if not group:
            seen = sorted({s.description for s in series.values() if s.modality == "MR"})
            missing.append(
                f"{channel}: an MR series under {folder} whose description reads as "
                f"{channel} (MR series found: {seen!r})"
            )
            continue
        if len(group) > 1:
            flags.append(f"several-series:{channel}")
        chosen = min(group, key=lambda s: (s.uid != referenced, -len(s.files), s.number, s.uid))
        images[channel] = VolumeRef("dicom", tuple(sorted(chosen.files)))
        if chosen.uid == referenced:
            flags.append(f"seg-reference:{channel}")
    if label is not None and not any(f.startswith("seg-reference:") for f in flags):
        flags.append("seg-reference:unclassified")
    return CaseSource(folder.name, images, label, {}, tuple(missing), tuple(flags))


def discover_dicom(
    root: Path,
    *,
    tumour_segments: Sequence[str] = ("tumor", "tumour"),
    require_label: bool = True,
) -> list[CaseSource]:
    """One case per sub-folder of ``root`` that holds DICOM files.

    A sub-folder without DICOM files is returned as a quarantine case, unless it holds
    only metadata or documentation files (see the module notes).
    """
    cases = []
    unusable = []
    for folder in _subfolders(root):
        files = _files_below(folder)
        if any(looks_like_dicom(p) for p in files):
            cases.append(
                discover_dicom_case(
                    folder, tumour_segments=tumour_segments, require_label=require_label
                )
            )
        elif (case := _unusable_folder(folder, "dicom", files)) is not None:
            unusable.append(case)
    return cases + unusable if cases else []


# --------------------------------------------------------------------------- entry points


def detect_layout(root: Path) -> str:
    """Name the layout of a local folder: "upenn", "ucsf", "brats" or "dicom".

    Looks up to `MAX_DEPTH` folders deep, in the order of `LAYOUTS` (see `LOOKED_FOR`).

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    ValueError
        Nothing matches; the message names the folder and lists what was looked for.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    brats_suffixes = tuple(
        s for n in (BRATS_2021, BRATS_2023) for s in (*n.channels.values(), n.label)
    )
    ucsf_suffixes = (*UCSF.channels.values(), UCSF.label)
    found: set[str] = set()
    checked = 0
    for folder, dirs, files in _walk(root):
        if "images_structural" in dirs:
            return "upenn"
        for name in files:
            split = _split_nifti(name)
            if split is not None:
                if folder.name.endswith("_nifti") and split[0].endswith(ucsf_suffixes):
                    found.add("ucsf")
                elif split[0].endswith(brats_suffixes):
                    found.add("brats")
            elif "dicom" not in found and checked < DETECT_MAX_FILES and folder != root:
                checked += 1
                if looks_like_dicom(folder / name):
                    found.add("dicom")
    for layout in LAYOUTS:
        if layout in found:
            return layout
    looked = "; ".join(f"{k}: {v}" for k, v in LOOKED_FOR.items())
    raise ValueError(
        f"cannot tell the layout of {str(root)!r} (searched {MAX_DEPTH} folders deep); "
        f"looked for {looked}"
    )


def discover(
    root: Path,
    *,
    layout: Layout = "auto",
    use_automated: bool = False,
    tumour_segments: tuple[str, ...] = ("tumor", "tumour"),
    partial_annotation: bool = False,
    require_label: bool = True,
) -> list[CaseSource]:
    """Find the cases of a local folder laid out like a TCIA brain-tumour collection.

    Parameters
    ----------
    root : Path
        The collection's folder.
    layout : {"auto", "brats", "upenn", "ucsf", "dicom"}
        See the module notes; "auto" uses `detect_layout`.
    use_automated : bool
        UPENN-GBM: use the automated mask of cases without a manual one (flagged
        ``"automated-segmentation"``). A manual mask is always preferred.
    tumour_segments : tuple of str
        DICOM layout: case-insensitive substrings of the SEG segment label/description
        that mark the tumour (ReMIND also stores resection cavity and ventricles).
    partial_annotation : bool
        The collection annotates only some slices (LGG-1p19qDeletion): read every label
        once and set ``CaseSource.annotated_slices`` to the source-grid slices along the
        axial index axis (`axial_axis`) that carry any label, and flag
        ``"partial-annotation"``. A label that cannot be read goes to ``missing``.
    require_label : bool
        List an absent label in ``missing`` (quarantine); False accepts unlabelled cases
        (``label=None``), e.g. a validation set.

    Returns
    -------
    list of CaseSource
        Sorted by ``case_id``; includes a quarantine case (``missing`` naming the
        folder) for each folder that stands where a case folder would but holds no
        case. Junk (`is_junk`) is skipped; see the module notes.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    ValueError
        Unknown ``layout``; nothing recognisable (auto), or no case of the requested
        layout; two cases with the same id (the message names both places).
    """
    root = Path(root)
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; expected one of {('auto', *LAYOUTS)!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    chosen = detect_layout(root) if layout == "auto" else layout
    finders: dict[str, Callable[[], list[CaseSource]]] = {
        "brats": lambda: discover_brats(root, require_label=require_label),
        "upenn": lambda: discover_upenn(
            root, use_automated=use_automated, require_label=require_label
        ),
        "ucsf": lambda: discover_ucsf(root, require_label=require_label),
        "dicom": lambda: discover_dicom(
            root, tumour_segments=tumour_segments, require_label=require_label
        ),
    }
    cases = finders[chosen]()
    if not cases:
        raise ValueError(f"no {chosen} cases in {str(root)!r}: looked for {LOOKED_FOR[chosen]}")
    cases.sort(key=lambda c: c.case_id)
    for a, b in itertools.pairwise(cases):
        if a.case_id == b.case_id:
            raise ValueError(
                f"case id {a.case_id!r} occurs twice in {str(root)!r}: at {_where(a)!r} and "
                f"at {_where(b)!r} (the {chosen} layout takes the id from {ID_FROM[chosen]}); "
                "case ids must be unique, so rename or remove one of them"
            )
    if partial_annotation:
        cases = [_with_annotated_slices(c) for c in cases]
    return cases


def _where(case: CaseSource) -> str:
    """The place that names a case in messages: its first file, else the path that its
    first ``missing`` entry names (the path the ingest records)."""
    files = case.files()
    if files:
        return str(files[0])
    if case.missing:
        return case.missing[0].split(": ", 1)[-1]
    return case.case_id


def _with_annotated_slices(case: CaseSource) -> CaseSource:
    if case.label is None:
        return case
    try:
        label = read_label(case.label)
    except VolumeError as err:
        return replace(case, missing=(*case.missing, f"label: {err}"))
    axis = 2 - axial_axis(label.GetDirection())  # SimpleITK index axis → (k, j, i) array axis
    slices = annotated_slices(sitk.GetArrayViewFromImage(label), axis)
    return replace(case, annotated_slices=slices, flags=(*case.flags, "partial-annotation"))
