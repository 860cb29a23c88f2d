"""Ingest cost per case against the unavoidable work alone, measured in one run.

    make bench-ingest        # or: .venv/bin/python -m benchmarks.bench_ingest --cases 3
    .venv/bin/python -m benchmarks.bench_ingest --cases 3 --stages   # + where the time goes

Baseline ("floor"): what any ingest must do, and nothing else: decode each source file
with nibabel (at its stored dtype, with its geometry), resample each volume once onto
the case's target grid (SimpleITK, linear for images, nearest neighbour for the label;
the very grid the ingest chooses, computed before timing, so that both resample the
same points; the run checks that the floor's voxels equal the stored ones) and write the
resampled arrays into Zarr arrays chunked like the store's, with the store's codec.
Ours: `ingest_cases` (reading and hashing the sources, the checks, the same resample,
the brain mask and annotated slices, writing with a SHA-256 per array, committing),
with ``recompute=True`` so every case is really processed. Both run on the same 240×240×155
four-channel phantom cases, one worker, in the same process, alternating case by case.
Each repeat also times a run of every case against the floors of every case: per case,
that is what ingesting a dataset costs (the run's own work, the writer lease, planning
and compacting the store, paid once); the one-case runs pay it each time.
Printed: the ratio of the median wall times (the figure the aim refers to), and, because
a shared machine makes wall times noisy, the ratio of the fastest repeats and of the
process CPU times (all threads). Aim (issue 14): ingest <= 1.2x the floor.

``--stages`` then runs the ingest again with timers around its stages (inclusive
seconds per case; the indented rows are parts of the row above them; the first row is
the whole `ingest_cases` call, whose part outside `ingest_case` is the run's own work:
the writer lease, planning, compacting the store) and prints the table, so that the
time beyond the floor can be attributed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import zarr

import pipeline.ingest
from pipeline.fsio import write_text_atomic
from pipeline.ingest import ingest_cases, read_case
from pipeline.io.nifti import affine_to_lps_geometry
from pipeline.sources.base import CHANNELS, CaseSource
from pipeline.sources.local import discover
from pipeline.sources.phantom import write_phantom
from pipeline.standardize import _brain_centre, target_reference
from pipeline.store import _COMPRESSORS, DatasetStore, Grid

GRID = Grid(spacing=(1.0, 1.0, 1.0), shape=(240, 240, 155))


def floor_arrays(root: Path) -> tuple[zarr.Array, zarr.Array]:
    """Zarr arrays shaped, chunked and compressed like the store's image and label arrays."""
    z, y, x = GRID.zyx
    image = zarr.create_array(str(root / "floor.zarr"), name="image", shape=(4, z, y, x),
                              chunks=(1, z, y, x), dtype="float32", fill_value=0.0,
                              compressors=_COMPRESSORS, config={"write_empty_chunks": True})
    label = zarr.create_array(str(root / "floor.zarr"), name="label", shape=(z, y, x),
                              chunks=(z, y, x), dtype="uint8", fill_value=0,
                              compressors=_COMPRESSORS, config={"write_empty_chunks": True})
    return image, label


def case_target(case: CaseSource) -> sitk.Image:
    """The grid the ingest resamples ``case`` onto (untimed set-up of the floor)."""
    images, _ = read_case(case)
    ref = images[CHANNELS[0]]
    centre = _brain_centre(case.case_id, ref, sitk.GetArrayViewFromImage(ref.image))
    return target_reference(GRID, centre, ref.image)


