"""Write CT series with chosen geometry for the zoo tests, on top of ``pipeline.lab.synth``.

``write_series`` writes a volume with the project's real CT writer, then rewrites each
image's geometry (orientation, positions, pixel spacing) so tests can make oblique,
reversed, gappy or otherwise odd series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from pipeline.lab.synth import write_ct_series


def write_series(
    folder: Path,
    volume_hu: np.ndarray,
    *,
    spacing: Sequence[float] = (5.0, 0.5, 0.5),
    origin: Sequence[float] = (-60.0, -70.0, 10.0),
    row_direction: Sequence[float] = (1.0, 0.0, 0.0),
    column_direction: Sequence[float] = (0.0, 1.0, 0.0),
    stack_direction: Sequence[float] | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    **attributes: object,
) -> list[Path]:
    """Write ``volume_hu`` (slices, rows, columns) as one series; slice ``k`` at ``origin + k*spacing[0]*stack``.

    Returns the paths in slice order. ``positions`` overrides the computed ImagePositionPatient.
    """
    row = np.asarray(row_direction, float)
    col = np.asarray(column_direction, float)
    stack = np.asarray(stack_direction, float) if stack_direction is not None else np.cross(row, col)
    paths = write_ct_series(volume_hu, spacing, folder, seed=seed, **attributes)  # type: ignore[arg-type]
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        position = positions[k] if positions is not None else np.asarray(origin) + k * spacing[0] * stack
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.save_as(path, enforce_file_format=True)
    return paths


def header_only_series(
    folder: Path,
    count: int,
    seed: int,
    *,
    rows: int = 8,
    columns: int = 8,
    thickness: float = 5.0,
    **attributes: object,
) -> list[Path]:
    """A small series (tiny images) for selection tests, which read headers only."""
    return write_ct_series(np.zeros((count, rows, columns)), (thickness, 0.5, 0.5), folder, seed=seed, **attributes)  # type: ignore[arg-type]
