"""The ``xrai`` command line as a whole (issue 12, item 8): help text, readable defaults,
usage errors that exit 2 with click's message and no traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = typer.main.get_command(app)


def _commands(command: Any = ROOT, path: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under ``xrai`` (typer's own click), with its path of names."""
    yield path, command
    if hasattr(command, "commands"):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())
#: Defaults rendered as Python, or as a float with all its digits.
UNREADABLE = re.compile(r"\d\.\d{5,}|\[\s*'|\(\s*'|\b(?:list|tuple|dict)\[|\bNone\b")


def test_every_command_is_walked() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"phantom", "ingest", "stats", "verify", "manifest", "manifest validate", "train",
            "download", "demo", "evidence"} <= names


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "xrai")
def test_every_option_has_help_text(path: tuple[str, ...]) -> None:
    command = COMMANDS[path]
    assert command.help, f"xrai {' '.join(path)} has no help"
    for param in command.params:
        assert getattr(param, "help", None), f"xrai {' '.join(path)}: {param.name} has no help"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "xrai")
def test_help_shows_readable_defaults(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    bad = UNREADABLE.findall(result.output)
    assert not bad, f"xrai {' '.join(path)} --help shows {bad}:\n{result.output}"
    for param in COMMANDS[path].params:
        if isinstance(param.default, float) and param.show_default is not False \
                and not isinstance(param.show_default, str):
            assert len(repr(param.default)) <= 8, (param.name, param.default)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    regular = tmp_path / "a-file"
    regular.write_text("not a store")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")  # only has to exist: the bad option is refused first
    return {"tmp": str(tmp_path), "file": str(regular), "manifest": str(manifest),
            "store": str(tmp_path / "s.zarr"), "missing": str(tmp_path / "missing")}


USAGE_ERRORS = {
    "ingest missing source folder": (["ingest", "{missing}", "--store", "{store}",
                                      "--dataset", "d"], "'source_dir'"),
    "ingest bad layout": (["ingest", "{tmp}", "--store", "{store}", "--dataset", "d",
                           "--layout", "bratz"], "'--layout'"),
    "ingest store is a file": (["ingest", "{tmp}", "--store", "{file}", "--dataset", "d"],
                               "'--store'"),
    "phantom shape too small": (["phantom", "{missing}", "--shape", "10", "10", "10"],
                                "'--shape'"),
    "phantom folder is a file": (["phantom", "{file}"], "'out_dir'"),
    "stats out is a folder": (["stats", "--store", "{store}", "--dataset", "d", "--out",
                               "{tmp}"], "'--out'"),
    "train out is a file": (["train", "--manifest", "{manifest}", "--store", "{store}",
                             "--out", "{file}"], "'--out'"),
    "stats dataset not a name": (["stats", "--store", "{store}", "--dataset", "../x"],
                                 "'--dataset'"),
    "verify store is a file": (["verify", "--store", "{file}", "--dataset", "d"], "'--store'"),
    "manifest missing stats": (["manifest", "--stats", "{missing}"], "'--stats'"),
    "train bad dim": (["train", "--manifest", "{manifest}", "--store", "{store}", "--out",
                       "{tmp}", "--dim", "4d"], "'--dim'"),
    "train bad device": (["train", "--manifest", "{manifest}", "--store", "{store}",
                          "--out", "{tmp}", "--device", "tpu"], "'--device'"),
    "train unknown loss": (["train", "--manifest", "{manifest}", "--store", "{store}",
                            "--out", "{tmp}", "--losses", "manifest,dcie"], "'--losses'"),
    "train one fold": (["train", "--manifest", "{manifest}", "--store", "{store}", "--out",
                        "{tmp}", "--folds", "1"], "'--folds'"),
    "train bad amp": (["train", "--manifest", "{manifest}", "--store", "{store}", "--out",
                       "{tmp}", "--amp", "fp8"], "'--amp'"),
    "train zero lr": (["train", "--manifest", "{manifest}", "--store", "{store}", "--out",
                       "{tmp}", "--lr", "0"], "'--lr'"),
    "train missing manifest": (["train", "--manifest", "{missing}", "--store", "{store}",
                                "--out", "{tmp}"], "'--manifest'"),
    "demo bad device": (["demo", "--out", "{tmp}", "--device", "cuda:x"], "'--device'"),
    "evidence bad scale": (["evidence", "--out", "{tmp}", "--scale", "huge"], "'--scale'"),
    "download dest is a file": (["download", "X", "--dest", "{file}"], "'--dest'"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2_without_a_traceback_issue_12(case: str,
                                                           files: dict[str, str]) -> None:
    args, option = USAGE_ERRORS[case]
    result = CliRunner().invoke(app, [a.format(**files) for a in args])
    output = " ".join(result.output.replace("│", " ").split())  # rich boxes and wraps it
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}" in output
    assert "Traceback" not in output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)


def test_the_command_line_imports_no_heavy_library_until_a_command_needs_it():
    """`xrai --help` must stay fast (issue 14: under 1 s): building the command tree
    imports neither torch/MONAI (training) nor zarr/xarray (the store) nor SimpleITK."""
    import subprocess
    import sys

    code = ("import sys, pipeline.cli; "
            "print(sorted(m for m in ('torch', 'monai', 'zarr', 'xarray', 'SimpleITK', 'dask') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
