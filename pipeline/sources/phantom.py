"""The embedded default source: a deterministic synthetic brain-tumour MRI phantom.

`write_phantom` writes a dataset in the BraTS 2023 layout::

    OUT_DIR/XRAI-PHANTOM-00000-000/XRAI-PHANTOM-00000-000-t1n.nii.gz
                                   XRAI-PHANTOM-00000-000-t1c.nii.gz
                                   XRAI-PHANTOM-00000-000-t2w.nii.gz
                                   XRAI-PHANTOM-00000-000-t2f.nii.gz
                                   XRAI-PHANTOM-00000-000-seg.nii.gz

Images are stored as **int16** (one of the types real collections use), labels as uint8 with the
BraTS 2023 scheme (`pipeline.sources.base.LABEL_SCHEME`: 1 NCR, 2 ED, 3 ET).

`phantom_case` is the in-memory generator the writer uses. Its anatomy is defined in
physical (world, RAS+ mm) space by smooth analytic fields, so that one seed gives the
same head whatever the voxel spacing or the stored orientation; only the voxel noise is
drawn per voxel. What a case holds:

- a skull-stripped brain (zero outside it in every channel, > 0 inside): a smoothly
  deformed ellipsoid with a CSF rim, sulci, lateral ventricles, a folded cortical grey
  matter band, deep grey nuclei and white matter;
- a tumour: necrotic core (1) inside an enhancing rim (3) inside oedema (2), an irregular
  star-shaped body (random low-order lobes plus finer bumps) lying inside the brain;
- per-modality tissue contrast (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark,
  oedema bright; T1c: enhancing rim brightest), a little partial-volume blur, a smooth
  multiplicative bias field per channel and Rician noise.

Across the cases of `write_phantom` the whole-tumour volume is log-normal (right-skewed)
with at least one tiny (< 0.5 mL) and one large tumour; spacing alternates between
1 x 1 x 1 mm and 0.94 x 0.94 x 1.5 mm and the stored orientation between RAS and LPS.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.sources.base import CHANNELS, LABEL_SCHEME

Orientation = Literal["RAS", "LPS"]
SeedLike = int | np.random.Generator | np.random.SeedSequence

#: Default grid (voxels at 1 mm, X Y Z): quick on two cores.
DEFAULT_SHAPE: tuple[int, int, int] = (96, 96, 64)
#: The BraTS grid (240 x 240 x 155 voxels at 1 mm).
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
#: Smallest accepted grid: below it the head cannot hold a large and a tiny tumour.
MIN_SHAPE: tuple[int, int, int] = (40, 40, 32)
#: Voxel spacings (mm) the cases of `write_phantom` alternate between.
SPACINGS: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0), (0.94, 0.94, 1.5))
#: Stored orientations the cases of `write_phantom` alternate between.
ORIENTATIONS: tuple[Orientation, ...] = ("RAS", "LPS")
#: Collection name in the case ids (``XRAI-PHANTOM-00000-000``).
COLLECTION = "XRAI-PHANTOM"
#: dtype of the stored images.
IMAGE_DTYPE = np.int16
#: Healthy-tissue codes of `PhantomCase.tissue`.
TISSUES: dict[int, str] = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}

#: Brain semi-axes as fractions of the field of view (x: left-right, y: ant-post, z).
HEAD_FRACTION = (0.28, 0.34, 0.38)
#: Log-normal whole-tumour volume: median as a fraction of the brain volume, and sigma of ln.
VOLUME_MEDIAN_FRACTION = 0.02
VOLUME_SIGMA = 0.75
#: Range (mL) of the guaranteed tiny tumour, and the guaranteed large one (fraction of brain).
TINY_ML = (0.15, 0.45)
LARGE_FRACTION = 0.08
#: Smallest tumour volume (mL) a case may be asked for.
MIN_TUMOUR_ML = 0.05

_PERTURBATION = 0.2  # max |relative radial perturbation| of the tumour outline
_DEPTH = 0.65  # max tumour reach as a fraction of the smallest brain semi-axis
_PV_SIGMA_MM = 0.5  # partial-volume blur
_CLASSES = ("background", "CSF", "GM", "WM", "NCR", "ED", "ET")
# Relative intensities (rows: CHANNELS; columns: _CLASSES), ordered as in clinical MRI.
_CONTRAST = np.array(
    [
        [0.0, 0.30, 0.58, 0.82, 0.32, 0.50, 0.60],  # t1n: WM > GM > CSF, tumour hypointense
        [0.0, 0.30, 0.60, 0.82, 0.30, 0.52, 1.25],  # t1c: enhancing rim brightest
        [0.0, 1.00, 0.62, 0.42, 0.95, 0.82, 0.62],  # t2w: CSF > GM > WM, oedema bright
        [0.0, 0.12, 0.56, 0.44, 0.38, 0.95, 0.70],  # t2f: CSF dark, oedema brightest
    ]
)


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One synthetic case, in its stored orientation.

    Attributes
    ----------
    images : mapping of str to ndarray
        Channel name (`CHANNELS`) to an int16 (X, Y, Z) array; 0 outside the brain.
    label : ndarray of uint8
        Tumour labels 0..3 (`LABEL_SCHEME`), same grid.
    tissue : ndarray of uint8
        Healthy tissue under the tumour (`TISSUES`: 0 background, 1 CSF, 2 GM, 3 WM).
    affine : ndarray, shape (4, 4)
        Voxel index to world (RAS+ mm), as written to the NIfTI sform/qform.
    spacing : tuple of float
        Voxel size (mm) along the stored axes.
    orientation : {"RAS", "LPS"}
        Axis codes of the stored array (nibabel's ``aff2axcodes``).
    tumour_volume_ml : float
        True whole-tumour volume (labels > 0) of this grid, in mL.
    tumour_centre_mm : tuple of float
        The intended tumour centre in world RAS+ mm; the centroid of labels > 0 lies
        within a voxel of it.
    brain_volume_ml : float
        Volume of the brain mask (tissue > 0), in mL.
    noise_sigma : mapping of str to float
        Standard deviation of each channel's complex Gaussian noise, in stored units.
    """

    images: Mapping[str, NDArray[np.int16]]
    label: NDArray[np.uint8]
    tissue: NDArray[np.uint8]
    affine: NDArray[np.float64]
    spacing: tuple[float, float, float]
    orientation: Orientation
    tumour_volume_ml: float
    tumour_centre_mm: tuple[float, float, float]
    brain_volume_ml: float
    noise_sigma: Mapping[str, float]


