"""Acute intracranial hemorrhages and their mimics, painted into a 1 mm head.

Each ``add_*`` function blends blood into ``hu`` with a soft edge (partial volume) and
raises ``label`` (float, 0..1) where it did; the generator thresholds the resampled label
at 0.5. Acute blood is 58-85 HU (with texture); calcifications (the classic mimic) are brighter and
are painted into studies with and without bleeds, as are hypodense old infarcts.
"""

from __future__ import annotations

import enum

import numpy as np
from scipy import ndimage as ndi

from pipeline.lab.phantom.anatomy import Anatomy, smooth_field


class BleedKind(str, enum.Enum):
    INTRAPARENCHYMAL = "intraparenchymal"
    SUBDURAL = "subdural"
    EPIDURAL = "epidural"
    INTRAVENTRICULAR = "intraventricular"


def _blend(
    hu: np.ndarray, label: np.ndarray, box: tuple[slice, ...], weight: np.ndarray, value: np.ndarray | float
) -> None:
    hu[box] = hu[box] * (1 - weight) + value * weight
    np.maximum(label[box], weight, out=label[box])


def _box(center: np.ndarray, half: float, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(center - half).astype(int), 0)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), axis=0).astype(
        np.float32
    )
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), grid


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    points = np.argwhere(candidates)
    if len(points) == 0:
        raise RuntimeError("no place for the lesion in this anatomy")
    return points[rng.integers(len(points))].astype(np.float32)


