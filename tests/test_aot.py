"""The statistics kernels compiled ahead of time (pipeline.aot): the same results as numba's
JIT bit for bit, used only when their stamp matches, and a run that computes a case
without importing numba or scipy.ndimage; the compiled component count against
scipy.ndimage.label (the oracle, exact)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline import aot
from stats import fused
from stats.transforms import arcsin_sqrt, ln
from tests.conftest import ENGINE_CASE_CODE

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not importable")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build in a temporary directory (about 5-10 s), whatever the checkout has."""
    directory = tmp_path_factory.mktemp("aot")
    try:
        aot.build(directory)
    except RuntimeError as exc:  # pragma: no cover - a machine without a C compiler
        pytest.skip(str(exc))
    return directory


def jit():
    from stats import fused_kernels

    return fused_kernels


def module(directory: Path):
    mod, why = aot.find(directory)
    assert mod is not None, why
    return mod


def fused_args(seed: int, mode: int) -> tuple:
    rng = np.random.default_rng(seed)
    n = 50_000 + seed
    values = rng.gamma(2.0, 300.0, n).astype(np.float32)
    codes = rng.integers(0, 5, n).astype(np.uint8)
    codes[: n // 3] = 0  # long runs of ignored voxels: the word skipping
    words = codes[: n - n % 8].view(np.uint64)
    edges = {0: np.arange(65, dtype=np.float64) * 64.0,  # dyadic
             1: np.linspace(0.0, 3000.0, 101),  # uniform
             2: np.sort(rng.uniform(0, 3000, 50))}[mode]  # general
    return (values, codes, words, 5, np.array([0, 1, 3], np.int64),
            np.array([0.0, 3.0, 4096.0]), 0.0, 4000.0, edges, mode, 4096)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_fused_equals_the_jit_bit_for_bit(built: Path, seed: int, mode: int) -> None:
    args = fused_args(seed, mode)
    got = module(built).fused_f32(*args)
    want = jit()._fused(*args)
    assert got[2:] == want[2:] == (0, 0)
    np.testing.assert_array_equal(got[0], want[0])  # moment fields, bit for bit
    np.testing.assert_array_equal(got[1], want[1])  # histogram counts


def test_fused_reports_bad_codes_and_non_finite_values_as_the_jit(built: Path) -> None:
    args = list(fused_args(7, 0))
    codes = args[1].copy()
    codes[-1] = 9
    args[1], args[2] = codes, codes[: codes.size - codes.size % 8].view(np.uint64)
    assert module(built).fused_f32(*args)[2:] == jit()._fused(*args)[2:] == (1, 9)
    args = list(fused_args(8, 0))
    values = args[0].copy()
    idx = int(np.flatnonzero(args[1])[-1])
    values[idx] = np.nan
    args[0] = values
    assert module(built).fused_f32(*args)[2:] == jit()._fused(*args)[2:] == (2, args[1][idx])


def test_codes_slices_and_components_equal_the_jit(built: Path) -> None:
    mod = module(built)
    rng = np.random.default_rng(4)
    label = rng.integers(0, 4, (12, 20, 18)).astype(np.uint8)
    brain = rng.random((12, 20, 18)) < 0.7
    annotated = rng.random(12) < 0.8
    outs = [np.empty_like(label), np.empty_like(label)]
    mod.codes(label, brain, annotated, outs[0])
    jit()._codes(label, brain, annotated, outs[1])
    np.testing.assert_array_equal(*outs)
    results = []
    for slices in (mod.slices, jit()._slices):
        brain_n, tumour_n = np.zeros(12, np.int64), np.zeros(12, np.int64)
        box = np.array([99, -1, 99, -1, 99, -1], np.int64)
        slices(outs[0], brain_n, tumour_n, box)
        results.append(np.concatenate([brain_n, tumour_n, box]))
    np.testing.assert_array_equal(*results)
    assert mod.components(outs[0], 2) == jit()._components(outs[0], 2) > 0


@pytest.mark.parametrize("form", ["aot", "jit"])
def test_components_equal_scipy_label(built: Path, form: str) -> None:
    """Exact counts against scipy.ndimage.label with the full 3x3x3 structure, on random
    masks from sparse to solid (around 3D site percolation's threshold, where components
    merge in long chains), thin and empty shapes among them."""
    count = module(built).components if form == "aot" else jit()._components
    rng = np.random.default_rng(5)
    for shape in [(1, 1, 1), (5, 1, 7), (1, 40, 40), (20, 30, 25), (30, 35, 40)]:
        for p in [0.0, 0.03, 0.1, 0.2, 0.35, 0.7, 1.0]:
            c = np.where(rng.random(shape) < p, rng.integers(2, 5, shape), 0).astype(np.uint8)
            c[(c == 0) & (rng.random(shape) < 0.3)] = 1  # brain, not tumour
            want = ndimage.label(c >= 2, structure=np.ones((3, 3, 3), dtype=bool))[1]
            assert count(c, 2) == want, (shape, p)


def test_components_wrapper_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"3D array, got shape \(4,\)"):
        fused.components(np.zeros(4, np.uint8), 2)
    assert fused.components(np.zeros((2, 2, 2), np.uint8), 2) == 0
    chain = np.zeros((3, 3, 3), np.uint8)
    chain[0, 0, 0] = chain[1, 1, 1] = chain[2, 2, 2] = 3  # corner neighbours: one
    assert fused.components(chain, 2) == 1


def copy_build(built: Path, tmp_path: Path) -> Path:
    for f in built.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp_path / f.name)
    return tmp_path