@dataclass(frozen=True)
class CasePlan:
    """What `write_phantom` generates for one case (so tests can rebuild it in memory).

    Attributes
    ----------
    case_id : str
        ``XRAI-PHANTOM-<5-digit index>-000``.
    seed : numpy.random.SeedSequence
        The case's own stream, ``SeedSequence(seed, spawn_key=(1, index))``.
    spacing : tuple of float
        ``SPACINGS[index % 2]``.
    orientation : {"RAS", "LPS"}
        ``ORIENTATIONS[((index + 1) // 2) % 2]``: RAS, LPS, LPS, RAS, ... so that two
        cases already cover both spacings and both orientations and four cover every pair.
    tumour_volume_ml : float
        Target whole-tumour volume from `tumour_volumes_ml`.
    """

    case_id: str
    seed: np.random.SeedSequence
    spacing: tuple[float, float, float]
    orientation: Orientation
    tumour_volume_ml: float

    def build(self, shape: Sequence[int] = DEFAULT_SHAPE) -> PhantomCase:
        """Generate this case in memory (what `write_phantom` writes)."""
        seed = np.random.SeedSequence(self.seed.entropy, spawn_key=self.seed.spawn_key)
        return phantom_case(seed, shape, self.spacing, orientation=self.orientation,
                            tumour_volume_ml=self.tumour_volume_ml)


# --------------------------------------------------------------------------- public API


def case_id(index: int) -> str:
    """BraTS-style id ``<COLLECTION>-<5 digits>-<3 digits>`` of case `index`."""
    return f"{COLLECTION}-{index:05d}-000"


def brain_volume_ml(shape: Sequence[int] = DEFAULT_SHAPE) -> float:
    """Nominal brain volume (mL) of a field of view: the undeformed ellipsoid, 4/3·π·abc."""
    a, b, c = _semi_axes(_check_shape(shape))
    return 4.0 / 3.0 * math.pi * a * b * c / 1000.0


def max_tumour_ml(shape: Sequence[int] = DEFAULT_SHAPE) -> float:
    """Largest whole-tumour volume (mL) a case of this field of view accepts.

    The tumour's reach (radius times the largest outline perturbation, 1.2) is kept
    below 0.65 of the brain's smallest semi-axis so that it lies inside the brain.
    """
    radius = _DEPTH * min(_semi_axes(_check_shape(shape))) / (1.0 + _PERTURBATION)
    return 4.0 / 3.0 * math.pi * radius**3 / 1000.0


