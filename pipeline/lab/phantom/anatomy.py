"""Head anatomy at 1 mm, built once per process from the real brain atlas.

The atlas is a skull-stripped average head CT. Around it we build what a head CT shows
and the atlas lacks: a layer of cerebrospinal fluid, the skull (inner and outer table,
diploe) and the scalp, on maps of distance to the intracranial surface, so that every
phantom can vary their thickness cheaply. Arrays are ``(z, y, x)`` in the atlas's own
index space; :attr:`Anatomy.reference` carries its physical geometry.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.lab.phantom.atlas import fetch

log = logging.getLogger(__name__)

PAD_MM = 26  # room for CSF, skull and scalp around the brain
RIM_CAP_HU = 42.0  # grey matter: the cortex under the skull is no denser than this


@dataclass(frozen=True)
class Anatomy:
    """Per-process, read-only maps the generator draws on (1 mm, ``(z, y, x)``)."""

    brain_hu: np.ndarray  # float32, atlas HU inside the brain, 0 outside
    brain: np.ndarray  # bool, brain parenchyma incl. ventricles
    intracranial: np.ndarray  # bool, brain plus the CSF layer under the skull
    depth: np.ndarray  # float32 mm, inside the intracranial space: distance to the inner table
    outside: np.ndarray  # float32 mm, outside the intracranial space: distance to it
    ventricles: np.ndarray  # bool, lateral/third ventricles
    midline_x: float  # index of the mid-sagittal plane along x
    reference: sitk.Image  # empty image holding the geometry of the arrays

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brain.shape  # type: ignore[return-value]


def _ventricles(atlas: np.ndarray, brain: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Low-density CSF deep inside the brain: the ventricular system."""
    csf = (atlas < 20) & brain & (depth > 8)
    csf = ndi.binary_opening(csf, iterations=1)
    labels, count = ndi.label(csf)
    if count == 0:
        raise RuntimeError("no ventricles found in the atlas")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= max(500, sizes.max() * 0.05))
    return np.isin(labels, keep)


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Build (once per process) the anatomy maps from the cached atlas, fetching it if needed."""
    image = sitk.ReadImage(str(fetch()))
    atlas = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = ndi.binary_fill_holes(atlas > 0)
    (z0, y0, x0), (z1, y1, x1) = np.argwhere(inside).min(0), np.argwhere(inside).max(0) + 1
    crop = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    atlas = np.pad(atlas[crop], PAD_MM)
    brain = np.pad(inside[crop], PAD_MM)
    # Smooth envelope of the brain plus a thin CSF layer: the inner table of the skull
    # follows this surface, not every gyrus.
    envelope = ndi.gaussian_filter(brain.astype(np.float32), 2.0) > 0.4
    intracranial = ndi.binary_fill_holes(envelope | brain)
    depth = ndi.distance_transform_edt(intracranial).astype(np.float32)
    outside = ndi.distance_transform_edt(~intracranial).astype(np.float32)
    from_edge = ndi.distance_transform_edt(brain)
    ventricles = _ventricles(atlas, brain, from_edge)
    # The averaged atlas keeps a hyperdense rim (skull and dura partial volume) a few mm
    # under the brain surface; real cortex is grey matter. Left in, every phantom would
    # carry a thin "subdural hematoma".
    rim = brain & (from_edge < 8)
    atlas[rim] = np.minimum(atlas[rim], RIM_CAP_HU)
    xs = np.argwhere(brain)[:, 2]
    start = image.TransformIndexToPhysicalPoint((int(x0) - PAD_MM, int(y0) - PAD_MM, int(z0) - PAD_MM))
    reference = sitk.Image([int(s) for s in atlas.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(start)
    log.debug("anatomy %s built from %s", atlas.shape, fetch())
    return Anatomy(
        brain_hu=np.where(brain, atlas, 0).astype(np.float32),
        brain=brain,
        intracranial=intracranial,
        depth=depth,
        outside=outside,
        ventricles=ventricles,
        midline_x=float((xs.min() + xs.max()) / 2),
        reference=reference,
    )


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Random smooth field, about unit standard deviation, correlation length ``scale`` voxels."""
    coarse_shape = tuple(max(2, int(np.ceil(s / scale)) + 1) for s in shape)
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse_shape, strict=True)]
    field = ndi.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)]


def build_head(anatomy: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU of one subject's head, no lesions: brain, CSF, skull, scalp, air.

    Skull and scalp thickness, bone density and its profile (distinct tables or a
    smooth one), brain attenuation and the CSF under the inner table vary per subject:
    the inner table moves inwards by up to 2.5 mm, so that on some heads the cortex
    touches the bone and a thick slice mixes the two (the classic false alarm), and
    the skull base is thicker. Returns the HU and, per voxel, the mm outside this
    subject's inner table (negative inside the skull).
    """
    low = smooth_field(rng, anatomy.shape, 40.0)
    shift = np.clip(rng.uniform(-0.5, 2.0) + 0.7 * rng.choice([-1.0, 1.0]) * low, -0.5, 2.5)
    out = np.where(anatomy.intracranial, -anatomy.depth, anatomy.outside) + shift  # mm outside the inner table
    intracranial = out <= 0
    z = np.arange(anatomy.shape[0], dtype=np.float32)[:, None, None]
    zs = np.flatnonzero(anatomy.intracranial.any((1, 2)))
    base = np.clip((zs[0] + 0.3 * (zs[-1] - zs[0]) - z) / (0.3 * (zs[-1] - zs[0])), 0, 1)
    skull = np.maximum(rng.uniform(4.0, 10.0) + 1.5 * low + rng.uniform(0, 14) * base, 3.0)  # mm
    scalp = rng.uniform(3.0, 8.0) + 1.0 * low
    table = rng.uniform(0.8, 2.5)
    hu = np.full(anatomy.shape, -1000.0, dtype=np.float32)
    # Scalp: skin and fat
    in_scalp = (out > skull) & (out <= skull + scalp)
    fat = rng.uniform(-120, -40)
    rel = out[in_scalp] - skull[in_scalp]
    hu[in_scalp] = np.where((rel > 1.5) & (rel < scalp[in_scalp] - 1.5), fat, rng.uniform(20, 55))
    # Skull: dense tables around diploe, either distinct layers or a smooth profile
    in_skull = (out > 0) & (out <= skull)
    d = out[in_skull]
    s = skull[in_skull]
    tables = rng.uniform(1100, 2400)
    diploe = rng.uniform(300, 1000)
    if rng.random() < 0.5:
        hu[in_skull] = np.where((d <= table) | (d >= s - table), tables, diploe)
    else:
        profile = np.maximum(np.exp(-np.clip(d, 0, None) / table), np.exp(-np.clip(s - d, 0, None) / table))
        hu[in_skull] = diploe + (tables - diploe) * profile
    tile = smooth_field(rng, (40, 40, 40), 2.0)  # trabecular texture, tiled: cheap at full size
    zz, yy, xx = np.nonzero(in_skull)
    hu[in_skull] += rng.uniform(0, 150) * tile[zz % 40, yy % 40, xx % 40]
    # CSF between brain and skull, then the brain itself
    csf = rng.uniform(0, 12)
    hu[intracranial] = csf
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-4, 4)
    brain = anatomy.brain & intracranial
    hu[brain] = anatomy.brain_hu[brain] * gain + offset
    hu[anatomy.ventricles] = 0.4 * hu[anatomy.ventricles] + 0.6 * csf
    return hu, out.astype(np.float32)
