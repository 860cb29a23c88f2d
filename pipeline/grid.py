"""The dataset grid: spacing and shape, checked against the accepted range.

Its own module (numpy only) so that the command line can check ``--spacing`` and
``--shape`` without importing the store's Zarr and xarray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "people"]


def people(values: Sequence[object]) -> str:
    """``(240, 240, 155)`` as ``240 240 155``: a tuple as it is typed on the command line.

    Here rather than in `pipeline.cli_checks` (which imports typer) so that `Grid`'s
    messages read the same way without it.
    """
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class Grid:
    """The dataset's common grid, in the canonical LPS orientation.

    Parameters
    ----------
    spacing : tuple of float
        Voxel size (x, y, z) in mm.
    shape : tuple of int
        Voxels along (x, y, z). Arrays are stored (z, y, x).
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] = (240, 240, 155)

    def __post_init__(self) -> None:
        """Check the grid against the accepted range.

        Spacing: finite, in [0.05, 20] mm per axis. Shape: whole numbers in [1, 2048] per
        axis.

        Raises
        ------
        ValueError
            Naming the field, the axis and the offending value.
        """
        # Accepted range. 0.05 mm is finer than any MRI the pipeline reads (7 T in-vivo
        # research scans reach ~0.2 mm, ex-vivo specimens ~0.1 mm); 20 mm is coarser than
        # any slice thickness in use (clinical 2D stacks stay <= 10 mm) and leaves an adult
        # brain (~170 mm long) under ten voxels across. Outside that range the value is a
        # unit or typing error (m or µm for mm), and inf/nan/0/negatives are never a grid:
        # they used to resample every case to zeros and write `Infinity` into zarr.json.
        # 2048 voxels per axis is 8.5x the BraTS grid's 240; one channel of one case is
        # one Zarr chunk, already 32 GiB of float32 at 2048^3, more than a worker can hold.
        min_spacing_mm, max_spacing_mm, max_voxels = 0.05, 20.0, 2048
        if len(self.spacing) != 3:
            raise ValueError(f"grid spacing must be three mm values (x, y, z), got {self.spacing!r}")
        if len(self.shape) != 3:
            raise ValueError(f"grid shape must be three voxel counts (x, y, z), got {self.shape!r}")
        for axis, s in zip("xyz", self.spacing, strict=True):
            if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
                raise ValueError(f"grid spacing {axis} must be a number of mm, got {s!r} "
                                 f"(spacing {people(self.spacing)})")
            if not (np.isfinite(s) and min_spacing_mm <= s <= max_spacing_mm):
                raise ValueError(
                    f"grid spacing {axis} must be a finite number of mm in [{min_spacing_mm:g}, "
                    f"{max_spacing_mm:g}], got {s!r} (spacing {people(self.spacing)})")
        for axis, n in zip("xyz", self.shape, strict=True):
            whole = (isinstance(n, (int, np.integer)) and not isinstance(n, bool)) or (
                isinstance(n, (float, np.floating)) and np.isfinite(n) and float(n).is_integer())
            if not (whole and 1 <= n <= max_voxels):
                raise ValueError(
                    f"grid shape {axis} must be a whole number of voxels in [1, {max_voxels}], "
                    f"got {n!r} (shape {people(self.shape)})")

    @property
    def zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return (int(self.shape[2]), int(self.shape[1]), int(self.shape[0]))

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm³)."""
        return float(np.prod(self.spacing)) / 1000.0

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {"spacing": [float(s) for s in self.spacing], "shape": [int(s) for s in self.shape]}
