"""stats/ stays pure (issue 12, item 6): no pipeline/flows/torch/prefect imports and no
file I/O; the manifest's file side lives in pipeline.manifest_io."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

STATS = Path(__file__).resolve().parents[2] / "stats"
MODULES = sorted(STATS.glob("*.py"))

#: Top-level packages stats/ must never import (lazily or not).
FORBIDDEN_PACKAGES = {"pipeline", "flows", "torch", "prefect", "tempfile", "shutil", "io",
                      "pathlib", "glob", "fsspec", "zarr"}
#: pathlib.Path.write_text (``SCHEMA_PATH`` is computed from ``__file__``; the name is
#: allowed, the file access is not).
FORBIDDEN_NAMES = {"open"}
#: ``os.<name>`` calls that touch the file system.
FORBIDDEN_OS = {"replace", "rename", "remove", "unlink", "open", "fdopen", "makedirs",
                "mkdir", "rmdir", "fsync", "link", "symlink", "listdir", "scandir", "walk",
                "stat", "chmod"}
#: Method names that read or write files (pathlib.Path, numpy).
FORBIDDEN_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes", "open", "touch",
                     "mkdir", "unlink", "rmdir", "rename", "replace_file", "iterdir", "glob",
                     "rglob", "save", "savez", "savez_compressed", "load", "loadtxt",
                     "savetxt", "tofile", "fromfile", "memmap"}


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN_PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in FORBIDDEN_PACKAGES:
                # pathlib.Path as a type or to name a path is fine; its I/O methods are not
                if node.module == "pathlib" and {a.name for a in node.names} <= {"Path"}:
                    continue
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_NAMES:
                found.append(f"{where}: {func.id}()")
            elif isinstance(func, ast.Attribute):
                owner = func.value
                if isinstance(owner, ast.Name) and owner.id == "os" and func.attr in FORBIDDEN_OS:
                    found.append(f"{where}: os.{func.attr}()")
                elif func.attr in FORBIDDEN_METHODS:
                    found.append(f"{where}: .{func.attr}()")
    return found


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_issue12_stats_module_is_pure(path: Path) -> None:
    assert violations(path) == []


def test_the_check_finds_file_io(tmp_path: Path) -> None:
    """The checker itself: each kind of violation is reported (a hand-written module)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nimport torch\nfrom pipeline.fsio import open_atomic\n"
                   "from pathlib import Path, PurePath\n"
                   "def f(p):\n    import prefect\n    open(p)\n    os.replace(p, p)\n"
                   "    Path(p).write_text('x')\n    np.save(p, 1)\n", encoding="utf-8")
    assert violations(bad) == [
        "bad.py:2: import torch", "bad.py:3: from pipeline.fsio import ...",
        "bad.py:4: from pathlib import ...", "bad.py:6: import prefect", "bad.py:7: open()",
        "bad.py:8: os.replace()", "bad.py:9: .write_text()", "bad.py:10: .save()"]


def test_importing_stats_pulls_in_no_upper_layer() -> None:
    """Every stats module imported in a fresh interpreter: no pipeline, flows, torch or
    prefect module is loaded as a side effect."""
    names = ", ".join(f"stats.{p.stem}" for p in MODULES if p.stem != "__init__")
    code = (f"import sys, importlib\nfor m in {names!r}.split(', '): "
            f"importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pipeline', 'flows', 'torch', 'prefect'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=STATS.parent)
    assert out.stdout.strip() == "[]"
