"""Ingest cost per case against the unavoidable work alone, measured in one run.

    make bench-ingest        # or: .venv/bin/python -m benchmarks.bench_ingest --cases 3

Baseline ("floor"): decoding each source file with nibabel and one SimpleITK resample
of each volume onto the target grid — what any ingest must do. Ours: `ingest_cases`
(hashing, reading, checks, the same resample, writing the store, committing), with
`recompute=True` so every case is really processed. Both run on the same
240×240×155 four-channel phantom cases, one worker, same process; the ratio is printed.
Aim: <= 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.fsio import write_text_atomic
from pipeline.ingest import ingest_cases
from pipeline.sources.local import discover
from pipeline.sources.phantom import write_phantom
from pipeline.standardize import target_reference
from pipeline.store import Grid

GRID = Grid(spacing=(1.0, 1.0, 1.0), shape=(240, 240, 155))


def floor_case(files: list[Path]) -> float:
    """Decode every volume and resample it once onto a 240x240x155 grid."""
    t0 = time.perf_counter()
    for f in files:
        img = nib.load(str(f))
        arr = np.asarray(img.dataobj)  # decode at the stored dtype
        s = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        s.SetSpacing(zooms)
        ref = target_reference(GRID, tuple(float(v) for v in np.asarray(arr.shape) * zooms / 2))
        is_label = f.name.endswith("-seg.nii.gz")
        sitk.Resample(s, ref, sitk.Transform(),
                      sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear, 0.0,
                      sitk.sitkUInt8 if is_label else sitk.sitkFloat32)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/ingest"))
    args = parser.parse_args()
    src = args.workdir / "source"
    if not (src / ".complete").exists():
        print(f"writing {args.cases} phantom cases of 240x240x155 to {src} (cached) ...")
        write_phantom(src, cases=args.cases, seed=7, shape=(240, 240, 155))
        write_text_atomic(src / ".complete", "ok")
    cases = discover(src, layout="brats")[: args.cases]
    floors, ours = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = str(Path(tmp) / "bench.zarr")
        ingest_cases(cases[:1], store, "bench", grid=GRID)  # warm-up: imports, store creation
        for _ in range(args.repeats):
            for case in cases:
                floors.append(floor_case(case.files()))
                t0 = time.perf_counter()
                report = ingest_cases([case], store, "bench", grid=GRID, recompute=True)
                ours.append(time.perf_counter() - t0)
                assert report.outcomes[0].status == "ingested", report.outcomes[0]
    f, o = statistics.median(floors), statistics.median(ours)
    print(f"cases: {len(cases)} x {args.repeats} repeats, grid 240x240x155, 4 channels + label")
    print(f"floor (decode + one resample per volume): {f:.3f} s/case")
    print(f"xrai ingest:                              {o:.3f} s/case")
    print(f"ratio ingest/floor: {o / f:.2f}x (aim <= 1.5x)")


if __name__ == "__main__":
    main()
