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

`PhantomOptions` changes one property of a dataset at a time (for controlled studies,
`pipeline.evidence.families`); its defaults give exactly the dataset described above
(byte-identical files):

- the tumour-volume distribution (``volume_median_fraction``, ``volume_sigma``,
  ``guarantee_extremes``);
- the tumour's shape (``tumour_shape``): one compact body, 2-4 foci apart along z
  ("multifocal"), or one body stretched along z ("elongated");
- the intensity tails (``intensity_tail``): Rician noise only ("light"), or in addition a
  sparse bright speckle with a heavy-tailed factor that survives percentile clipping
  ("heavy", `bright_speckle`);
- the intensity units (``intensity_scale``): the stored int16 values are unchanged and the
  NIfTI header's ``scl_slope`` says what one unit is, so a reader that applies the slope
  (nibabel's ``get_fdata``, `pipeline.io.nifti`) sees ``scale x`` the default values.
"""

from __future__ import annotations

import gzip
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.fsio import write_bytes_atomic
from pipeline.sources.base import CHANNELS, LABEL_SCHEME

Orientation = Literal["RAS", "LPS"]
TumourShape = Literal["compact", "multifocal", "elongated"]
IntensityTail = Literal["light", "heavy"]
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
#: Values of `PhantomOptions.tumour_shape` and `PhantomOptions.intensity_tail`.
TUMOUR_SHAPES: tuple[TumourShape, ...] = ("compact", "multifocal", "elongated")
INTENSITY_TAILS: tuple[IntensityTail, ...] = ("light", "heavy")
#: Multifocal tumours: number of foci drawn uniformly in this range (inclusive), before
#: fewer are used when the brain cannot hold them apart along z.
FOCI_RANGE = (2, 4)
#: Multifocal tumours: smallest gap (mm) along z between the reaches of neighbouring foci
#: (their radius times 1.2, the outline's largest perturbation), before the jitter.
FOCUS_GAP_MM = 3.0
#: Multifocal tumours: each focus is flattened along z, semi-axes x : y : z = f : f : 1.
FOCUS_FLATTENING = 2.0
#: Elongated tumours: semi-axis ratios z : x (= z : y) tried in turn, the first that fits.
ELONGATION_RATIOS = (3.0, 2.5, 2.0, 1.5, 1.25)
#: Heavy intensity tail (`bright_speckle`): share of brain voxels hit per channel, smallest
#: log factor, degrees of freedom of the Student t variable in the log factor.
SPECKLE_FRACTION = 0.02
SPECKLE_LOG_AMPLITUDE = 1.0
SPECKLE_DF = 2.0
#: Range of `PhantomOptions.intensity_scale` (stored as a float32 ``scl_slope``).
SCALE_RANGE = (1e-30, 1e30)

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


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


@dataclass(frozen=True)
class PhantomOptions:
    """Dataset properties a controlled study varies one at a time; defaults: today's phantom.

    Parameters
    ----------
    volume_median_fraction : float, default 0.02
        Median of the log-normal whole-tumour volume, as a fraction of the nominal brain
        volume (`brain_volume_ml`), in (0, 1).
    volume_sigma : float, default 0.75
        Standard deviation of the log volume, >= 0 (0: every case the same volume).
    guarantee_extremes : bool, default True
        Replace the smallest draw of a dataset by a tiny tumour (0.15-0.45 mL) and raise the
        largest to 8 % of the brain (`tumour_volumes_ml`). False keeps a narrow
        distribution narrow.
    tumour_shape : {"compact", "multifocal", "elongated"}, default "compact"
        "compact": one irregular star-shaped body. "multifocal": the same total volume in
        2-4 separate foci, flattened along z and placed apart along z, so that the
        per-slice tumour burden has gaps and varies strongly within the tumour's z-extent. "elongated": one body stretched along z,
        semi-axes z : x : y = 3 : 1 : 1 where the brain allows (`ELONGATION_RATIOS`).
    intensity_tail : {"light", "heavy"}, default "light"
        "light": Rician noise only. "heavy": in addition a bright speckle
        (`bright_speckle`) whose tail survives clipping at the 0.5/99.5 percentiles.
    intensity_scale : float, default 1.0
        Units of the stored images: the int16 values are those of the default and the
        NIfTI ``scl_slope`` is this factor, so a reader applying the slope sees
        ``scale x`` the default intensities (no overflow, no extra quantisation). In
        [1e-30, 1e30].

    Raises
    ------
    ValueError
        If a value is out of range or not one of the listed choices.
    """

    volume_median_fraction: float = VOLUME_MEDIAN_FRACTION
    volume_sigma: float = VOLUME_SIGMA
    guarantee_extremes: bool = True
    tumour_shape: TumourShape = "compact"
    intensity_tail: IntensityTail = "light"
    intensity_scale: float = 1.0

    def __post_init__(self) -> None:
        f = self.volume_median_fraction
        if not (_is_real(f) and 0.0 < f < 1.0):
            raise ValueError(f"volume_median_fraction must be a number in (0, 1), got {f!r}")
        if not (_is_real(self.volume_sigma) and self.volume_sigma >= 0.0):
            raise ValueError(
                f"volume_sigma must be a finite number >= 0, got {self.volume_sigma!r}")
        if not isinstance(self.guarantee_extremes, (bool, np.bool_)):
            raise ValueError(
                f"guarantee_extremes must be True or False, got {self.guarantee_extremes!r}")
        if self.tumour_shape not in TUMOUR_SHAPES:
            raise ValueError(
                f"tumour_shape must be one of {TUMOUR_SHAPES}, got {self.tumour_shape!r}")
        if self.intensity_tail not in INTENSITY_TAILS:
            raise ValueError(
                f"intensity_tail must be one of {INTENSITY_TAILS}, got {self.intensity_tail!r}")
        scale = self.intensity_scale
        if not (_is_real(scale) and SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]):
            raise ValueError(
                f"intensity_scale must be a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] "
                f"(stored as a float32 scl_slope), got {scale!r}")


#: The default options (today's phantom).
DEFAULT_OPTIONS = PhantomOptions()


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
    intensity_scale : float
        Physical value of one stored unit (`PhantomOptions.intensity_scale`): the
        intensities a reader sees are ``intensity_scale * images``; written as the NIfTI
        ``scl_slope`` when not 1.
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
    intensity_scale: float = 1.0


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
    options : PhantomOptions
        The dataset's options (shape, tails and units of the case).
    """

    case_id: str
    seed: np.random.SeedSequence
    spacing: tuple[float, float, float]
    orientation: Orientation
    tumour_volume_ml: float
    options: PhantomOptions = DEFAULT_OPTIONS

    def build(self, shape: Sequence[int] = DEFAULT_SHAPE) -> PhantomCase:
        """Generate this case in memory (what `write_phantom` writes)."""
        seed = np.random.SeedSequence(self.seed.entropy, spawn_key=self.seed.spawn_key)
        return phantom_case(seed, shape, self.spacing, orientation=self.orientation,
                            tumour_volume_ml=self.tumour_volume_ml, options=self.options)


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


def tumour_volumes_ml(cases: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE, *,
                      options: PhantomOptions = DEFAULT_OPTIONS) -> NDArray[np.float64]:
    """Target whole-tumour volumes (mL) of the cases of a dataset.

    Parameters
    ----------
    cases : int
        Number of cases (>= 1).
    seed : int
        Dataset seed; the draws come from ``SeedSequence(seed, spawn_key=(0,))``.
    shape : sequence of 3 int
        Field of view in 1-mm voxels.
    options : PhantomOptions, optional
        Its ``volume_median_fraction`` (m, default 0.02), ``volume_sigma`` (σ, default
        0.75) and ``guarantee_extremes`` are used.

    Returns
    -------
    ndarray of float64, shape (cases,)
        Volumes V_i = f_i · V_brain with ln f_i ~ N(ln m, σ²) (log-normal, hence
        right-skewed: a few large tumours, many small ones), clipped to
        [`MIN_TUMOUR_ML`, `max_tumour_ml`]. With ``guarantee_extremes`` and two cases or
        more, the smallest draw is replaced by a tiny volume drawn uniformly in
        [0.15, 0.45] mL and the largest is raised to at least 8 % of the brain volume
        (within the cap).

    Raises
    ------
    ValueError
        If `cases`, `seed` or `shape` is out of range.
    TypeError
        If `options` is not a `PhantomOptions`.

    Notes
    -----
    With the defaults, the cap cuts the log-normal's upper tail at about
    ln(cap/median)/σ ≈ 2.2 standard deviations (1-1.5 % of draws for every supported
    shape); the floor of 0.05 mL matters only near `MIN_SHAPE` (2 % of draws at
    48 x 48 x 32, 7 % at 40 x 40 x 32). The standard normal deviates are the same for
    every option value, so datasets of equal seed differ only by the options' transform
    of the same draws (paired arms of a study).
    """
    cases = _check_cases(cases)
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    options = _check_options(options)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    brain = brain_volume_ml(shape)
    cap = max_tumour_ml(shape)
    draws = np.exp(rng.normal(math.log(options.volume_median_fraction), options.volume_sigma,
                              cases)) * brain
    tiny = rng.uniform(*TINY_ML)
    volumes = np.clip(draws, MIN_TUMOUR_ML, cap)
    if options.guarantee_extremes and cases >= 2:
        volumes[int(np.argmin(draws))] = tiny
        big = int(np.argmax(draws))
        volumes[big] = min(max(volumes[big], LARGE_FRACTION * brain), cap)
    return volumes


def case_plans(cases: int = 8, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE, *,
               options: PhantomOptions = DEFAULT_OPTIONS) -> list[CasePlan]:
    """The cases `write_phantom` generates: ids, seeds, spacings, orientations, volumes."""
    volumes = tumour_volumes_ml(cases, seed, shape, options=options)
    return [
        CasePlan(
            case_id=case_id(i),
            seed=np.random.SeedSequence(seed, spawn_key=(1, i)),
            spacing=SPACINGS[i % 2],
            orientation=ORIENTATIONS[((i + 1) // 2) % 2],
            tumour_volume_ml=float(volumes[i]),
            options=options,
        )
        for i in range(cases)
    ]


def write_phantom(out_dir: Path, *, cases: int = 8, seed: int = 0,
                  shape: tuple[int, int, int] = DEFAULT_SHAPE,
                  options: PhantomOptions = DEFAULT_OPTIONS) -> list[Path]:
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
    options : PhantomOptions, optional
        Volume distribution, tumour shape, intensity tails and units; the default gives
        today's phantom, byte for byte.

    Returns
    -------
    list of Path
        The case folders, in case order.

    Raises
    ------
    ValueError
        If `cases`, `seed` or `shape` is out of range.
    TypeError
        If `options` is not a `PhantomOptions`.

    Notes
    -----
    Each file is written to a hidden temporary name in its case folder and moved into
    place with `os.replace`, so an interrupted run never leaves a partial file under a
    final ``.nii.gz`` name. The gzip header carries no time stamp (``mtime=0``), hence
    byte-identical files for equal seeds. Images are int16; with an ``intensity_scale``
    other than 1 their header's ``scl_slope`` is that scale (``scl_inter`` 0), labels are
    never scaled.
    """
    shape = _check_shape(shape)
    out_dir = Path(out_dir)
    folders: list[Path] = []
    for plan in case_plans(cases, seed, shape, options=options):
        case = plan.build(shape)
        folder = out_dir / plan.case_id
        folder.mkdir(parents=True, exist_ok=True)
        slope = None if case.intensity_scale == 1.0 else case.intensity_scale
        for channel in CHANNELS:
            _write_nifti(folder / f"{plan.case_id}-{channel}.nii.gz",
                         case.images[channel], case.affine, slope=slope)
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


def bright_speckle(signal: NDArray[np.floating], rng: np.random.Generator, *,
                   fraction: float = SPECKLE_FRACTION,
                   log_amplitude: float = SPECKLE_LOG_AMPLITUDE,
                   df: float = SPECKLE_DF) -> NDArray[np.float32]:
    """Brighten a sparse set of voxels by a heavy-tailed factor (the "heavy" intensity tail).

    Parameters
    ----------
    signal : ndarray
        Intensities (one channel's brain voxels), >= 0.
    rng : numpy.random.Generator
        Source of the speckle.
    fraction : float, default 0.02
        Probability that a voxel is hit, in (0, 1).
    log_amplitude : float, default 1.0
        Smallest log factor a, >= 0: a hit voxel is at least e^a times brighter.
    df : float, default 2
        Degrees of freedom of the Student t variable in the factor, > 0.

    Returns
    -------
    ndarray of float32
        ``signal · exp(B · min(a · (1 + |T|), 30))`` with B ~ Bernoulli(fraction) and
        T ~ Student t(df), independent per voxel (the cap keeps float32 finite).

    Notes
    -----
    The factor is multiplicative, so the tail is heavy on the linear scale and on the log
    scale alike (the normalization plan may choose ``ln``), and one-sided (bright) on
    purpose: stored values are floored at 1, so a dark tail would be bounded by the tissue
    mean. Measured on the phantom (24 case-channels, 64 x 64 x 48 and 96 x 96 x 64) with
    the defaults: Fisher excess kurtosis of the brain intensities clipped at their
    0.5/99.5 percentiles (what a network is fed) >= 60, and of ln(x + 1) unclipped >= 4,
    where Rician noise alone gives about -1 (at most 1.5). Alternatives that do not
    survive the clipping: Student t noise at 5 % of the reference (excess kurtosis < 1),
    an additive bright speckle (about 20 clipped, but 1-2.5 after ln). About a tenth of
    the hit voxels (0.2 % of the brain) saturate at the int16 maximum when written.
    """
    if not (_is_real(fraction) and 0.0 < fraction < 1.0):
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    if not (_is_real(log_amplitude) and log_amplitude >= 0.0):
        raise ValueError(f"log_amplitude must be a finite number >= 0, got {log_amplitude!r}")
    if not (_is_real(df) and df > 0.0):
        raise ValueError(f"df must be a finite number > 0, got {df!r}")
    out = np.array(signal, dtype=np.float32)
    hit = rng.random(out.shape) < fraction
    tail = np.abs(rng.standard_t(df, int(hit.sum())))
    # log factor capped at 30 (e^30 ~ 1e13) so float32 cannot overflow; storage saturates
    out[hit] *= np.exp(np.minimum(log_amplitude * (1.0 + tail), 30.0)).astype(np.float32)
    return out


def phantom_case(rng_or_seed: SeedLike, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), *,
                 orientation: Orientation = "RAS", tumour_volume_ml: float | None = None,
                 noise: float = 0.03, bias: float = 1.0,
                 options: PhantomOptions = DEFAULT_OPTIONS) -> PhantomCase:
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
    options : PhantomOptions, optional
        Tumour shape, intensity tails and units; the volume distribution when
        `tumour_volume_ml` is omitted. The default gives today's phantom. The options use
        their own random draws after the default ones (the speckle a stream spawned from
        the noise stream), so a case with other options has the same anatomy, and a
        "multifocal" or "elongated" case the same first focus outline, as the default.

    Returns
    -------
    PhantomCase

    Raises
    ------
    ValueError
        If an argument is out of range.
    TypeError
        If `rng_or_seed` is not an int, SeedSequence or Generator, or `options` not a
        `PhantomOptions`.

    Notes
    -----
    Smooth fields are sums of random plane waves, Σ_k a_k cos(k_k·x + φ_k), evaluated on a
    world-space lattice (step <= 2.5 mm) centred on the head and interpolated trilinearly
    onto the voxel centres. The brain is {r (1 + d(x)) < 1} with r the ellipsoidal radius
    and d a deformation field; the image of channel c is
    Rice(blur(I_c[class]) · exp(b_c(x)), σ_c) inside the brain and 0 outside, plus
    `bright_speckle` for a "heavy" tail, rounded and clipped to [1, 32767].

    A multifocal tumour splits the volume in n foci (n drawn in `FOCI_RANGE`, shares
    drawn uniformly in [1, 3] and normalised). Each focus is a body flattened along z,
    semi-axes proportional to (f, f, 1)·f^(-2/3) with f = `FOCUS_FLATTENING` (the same
    volume as the sphere), with its own outline and NCR ⊂ ET ⊂ ED shells, and lies inside
    the brain. The k-th focus is centred near the k/(n-1) point of the z-range where it
    fits, at a lattice node clear of the foci placed before where possible, and n is
    lowered (down to 2) until the reaches of neighbouring foci are `FOCUS_GAP_MM` (plus
    one lattice step for the centres' jitter) apart along z; two foci are kept even when
    they are not (not seen at 48 x 48 x 32 to 96 x 96 x 64). `PhantomCase.tumour_centre_mm`
    is then the voxel-weighted mean of the foci's centres.

    An elongated tumour has semi-axes proportional to (1, 1, k)·k^(-1/3) (the same volume
    as the sphere) for the first k of `ELONGATION_RATIOS` that fits in the brain, and is
    compact when none does.
    """
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    options = _check_options(options)
    _check_case(shape, orientation, noise, bias, tumour_volume_ml)
    anatomy_rng, tumour_rng, contrast_rng, bias_rng, noise_rng, volume_rng = _streams(
        rng_or_seed)
    frame = _Frame.of(shape, spacing)
    anatomy = _anatomy(anatomy_rng, frame)
    if tumour_volume_ml is None:
        tumour_volume_ml = _draw_tumour_volume(volume_rng, shape, options)
    label, centre_rel = _tumour(tumour_rng, frame.lattice, anatomy.d_coarse, frame.axes,
                                frame.u, spacing, anatomy.brain, float(tumour_volume_ml),
                                options.tumour_shape)
    images = _intensities(contrast_rng, bias_rng, noise_rng, frame, anatomy, label,
                          noise=noise, bias=bias, options=options)
    stored = _orient(frame, anatomy, images, label, orientation)
    voxel_ml = float(np.prod(np.asarray(spacing))) / 1000.0
    return PhantomCase(
        images=stored.images,
        label=stored.label,
        tissue=stored.tissue,
        affine=stored.affine,
        spacing=spacing,
        orientation=orientation,
        tumour_volume_ml=float((label > 0).sum()) * voxel_ml,
        tumour_centre_mm=tuple(float(v) for v in anatomy.head_centre + centre_rel),
        brain_volume_ml=anatomy.n_brain * voxel_ml,
        noise_sigma=images.noise_sigma,
        intensity_scale=float(options.intensity_scale),
    )


# --------------------------------------------------------------------------- internals


# -- the sections of phantom_case


def _check_case(shape: tuple[int, int, int], orientation: Orientation, noise: float,
                bias: float, tumour_volume_ml: float | None) -> None:
    """Validate `phantom_case`'s orientation, noise, bias and target volume.

    Raises
    ------
    ValueError
        If one is out of range; the message names it and the accepted range.
    """
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


@dataclass(frozen=True)
class _Frame:
    """The voxel grid of a case and the box around the brain where the work is done.

    Attributes
    ----------
    spacing : tuple of float
        Voxel size (mm).
    axes : ndarray, shape (3,)
        Brain semi-axes (mm).
    grid : tuple of int
        Voxels of the whole field of view, ``round(shape / spacing)``.
    inner : tuple of slice
        The box of `grid` that holds the brain (r (1 + d) < 1 with d >= -0.1).
    u : tuple of ndarray
        Voxel centres of the box along each axis, mm from the head centre (RAS order).
    lattice : _Lattice
        World-space lattice (step <= 2.5 mm) for the smooth fields.
    """

    spacing: tuple[float, float, float]
    axes: NDArray[np.float64]
    grid: tuple[int, ...]
    inner: tuple[slice, slice, slice]
    u: tuple[NDArray[np.float64], ...]
    lattice: _Lattice

    @classmethod
    def of(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Frame:
        """The frame of a field of view `shape` (mm) sampled at `spacing` (mm)."""
        fov = np.asarray(shape, dtype=np.float64)
        axes = np.asarray(_semi_axes(shape))
        grid = tuple(int(np.rint(n / s)) for n, s in zip(fov, spacing, strict=True))
        # voxel centres relative to the head centre (mm), canonical RAS index order
        u_full = tuple(((np.arange(n) - (n - 1) / 2.0) * s)
                       for n, s in zip(grid, spacing, strict=True))
        # the brain (r (1 + d) < 1 with d >= -0.1) lies in this box: work there, embed at the end
        inner = _box(u_full, np.zeros(3), axes / 0.9 + 3.0 * np.asarray(spacing))
        u = tuple(ui[b] for ui, b in zip(u_full, inner, strict=True))
        step = min(2.5, float(axes.min()) / 10.0)
        return cls(spacing, axes, grid, inner, u, _Lattice.around(fov, step))


@dataclass(frozen=True)
class _Anatomy:
    """The healthy head, on the frame's box.

    Attributes
    ----------
    head_centre : ndarray, shape (3,)
        World position (RAS+ mm) of the head centre.
    d_coarse : ndarray
        The brain's deformation field d on the lattice (clipped to [-0.1, 0.1]).
    brain : ndarray of bool
        The brain mask, r (1 + d) < 1.
    tissue : ndarray of uint8
        Healthy tissue codes (`TISSUES`).
    """

    head_centre: NDArray[np.float64]
    d_coarse: NDArray[np.float64]
    brain: NDArray[np.bool_]
    tissue: NDArray[np.uint8]

    @property
    def n_brain(self) -> int:
        """Number of brain voxels."""
        return int(self.brain.sum())


def _anatomy(rng: np.random.Generator, frame: _Frame) -> _Anatomy:
    """Draw the head: deformed brain, CSF rim, folded cortex, sulci, nuclei, ventricles.

    Parameters
    ----------
    rng : numpy.random.Generator
        The anatomy stream (all its draws are made here, first of all).
    frame : _Frame

    Returns
    -------
    _Anatomy
    """
    axes, u, lattice = frame.axes, frame.u, frame.lattice
    head_centre = rng.uniform((-4.0, -24.0, 4.0), (4.0, -12.0, 16.0))
    deform = _Waves.draw(rng, 8, 1.0, 3.0, scale=axes)
    fold = _Waves.draw(rng, 10, 2 * math.pi / 24.0, 2 * math.pi / 14.0)
    sulci = _Waves.draw(rng, 10, 2 * math.pi / 18.0, 2 * math.pi / 10.0)
    ventricle_scale = rng.uniform(0.85, 1.2, 3)
    nuclei_scale = rng.uniform(0.9, 1.1, 3)

    d_coarse = np.clip(0.04 * lattice.evaluate(deform), -0.1, 0.1)
    d = lattice.interpolate(d_coarse, u)
    r = _ellipsoidal_radius(u, axes)
    r *= 1.0 + d
    brain = r < 1.0
    mean_axis = float(axes.mean())
    w_csf = min(max(0.04, 2.0 / mean_axis), 0.12)
    w_gm = min(max(0.10, 4.0 / mean_axis), 0.25)
    fold_f = lattice.interpolate(lattice.evaluate(fold), u)
    tissue = np.zeros(tuple(ui.size for ui in u), dtype=np.uint8)
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
    return _Anatomy(head_centre, d_coarse, brain, tissue)


def _draw_tumour_volume(rng: np.random.Generator, shape: tuple[int, int, int],
                        options: PhantomOptions) -> float:
    """One log-normal whole-tumour volume (mL), as in `tumour_volumes_ml` without extremes.

    Parameters
    ----------
    rng : numpy.random.Generator
        The volume stream (one normal draw).
    shape : tuple of 3 int
    options : PhantomOptions
        Its ``volume_median_fraction`` and ``volume_sigma``.

    Returns
    -------
    float
        Clipped to [`MIN_TUMOUR_ML`, `max_tumour_ml`].
    """
    draw = math.exp(rng.normal(math.log(options.volume_median_fraction), options.volume_sigma))
    return float(np.clip(draw * brain_volume_ml(shape), MIN_TUMOUR_ML, max_tumour_ml(shape)))


@dataclass(frozen=True)
class _Images:
    """The images of each channel (RAS, whole grid) and each channel's noise sigma.

    Attributes
    ----------
    images : mapping of str to ndarray
        Channel name to an int16 image of the frame's grid, 0 outside the brain.
    noise_sigma : mapping of str to float
        Standard deviation of the channel's complex Gaussian noise.
    """

    images: Mapping[str, NDArray[np.int16]]
    noise_sigma: Mapping[str, float]


def _intensities(contrast_rng: np.random.Generator, bias_rng: np.random.Generator,
                 noise_rng: np.random.Generator, frame: _Frame, anatomy: _Anatomy,
                 label: NDArray[np.uint8], *, noise: float, bias: float,
                 options: PhantomOptions) -> _Images:
    """Per-channel contrast, partial-volume blur, bias field, Rician noise and speckle.

    Parameters
    ----------
    contrast_rng, bias_rng, noise_rng : numpy.random.Generator
        The case's contrast, bias and noise streams (the speckle stream is spawned from
        the noise stream for a "heavy" tail).
    frame : _Frame
    anatomy : _Anatomy
    label : ndarray of uint8
        Tumour labels on the frame's box.
    noise, bias : float
        As in `phantom_case`.
    options : PhantomOptions
        Its ``intensity_tail``.

    Returns
    -------
    _Images
        Inside the brain rounded and clipped to [1, 32767].
    """
    lattice = frame.lattice
    gain = 1000.0 * contrast_rng.uniform(0.8, 1.25)
    channel_gain = contrast_rng.uniform(0.9, 1.1, len(CHANNELS))
    contrast = _CONTRAST * contrast_rng.uniform(0.96, 1.04, _CONTRAST.shape)
    common_bias = _Waves.draw(bias_rng, 6, 0.5, 2.0, scale=frame.axes)
    own_bias = [_Waves.draw(bias_rng, 6, 0.5, 2.0, scale=frame.axes) for _ in CHANNELS]
    common_log_bias = lattice.evaluate(common_bias)
    classes = anatomy.tissue.copy()
    tumour = label > 0
    classes[tumour] = label[tumour] + 3
    sigma_vox = tuple(_PV_SIGMA_MM / s for s in frame.spacing)
    brain = anatomy.brain
    n_brain = anatomy.n_brain
    images: dict[str, NDArray[np.int16]] = {}
    noise_sigma: dict[str, float] = {}
    # spawning leaves noise_rng's own draws unchanged
    speckle_rng = noise_rng.spawn(1)[0] if options.intensity_tail == "heavy" else None
    for c, channel in enumerate(CHANNELS):
        reference = gain * channel_gain[c]
        table = (contrast[c] * reference).astype(np.float32)
        table[0] = 0.0
        clean = ndimage.gaussian_filter(table[classes], sigma_vox, truncate=3.0)
        log_bias = 0.8 * common_log_bias + 0.6 * lattice.evaluate(own_bias[c])
        field = np.exp(lattice.interpolate(np.clip(0.1 * bias * log_bias, -0.3, 0.3), frame.u))
        signal = clean[brain] * field[brain]
        del clean, field
        sigma = float(noise * reference)
        if sigma > 0:
            signal = rician(signal, sigma, noise_rng)
        else:  # keep the noise stream aligned whether or not noise is on
            noise_rng.standard_normal((2, n_brain), dtype=np.float32)
        if speckle_rng is not None:
            signal = bright_speckle(signal, speckle_rng)
        out = np.zeros(frame.grid, dtype=IMAGE_DTYPE)
        out[frame.inner][brain] = np.clip(np.rint(signal), 1, np.iinfo(IMAGE_DTYPE).max)
        images[channel] = out
        noise_sigma[channel] = sigma
    return _Images(images, noise_sigma)


@dataclass(frozen=True)
class _Stored:
    """A case's arrays in the stored orientation (read-only) and its affine."""

    affine: NDArray[np.float64]
    images: Mapping[str, NDArray[np.int16]]
    label: NDArray[np.uint8]
    tissue: NDArray[np.uint8]


def _orient(frame: _Frame, anatomy: _Anatomy, images: _Images, label: NDArray[np.uint8],
            orientation: Orientation) -> _Stored:
    """Embed label and tissue in the grid, build the affine and flip for LPS.

    Parameters
    ----------
    frame : _Frame
    anatomy : _Anatomy
        Its head centre places the grid in the world and its tissue is stored.
    images : _Images
        Whole-grid RAS images.
    label : ndarray of uint8
        Tumour labels on the frame's box.
    orientation : {"RAS", "LPS"}
        "LPS" flips the arrays along their first two axes and the affine to match.

    Returns
    -------
    _Stored
        Contiguous, read-only arrays and a read-only affine (voxel index to RAS+ mm).
    """
    grid = frame.grid
    spacing_arr = np.asarray(frame.spacing)
    origin = anatomy.head_centre - spacing_arr * (np.asarray(grid) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing_arr)
    affine[:3, 3] = origin
    arrays: dict[str, NDArray] = dict(images.images)
    for name, part in (("label", label), ("tissue", anatomy.tissue)):
        arrays[name] = np.zeros(grid, dtype=np.uint8)
        arrays[name][frame.inner] = part
    if orientation == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        shift = np.eye(4)
        shift[:2, 3] = np.asarray(grid[:2]) - 1
        affine = affine @ shift @ flip  # index i -> (n - 1 - i) along x and y
        arrays = {k: np.ascontiguousarray(np.flip(v, axis=(0, 1))) for k, v in arrays.items()}
    for value in arrays.values():
        value.flags.writeable = False
    affine.flags.writeable = False
    return _Stored(affine, {ch: arrays[ch] for ch in CHANNELS}, arrays["label"],
                   arrays["tissue"])


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


def _check_options(options: PhantomOptions) -> PhantomOptions:
    if not isinstance(options, PhantomOptions):
        raise TypeError(f"options must be a PhantomOptions, got {type(options).__name__} "
                        f"{options!r}")
    return options


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


@dataclass(frozen=True)
class _Outline:
    """The random shape of one tumour body: outline waves and the ET/NCR shell levels."""

    lobes: _Waves
    bumps: _Waves
    et_waves: _Waves
    ncr_waves: _Waves
    et_level: float
    ncr_level: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Outline:
        lobes = _Waves.draw(rng, 6, 1.5, 3.5)
        bumps = _Waves.draw(rng, 6, 3.0, 6.0)
        et_waves = _Waves.draw(rng, 4, 2.0, 5.0)
        ncr_waves = _Waves.draw(rng, 4, 2.0, 5.0)
        et_level = rng.uniform(0.55, 0.75)
        ncr_level = et_level * rng.uniform(0.45, 0.75)
        return cls(lobes, bumps, et_waves, ncr_waves, et_level, ncr_level)


@dataclass(frozen=True)
class _Focus:
    """One tumour body: intended centre (mm from the head centre), radius (mm) of the sphere
    of its volume, semi-axis factors (product 1), target volume (mL) and outline."""

    centre: NDArray[np.float64]
    radius: float
    stretch: NDArray[np.float64]
    target_ml: float
    outline: _Outline


#: Label precedence where bodies overlap: NCR over ET over ED over background.
_RANK = np.array([0, 3, 1, 2], dtype=np.uint8)  # indexed by label value 0 bg, 1 NCR, 2 ED, 3 ET


def _tumour(rng: np.random.Generator, lattice: _Lattice, d_coarse: NDArray[np.float64],
            axes: NDArray[np.float64], u: tuple[NDArray[np.float64], ...],
            spacing: tuple[float, float, float], brain: NDArray[np.bool_],
            target_ml: float, form: TumourShape = "compact",
            ) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """Label volume (canonical grid) and the intended centre (mm from the head centre)."""
    outline = _Outline.draw(rng)
    pick = rng.random()
    jitter = rng.uniform(-0.5, 0.5, 3)

    # centre: a lattice node deep enough for the tumour's reach (distance on the lattice)
    x, y, z = lattice.nodes
    r_coarse = np.sqrt((x[:, None, None] / axes[0]) ** 2 + (y[None, :, None] / axes[1]) ** 2
                       + (z[None, None, :] / axes[2]) ** 2) * (1.0 + d_coarse)
    inside = r_coarse < 1.0
    depth = ndimage.distance_transform_edt(inside, sampling=lattice.step)
    margin = lattice.step + 1.0  # not the voxel size: the centre must not depend on the grid
    radius = (3.0 * target_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    foci: list[_Focus] | None = None
    if form == "multifocal":
        foci = _multifocal(rng, lattice, inside, margin, target_ml, outline, pick, jitter)
    elif form == "elongated":
        foci = _elongated(lattice, inside, margin, radius, target_ml, outline, pick, jitter)
    if foci is None:  # compact (or an elongated body that fits nowhere)
        centre, radius = _sphere_centre(lattice, depth, margin, radius, pick, jitter)
        foci = [_Focus(centre, radius, np.ones(3), target_ml, outline)]

    label = np.zeros(brain.shape, dtype=np.uint8)
    counts: list[int] = []
    for focus in foci:
        box, part = _focus_label(focus, u, spacing, brain)
        view = label[box]
        np.copyto(view, part, where=_RANK[part] > _RANK[view])
        counts.append(int(np.count_nonzero(part)))
    if len(foci) == 1:
        return label, foci[0].centre
    weights = np.asarray(counts, dtype=np.float64)
    centres = np.array([f.centre for f in foci])
    if weights.sum() == 0:
        return label, centres.mean(axis=0)
    return label, weights @ centres / weights.sum()


def _sphere_centre(lattice: _Lattice, depth: NDArray[np.float64], margin: float, radius: float,
                   pick: float, jitter: NDArray[np.float64]
                   ) -> tuple[NDArray[np.float64], float]:
    """Centre of a compact body (radius shrunk if no lattice node is deep enough)."""
    reach = radius * (1.0 + _PERTURBATION)
    if depth.max() < reach + margin:  # only for heads near MIN_SHAPE: shrink to fit
        reach = float(depth.max()) - margin
        radius = reach / (1.0 + _PERTURBATION)
    candidates = np.argwhere(depth >= reach + margin)
    node = candidates[min(int(pick * len(candidates)), len(candidates) - 1)]
    centre = np.array([n[i] for n, i in zip(lattice.nodes, node, strict=True)]) + jitter * lattice.step
    return centre, radius


def _elongated(lattice: _Lattice, inside: NDArray[np.bool_], margin: float, radius: float,
               target_ml: float, outline: _Outline, pick: float, jitter: NDArray[np.float64]
               ) -> list[_Focus] | None:
    """One body stretched along z by the first ratio of `ELONGATION_RATIOS` that fits."""
    for ratio in ELONGATION_RATIOS:
        stretch = np.array([ratio ** (-1.0 / 3.0), ratio ** (-1.0 / 3.0), ratio ** (2.0 / 3.0)])
        half = radius * (1.0 + _PERTURBATION) * stretch + margin
        # distance in units of the ellipsoid's semi-axes: >= 1 iff the ellipsoid fits
        fits = ndimage.distance_transform_edt(inside, sampling=lattice.step / half) >= 1.0
        candidates = np.argwhere(fits)
        if len(candidates):
            node = candidates[min(int(pick * len(candidates)), len(candidates) - 1)]
            centre = (np.array([n[i] for n, i in zip(lattice.nodes, node, strict=True)])
                      + jitter * lattice.step)
            return [_Focus(centre, radius, stretch, target_ml, outline)]
    return None


def _fit(inside: NDArray[np.bool_], step: float, reach: float, stretch: NDArray[np.float64],
         margin: float) -> tuple[NDArray[np.intp], float]:
    """Lattice nodes where an ellipsoid of semi-axes ``reach * stretch + margin`` lies inside.

    The reach shrinks by 10 % steps until some node fits (only for heads near `MIN_SHAPE`).
    """
    for _ in range(60):
        half = reach * stretch + margin
        # distance in units of the ellipsoid's semi-axes: >= 1 iff the ellipsoid fits
        fits = ndimage.distance_transform_edt(inside, sampling=step / half) >= 1.0
        if fits.any():
            return np.argwhere(fits), reach
        reach *= 0.9
    depth = ndimage.distance_transform_edt(inside)
    return np.argwhere(depth == depth.max()), reach


def _multifocal(rng: np.random.Generator, lattice: _Lattice, inside: NDArray[np.bool_],
                margin: float, target_ml: float, outline: _Outline, pick: float,
                jitter: NDArray[np.float64]) -> list[_Focus]:
    """2-4 flattened foci sharing the volume, spread along z (see `phantom_case`, Notes)."""
    n_max = int(rng.integers(FOCI_RANGE[0], FOCI_RANGE[1] + 1))
    shares = rng.uniform(1.0, 3.0, n_max)
    outlines = [outline, *(_Outline.draw(rng) for _ in range(n_max - 1))]
    picks = np.concatenate([[pick], rng.random(n_max - 1)])
    jitters = np.concatenate([jitter[None, :], rng.uniform(-0.5, 0.5, (n_max - 1, 3))])
    f = FOCUS_FLATTENING
    stretch = np.array([f ** (1.0 / 3.0), f ** (1.0 / 3.0), f ** (-2.0 / 3.0)])
    z_nodes = lattice.nodes[2]
    step = lattice.step
    foci: list[_Focus] = []
    for n in range(n_max, FOCI_RANGE[0] - 1, -1):
        volumes = target_ml * shares[:n] / shares[:n].sum()
        foci = []
        reaches: list[float] = []
        for k in range(n):
            radius = (3.0 * volumes[k] * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
            reach0 = radius * (1.0 + _PERTURBATION) * 1.25  # volume matching may grow it
            candidates, reach = _fit(inside, step, reach0, stretch, margin)
            radius *= reach / reach0
            cz = z_nodes[candidates[:, 2]]
            target_z = cz.min() + (cz.max() - cz.min()) * k / (n - 1)
            level = candidates[cz == cz[np.argmin(np.abs(cz - target_z))]]
            points = np.array([[lattice.nodes[a][i] for a, i in enumerate(node)]
                               for node in level])
            if foci:  # keep clear of the foci placed so far, where this level allows
                clearance = np.min([np.linalg.norm(points - g.centre, axis=1)
                                    - (r + reach) * stretch.max()
                                    for g, r in zip(foci, reaches, strict=True)], axis=0)
                clear = clearance >= FOCUS_GAP_MM + step
                points = points[clear] if clear.any() else points[[int(np.argmax(clearance))]]
            point = points[min(int(picks[k] * len(points)), len(points) - 1)]
            foci.append(_Focus(point + jitters[k] * step, radius, stretch, float(volumes[k]),
                               outlines[k]))
            reaches.append(reach)
        zs = sorted((g.centre[2], r * stretch[2]) for g, r in zip(foci, reaches, strict=True))
        gaps = [z1 - r1 - z0 - r0 - step for (z0, r0), (z1, r1) in itertools.pairwise(zs)]
        if min(gaps) >= FOCUS_GAP_MM:
            break
    return foci


def _body(focus: _Focus, c: NDArray[np.float64], rad: float, u: tuple[NDArray[np.float64], ...],
          spacing: tuple[float, float, float], brain: NDArray[np.bool_], *, inner: bool
          ) -> tuple[tuple[slice, slice, slice], dict[str, NDArray[np.bool_]]]:
    """A body's shells in a box around centre `c` (mm) for equivalent radius `rad` (mm)."""
    semi = rad * focus.stretch
    box = _box(u, c, rad * (1.0 + _PERTURBATION) * focus.stretch + 2.0 * np.asarray(spacing))
    rel = [(ui[b] - ci) / si for ui, b, ci, si in zip(u, box, c, semi, strict=True)]
    vx = rel[0][:, None, None]
    vy = rel[1][None, :, None]
    vz = rel[2][None, None, :]
    rho = np.sqrt(vx**2 + vy**2 + vz**2)
    norm = np.maximum(rho, 1e-9)
    o = focus.outline
    outline = 0.10 * o.lobes(vx / norm, vy / norm, vz / norm)
    outline += 0.05 * o.bumps.grid(*rel)
    np.clip(outline, -_PERTURBATION, _PERTURBATION, out=outline)
    shells = {"whole": (rho < 1.0 + outline) & brain[box]}
    if inner:
        for name, waves, level in (("et", o.et_waves, o.et_level),
                                   ("ncr", o.ncr_waves, o.ncr_level)):
            wobble = np.clip(0.05 * waves.grid(*rel), -0.1, 0.1)
            shells[name] = rho < level * (1.0 + outline + wobble)
    return box, shells


def _focus_label(focus: _Focus, u: tuple[NDArray[np.float64], ...],
                 spacing: tuple[float, float, float], brain: NDArray[np.bool_]
                 ) -> tuple[tuple[slice, slice, slice], NDArray[np.uint8]]:
    """Labels of one body in its box, after matching its centroid and volume to the targets."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    centre, radius, target_ml = focus.centre, focus.radius, focus.target_ml
    c_eff, r_eff = centre.copy(), radius
    for _ in range(4):  # move and scale the body until its centroid and volume match
        box, shells = _body(focus, c_eff, r_eff, u, spacing, brain, inner=False)
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
    box, shells = _body(focus, c_eff, r_eff, u, spacing, brain, inner=True)
    whole = shells["whole"]
    et = shells["et"] & ndimage.binary_erosion(whole)
    ncr = shells["ncr"] & ndimage.binary_erosion(et)
    part = np.where(whole, np.uint8(2), np.uint8(0))
    part[et] = 3
    part[ncr] = 1
    return box, part


def _write_nifti(path: Path, array: NDArray, affine: NDArray[np.float64], *,
                 slope: float | None = None) -> None:
    """Write one volume atomically (`pipeline.fsio.write_bytes_atomic`).

    With `slope`, the stored values are `array` unchanged and the header's scl_slope is
    `slope` (scl_inter 0); nibabel keeps a header scaling that is set when it writes.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    write_bytes_atomic(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def iter_phantom(cases: int = 8, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE, *,
                 options: PhantomOptions = DEFAULT_OPTIONS) -> Iterator[tuple[str, PhantomCase]]:
    """Yield ``(case_id, PhantomCase)`` for the cases `write_phantom` would write."""
    shape = _check_shape(shape)
    for plan in case_plans(cases, seed, shape, options=options):
        yield plan.case_id, plan.build(shape)


__all__ = [
    "BRATS_SHAPE",
    "CHANNELS",
    "COLLECTION",
    "DEFAULT_OPTIONS",
    "DEFAULT_SHAPE",
    "ELONGATION_RATIOS",
    "FOCI_RANGE",
    "FOCUS_GAP_MM",
    "IMAGE_DTYPE",
    "INTENSITY_TAILS",
    "LABEL_SCHEME",
    "ORIENTATIONS",
    "SPACINGS",
    "SPECKLE_DF",
    "SPECKLE_FRACTION",
    "SPECKLE_LOG_AMPLITUDE",
    "TISSUES",
    "TUMOUR_SHAPES",
    "CasePlan",
    "IntensityTail",
    "PhantomCase",
    "PhantomOptions",
    "TumourShape",
    "brain_volume_ml",
    "bright_speckle",
    "case_id",
    "case_plans",
    "iter_phantom",
    "max_tumour_ml",
    "phantom_case",
    "rician",
    "tumour_volumes_ml",
    "write_phantom",
]
