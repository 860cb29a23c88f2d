"""The compiled kernels built ahead of time (issue 14): ``python -m pipeline.aot``.

The kernels are the statistics engine's (`stats.fused_kernels`) and the ingest's scan of
the resampled channels (`pipeline.standardize_kernels`). Just in time, they cost every
process 0.4-0.6 s before their first call, even when numba's cache holds their machine
code: importing numba, filling its typing registries, importing scipy.linalg for its
BLAS check. That is 5-10 times the work of one 4 x 240x240x155 case, so a run that
adds one case to a dataset spent most of its time there. ``numba.pycc`` compiles the same functions (the same
source, through the same LLVM, for this machine's CPU) into an extension module that
imports in under a millisecond and does not load numba; its results equal the JIT's bit
for bit (tested).

The module is built at install (``make setup`` runs this), into the stats package beside
`stats.fused_kernels`, with a stamp (``_fused_aot.json``) naming what it was built from:
a digest of the kernels' sources, the CPU (its instructions: the code uses them all) and
numpy's version. `find` takes the module only when all three match this process;
`install` hands it to `stats.fused` (which does no file I/O of its own, so the pipeline's
statistics stages install it: `pipeline.stats_runner`). Otherwise (no compiler at
install, a stale build, another machine) the JIT runs, with the same results, and
`stats.fused.compiled_form` says why. ``XRAI_STATS_AOT=0`` turns the module off.

``numba.pycc`` is pending deprecation since numba 0.57 (its successor is not released);
when it goes, the build fails and the JIT remains.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import stats
from pipeline.fsio import write_bytes_atomic, write_text_atomic
from stats import fused

__all__ = ["ENV_VAR", "MODULE", "STAMP", "build", "cpu_id", "exports", "find", "install",
           "main", "source_digest"]

#: ``0``/``off``/``false``/``no`` turns the ahead-of-time module off (the JIT runs).
ENV_VAR = "XRAI_STATS_AOT"
#: The extension module's name (its file: this plus the interpreter's extension suffix).
MODULE = "_fused_aot"
#: The stamp written beside it.
STAMP = MODULE + ".json"
#: Where the module goes: the stats package, beside the kernels' sources.
_HERE = Path(stats.__file__).resolve().parent
#: The sources the module is compiled from (the kernels, and `stats.fused`, whose
#: constants they import).
_SOURCES = (_HERE / "fused_kernels.py", _HERE / "fused.py",
            Path(__file__).resolve().parent / "standardize_kernels.py")


def exports() -> dict[str, tuple[Callable[..., Any], str]]:
    """Exported name -> (numba function, signature): the statistics kernels at the dtypes
    the engine gives them (float32 images, uint8 codes; `stats.fused._fast` picks them by
    dtype), and the ingest's scan of resampled channels (`pipeline.standardize`)."""
    from pipeline import standardize_kernels as s
    from stats import fused_kernels as k

    return {
        "fused_f32": (k._fused, "Tuple((float64[:,:,::1], int64[:,::1], int64, int64))"
                      "(float32[::1], uint8[::1], uint64[::1], int64, int64[::1], float64[::1],"
                      " float64, float64, float64[::1], int64, int64)"),
        "codes": (k._codes, "void(uint8[:,:,::1], boolean[:,:,::1], boolean[::1],"
                  " uint8[:,:,::1])"),
        "slices": (k._slices, "void(uint8[:,:,::1], int64[::1], int64[::1], int64[::1])"),
        "components": (k._components, "int64(uint8[:,:,::1], int64)"),
        "scan_channels": (s._scan_channels, "void(float32[:,::1], int32[:,::1], boolean[::1],"
                                                  " float64[:,::1])"),
    }


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of the kernels' sources, as this checkout has them."""
    h = hashlib.sha256()
    for path in _SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cpu_id() -> str:
    """This CPU's model and instruction-set flags, digested: the module is compiled for
    this CPU's instructions (numba's "host" target), so another CPU must not run it."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen: set[str] = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    text += line.strip() + "\n"
                if not line.strip() and seen:  # the first processor is enough
                    break
    except OSError:
        pass
    text += f"{platform.machine()} {platform.processor()} {platform.system()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _expected() -> dict[str, str]:
    return {"sources": source_digest(), "cpu": cpu_id(), "numpy": np.__version__,
            "python": sysconfig.get_config_var("EXT_SUFFIX") or ""}


def _module_path(directory: Path) -> Path:
    return directory / (MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


@contextlib.contextmanager
def _releasing_the_gil() -> Iterator[None]:
    """Make pycc's Python wrappers release the GIL around each call, as ``nogil=True``
    makes the JIT's: the statistics engine reads the next case on a thread while the
    kernel runs (`pipeline.stats_runner.run_jobs`). pycc has no option for it; it builds
    its wrappers with compiler flags made by ``numba.pycc.compiler.Flags()``, whose
    ``release_gil`` option is the one ``nogil`` sets, so the build swaps in flags with it
    on. The kernels touch no Python object (nopython mode), so they may run without the
    GIL; a test checks that a second thread runs while the built kernel does."""
    from numba.pycc import compiler

    original = compiler.Flags

    class Flags(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.release_gil = True

    compiler.Flags = Flags
    try:
        yield
    finally:
        compiler.Flags = original


def build(directory: Path | None = None) -> Path:
    """Compile the kernels into ``directory`` (default: beside this module); returns the
    module's path. The module and then its stamp replace the old ones, so a reader sees
    either no stamp or one that names the module beside it.

    Raises
    ------
    RuntimeError
        numba (or its ``pycc``) cannot be imported, or the compiler fails.
    """
    directory = Path(directory or _HERE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
            from numba.pycc import CC
    except ImportError as exc:
        raise RuntimeError(f"cannot build the ahead-of-time kernels: {exc}") from exc
    import numba

    expected = _expected()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".aot-") as tmp:
        cc = CC(MODULE)
        cc.output_dir = tmp
        cc.target_cpu = "host"  # as numba's JIT compiles: the same code, bit for bit
        cc.verbose = False
        for name, (func, signature) in exports().items():
            cc.export(name, signature)(func.py_func)
        try:
            with warnings.catch_warnings(), _releasing_the_gil():
                warnings.simplefilter("ignore")
                cc.compile()
        except Exception as exc:  # distutils / the C compiler: say what failed
            raise RuntimeError(f"cannot build the ahead-of-time kernels: "
                               f"{type(exc).__name__}: {exc}") from exc
        stamp = directory / STAMP
        stamp.unlink(missing_ok=True)  # no stamp names a module being replaced
        target = write_bytes_atomic(_module_path(directory),
                                    _module_path(Path(tmp)).read_bytes())
        doc = {**expected, "numba": numba.__version__, "module": target.name,
               "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_text_atomic(stamp, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return target


def find(directory: Path | None = None) -> tuple[ModuleType | None, str]:
    """The ahead-of-time module in ``directory`` (default: beside this module), or None
    and why not: turned off, not built, built from other sources, for another CPU or
    another numpy, or not importable."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "off", "false", "no"):
        return None, f"{ENV_VAR} turns it off"
    directory = Path(directory or _HERE)
    stamp = directory / STAMP
    try:
        doc = json.loads(stamp.read_text())
    except FileNotFoundError:
        return None, f"not built ({stamp} is missing; python -m pipeline.aot builds it)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable stamp {stamp}: {exc}"
    if not isinstance(doc, dict):
        return None, f"unreadable stamp {stamp}: not a JSON object"
    for key, want in _expected().items():
        if doc.get(key) != want:
            return None, (f"stale: built for {key} {doc.get(key)!r}, this process has "
                          f"{want!r} (python -m pipeline.aot rebuilds it)")
    path = _module_path(directory)
    try:
        loader = importlib.machinery.ExtensionFileLoader(f"stats.{MODULE}", str(path))
        spec = importlib.util.spec_from_file_location(f"stats.{MODULE}", path, loader=loader)
        if spec is None:
            return None, f"cannot import {path}"
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except Exception as exc:  # ImportError, or the extension's own init failing
        return None, f"cannot import {path}: {type(exc).__name__}: {exc}"
    missing = [name for name in _EXPORTED if not hasattr(module, name)]
    if missing:
        return None, f"{path} lacks {', '.join(missing)}"
    return module, str(path)