def floor_case(files: list[Path], target: sitk.Image, image: zarr.Array,
               label: zarr.Array) -> None:
    """Decode every volume, resample it once onto ``target`` and write it to Zarr (the
    channels in one selection, which zarr encodes concurrently, as the store does)."""
    channels = np.empty(image.shape, dtype=np.float32)
    channel = 0
    for f in files:
        img = nib.load(str(f))
        arr = np.asarray(img.dataobj)  # decode at the stored dtype
        s = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
        origin, spacing, direction = affine_to_lps_geometry(img.affine, f)
        s.SetOrigin(origin)
        s.SetSpacing(spacing)
        s.SetDirection(direction)
        is_label = f.name.endswith("-seg.nii.gz")
        res = sitk.Resample(s, target, sitk.Transform(),
                            sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear, 0.0,
                            sitk.sitkUInt8 if is_label else sitk.sitkFloat32)
        if is_label:
            label[...] = sitk.GetArrayViewFromImage(res)
        else:
            channels[channel] = sitk.GetArrayViewFromImage(res)
            channel += 1
    image[...] = channels


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


#: (row, module, attribute) timed by ``--stages``; indented rows are parts of the one above.
#: Attributes that do not exist (another version of the code) are skipped.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("ingest_cases (whole run)", "pipeline.ingest", "ingest_cases"),
    ("ingest_case", "pipeline.ingest", "ingest_case"),
    ("  hash sources (no decode)", "pipeline.sources.base:CaseSource", "file_hashes"),
    ("  read + hash sources", "pipeline.sources.base:CaseSource", "read_files"),
    ("  decode (read_case)", "pipeline.ingest", "read_case"),
    ("  standardize_case", "pipeline.ingest", "standardize_case"),
    ("    resample", "pipeline.standardize", "_resample"),
    ("    intensity checks", "pipeline.standardize", "_check_intensities"),
    ("    scan resampled channels", "pipeline.standardize", "scan_channels"),
    ("    brain centre", "pipeline.standardize", "_brain_centre"),
    ("    label remap", "pipeline.standardize", "remap_labels"),
    ("    measure volumes", "pipeline.standardize", "measure_volume"),
    ("    sampling tolerance", "pipeline.standardize", "sampling_tolerance_ml"),
    ("  write_case", "pipeline.store:DatasetStore", "write_case"),
    ("    checksums", "pipeline.store", "checksum"),
    ("  commit", "pipeline.store:DatasetStore", "commit"),
)