@pytest.mark.parametrize(("key", "value", "says"), [
    ("sources", "0123456789abcdef", "stale: built for sources"),
    ("cpu", "fedcba9876543210", "stale: built for cpu"),
    ("numpy", "1.0.0", "stale: built for numpy '1.0.0'"),
])
def test_a_stale_stamp_is_not_used(built: Path, tmp_path: Path, key: str, value: str,
                                   says: str) -> None:
    d = copy_build(built, tmp_path)
    doc = json.loads((d / aot.STAMP).read_text())
    doc[key] = value
    (d / aot.STAMP).write_text(json.dumps(doc))
    mod, why = aot.find(d)
    assert mod is None
    assert says in why
    assert "python -m pipeline.aot rebuilds it" in why


def test_missing_damaged_or_turned_off(built: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mod, why = aot.find(tmp_path)
    assert mod is None
    assert why.startswith("not built")
    assert aot.STAMP in why
    d = copy_build(built, tmp_path)
    (d / aot.STAMP).write_text("{not json")
    assert aot.find(d)[1].startswith("unreadable stamp")
    shutil.copy2(built / aot.STAMP, d / aot.STAMP)
    next(d.glob(aot.MODULE + ".*.so")).write_bytes(b"not an ELF file")
    mod, why = aot.find(d)
    assert mod is None
    assert why.startswith("cannot import")
    assert "ImportError" in why
    monkeypatch.setenv(aot.ENV_VAR, "0")
    assert aot.find(built) == (None, f"{aot.ENV_VAR} turns it off")


def test_exports_are_what_load_checks() -> None:
    assert tuple(aot.exports()) == aot._EXPORTED


def test_build_replaces_an_older_build(built: Path, tmp_path: Path) -> None:
    d = copy_build(built, tmp_path)
    (d / aot.STAMP).write_text("{}")
    aot.build(d)
    assert aot.find(d)[0] is not None
    assert not list(d.glob(".aot-*"))  # the build's temporary directory is gone


def test_check_command_says_why(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.aot", "--check", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert out.stdout.startswith("ahead-of-time kernels: not used: not built")


@pytest.mark.skipif(aot.find()[0] is None,
                    reason="the checkout has no current ahead-of-time build (make setup builds it)")
def test_a_case_is_computed_without_numba_or_scipy_ndimage() -> None:
    """What the build is for: with it installed (as the statistics stages do), a process
    computes a case's partials (the engine's path: codes, kernel, label statistics with
    components) without importing numba's compiler or scipy.ndimage."""
    code = ENGINE_CASE_CODE + """
import sys
from pipeline import aot
from stats.dataset import case_partials, prepare
assert aot.install()[0] is not None
prepare()
p = case_partials("c", "h", arrays, config)
assert p.labels.components > 0
print(sorted(m for m in ("numba", "llvmlite", "scipy.ndimage") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k not in (aot.ENV_VAR, fused.ENV_VAR)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_kernels_give_the_same_partials_in_both_forms(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the wrapper: `fused.region_partials` with the form the process uses equals
    the JIT's (the engine's candidates, a float32 volume)."""
    rng = np.random.default_rng(6)
    values = rng.gamma(2.0, 200.0, (10, 30, 30)).astype(np.float32)
    codes = rng.integers(0, 5, values.shape).astype(np.uint8)
    transforms = {"ln": ln(2.0), "arcsin_sqrt": arcsin_sqrt(4000.0)}
    kw = {"edges": np.arange(129, dtype=np.float64) * 32.0, "clamp": (0.0, 4000.0)}
    monkeypatch.setattr(fused, "_aot_module", fused._aot_module)  # restored after
    fused.use_compiled(module(built))
    assert fused.compiled_form()[0] == "aot"
    here = fused.region_partials(values, codes, 5, transforms, **kw)
    fused.use_compiled(None, "this test")
    assert fused.compiled_form() == ("jit", "this test")
    there = fused.region_partials(values, codes, 5, transforms, **kw)
    assert here is not None
    assert there is not None
    for name in here.moments:
        for code in here.codes:
            assert here.moments[name][code] == there.moments[name][code]
    for code in here.codes:
        h, t = here.histograms["identity"][code], there.histograms["identity"][code]
        np.testing.assert_array_equal(h.counts, t.counts)


def test_the_built_kernels_release_the_gil(built: Path) -> None:
    """As numba's ``nogil=True``: while the built kernel runs, another Python thread runs
    too (the engine reads the next case meanwhile). Held, the GIL would stall that
    thread for the whole call; released, its longest stall is scheduling noise."""
    import threading
    import time

    mod = module(built)
    rng = np.random.default_rng(9)
    n = 20_000_000
    values = rng.gamma(2.0, 100.0, n).astype(np.float32)
    codes = np.ones(n, np.uint8)
    args = (values, codes, codes.view(np.uint64), 2, np.array([0, 1, 3], np.int64),
            np.array([0.0, 1.0, 3000.0]), 0.0, 3000.0, np.arange(65, dtype=np.float64) * 64.0,
            0, 4096)
    stall = [0.0]  # the other thread's longest gap between two of its iterations
    running = threading.Event()
    stop = threading.Event()

    def other() -> None:
        last = time.perf_counter()
        running.set()
        while not stop.is_set():
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last)
            last = now

    thread = threading.Thread(target=other)
    thread.start()
    running.wait()
    time.sleep(0.01)
    stall[0] = 0.0
    t0 = time.perf_counter()
    mod.fused_f32(*args)
    took = time.perf_counter() - t0
    stop.set()
    thread.join()
    assert took > 0.05  # long enough for the check to mean something
    assert stall[0] < took / 2, (stall[0], took)
