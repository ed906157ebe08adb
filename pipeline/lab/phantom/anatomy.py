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


def build_head(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """HU of one subject's head, no lesions: brain, CSF, skull, scalp, air.

    Skull and scalp thickness, bone density and brain attenuation vary per subject.
    """
    out = anatomy.outside
    low = smooth_field(rng, anatomy.shape, 40.0)
    skull = rng.uniform(5.0, 8.0) + 1.5 * low  # mm, varies over the vault
    scalp = rng.uniform(3.0, 7.0) + 1.0 * low
    table = rng.uniform(1.2, 2.0)
    hu = np.full(anatomy.shape, -1000.0, dtype=np.float32)
    # Scalp: skin and fat
    in_scalp = (out > skull) & (out <= skull + scalp)
    fat = rng.uniform(-100, -40)
    rel = out[in_scalp] - skull[in_scalp]
    hu[in_scalp] = np.where((rel > 1.5) & (rel < scalp[in_scalp] - 1.5), fat, rng.uniform(20, 50))
    # Skull: dense tables around diploe
    in_skull = (out > 0) & (out <= skull)
    d = out[in_skull]
    s = skull[in_skull]
    tables = rng.uniform(1300, 1900)
    diploe = rng.uniform(450, 900)
    hu[in_skull] = np.where((d <= table) | (d >= s - table), tables, diploe)
    # CSF between brain and skull, then the brain itself
    csf = rng.uniform(2, 10)
    hu[anatomy.intracranial] = csf
    gain, offset = rng.uniform(0.95, 1.05), rng.uniform(-3, 3)
    hu[anatomy.brain] = anatomy.brain_hu[anatomy.brain] * gain + offset
    hu[anatomy.ventricles] = 0.4 * hu[anatomy.ventricles] + 0.6 * csf
    return hu