def tumour_volumes_ml(cases: int, seed: int = 0,
                      shape: Sequence[int] = DEFAULT_SHAPE) -> NDArray[np.float64]:
    """Target whole-tumour volumes (mL) of the cases of a dataset.

    Parameters
    ----------
    cases : int
        Number of cases (>= 1).
    seed : int
        Dataset seed; the draws come from ``SeedSequence(seed, spawn_key=(0,))``.
    shape : sequence of 3 int
        Field of view in 1-mm voxels.

    Returns
    -------
    ndarray of float64, shape (cases,)
        Volumes V_i = f_i · V_brain with ln f_i ~ N(ln 0.02, 0.75²) (log-normal, hence
        right-skewed: a few large tumours, many small ones), clipped to
        [`MIN_TUMOUR_ML`, `max_tumour_ml`]. With two cases or more, the smallest draw is
        replaced by a tiny volume drawn uniformly in [0.15, 0.45] mL and the largest is
        raised to at least 8 % of the brain volume (within the cap).

    Notes
    -----
    The cap cuts the log-normal's upper tail at about ln(cap/median)/σ ≈ 2.2 standard
    deviations (1-1.5 % of draws for every supported shape); the floor of 0.05 mL matters
    only near `MIN_SHAPE` (2 % of draws at 48 x 48 x 32, 7 % at 40 x 40 x 32).
    """
    cases = _check_cases(cases)
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    brain = brain_volume_ml(shape)
    cap = max_tumour_ml(shape)
    draws = np.exp(rng.normal(math.log(VOLUME_MEDIAN_FRACTION), VOLUME_SIGMA, cases)) * brain
    tiny = rng.uniform(*TINY_ML)
    volumes = np.clip(draws, MIN_TUMOUR_ML, cap)
    if cases >= 2:
        volumes[int(np.argmin(draws))] = tiny
        big = int(np.argmax(draws))
        volumes[big] = min(max(volumes[big], LARGE_FRACTION * brain), cap)
    return volumes


