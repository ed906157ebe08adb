"""Where the cranial cavity is: the voxels the skull encloses, slice by slice.

An intracranial finding can only lie inside the skull. A network trained on one kind of
head can take what lies outside it for blood: the temporalis muscle and a thick scalp
are 40-60 HU, as dense as a fresh bleed, and on an independent source of head CTs
that was where every false alarm of ``head_ct_hemorrhage`` 0.3 lay. So, for a finding
whose spec sets ``within_cranium``, voxels outside the cavity are never part of it.

Per axial slice, the bone (HU >= ``bone_hu``) is closed over gaps up to
:data:`CLOSING_MM` wide (sutures, a thin temporal squama whose partial volume falls
under the bone threshold, a burr hole) and its enclosed holes filled; the cavity is
what was filled, less the bone itself. A slice where the bone encloses nothing worth
the name (the skull base below the foramen magnum's ring, the vertex cut tangentially,
a ring open wider than the closing bridges) is judged by the convex hull of its bone
instead (which cuts the chord across a wide opening: what lies beyond it counts as
outside); a slice without bone is not judged at all (everything counts as inside), so
the rule can only remove what lies plainly outside a skull it can see.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from pipeline.ai.volume import Volume

CLOSING_MM = 3.0  # the widest gap in the skull's ring that is bridged
MIN_CAVITY_MM2 = 400.0  # an enclosed area smaller than this (2 x 2 cm) is not a cranial cavity
MIN_BONE_MM2 = 50.0  # less bone than this in a slice: nothing to judge by


def _closing(bone: np.ndarray, radius_mm: float, sampling: tuple[float, float]) -> np.ndarray:
    """Morphological closing by a disk of ``radius_mm``, through two distance transforms
    (exact and much faster than a large structuring element); nothing leaks in from the
    image's edge."""
    dilated = ndi.distance_transform_edt(~bone, sampling=sampling) <= radius_mm
    return (
        ndi.distance_transform_edt(np.pad(dilated, 1, constant_values=False), sampling=sampling)[1:-1, 1:-1] > radius_mm
    )


def _hull(bone: np.ndarray) -> np.ndarray:
    """The filled convex hull of ``bone``'s pixels (2-D), all True when it has none."""
    points = np.argwhere(bone)
    try:
        hull = ConvexHull(points.astype(float))
    except (QhullError, ValueError):  # collinear or too few points
        return np.ones(bone.shape, dtype=bool)
    rows, columns = np.indices(bone.shape)
    grid = np.stack([rows.ravel(), columns.ravel()], axis=1).astype(float)
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0.5, axis=1)
    return inside.reshape(bone.shape)


def _judge_slice(volume: Volume, z: int, bone_hu: float) -> np.ndarray | None:
    """Slice ``z``'s cavity (bool rows x columns), or None where there is no skull to judge by."""
    row_mm, column_mm = (float(s) for s in volume.spacing[1:])
    pixel_mm2 = row_mm * column_mm
    bone = volume.array[z] >= bone_hu
    if bone.sum() * pixel_mm2 < MIN_BONE_MM2:
        return None
    closed = _closing(bone, CLOSING_MM, (row_mm, column_mm))
    cavity = ndi.binary_fill_holes(closed) & ~closed
    if cavity.sum() * pixel_mm2 >= MIN_CAVITY_MM2:
        return (cavity | closed) & ~bone
    return _hull(bone) & ~bone


class CranialCavity:
    """One volume's cavity, judged slice by slice as asked and remembered: a finding's core
    and its grown rim (:func:`pipeline.ai.measure.grow`) lie mostly on the same slices."""

    def __init__(self, volume: Volume, bone_hu: float = 300.0) -> None:
        self.volume, self.bone_hu = volume, bone_hu
        self._slices: dict[int, np.ndarray | None] = {}

    def slice(self, z: int) -> np.ndarray | None:
        if z not in self._slices:
            self._slices[z] = _judge_slice(self.volume, z, self.bone_hu)
        return self._slices[z]

    def within(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` without its voxels outside the cavity."""
        out = mask.copy()
        for z in np.flatnonzero(mask.any(axis=(1, 2))):
            cavity = self.slice(int(z))
            if cavity is not None:
                out[z] &= cavity
        return out


def cranial_cavity(volume: Volume, bone_hu: float = 300.0, slices: Iterable[int] | None = None) -> np.ndarray:
    """Boolean ``(slices, rows, columns)``: True inside the skull (or where it cannot tell).

    ``slices``: judge only these (the others stay True); default all.
    """
    out = np.ones(volume.shape, dtype=bool)
    for z in range(volume.shape[0]) if slices is None else slices:
        cavity = _judge_slice(volume, z, bone_hu)
        if cavity is not None:
            out[z] = cavity
    return out


def within_cranium(
    mask: np.ndarray, volume: Volume, bone_hu: float = 300.0, cavity: CranialCavity | None = None
) -> np.ndarray:
    """``mask`` without its voxels outside :func:`cranial_cavity` (``cavity``: one already
    judged for this volume and ``bone_hu``, whose slices are reused)."""
    if not mask.any():
        return mask
    return (cavity or CranialCavity(volume, bone_hu)).within(mask)
