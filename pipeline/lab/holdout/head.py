"""Head anatomy for the independent test source, at the atlas's 1 mm.

Built apart from :mod:`pipeline.lab.phantom.anatomy` on purpose: the inner table follows
a morphological closing of the brain (not a blurred envelope), the CSF rim under it is
thin (0.3-2.5 mm) and varies over the vault, the skull has a continuous table/diploe
profile with trabecular texture and regional thickness, the skull base is thick and
dense with petrous ridges that reach into the posterior fossa, and the falx and
typical calcifications (pineal, choroid plexus, basal ganglia, dural plaques) are
painted. Arrays are ``(z, y, x)``; y grows to anterior, z to superior.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.lab.phantom.atlas import fetch

PAD = 34  # mm of room around the brain for skull, scalp and skull base
CLOSING_MM = 4.0


@dataclass(frozen=True)
class HeadMaps:
    """Per-process maps every subject is drawn from."""

    atlas_hu: np.ndarray  # float32, brain HU with the atlas's dense rim removed
    brain: np.ndarray  # bool
    signed: np.ndarray  # float32 mm: distance outside the closed brain surface (< 0 inside)
    ventricles: np.ndarray  # bool
    midline_x: float
    z_range: tuple[int, int]  # first and last slice holding brain
    reference: sitk.Image  # geometry of the arrays

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brain.shape  # type: ignore[return-value]


@dataclass
class Subject:
    """One head before bleeds: HU, where blood can go, and the skull's inner table."""

    hu: np.ndarray
    intracranial: np.ndarray  # bool: brain, CSF rim and sulci, inside the inner table
    under_table: np.ndarray  # float32 mm below the inner table (>= 0 inside)
    parenchyma: np.ndarray  # bool: brain that a hematoma may occupy
    bone: np.ndarray  # bool


def _noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Band-limited noise, unit std, made by blurring white noise (not by zooming a grid)."""
    step = max(1, int(scale // 2))
    small = rng.standard_normal(tuple(int(np.ceil(s / step)) + 2 for s in shape)).astype(np.float32)
    small = ndi.gaussian_filter(small, scale / step / 2)
    full = np.repeat(np.repeat(np.repeat(small, step, 0), step, 1), step, 2)[tuple(slice(0, s) for s in shape)]
    full = ndi.uniform_filter(full, step) if step > 1 else full
    return (full - full.mean()) / max(float(full.std()), 1e-6)


@functools.lru_cache(maxsize=1)
def head_maps() -> HeadMaps:
    """Read the atlas once per process and derive the maps subjects share."""
    image = sitk.ReadImage(str(fetch()))
    raw = sitk.GetArrayFromImage(image).astype(np.float32)
    brain = ndi.binary_fill_holes(ndi.binary_closing(raw != 0, iterations=2))
    lo, hi = np.argwhere(brain).min(0), np.argwhere(brain).max(0) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    raw, brain = np.pad(raw[crop], PAD), np.pad(brain[crop], PAD)
    inside = ndi.distance_transform_edt(brain).astype(np.float32)
    dilated = ndi.distance_transform_edt(~brain) <= CLOSING_MM
    closed = ndi.binary_fill_holes(ndi.distance_transform_edt(dilated) > CLOSING_MM) | brain
    signed = (ndi.distance_transform_edt(~closed) - ndi.distance_transform_edt(closed)).astype(np.float32)
    # The averaged atlas carries skull partial volume a few mm under its surface; real
    # cortex there is grey matter: replace anything denser by a local grey-matter value.
    cortex = brain & (inside < 7) & (raw > 40)
    grey = ndi.median_filter(np.where(brain & (raw < 40), raw, 36.0), size=3)
    hu = np.where(cortex, np.minimum(grey, 40.0), raw).astype(np.float32)
    csf = (raw < 16) & brain & (inside > 9)
    labels, count = ndi.label(ndi.binary_opening(csf))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ventricles = np.isin(labels, np.flatnonzero(sizes >= max(400, 0.04 * sizes.max())))
    xs = np.argwhere(brain)[:, 2]
    zs = np.flatnonzero(brain.any((1, 2)))
    origin = image.TransformIndexToPhysicalPoint(tuple(int(v) - PAD for v in lo[::-1]))
    reference = sitk.Image([int(s) for s in brain.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(origin)
    return HeadMaps(
        atlas_hu=np.where(brain, hu, 0.0).astype(np.float32),
        brain=brain,
        signed=signed,
        ventricles=ventricles,
        midline_x=float(np.median(xs)),
        z_range=(int(zs[0]), int(zs[-1])),
        reference=reference,
    )


def _ball(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Box around an ellipsoid and the normalised radius ``q`` inside it."""
    lo = np.maximum(np.floor(centre - radii - 2).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii + 2).astype(int), shape)
    axes = [(np.arange(a, b) - c) / r for a, b, c, r in zip(lo, hi, centre, radii, strict=True)]
    q = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), q