def case_plans(cases: int = 8, seed: int = 0,
               shape: Sequence[int] = DEFAULT_SHAPE) -> list[CasePlan]:
    """The cases `write_phantom` generates: ids, seeds, spacings, orientations, volumes."""
    volumes = tumour_volumes_ml(cases, seed, shape)
    return [
        CasePlan(
            case_id=case_id(i),
            seed=np.random.SeedSequence(seed, spawn_key=(1, i)),
            spacing=SPACINGS[i % 2],
            orientation=ORIENTATIONS[((i + 1) // 2) % 2],
            tumour_volume_ml=float(volumes[i]),
        )
        for i in range(cases)
    ]


def write_phantom(out_dir: Path, *, cases: int = 8, seed: int = 0,
                  shape: tuple[int, int, int] = DEFAULT_SHAPE) -> list[Path]:
    """Write a synthetic BraTS 2023-layout dataset, deterministic by seed.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created if needed); existing cases of the same ids are
        replaced.
    cases : int, default 8
        Number of cases (>= 1).
    seed : int, default 0
        Dataset seed (>= 0). Equal seeds give byte-identical files.
    shape : tuple of 3 int, default (96, 96, 64)
        Field of view in voxels at 1 mm (X Y Z); (240, 240, 155) is the BraTS grid.
        Cases at 0.94 x 0.94 x 1.5 mm get ``round(shape / spacing)`` voxels, so the head
        keeps its physical size.

    Returns
    -------
    list of Path
        The case folders, in case order.

    Raises
    ------
    ValueError
        If `cases`, `seed` or `shape` is out of range.

    Notes
    -----
    Each file is written to a hidden temporary name in its case folder and moved into
    place with `os.replace`, so an interrupted run never leaves a partial file under a
    final ``.nii.gz`` name. The gzip header carries no time stamp (``mtime=0``), hence
    byte-identical files for equal seeds.
    """
    shape = _check_shape(shape)
    out_dir = Path(out_dir)
    folders: list[Path] = []
    for plan in case_plans(cases, seed, shape):
        case = plan.build(shape)
        folder = out_dir / plan.case_id
        folder.mkdir(parents=True, exist_ok=True)
        for channel in CHANNELS:
            _write_nifti(folder / f"{plan.case_id}-{channel}.nii.gz",
                         case.images[channel], case.affine)
        _write_nifti(folder / f"{plan.case_id}-seg.nii.gz", case.label, case.affine)
        folders.append(folder)
    return folders


def rician(signal: NDArray[np.floating], sigma: float,
           rng: np.random.Generator) -> NDArray[np.float32]:
    """Magnitude of a complex signal with Gaussian noise: Rician-distributed values.

    Parameters
    ----------
    signal : ndarray
        Noise-free magnitude ν >= 0.
    sigma : float
        Standard deviation σ of each of the real and imaginary noise parts.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    ndarray of float32
        M = sqrt((ν + σ·n₁)² + (σ·n₂)²) with n₁, n₂ ~ N(0, 1) independent, i.e.
        M ~ Rice(ν/σ, scale=σ) (scipy.stats.rice); for ν = 0 a Rayleigh variable.

    References
    ----------
    .. [1] Gudbjartsson, H., Patz, S. (1995). The Rician distribution of noisy MRI data.
       Magnetic Resonance in Medicine 34(6), 910-914. doi:10.1002/mrm.1910340618
    """
    s = np.asarray(signal, dtype=np.float32)
    real = rng.standard_normal(s.shape, dtype=np.float32)
    imag = rng.standard_normal(s.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += s
    imag *= np.float32(sigma)
    return np.hypot(real, imag)


def phantom_case(rng_or_seed: SeedLike, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), *,
                 orientation: Orientation = "RAS", tumour_volume_ml: float | None = None,
                 noise: float = 0.03, bias: float = 1.0) -> PhantomCase:
    """Generate one synthetic brain-tumour case in memory.

    Parameters
    ----------
    rng_or_seed : int, numpy.random.SeedSequence or numpy.random.Generator
        Source of randomness; an int or a SeedSequence gives a reproducible case.
        Six independent streams are spawned from it (anatomy, tumour, contrast, bias,
        noise, volume), so switching noise or bias off leaves the anatomy unchanged.
    shape : sequence of 3 int, default (96, 96, 64)
        Field of view in voxels at 1 mm (i.e. its size in mm), at least (40, 40, 32).
    spacing : sequence of 3 float, default (1, 1, 1)
        Voxel size (mm); the grid has ``round(shape / spacing)`` voxels.
    orientation : {"RAS", "LPS"}, default "RAS"
        Stored orientation. "LPS" stores the RAS array flipped along its first two axes,
        with the affine saying so (columns -sx, -sy, +sz).
    tumour_volume_ml : float, optional
        Target whole-tumour volume in (`MIN_TUMOUR_ML`, `max_tumour_ml(shape)`]; drawn
        log-normal (as in `tumour_volumes_ml`) when omitted.
    noise : float, default 0.03
        Noise σ relative to the channel's reference intensity; 0 gives a noise-free case.
    bias : float, default 1.0
        Strength of the log bias field (std about 0.1 at 1.0); 0 switches it off.

    Returns
    -------
    PhantomCase

    Raises
    ------
    ValueError
        If an argument is out of range.
    TypeError
        If `rng_or_seed` is not an int, SeedSequence or Generator.

    Notes
    -----
    Smooth fields are sums of random plane waves, Σ_k a_k cos(k_k·x + φ_k), evaluated on a
    world-space lattice (step <= 2.5 mm) centred on the head and interpolated trilinearly
    onto the voxel centres. The brain is {r (1 + d(x)) < 1} with r the ellipsoidal radius
    and d a deformation field; the image of channel c is
    Rice(blur(I_c[class]) · exp(b_c(x)), σ_c) inside the brain and 0 outside.
    """
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not (math.isfinite(bias) and bias >= 0):
        raise ValueError(f"bias must be a finite number >= 0, got {bias!r}")
    cap = max_tumour_ml(shape)
    if tumour_volume_ml is not None and not (MIN_TUMOUR_ML <= tumour_volume_ml <= cap):
        raise ValueError(
            f"tumour_volume_ml must lie in [{MIN_TUMOUR_ML}, {cap:.4g}] mL for shape "
            f"{shape!r}, got {tumour_volume_ml!r}"
        )
    anatomy_rng, tumour_rng, contrast_rng, bias_rng, noise_rng, volume_rng = _streams(
        rng_or_seed)

    fov = np.asarray(shape, dtype=np.float64)
    axes = np.asarray(_semi_axes(shape))
    grid = tuple(int(np.rint(n / s)) for n, s in zip(fov, spacing, strict=True))
    # voxel centres relative to the head centre (mm), canonical RAS index order
    u_full = tuple(((np.arange(n) - (n - 1) / 2.0) * s) for n, s in zip(grid, spacing, strict=True))
    # the brain (r (1 + d) < 1 with d >= -0.1) lies in this box: work there, embed at the end
    inner = _box(u_full, np.zeros(3), axes / 0.9 + 3.0 * np.asarray(spacing))
    u = tuple(ui[b] for ui, b in zip(u_full, inner, strict=True))
    sub = tuple(ui.size for ui in u)
    step = min(2.5, float(axes.min()) / 10.0)
    lattice = _Lattice.around(fov, step)

    # ---- anatomy (world space)
    head_centre = anatomy_rng.uniform((-4.0, -24.0, 4.0), (4.0, -12.0, 16.0))
    deform = _Waves.draw(anatomy_rng, 8, 1.0, 3.0, scale=axes)
    fold = _Waves.draw(anatomy_rng, 10, 2 * math.pi / 24.0, 2 * math.pi / 14.0)
    sulci = _Waves.draw(anatomy_rng, 10, 2 * math.pi / 18.0, 2 * math.pi / 10.0)
    ventricle_scale = anatomy_rng.uniform(0.85, 1.2, 3)
    nuclei_scale = anatomy_rng.uniform(0.9, 1.1, 3)

    d_coarse = np.clip(0.04 * lattice.evaluate(deform), -0.1, 0.1)
    d = lattice.interpolate(d_coarse, u)
    r = _ellipsoidal_radius(u, axes)
    r *= 1.0 + d
    brain = r < 1.0
    mean_axis = float(axes.mean())
    w_csf = min(max(0.04, 2.0 / mean_axis), 0.12)
    w_gm = min(max(0.10, 4.0 / mean_axis), 0.25)
    fold_f = lattice.interpolate(lattice.evaluate(fold), u)
    tissue = np.zeros(sub, dtype=np.uint8)
    tissue[brain] = 3
    tissue[brain & (r >= 1.0 - w_csf - w_gm * (1.0 + 0.4 * np.clip(fold_f, -1.5, 1.5)))] = 2
    del fold_f
    sulci_f = lattice.interpolate(lattice.evaluate(sulci), u)
    tissue[(tissue == 2) & (r >= 1.0 - w_csf - 0.8 * w_gm) & (np.abs(sulci_f) < 0.12)] = 1
    del sulci_f
    tissue[brain & (r >= 1.0 - w_csf)] = 1
    for side in (-1.0, 1.0):
        centre = axes * (0.26 * side, 0.02, -0.05)
        _paint_ellipsoid(tissue, brain, u, centre, axes * (0.10, 0.20, 0.14) * nuclei_scale, 2)
    for side in (-1.0, 1.0):
        centre = axes * (0.11 * side, 0.05, 0.12)
        _paint_ellipsoid(tissue, brain, u, centre, axes * (0.07, 0.32, 0.13) * ventricle_scale, 1)
    del r, d

    # ---- tumour
    if tumour_volume_ml is None:
        draw = math.exp(volume_rng.normal(math.log(VOLUME_MEDIAN_FRACTION), VOLUME_SIGMA))
        tumour_volume_ml = float(np.clip(draw * brain_volume_ml(shape), MIN_TUMOUR_ML, cap))
    label, centre_rel = _tumour(tumour_rng, lattice, d_coarse, axes, u, spacing, brain,
                                float(tumour_volume_ml))

    # ---- intensities
    gain = 1000.0 * contrast_rng.uniform(0.8, 1.25)
    channel_gain = contrast_rng.uniform(0.9, 1.1, len(CHANNELS))
    contrast = _CONTRAST * contrast_rng.uniform(0.96, 1.04, _CONTRAST.shape)
    common_bias = _Waves.draw(bias_rng, 6, 0.5, 2.0, scale=axes)
    own_bias = [_Waves.draw(bias_rng, 6, 0.5, 2.0, scale=axes) for _ in CHANNELS]
    common_log_bias = lattice.evaluate(common_bias)
    classes = tissue.copy()
    tumour = label > 0
    classes[tumour] = label[tumour] + 3
    sigma_vox = tuple(_PV_SIGMA_MM / s for s in spacing)
    n_brain = int(brain.sum())
    images: dict[str, NDArray[np.int16]] = {}
    noise_sigma: dict[str, float] = {}
    for c, channel in enumerate(CHANNELS):
        reference = gain * channel_gain[c]
        table = (contrast[c] * reference).astype(np.float32)
        table[0] = 0.0
        clean = ndimage.gaussian_filter(table[classes], sigma_vox, truncate=3.0)
        log_bias = 0.8 * common_log_bias + 0.6 * lattice.evaluate(own_bias[c])
        field = np.exp(lattice.interpolate(np.clip(0.1 * bias * log_bias, -0.3, 0.3), u))
        signal = clean[brain] * field[brain]
        del clean, field
        sigma = float(noise * reference)
        if sigma > 0:
            signal = rician(signal, sigma, noise_rng)
        else:  # keep the noise stream aligned whether or not noise is on
            noise_rng.standard_normal((2, n_brain), dtype=np.float32)
        out = np.zeros(grid, dtype=IMAGE_DTYPE)
        out[inner][brain] = np.clip(np.rint(signal), 1, np.iinfo(IMAGE_DTYPE).max)
        images[channel] = out
        noise_sigma[channel] = sigma

    # ---- geometry
    spacing_arr = np.asarray(spacing)
    origin = head_centre - spacing_arr * (np.asarray(grid) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing_arr)
    affine[:3, 3] = origin
    arrays: dict[str, NDArray] = dict(images)
    for name, part in (("label", label), ("tissue", tissue)):
        arrays[name] = np.zeros(grid, dtype=np.uint8)
        arrays[name][inner] = part
    if orientation == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        shift = np.eye(4)
        shift[:2, 3] = np.asarray(grid[:2]) - 1
        affine = affine @ shift @ flip  # index i -> (n - 1 - i) along x and y
        arrays = {k: np.ascontiguousarray(np.flip(v, axis=(0, 1))) for k, v in arrays.items()}
    for value in arrays.values():
        value.flags.writeable = False
    affine.flags.writeable = False
    voxel_ml = float(np.prod(spacing_arr)) / 1000.0
    return PhantomCase(
        images={ch: arrays[ch] for ch in CHANNELS},
        label=arrays["label"],
        tissue=arrays["tissue"],
        affine=affine,
        spacing=spacing,
        orientation=orientation,
        tumour_volume_ml=float((label > 0).sum()) * voxel_ml,
        tumour_centre_mm=tuple(float(v) for v in head_centre + centre_rel),
        brain_volume_ml=n_brain * voxel_ml,
        noise_sigma=noise_sigma,
    )


# --------------------------------------------------------------------------- internals


def _check_cases(cases: int) -> int:
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ValueError(f"cases must be an integer >= 1, got {cases!r}")
    return int(cases)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        values = tuple(shape)
    except TypeError as err:
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}") from err
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}")
    if any(v < m for v, m in zip(values, MIN_SHAPE, strict=True)):
        raise ValueError(f"shape must be at least {MIN_SHAPE} voxels at 1 mm, got {shape!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and 0.25 <= s <= 4.0 for s in values):
        raise ValueError(f"spacing must be 3 numbers in [0.25, 4] mm, got {spacing!r}")
    return (values[0], values[1], values[2])


def _streams(rng_or_seed: SeedLike) -> list[np.random.Generator]:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed.spawn(6)
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return [np.random.default_rng(s) for s in rng_or_seed.spawn(6)]
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        if rng_or_seed < 0:
            raise ValueError(f"seed must be >= 0, got {rng_or_seed!r}")
        return [np.random.default_rng(s)
                for s in np.random.SeedSequence(int(rng_or_seed)).spawn(6)]
    raise TypeError(
        "rng_or_seed must be an int, numpy.random.SeedSequence or numpy.random.Generator, "
        f"got {type(rng_or_seed).__name__} {rng_or_seed!r}"
    )


def _semi_axes(shape: Sequence[int]) -> tuple[float, float, float]:
    a, b, c = (f * n for f, n in zip(HEAD_FRACTION, shape, strict=True))
    return (a, b, c)


@dataclass(frozen=True)
class _Waves:
    """Σ_k amp_k cos(k_k · x + phase_k), x in mm; unit variance over random phases."""

    k: NDArray[np.float64]  # (n, 3), rad / mm
    phase: NDArray[np.float64]
    amp: NDArray[np.float64]

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, k_min: float, k_max: float,
             scale: Sequence[float] | NDArray[np.float64] = (1.0, 1.0, 1.0)) -> _Waves:
        """Random directions, |k| uniform in [k_min, k_max] per unit of `scale` (mm)."""
        direction = rng.standard_normal((n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = direction * rng.uniform(k_min, k_max, n)[:, None] / np.asarray(scale, float)
        phase = rng.uniform(0.0, 2.0 * math.pi, n)
        amp = rng.choice((-1.0, 1.0), n) * math.sqrt(2.0 / n)
        return cls(k, phase, amp)

    def grid(self, x: NDArray[np.float64], y: NDArray[np.float64],
             z: NDArray[np.float64]) -> NDArray[np.float64]:
        """Evaluate on the grid x ⊗ y ⊗ z (1-D arrays), separably.

        cos(kx·x + ky·y + kz·z + φ) = Re(e^{i(kx·x + φ)} · e^{i·ky·y} · e^{i·kz·z}), so the
        sum over waves is one complex matrix product (waves as the inner dimension).
        """
        ex = self.amp[:, None] * np.exp(1j * (self.k[:, 0:1] * x[None, :] + self.phase[:, None]))
        ey = np.exp(1j * self.k[:, 1:2] * y[None, :])
        ez = np.exp(1j * self.k[:, 2:3] * z[None, :])
        eyz = (ey[:, :, None] * ez[:, None, :]).reshape(len(self.amp), -1)
        return (ex.T @ eyz).real.reshape(x.size, y.size, z.size)

    def __call__(self, x: NDArray, y: NDArray, z: NDArray) -> NDArray[np.float64]:
        """Evaluate at broadcastable coordinate arrays (mm)."""
        total = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)))
        for (kx, ky, kz), phase, amp in zip(self.k, self.phase, self.amp, strict=True):
            total += amp * np.cos(kx * x + ky * y + kz * z + phase)
        return total


