"""The fused per-volume kernel (issue 14, item 1): one compiled pass over a volume.

:func:`region_partials` returns what :func:`stats.kernels.region_partials` returns for
the engine's candidates (identity; ln with an offset and arcsin-sqrt with a scale, of the
values clamped to ``[0, scale]``; log10 is derived from ln by the caller) and a histogram
of the raw values, but reads each voxel once: it classifies the voxel by its region code
and appends the value to that code's block buffer; a full buffer (:data:`BLOCK` values,
in cache) gets its histogram bins counted and its moment fields computed for the raw
values and every candidate, merged into the code's running partials. No per-region
gather, no array of the volume's size per transform, no second read of the codes.

The compiled code is numba's: the loops live in `stats.fused_kernels` as
``@njit(cache=True, nogil=True)`` functions; numba is the well-kept way to compiled
loops from Python, and the kernel is plain loops over float64 scalars. Two forms of the
same functions (:func:`compiled_form`):

- ``"aot"``: the extension module that `pipeline.aot` builds from them at install (``make
  setup``; ``python -m pipeline.aot``). It imports in under a millisecond and never loads
  numba. Used once the pipeline installs it (:func:`use_compiled`), which it does when
  its stamp matches these sources, this CPU and this numpy.
- ``"jit"``: numba's just-in-time build otherwise. The first process compiles (~3 s);
  every later one loads numba's cache, but sets numba's compiler up first: 0.4-0.6 s a
  process, 5-10 times the work of one case (why the ahead-of-time form exists).

:func:`available` says whether either can be used; ``XRAI_STATS_KERNEL=numpy`` forces
the numpy path (`stats.kernels.region_partials`), which stays the reference the tests
compare this kernel with.

Exactness
---------
Every sum is in float64; the 1e-9 contract against scipy holds with margin:

- *one shift per (code, candidate)*: the first block's mean ``k``. Every value enters
  as ``y - k``, which is exact for values within a factor 2 of ``k`` (Sterbenz), so an
  offset (1e6 + noise, or its logarithm, 13.8 ± 5e-7) costs no digits: the block means
  and the merges see the spread only. (Means stored at the offset would carry
  ulp(1e6) ~ 1e-10, 2e-10 of such a spread, into every merge: the numpy path's
  kurtosis errs by 1e-11 to 3e-10 there, this kernel's by ~1e-15; tested against
  long-double sums.)
- *inside a block* two passes over the cached values: their mean ``c``, then
  :math:`S_p = \\sum (z - c)^p`, corrected for the rounding of ``c`` with
  :math:`\\delta = S_1/n` (:math:`M_2 = S_2 - n\\delta^2`, ... as `stats.moments`); the
  centre is the block's own mean, never a guess, so a far outlier costs nothing either.
  The sums run in vector lanes (8-32 interleaved partial sums), an error of at most
  ~4096 eps ~ 1e-12 relative to :math:`\\sum |z - c|^p`.
- *across blocks* Pébay's pairwise merge (as `stats.moments.merge`), in the compiled
  loop; its rounding grows with the number of blocks (~1e-14 per 100 blocks).

ln and arcsin-sqrt are fdlibm's algorithms written so that they vectorise (within 1 and
2 ulp of numpy's own results); histogram bins are found as `stats.histogram` finds them
(``numpy.histogram``'s convention), so the counts are equal exactly. A region that holds
a NaN or ±inf hands the volume back to the numpy path (:func:`region_partials` returns
None), which defines what non-finite values do (the engine's candidates reject them).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from stats.histogram import HistogramPartial, _check_edges
from stats.kernels import IDENTITY, RegionPartials, _check_inputs
from stats.moments import MomentPartial

__all__ = ["BLOCK", "ENV_VAR", "SUPPORTED", "available", "compiled_form", "components",
           "region_codes", "region_partials", "selected", "slice_counts", "supports",
           "use_compiled", "warm_up"]

#: Environment variable that selects the per-volume kernel: ``numba`` (default when numba
#: is importable) or ``numpy``.
ENV_VAR = "XRAI_STATS_KERNEL"
#: Values of one code per accumulation block: 32 KiB of float64, so the passes over a
#: block (histogram, then per candidate: values, mean, centred powers) run in L1/L2 cache.
BLOCK = 4096
#: Transform names the fused kernel evaluates itself (see `stats.transforms`).
SUPPORTED = ("ln", "arcsin_sqrt")
_KIND = {"identity": 0, "ln": 1, "arcsin_sqrt": 3}


def available() -> bool:
    """Whether a compiled kernel can run (the ahead-of-time module, or numba importable)."""
    return _aot_module is not None or _numba_importable()


@functools.cache
def _numba_importable() -> bool:
    return importlib.util.find_spec("numba") is not None


def selected() -> str:
    """The kernel the engine uses now: ``"numba"`` (compiled) or ``"numpy"``.

    ``XRAI_STATS_KERNEL`` (read at each call) may force ``"numpy"``; ``"numba"`` is the
    default when a compiled form is :func:`available`, else ``"numpy"`` (same results
    within the contract, so the fallback changes speed, not statistics).

    Raises
    ------
    ValueError
        If the variable holds another value, or asks for numba where it is missing.
    """
    want = os.environ.get(ENV_VAR, "").strip().lower()
    if want not in ("", "numba", "numpy"):
        raise ValueError(f"{ENV_VAR} must be 'numba' or 'numpy', got {want!r}")
    have = available()
    if want == "numba" and not have:
        raise ValueError(f"{ENV_VAR}='numba' but numba cannot be imported")
    if want == "numpy" or not have:
        return "numpy"
    return "numba"


def compiled_form() -> tuple[str, str]:
    """Which form of the compiled kernel runs, and why: ``("aot", path)``, ``("jit", why
    the ahead-of-time module is not used)``, or ``("none", why)`` when neither can run
    (the numpy path then does the work)."""
    if _aot_module is not None:
        return "aot", str(_aot_module.__file__)
    if not _numba_importable():
        return "none", f"no ahead-of-time module ({_aot_why}) and numba cannot be imported"
    return "jit", _aot_why


_aot_module: Any = None  # the ahead-of-time module, when the pipeline installed one
_aot_why = "none installed (pipeline.aot.install installs the build, python -m pipeline.aot makes it)"


def use_compiled(module: Any, why: str = "") -> None:
    """Run the kernels from ``module`` (the ahead-of-time build: `pipeline.aot`, whose
    ``find`` checks it matches these sources), or from numba's JIT when None; ``why``
    says why not, for :func:`compiled_form`. This module reads no files: the pipeline
    finds the build and hands it over."""
    global _aot_module, _aot_why
    _aot_module, _aot_why = module, (why if module is None else "")


def _jit() -> Any:
    """numba's just-in-time functions (imports numba)."""
    from stats import fused_kernels

    if fused_kernels.numba is None:
        raise RuntimeError("the fused kernel needs numba, which cannot be imported")
    return fused_kernels