@contextlib.contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """Patch every `STAGES` function with a timer; yield row -> inclusive seconds."""
    import importlib

    totals: dict[str, float] = defaultdict(float)
    undo: list[tuple[Any, str, Any]] = []

    def timer(row: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[row] += time.perf_counter() - t0
        return wrapper

    for row, where, attr in STAGES:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls)
        fn = owner.__dict__.get(attr) if cls else getattr(owner, attr, None)
        if fn is None:
            continue
        undo.append((owner, attr, fn))
        setattr(owner, attr, timer(row, fn))
    try:
        yield totals
    finally:
        for owner, attr, fn in reversed(undo):
            setattr(owner, attr, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/ingest"))
    parser.add_argument("--stages", action="store_true",
                        help="also print where the ingest's time goes, stage by stage")
    args = parser.parse_args()
    from pipeline.malloc import INGEST_THRESHOLD, tune_this_process

    # both the floor and the ingest run in this process: with the allocator settings
    # `xrai ingest` uses
    tune_this_process(INGEST_THRESHOLD)
    src = args.workdir / "source"
    if not (src / ".complete").exists():
        print(f"writing {args.cases} phantom cases of 240x240x155 to {src} (cached) ...")
        write_phantom(src, cases=args.cases, seed=7, shape=(240, 240, 155))
        write_text_atomic(src / ".complete", "ok")
    cases = discover(src, layout="brats")[: args.cases]
    floors: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    run_floors: list[tuple[float, float]] = []
    run_ours: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = str(Path(tmp) / "bench.zarr")
        image, label = floor_arrays(Path(tmp))
        ingest_cases(cases[:1], store, "bench", grid=GRID)  # warm-up: imports, store creation
        targets = [case_target(case) for case in cases]
        floor_case(cases[0].files(), targets[0], image, label)
        for _ in range(args.repeats):
            for case, target in zip(cases, targets, strict=True):
                floors.append(timed(lambda c=case, t=target: floor_case(c.files(), t, image,
                                                                        label)))
                ours.append(timed(lambda c=case: ingest_cases([c], store, "bench", grid=GRID,
                                                              recompute=True)))
            # a run of every case, as users ingest a dataset: the run's own work (the
            # writer lease, planning, compacting) is paid once
            run_floors.append(timed(lambda: [floor_case(c.files(), t, image, label)
                                             for c, t in zip(cases, targets, strict=True)]))
            run_ours.append(timed(lambda: ingest_cases(cases, store, "bench", grid=GRID,
                                                       recompute=True)))
        # the floor did the ingest's resample: its voxels are the stored ones (last case)
        stored = DatasetStore.open(store, "bench").read_case(cases[-1].case_id)
        assert np.array_equal(image[...], stored["image"]), "floor and ingest differ"
        assert np.array_equal(label[...], stored["label"]), "floor and ingest differ"
        t0 = time.perf_counter()
        report = ingest_cases(cases, store, "bench", grid=GRID)
        unchanged = (time.perf_counter() - t0) / len(cases)
        assert [o.status for o in report.outcomes] == ["unchanged"] * len(cases), report
        if args.stages:
            with stage_timers() as totals:
                for case in cases:
                    # the module attribute: the timed one
                    pipeline.ingest.ingest_cases([case], store, "bench", grid=GRID,
                                                 recompute=True)
    wall_f, wall_o = [w for w, _ in floors], [w for w, _ in ours]
    f, o = statistics.median(wall_f), statistics.median(wall_o)
    cpu_f = statistics.median(c for _, c in floors)
    cpu_o = statistics.median(c for _, c in ours)
    n = len(cases)
    run_f = [w / n for w, _ in run_floors]
    run_o = [w / n for w, _ in run_ours]
    rf, ro = statistics.median(run_f), statistics.median(run_o)
    run_ratios = [b / a for a, b in zip(run_f, run_o, strict=True)]
    print(f"cases: {n} x {args.repeats} repeats, grid 240x240x155, 4 channels + label")
    print(f"a run of all {n} cases (ingest_cases), per case:")
    print(f"  floor (decode + one resample per volume + zarr write): {rf:.3f} s/case "
          f"(fastest {min(run_f):.3f}, cpu {statistics.median(c for _, c in run_floors) / n:.3f})")
    print(f"  xrai ingest:                                           {ro:.3f} s/case "
          f"(fastest {min(run_o):.3f}, cpu {statistics.median(c for _, c in run_ours) / n:.3f})")
    print(f"  ratio ingest/floor: {ro / rf:.2f}x (aim <= 1.2x); per repeat "
          f"{', '.join(f'{r:.2f}' for r in run_ratios)}x; fastest {min(run_o) / min(run_f):.2f}x")
    print("a run of one case (each case alone, alternating with its floor):")
    print(f"  floor {f:.3f} s/case (fastest {min(wall_f):.3f}, cpu {cpu_f:.3f}); xrai ingest "
          f"{o:.3f} s/case (fastest {min(wall_o):.3f}, cpu {cpu_o:.3f})")
    print(f"  ratio ingest/floor: {o / f:.2f}x; fastest {min(wall_o) / min(wall_f):.2f}x, "
          f"cpu {cpu_o / cpu_f:.2f}x (the run's own work, paid by each one-case run: "
          f"{max(o - ro, 0.0) * 1000:.0f} ms)")
    print(f"re-run with every case unchanged (read + hash only): {unchanged:.3f} s/case")
    if args.stages:
        total = totals["ingest_cases (whole run)"]
        print(f"\nstages of ingest_case (inclusive s/case over {len(cases)} cases, one pass):")
        for row, _, _ in STAGES:
            if row in totals:
                s = totals[row] / len(cases)
                print(f"  {row:<30s} {s:7.3f} s  {100 * totals[row] / total:5.1f} %")


if __name__ == "__main__":
    main()