def _blood(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(58, 85) + 3.0 * smooth_field(rng, shape, 4.0)


def add_intraparenchymal(
    anatomy: Anatomy, hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
) -> None:
    """Lobulated hematoma in the parenchyma, often with a hypodense edema rim."""
    radii = rng.uniform(4.0, 19.0) * rng.uniform(0.7, 1.3, size=3)
    centre = _pick(rng, anatomy.brain & ~anatomy.ventricles & (anatomy.depth > radii.max() + 4))
    box, grid = _box(centre, 1.6 * radii.max() + 2, anatomy.shape)
    q = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    q = q * (1 + 0.2 * smooth_field(rng, q.shape, 5.0))
    inside = anatomy.brain[box] & ~anatomy.ventricles[box]
    if rng.random() < 0.6:
        rim = np.clip((1.45 - q) / 0.2, 0, 1) * np.clip((q - 0.9) / 0.1, 0, 1) * inside
        hu[box] -= rim * rng.uniform(4, 10)
    weight = np.clip((1.0 - q) / 0.15 + 0.5, 0, 1) * inside
    _blend(hu, label, box, weight, _blood(rng, q.shape))


def _extra_axial(
    anatomy: Anatomy,
    hu: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    extent: float,
    thickness: float,
    lens: bool,
    out: np.ndarray | None = None,
) -> None:
    # Over the convexity, above the skull base and below the vertex (where most are seen
    # and where a thick slice through the tangential skull does not mimic one).
    # ``out``: this subject's mm outside the inner table; blood stays inside it.
    depth = anatomy.depth if out is None else np.maximum(-out, 0)
    intracranial = anatomy.intracranial if out is None else out <= 0
    zs = np.argwhere(anatomy.intracranial)[:, 0]
    z = np.arange(anatomy.shape[0])[:, None, None]
    convexity = (z > np.percentile(zs, 35)) & (z < np.percentile(zs, 85))
    centre = _pick(rng, (depth >= 1) & (depth < 2) & intracranial & convexity)
    box, grid = _box(centre, extent + 1, anatomy.shape)
    rho = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / extent
    rho = rho * (1 + 0.1 * smooth_field(rng, rho.shape, 8.0))
    profile = np.sqrt(np.clip(1 - rho**2, 0, 1)) if lens else np.clip(1 - rho**2, 0, 1)
    local = thickness * profile  # mm of blood under the inner table at each point
    same_side = (grid[2] - anatomy.midline_x) * (centre[2] - anatomy.midline_x) > 0
    inside = intracranial[box] & ~anatomy.ventricles[box] & same_side & (local > 0.3)
    weight = np.clip(local - depth[box] + 0.5, 0, 1) * inside
    _blend(hu, label, box, weight, _blood(rng, rho.shape))


def add_subdural(
    anatomy: Anatomy, hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
) -> None:
    """Crescent along the convexity, wide and thin, stopping at the falx."""
    _extra_axial(anatomy, hu, label, rng, extent=rng.uniform(35, 75), thickness=rng.uniform(4, 14), lens=False, out=out)


def add_epidural(
    anatomy: Anatomy, hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
) -> None:
    """Biconvex lens under the skull, short and thick."""
    _extra_axial(anatomy, hu, label, rng, extent=rng.uniform(18, 35), thickness=rng.uniform(8, 22), lens=True, out=out)


def add_intraventricular(
    anatomy: Anatomy, hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
) -> None:
    """Blood layering in the dependent (posterior) parts of the ventricles, one or both sides."""
    ventricles = anatomy.ventricles.copy()
    if rng.random() < 0.5:
        side = rng.choice([-1, 1])
        ventricles &= (np.arange(anatomy.shape[2])[None, None, :] - anatomy.midline_x) * side > 0
    ys = np.argwhere(ventricles)[:, 1]
    # Atlas y index grows towards anterior: dependent blood in a supine patient is at low y.
    level = np.quantile(ys, rng.uniform(0.3, 1.0))
    fill = ventricles & (np.arange(anatomy.shape[1])[None, :, None] <= level)
    zz, yy, xx = np.nonzero(fill)
    box = (slice(zz.min(), zz.max() + 1), slice(yy.min(), yy.max() + 1), slice(xx.min(), xx.max() + 1))
    weight = np.clip(ndi.gaussian_filter(fill[box].astype(np.float32), 0.6) * 1.5, 0, 1) * anatomy.ventricles[box]
    _blend(hu, label, box, weight, _blood(rng, weight.shape))


ADDERS = {
    BleedKind.INTRAPARENCHYMAL: add_intraparenchymal,
    BleedKind.SUBDURAL: add_subdural,
    BleedKind.EPIDURAL: add_epidural,
    BleedKind.INTRAVENTRICULAR: add_intraventricular,
}


def _ball_weight(anatomy: Anatomy, centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    box, grid = _box(centre, radius + 2, anatomy.shape)
    q = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / radius
    return box, np.clip((1 - q) / 0.3 + 0.5, 0, 1)


def add_mimics(anatomy: Anatomy, hu: np.ndarray, rng: np.random.Generator) -> None:
    """Things that are not acute blood: calcifications and old hypodense infarcts.

    Calcifications from faint (70 HU, basal ganglia) to dense (500 HU, pineal, choroid
    plexus in the ventricles' atria), deep in the brain or on the ventricle walls.
    """
    deep = anatomy.brain & (anatomy.depth > 15)
    walls = anatomy.ventricles & ~ndi.binary_erosion(anatomy.ventricles, iterations=2)
    for _ in range(rng.integers(0, 7)):
        faint = rng.random() < 0.4
        radius = rng.uniform(0.8, 1.8) if faint else rng.uniform(1.0, 3.0)
        centre = _pick(rng, walls if rng.random() < 0.4 else deep)
        box, weight = _ball_weight(anatomy, centre, radius)
        value = rng.uniform(70, 120) if faint else rng.uniform(120, 500)
        hu[box] = hu[box] * (1 - weight) + value * weight
    if rng.random() < 0.3:
        radius = rng.uniform(5, 14)
        centre = _pick(rng, anatomy.brain & ~anatomy.ventricles & (anatomy.depth > radius + 3))
        box, grid = _box(centre, 1.5 * radius, anatomy.shape)
        q = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) / radius
        q = q * (1 + 0.2 * smooth_field(rng, q.shape, 4.0))
        weight = np.clip((1 - q) / 0.2 + 0.5, 0, 1) * anatomy.brain[box]
        hu[box] = hu[box] * (1 - weight) + rng.uniform(8, 18) * weight


def add_dura(anatomy: Anatomy, hu: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> None:
    """A dense falx (40-85 HU, sometimes with calcified plaques): hyperdense but not blood."""
    if rng.random() < 0.25:
        return
    x = np.arange(anatomy.shape[2])[None, None, :]
    z = np.arange(anatomy.shape[0])[:, None, None]
    zv = float(np.argwhere(anatomy.ventricles)[:, 0].mean())
    falx = (np.abs(x - anatomy.midline_x) <= rng.uniform(0.6, 1.3)) & (out <= 0) & (z > zv + rng.uniform(-8, 12))
    hu[falx] = np.maximum(hu[falx], rng.uniform(40, 85))
    points = np.argwhere(falx)
    for _ in range(rng.integers(0, 3) if len(points) else 0):
        box, weight = _ball_weight(anatomy, points[rng.integers(len(points))].astype(np.float32), rng.uniform(1, 2.5))
        hu[box] = hu[box] * (1 - weight) + rng.uniform(150, 600) * weight


def add_skull_base(
    anatomy: Anatomy, hu: np.ndarray, label: np.ndarray, out: np.ndarray, rng: np.random.Generator
) -> None:
    """Dense petrous bone reaching into the posterior fossa, with mastoid air; no blood there.

    Painted after the bleeds: where it lies, the label is cleared.
    """
    if rng.random() < 0.2:
        return
    zs = np.flatnonzero((out <= 0).any((1, 2)))
    zc = zs[0] + rng.uniform(0.1, 0.25) * (zs[-1] - zs[0])
    slab = slice(max(0, int(zc) - 10), int(zc) + 11)  # the ridges are at most 9 mm high
    shape = hu[slab].shape
    z = np.arange(slab.start, slab.start + shape[0], dtype=np.float32)[:, None, None]
    y = np.arange(shape[1], dtype=np.float32)[None, :, None]
    x = np.arange(shape[2], dtype=np.float32)[None, None, :]
    yc = (shape[1] - 1) / 2 + rng.uniform(-15, 5)
    pores = smooth_field(rng, shape, 3.0)
    for side in (-1, 1):
        xc = anatomy.midline_x + side * rng.uniform(20, 36)
        angle = np.deg2rad(rng.uniform(30, 60))
        a = ((x - xc) * np.cos(angle) * side + (y - yc) * np.sin(angle)) / rng.uniform(18, 34)
        b = ((y - yc) * np.cos(angle) - (x - xc) * np.sin(angle) * side) / rng.uniform(4, 9)
        ridge = np.sqrt(a**2 + b**2 + ((z - zc) / rng.uniform(4, 9)) ** 2) <= 1
        air = ridge & (pores > rng.uniform(0.6, 1.5))
        hu[slab][ridge] = rng.uniform(1200, 2600)
        hu[slab][air] = -700.0
        label[slab][ridge] = 0


def add_beam_hardening(hu: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> None:
    """Under-corrected beam hardening: the brain next to the inner table a few HU denser."""
    inside = out <= 0
    lift = rng.uniform(0, 12) * np.exp(out[inside] / rng.uniform(1.0, 3.5))
    hu[inside] += lift