def _fast(*arrays_and_types: tuple[np.ndarray, Any]) -> Any:
    """The ahead-of-time module when every array has the dtype its exports take (they
    are compiled for the store's float32 images and uint8 codes), else None (numba's JIT)."""
    mod = _aot_module
    if mod is not None and all(a.dtype == t and a.flags.c_contiguous
                               for a, t in arrays_and_types):
        return mod
    return None


#: Smallest positive normal float64: ln's argument must be at least this (see `supports`).
_TINY = float(np.finfo(np.float64).tiny)


#: How `_bin_block` finds bins (chosen by `_edge_mode` as `stats.histogram._bin_index`
#: does, so the counts are the numpy path's): edges ``i * 2**k`` from 0 (the engine's),
#: equally spaced edges, any increasing edges.
_DYADIC, _UNIFORM, _GENERAL = 0, 1, 2


def _edge_mode(e: NDArray[np.float64]) -> int:
    """`_bin_block`'s method for these edges: the one `stats.histogram._bin_index` uses."""
    bins = e.size - 1
    w = float(e[1])
    if (e[0] == 0.0 and w > 0.0 and math.frexp(w)[0] == 0.5
            and np.array_equal(e, np.arange(e.size, dtype=np.float64) * w)):
        return _DYADIC
    if np.allclose(np.diff(e), (e[-1] - e[0]) / bins, rtol=1e-9, atol=0.0):
        return _UNIFORM
    return _GENERAL