def _paint_blob(hu: np.ndarray, centre: np.ndarray, radius: float, value: float) -> None:
    box, q = _ball(hu.shape, centre, np.full(3, radius))
    w = np.clip((1.0 - q) * radius + 0.5, 0, 1)
    hu[box] = hu[box] * (1 - w) + value * w


def build_subject(maps: HeadMaps, rng: np.random.Generator) -> Subject:
    """One subject's head in HU without bleeds."""
    shape = maps.shape
    z = np.arange(shape[0], dtype=np.float32)[:, None, None]
    y = np.arange(shape[1], dtype=np.float32)[None, :, None]
    x = np.arange(shape[2], dtype=np.float32)[None, None, :]
    z0, z1 = maps.z_range
    height = (z - z0) / (z1 - z0)  # 0 at the lowest brain slice, 1 at the vertex
    lateral = np.abs(x - maps.midline_x) / (shape[2] / 2 - PAD)
    coarse = _noise(rng, shape, 24.0)
    rim = np.clip(rng.uniform(0.3, 1.6) + 0.6 * coarse, 0.3, 2.5)  # mm of CSF under the inner table
    outside = maps.signed - rim  # mm outside the inner table
    intracranial = outside <= 0
    # Skull: thick frontal and occipital bone, thin temporal squama, much thicker base.
    base = np.clip((0.3 - height) / 0.3, 0, 1)
    thickness = rng.uniform(4.0, 8.5) * (1.0 - 0.35 * lateral**2) + 1.2 * coarse + rng.uniform(6, 16) * base
    thickness = np.maximum(thickness, 2.5)
    u = outside / thickness
    skull = (outside > 0) & (u <= 1)
    table_hu, diploe_hu = rng.uniform(1100, 2300), rng.uniform(250, 950)
    table_mm = rng.uniform(0.8, 2.2)
    inner, outer = np.clip(outside, 0, None), np.clip(thickness - outside, 0, None)
    profile = np.maximum(np.exp(-inner / table_mm), np.exp(-outer / table_mm))
    tile = _noise(rng, (48, 48, 48), 2.0)  # trabecular texture, tiled: cheap at full size
    trabecular = np.empty(shape, dtype=np.float32)
    trabecular[:] = np.tile(tile, [int(np.ceil(n / 48)) for n in shape])[: shape[0], : shape[1], : shape[2]]
    trabecular *= rng.uniform(60, 200)
    bone_hu = diploe_hu + trabecular + (table_hu - diploe_hu) * profile
    scalp_mm = np.maximum(rng.uniform(3.5, 9.0) + 1.5 * coarse, 2.0)
    v = outside - thickness
    scalp = (v > 0) & (v <= scalp_mm)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    fat, skin = rng.uniform(-120, -60), rng.uniform(25, 60)
    temporalis = (lateral > 0.55) & (height > 0.15) & (height < 0.6) & (v < rng.uniform(4, 9))
    hu[scalp] = np.where((v < 1.2) | (v > scalp_mm - 1.5), skin, np.where(temporalis, rng.uniform(40, 58), fat))[scalp]
    hu[skull] = bone_hu[skull]
    csf_hu = rng.uniform(0, 12)
    hu[intracranial] = csf_hu + 2.0 * trabecular[intracranial] / 200
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-4, 4)
    hu[maps.brain] = maps.atlas_hu[maps.brain] * gain + offset
    hu[maps.ventricles] = csf_hu + 0.2 * (hu[maps.ventricles] - csf_hu)
    parenchyma = maps.brain & ~maps.ventricles & intracranial
    # Petrous ridges: dense bone running antero-medially into the posterior fossa, with
    # mastoid air; at thick slices they blur into the temporal lobes and cerebellum.
    petrous = np.zeros(shape, dtype=bool)
    zc = z0 + rng.uniform(0.12, 0.22) * (z1 - z0)
    yc = (shape[1] - 1) / 2 + rng.uniform(-12, 0)
    pores = trabecular / max(float(trabecular.std()), 1e-6)
    for side in (-1, 1):
        xc = maps.midline_x + side * rng.uniform(24, 34)
        angle = np.deg2rad(rng.uniform(35, 55))
        along = ((x - xc) * side * -np.cos(angle) + (y - yc) * np.sin(angle)) / rng.uniform(22, 32)
        across = ((x - xc) * np.sin(angle) + (y - yc) * side * np.cos(angle)) / rng.uniform(5, 8)
        q = np.sqrt(along**2 + across**2 + ((z - zc) / rng.uniform(5, 8)) ** 2)
        petrous |= q <= 1
        mastoid = q <= 1
        hu[mastoid] = np.where(pores[mastoid] > 1.0, -700.0, rng.uniform(1400, 2600))
    parenchyma &= ~petrous
    intracranial &= ~petrous
    bone = skull | petrous
    # Falx: a dense dural sheet in the interhemispheric fissure, sometimes calcified.
    zv = float(np.argwhere(maps.ventricles)[:, 0].mean())
    falx = (np.abs(x - maps.midline_x) <= rng.uniform(0.4, 1.0)) & intracranial & (z > zv + rng.uniform(-5, 10))
    hu[falx] = np.maximum(hu[falx], rng.uniform(45, 80))
    calcs: list[tuple[np.ndarray, float, float]] = []
    vz, vy, vx = np.argwhere(maps.ventricles).mean(0)
    calcs.append((np.array([vz + rng.uniform(-4, 2), vy - rng.uniform(12, 18), maps.midline_x]), 2.5, 400))
    for side in (-1, 1):
        atrium = maps.ventricles & ((x - maps.midline_x) * side > 5)
        pts = np.argwhere(atrium)
        back = pts[pts[:, 1] <= np.quantile(pts[:, 1], 0.3)]
        if len(back):
            calcs.append((back.mean(0), rng.uniform(1.5, 3.0), rng.uniform(80, 260)))
    if rng.random() < 0.4:  # basal ganglia: faint, small, blood-like density
        for side in (-1, 1):
            calcs.append(
                (np.array([vz + rng.uniform(-6, 0), vy, maps.midline_x + side * rng.uniform(16, 24)]), 1.6, 110)
            )
    for _ in range(rng.integers(0, 3)):  # dural plaques on the falx
        pts = np.argwhere(falx)
        if len(pts):
            calcs.append((pts[rng.integers(len(pts))].astype(float), rng.uniform(1.0, 2.5), rng.uniform(150, 600)))
    for centre, radius, value in calcs:
        _paint_blob(hu, np.asarray(centre, dtype=float), radius, rng.uniform(0.7, 1.3) * value)
    under = np.where(intracranial, -outside, 0.0).astype(np.float32)
    return Subject(hu=hu, intracranial=intracranial, under_table=under, parenchyma=parenchyma, bone=bone)
