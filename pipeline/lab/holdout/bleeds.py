"""Hemorrhages of a known volume for the independent test source.

Each function returns the fraction of blood per 1 mm voxel (0..1); the study blends
blood into the head with it, and the truth is where the fraction, after the scanner's
slice profile, is at least one half. Shapes and sizes are drawn differently from the
training phantom: an intraparenchymal hematoma is a union of ellipsoids cut at the
level that gives the drawn volume (5-20 ml mostly, some 2-5 ml); subdurals are large
crescents whose thickness follows the inner table; epidurals are lenses; ventricular
blood layers in the occipital horns.
"""

from __future__ import annotations

import enum

import numpy as np
from scipy import ndimage as ndi

from pipeline.lab.holdout.head import HeadMaps, Subject, _noise


class HoldoutKind(str, enum.Enum):
    INTRAPARENCHYMAL = "intraparenchymal"
    SUBDURAL = "subdural"
    EPIDURAL = "epidural"
    INTRAVENTRICULAR = "intraventricular"


def _point(rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
    points = np.argwhere(where)
    if not len(points):
        raise RuntimeError("no room for this bleed in this head")
    return points[rng.integers(len(points))].astype(np.float64)


_DEPTH: dict[int, np.ndarray] = {}


def _depth(maps: HeadMaps) -> np.ndarray:
    """mm from the edge of the brain outside the ventricles (once per process)."""
    if id(maps) not in _DEPTH:
        _DEPTH[id(maps)] = ndi.distance_transform_edt(maps.brain & ~maps.ventricles).astype(np.float32)
    return _DEPTH[id(maps)]


def intraparenchymal(maps: HeadMaps, subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """Lobulated hematoma whose volume is drawn first (ml) and then met by the cut level."""
    target_ml = rng.uniform(5, 20) if rng.random() < 0.8 else rng.uniform(2, 5)
    centre = _point(rng, (_depth(maps) > 10) & subject.parenchyma)
    reach = 2.2 * (target_ml * 1000 * 3 / (4 * np.pi)) ** (1 / 3) + 6
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int), maps.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), 0)
    field = np.full(grid.shape[1:], np.inf, dtype=np.float32)
    for _ in range(rng.integers(1, 4)):
        c = centre + rng.normal(0, 3.5, size=3)
        radii = rng.uniform(0.6, 1.4, size=3)
        q = np.sqrt((((grid - c[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
        field = np.minimum(field, q)
    field *= 1 + 0.08 * _noise(rng, field.shape, 3.0)
    allowed = subject.parenchyma[box]
    voxels = int(round(target_ml * 1000))
    values = np.sort(field[allowed])
    if len(values) <= voxels:
        raise RuntimeError("hematoma does not fit")
    level = float(values[voxels])
    fraction = np.zeros(maps.shape, dtype=np.float32)
    fraction[box] = np.clip((level - field) / (0.08 * level) + 0.5, 0, 1) * allowed
    if rng.random() < 0.7:  # perihematomal edema: hypodense, not blood
        ring = (field < level * rng.uniform(1.15, 1.4)) & (field >= level) & allowed
        subject.hu[box][ring] -= rng.uniform(5, 12)
    return fraction


def _extra_axial(
    maps: HeadMaps, subject: Subject, rng: np.random.Generator, extent: float, thickness: float, power: float
) -> np.ndarray:
    z = np.arange(maps.shape[0])[:, None, None]
    z0, z1 = maps.z_range
    band = (z > z0 + 0.4 * (z1 - z0)) & (z < z0 + 0.88 * (z1 - z0))
    x = np.arange(maps.shape[2])[None, None, :]
    lateral = np.abs(x - maps.midline_x) > 25
    centre = _point(rng, (subject.under_table > 0) & (subject.under_table < 1.0) & band & lateral)
    lo = np.maximum(np.floor(centre - extent - 2).astype(int), 0)
    hi = np.minimum(np.ceil(centre + extent + 2).astype(int), maps.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), 0)
    rho = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / extent
    rho = rho * (1 + 0.12 * _noise(rng, rho.shape, 6.0))
    local = thickness * np.clip(1 - rho**2, 0, 1) ** power  # mm of blood under the table
    side = np.sign(centre[2] - maps.midline_x)
    same = (grid[2] - maps.midline_x) * side > 1.0  # stops at the falx
    depth = subject.under_table[box]
    fraction = np.zeros(maps.shape, dtype=np.float32)
    fraction[box] = np.clip(local - depth + 0.5, 0, 1) * subject.intracranial[box] * same * (local > 0.5)
    fraction[maps.ventricles] = 0
    return fraction


def subdural(maps: HeadMaps, subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """Large crescent over the convexity (typically 30-120 ml)."""
    return _extra_axial(maps, subject, rng, rng.uniform(50, 85), rng.uniform(7, 18), power=0.6)


def epidural(maps: HeadMaps, subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """Biconvex lens pressed against the inner table."""
    return _extra_axial(maps, subject, rng, rng.uniform(20, 34), rng.uniform(10, 24), power=0.5)


def intraventricular(maps: HeadMaps, subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """Blood layering in the dependent (posterior) ventricles, one or both sides."""
    vent = maps.ventricles.copy()
    x = np.arange(maps.shape[2])[None, None, :]
    if rng.random() < 0.3:
        vent &= (x - maps.midline_x) * rng.choice([-1, 1]) > 0
    ys = np.argwhere(vent)[:, 1]
    level = np.quantile(ys, rng.uniform(0.5, 0.95))
    fill = vent & (np.arange(maps.shape[1])[None, :, None] <= level)
    return (ndi.gaussian_filter(fill.astype(np.float32), 0.5) * maps.ventricles >= 0.5).astype(np.float32)


ADD = {
    HoldoutKind.INTRAPARENCHYMAL: intraparenchymal,
    HoldoutKind.SUBDURAL: subdural,
    HoldoutKind.EPIDURAL: epidural,
    HoldoutKind.INTRAVENTRICULAR: intraventricular,
}


def paint(subject: Subject, fraction: np.ndarray, rng: np.random.Generator) -> None:
    """Blend acute blood (clotted, 55-88 HU with texture) into the head where ``fraction`` > 0."""
    where = fraction > 0
    if not where.any():
        return
    box = ndi.find_objects(where.astype(np.int8))[0]
    texture = rng.uniform(55, 88) + rng.uniform(2, 6) * _noise(rng, subject.hu[box].shape, 2.5)
    w = fraction[box]
    subject.hu[box] = subject.hu[box] * (1 - w) + texture * w