# --------------------------------------------------------------------------- wrapper
def supports(transforms: Mapping[str, Any], clamp: tuple[float, float]) -> bool:
    """Whether the fused kernel computes these transforms of values clamped to ``clamp``.

    It does for `stats.transforms.Transform` objects named ``ln`` (offset at least the
    smallest normal float64, so every argument ``x + offset`` is positive and normal)
    and ``arcsin_sqrt`` (``clamp`` within ``[0, scale]``), with ``0 <= clamp[0] <=
    clamp[1]`` finite: exactly the engine's candidates (`stats.dataset.case_partials`),
    whose arguments then always lie in the transforms' domains.
    """
    lo, hi = (float(v) for v in clamp)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
        return False
    for name, t in transforms.items():
        kind = getattr(t, "name", None)
        params = getattr(t, "params", {})
        if name == IDENTITY or kind not in SUPPORTED:
            return False
        if kind == "ln" and not params["offset"] >= _TINY:
            return False
        if kind == "arcsin_sqrt" and not hi <= params["scale"]:
            return False
    return True


def region_partials(
    values: ArrayLike,
    codes: ArrayLike,
    n_codes: int,
    transforms: Mapping[str, Any],
    *,
    edges: ArrayLike,
    clamp: tuple[float, float],
    block: int = BLOCK,
) -> RegionPartials | None:
    """Moments of the raw values and of each transform, and histograms, per region code.

    Parameters
    ----------
    values : array_like of real numbers
        One volume (any real dtype; read once, each value converted to float64).
    codes : array_like of int or bool, same shape
        0 = ignored, ``1 .. n_codes - 1`` = region codes.
    n_codes : int
    transforms : Mapping[str, stats.transforms.Transform]
        Name → transform, as accepted by :func:`supports`.
    edges : array_like
        Histogram edges of the raw values.
    clamp : (float, float)
        The transforms see ``clip(x, *clamp)`` (the engine's rule, `stats.dataset.clamped`);
        the raw moments and the histogram see ``x``.
    block : int, default :data:`BLOCK`
        Values of one code per accumulation block.

    Returns
    -------
    RegionPartials or None
        What `stats.kernels.region_partials` returns for the clamped forwards of the
        transforms and ``edges={"identity": edges}``, within the 1e-9 contract (the
        histograms equal exactly); None when a region holds a NaN or ±inf value: the
        numpy path then gives the engine's answer for them.

    Raises
    ------
    RuntimeError
        numba is not importable (check :func:`available` first).
    TypeError
        Non-numeric values, non-integer codes.
    ValueError
        Shape mismatch, a code outside ``[0, n_codes - 1]``, invalid edges, transforms
        or clamp that :func:`supports` rejects.
    """
    if not available():
        raise RuntimeError("the fused kernel needs numba, which cannot be imported")
    v, c = _check_inputs(values, codes, n_codes, check_range=False)
    e = _check_edges(edges)
    if not supports(transforms, clamp):
        raise ValueError(
            f"the fused kernel computes ln (offset > 0) and arcsin_sqrt (clamp within "
            f"[0, scale]) of values clamped to a finite range >= 0; got transforms "
            f"{ {k: (getattr(t, 'name', t), dict(getattr(t, 'params', {}))) for k, t in transforms.items()}!r} "
            f"and clamp {clamp!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    names = [IDENTITY, *transforms]
    kinds = [0] + [_KIND[t.name] for t in transforms.values()]
    params = [0.0] + [float(t.params["scale" if t.name == "arcsin_sqrt" else "offset"])
                      for t in transforms.values()]
    if v.dtype.kind == "b":
        v = v.view(np.uint8)
    c = np.ascontiguousarray(c)
    n8 = c.size - c.size % 8 if c.dtype == np.uint8 else 0
    words = c[:n8].view(np.uint64)
    args = (v, c, words, int(n_codes), np.array(kinds, dtype=np.int64),
            np.array(params, dtype=np.float64), float(clamp[0]), float(clamp[1]),
            np.ascontiguousarray(e), _edge_mode(e), int(block))
    aot = _fast((v, np.float32), (c, np.uint8))
    acc, counts, status, bad = aot.fused_f32(*args) if aot is not None else _jit()._fused(*args)
    if status == 1:
        raise ValueError(f"codes must lie in [0, {n_codes - 1}] (n_codes={n_codes}), "
                         f"found {int(bad)!r}")
    if status == 2:
        return None
    region_codes = tuple(range(1, int(n_codes)))
    moments = {
        name: MappingProxyType({code: _partial(acc[code, t]) for code in region_codes})
        for t, name in enumerate(names)
    }
    bins = e.size - 1
    hists = {code: HistogramPartial(e, counts[code, :bins], int(counts[code, bins]),
                                    int(counts[code, bins + 1]), 0)
             for code in region_codes}
    return RegionPartials(
        region_codes,
        MappingProxyType(moments),
        MappingProxyType({IDENTITY: MappingProxyType(hists)}),
    )


def _partial(f: NDArray[np.float64]) -> MomentPartial:
    """MomentPartial of one row of `_fused`'s fields (mean stored relative to f[7])."""
    if f[0] == 0:
        return MomentPartial.empty()
    return MomentPartial(int(f[0]), float(f[7] + f[1]), *(float(x) for x in f[2:7]))


def warm_up() -> None:
    """Load the kernel's machine code now, for the engine's volumes.

    The ahead-of-time module loads in under a millisecond. numba's JIT costs 0.4-0.6 s on
    its first call in a process (setting up its compiler, then loading the cached code);
    a caller can overlap that with I/O, such as reading the first case. Does nothing
    without a compiled kernel.
    """
    if not available() or _aot_module is not None:
        return
    from stats.transforms import arcsin_sqrt, ln

    values = np.ones((2, 2, 2), np.float32)  # the store's image dtype and rank
    codes = np.ones((2, 2, 2), np.uint8)
    region_partials(values, codes, 2, {"ln": ln(1.0), "arcsin_sqrt": arcsin_sqrt(2.0)},
                    edges=np.linspace(0.0, 2.0, 9), clamp=(0.0, 2.0))
    coded = region_codes(codes, values > 0, np.ones(2, np.bool_))
    slice_counts(coded)
    components(coded, 2)


def region_codes(label: np.ndarray, brain: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """`stats.dataset.region_codes` in one compiled pass (same array: 0 outside the brain
    or the annotated slices, else 1 + label, in uint8)."""
    lab = np.ascontiguousarray(label, dtype=np.uint8)
    out = np.empty(lab.shape, dtype=np.uint8)
    args = (lab, np.ascontiguousarray(brain, dtype=np.bool_),
            np.ascontiguousarray(annotated, dtype=np.bool_), out)
    aot = _fast((lab, np.uint8))
    (aot.codes if aot is not None else _jit()._codes)(*args)
    return out


def slice_counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                             tuple[slice, slice, slice] | None]:
    """Per axial slice, the voxels with code >= 1 (annotated brain) and >= 2 (tumour), and
    the bounding box (z, y, x) of the tumour voxels (None without any), in one pass."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    nz = c.shape[0]
    brain = np.zeros(nz, dtype=np.int64)
    tumour = np.zeros(nz, dtype=np.int64)
    big = np.iinfo(np.int64).max
    box = np.array([big, -1, big, -1, big, -1], dtype=np.int64)
    aot = _fast((c, np.uint8))
    (aot.slices if aot is not None else _jit()._slices)(c, brain, tumour, box)
    if box[1] < 0:
        return brain, tumour, None
    return brain, tumour, (slice(int(box[0]), int(box[1]) + 1),
                           slice(int(box[2]), int(box[3]) + 1),
                           slice(int(box[4]), int(box[5]) + 1))


def components(codes: np.ndarray, lo: int) -> int:
    """Number of 26-connected components of the voxels whose code is at least ``lo``.

    What ``scipy.ndimage.label(codes >= lo, structure=np.ones((3, 3, 3)))[1]`` counts
    (tested equal), in one compiled pass with no scipy import (0.05-0.25 s in a fresh
    process, which a run computing one case would otherwise pay).
    """
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    if c.ndim != 3:
        raise ValueError(f"codes must be a 3D array, got shape {c.shape!r}")
    if not 0 <= int(lo) <= 255:
        raise ValueError(f"lo must be a uint8 code in [0, 255], got {lo!r}")
    aot = _fast((c, np.uint8))
    return int((aot.components if aot is not None else _jit()._components)(c, int(lo)))
