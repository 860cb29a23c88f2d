"""Manifest and statistics files: reading, writing, and the ``xrai manifest`` commands.

The schema, the builder and the validation of a manifest's text are pure and live in
`stats.manifest`; this module is the file side of them. Reading a manifest
(`load_manifest`) is the one check of both ``xrai manifest validate`` and the trainer
(``pipeline.train.benchmark.load_training_manifest``). Files are written atomically and
readable by colleagues (`pipeline.fsio`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.fsio import write_text_atomic
from stats.errors import ManifestError
from stats.manifest import (
    SCHEMA_PATH,
    Manifest,
    build_manifest,
    manifest_json_schema,
    parse_manifest,
    parse_stats,
)
from stats.summary import DatasetStats

__all__ = [
    "export_schema",
    "load_manifest",
    "load_stats",
    "manifest_command",
    "validate_command",
    "write_manifest",
]


def _read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a file; errors name the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ManifestError
        If it is a directory or cannot be read.
    """
    if path.is_dir():
        raise ManifestError(f"{what} {str(path)!r} is a directory, not a file")
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from err
    except OSError as err:
        raise ManifestError(f"{what} {str(path)!r} cannot be read: "
                            f"{err.strerror or err}") from err


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file (`stats.manifest.parse_manifest`).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ManifestError
        If it is a directory or unreadable, is not UTF-8 (the byte position), nests deeper
        than `stats.manifest.MAX_NESTING`, is not JSON, holds NaN or Infinity, or does not
        validate: the message names the file, the field path (``loss.terms.0.name``) and
        the offending value.
    """
    p = Path(path)
    return parse_manifest(_read_bytes(p, "manifest"), p)


def write_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> Path:
    """Write a manifest atomically (`pipeline.fsio.write_text_atomic`); return the path."""
    return write_text_atomic(path, manifest.model_dump_json(indent=2) + "\n")


def load_stats(path: str | os.PathLike[str]) -> DatasetStats:
    """Read a statistics file (``xrai stats --out``).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ManifestError
        A directory, unreadable, not JSON or not valid statistics (file, field path,
        value).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"statistics file {str(p)!r} does not exist")
    return parse_stats(_read_bytes(p, "statistics file"), p)


def manifest_command(stats_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     seed: int = 0) -> Manifest:
    """``xrai manifest --stats STATS --out OUT``: build from a statistics file and write.

    Raises
    ------
    FileNotFoundError, ManifestError
        Unreadable statistics, or statistics the rules cannot use (the message names
        the statistics file).
    """
    stats = load_stats(stats_path)
    try:
        manifest = build_manifest(stats, seed=seed)
    except ValueError as err:
        raise ManifestError(f"{stats_path}: {err}") from err
    write_manifest(manifest, out_path)
    return manifest


def validate_command(path: str | os.PathLike[str]) -> Manifest:
    """``xrai manifest validate FILE``: the manifest, or `ManifestError` naming the file and
    the field (`load_manifest`, the trainer's own check)."""
    return load_manifest(path)


def export_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Write the JSON Schema of `stats.manifest.Manifest` (sorted keys, 2-space indent,
    final newline), by default to the committed ``stats/manifest.schema.json``."""
    return write_text_atomic(
        path, json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")