@dataclass(frozen=True)
class _Lattice:
    """A world-space lattice centred on the head, for smooth fields."""

    step: float
    nodes: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]

    @classmethod
    def around(cls, fov: NDArray[np.float64], step: float) -> _Lattice:
        nodes = []
        for extent in fov:
            half = math.ceil(extent / 2.0 / step) + 1
            nodes.append(np.arange(-half, half + 1) * step)
        return cls(step, (nodes[0], nodes[1], nodes[2]))

    def evaluate(self, waves: _Waves) -> NDArray[np.float64]:
        return waves.grid(*self.nodes)

    def interpolate(self, values: NDArray[np.floating],
                    u: tuple[NDArray[np.float64], ...]) -> NDArray[np.float32]:
        """Trilinear interpolation (separable: one axis at a time) at the grid `u`."""
        out = np.asarray(values, dtype=np.float32)
        for axis, (nodes, x) in enumerate(zip(self.nodes, u, strict=True)):
            pos = (x - nodes[0]) / self.step
            i0 = np.clip(np.floor(pos).astype(np.intp), 0, nodes.size - 2)
            w = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            lo = np.take(out, i0, axis=axis)
            hi = np.take(out, i0 + 1, axis=axis)
            hi -= lo
            hi *= w.reshape(shape)
            lo += hi
            out = lo
        return out