#: The names `exports` gives (checked by `find` without importing numba).
_EXPORTED = ("fused_f32", "codes", "slices", "components", "scan_channels")


_installed: tuple[ModuleType | None, str] | None = None


def install() -> tuple[ModuleType | None, str]:
    """Hand the ahead-of-time module (if `find` takes it) to `stats.fused`, once per
    process; returns what `find` returned. Cheap after the first call (a worker's tasks
    call it each)."""
    global _installed
    if _installed is None:
        _installed = find()
        fused.use_compiled(*_installed)
    return _installed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.aot",
        description="Compile the statistics kernels ahead of time (beside stats.fused), so "
                    "that no process pays numba's start-up; --check says whether the "
                    "current build is used.")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the "
                        "stats package)")
    parser.add_argument("--check", action="store_true", help="only say whether the build "
                        "in place is used, and why not (exit 1 when not)")
    args = parser.parse_args(argv)
    if args.check:
        module, why = find(args.out)
        print(f"ahead-of-time kernels: {'used, ' + why if module else 'not used: ' + why}")
        return 0 if module else 1
    t0 = time.perf_counter()
    try:
        path = build(args.out)
    except RuntimeError as exc:
        print(f"pipeline.aot: {exc}; the statistics run numba's JIT instead (same results, "
              f"0.4-0.6 s more a process)", file=sys.stderr)
        return 1
    print(f"pipeline.aot: built {path.name} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