def _ellipsoidal_radius(u: tuple[NDArray[np.float64], ...],
                        axes: NDArray[np.float64]) -> NDArray[np.float32]:
    qx, qy, qz = ((ui / a).astype(np.float32) ** 2 for ui, a in zip(u, axes, strict=True))
    r2 = qx[:, None, None] + qy[None, :, None]
    return np.sqrt(r2 + qz[None, None, :])


def _box(u: tuple[NDArray[np.float64], ...], centre: NDArray[np.float64],
         half: NDArray[np.float64]) -> tuple[slice, slice, slice]:
    out = []
    for ui, c, h in zip(u, centre, half, strict=True):
        lo = int(np.searchsorted(ui, c - h, side="left"))
        hi = int(np.searchsorted(ui, c + h, side="right"))
        out.append(slice(max(lo, 0), min(hi, ui.size)))
    return (out[0], out[1], out[2])


def _paint_ellipsoid(tissue: NDArray[np.uint8], brain: NDArray[np.bool_],
                     u: tuple[NDArray[np.float64], ...], centre: NDArray[np.float64],
                     semi: NDArray[np.float64], value: int) -> None:
    box = _box(u, centre, semi)
    q = [((ui[b] - c) / s) ** 2 for ui, b, c, s in zip(u, box, centre, semi, strict=True)]
    inside = (q[0][:, None, None] + q[1][None, :, None] + q[2][None, None, :]) < 1.0
    inside &= brain[box]
    tissue[box][inside] = value


def _tumour(rng: np.random.Generator, lattice: _Lattice, d_coarse: NDArray[np.float64],
            axes: NDArray[np.float64], u: tuple[NDArray[np.float64], ...],
            spacing: tuple[float, float, float], brain: NDArray[np.bool_],
            target_ml: float) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """Label volume (canonical grid) and the intended centre (mm from the head centre)."""
    lobes = _Waves.draw(rng, 6, 1.5, 3.5)
    bumps = _Waves.draw(rng, 6, 3.0, 6.0)
    et_waves = _Waves.draw(rng, 4, 2.0, 5.0)
    ncr_waves = _Waves.draw(rng, 4, 2.0, 5.0)
    et_level = rng.uniform(0.55, 0.75)
    ncr_level = et_level * rng.uniform(0.45, 0.75)
    pick = rng.random()
    jitter = rng.uniform(-0.5, 0.5, 3)

    # centre: a lattice node deep enough for the tumour's reach (distance on the lattice)
    x, y, z = lattice.nodes
    r_coarse = np.sqrt((x[:, None, None] / axes[0]) ** 2 + (y[None, :, None] / axes[1]) ** 2
                       + (z[None, None, :] / axes[2]) ** 2) * (1.0 + d_coarse)
    depth = ndimage.distance_transform_edt(r_coarse < 1.0, sampling=lattice.step)
    margin = lattice.step + 1.0  # not the voxel size: the centre must not depend on the grid
    radius = (3.0 * target_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    reach = radius * (1.0 + _PERTURBATION)
    if depth.max() < reach + margin:  # only for heads near MIN_SHAPE: shrink to fit
        reach = float(depth.max()) - margin
        radius = reach / (1.0 + _PERTURBATION)
    candidates = np.argwhere(depth >= reach + margin)
    node = candidates[min(int(pick * len(candidates)), len(candidates) - 1)]
    centre = np.array([n[i] for n, i in zip(lattice.nodes, node, strict=True)]) + jitter * lattice.step

    def body(c: NDArray[np.float64], rad: float, *, inner: bool
             ) -> tuple[tuple[slice, slice, slice], dict[str, NDArray[np.bool_]]]:
        """The tumour's shells in a box around centre `c` (mm) for radius `rad` (mm)."""
        box = _box(u, c, np.full(3, rad * (1.0 + _PERTURBATION)) + 2.0 * np.asarray(spacing))
        rel = [(ui[b] - ci) / rad for ui, b, ci in zip(u, box, c, strict=True)]
        vx = rel[0][:, None, None]
        vy = rel[1][None, :, None]
        vz = rel[2][None, None, :]
        rho = np.sqrt(vx**2 + vy**2 + vz**2)
        norm = np.maximum(rho, 1e-9)
        outline = 0.10 * lobes(vx / norm, vy / norm, vz / norm)
        outline += 0.05 * bumps.grid(*rel)
        np.clip(outline, -_PERTURBATION, _PERTURBATION, out=outline)
        shells = {"whole": (rho < 1.0 + outline) & brain[box]}
        if inner:
            for name, waves, level in (("et", et_waves, et_level), ("ncr", ncr_waves, ncr_level)):
                wobble = np.clip(0.05 * waves.grid(*rel), -0.1, 0.1)
                shells[name] = rho < level * (1.0 + outline + wobble)
        return box, shells

    voxel_ml = float(np.prod(spacing)) / 1000.0
    c_eff, r_eff = centre.copy(), radius
    for _ in range(4):  # move and scale the body until its centroid and volume match
        box, shells = body(c_eff, r_eff, inner=False)
        whole = shells["whole"]
        n = int(whole.sum())
        if n == 0:
            r_eff *= 1.5
            continue
        centroid = np.array([
            float((whole.sum(axis=tuple(j for j in range(3) if j != i)) * ui[b]).sum()) / n
            for i, (ui, b) in enumerate(zip(u, box, strict=True))
        ])
        c_eff = c_eff + (centre - centroid)
        r_eff = min(r_eff * (target_ml / (n * voxel_ml)) ** (1.0 / 3.0), radius * 1.25)
    box, shells = body(c_eff, r_eff, inner=True)
    whole = shells["whole"]
    et = shells["et"] & ndimage.binary_erosion(whole)
    ncr = shells["ncr"] & ndimage.binary_erosion(et)
    label = np.zeros(brain.shape, dtype=np.uint8)
    part = np.where(whole, np.uint8(2), np.uint8(0))
    part[et] = 3
    part[ncr] = 1
    label[box] = part
    return label, centre


def _write_nifti(path: Path, array: NDArray, affine: NDArray[np.float64]) -> None:
    """Write one volume atomically: hidden temporary name in the same folder, then rename."""
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    payload = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def iter_phantom(cases: int = 8, seed: int = 0,
                 shape: Sequence[int] = DEFAULT_SHAPE) -> Iterator[tuple[str, PhantomCase]]:
    """Yield ``(case_id, PhantomCase)`` for the cases `write_phantom` would write."""
    shape = _check_shape(shape)
    for plan in case_plans(cases, seed, shape):
        yield plan.case_id, plan.build(shape)


__all__ = [
    "BRATS_SHAPE",
    "CHANNELS",
    "COLLECTION",
    "DEFAULT_SHAPE",
    "IMAGE_DTYPE",
    "LABEL_SCHEME",
    "ORIENTATIONS",
    "SPACINGS",
    "TISSUES",
    "CasePlan",
    "PhantomCase",
    "brain_volume_ml",
    "case_id",
    "case_plans",
    "iter_phantom",
    "max_tumour_ml",
    "phantom_case",
    "rician",
    "tumour_volumes_ml",
    "write_phantom",
]
