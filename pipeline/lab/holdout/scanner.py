"""How the independent source turns a 1 mm head into a scanner's axial series.

Differences from the training phantom are deliberate: the head may sit off-centre and
tilted further (chin down or up), the slice profile is a box of the slice thickness
(sub-sampled, not a Gaussian), the reconstruction kernel is a sharper in-plane blur,
bone brightens the brain next to it (under-corrected beam hardening), dense petrous
bone throws dark and bright streaks and a dark band across the posterior fossa, and
the noise has a mid-frequency texture whose level rises behind dense bone. Pixel
values end as integers, as stored in DICOM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.lab.holdout.head import HeadMaps

COVERAGE_MM = 180.0


@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    pixel_spacing: float
    slice_thickness: float
    slices: int | None  # None: the whole head
    z_offset_mm: float


def _pose(rng: np.random.Generator, centre: tuple[float, ...]) -> sitk.Transform:
    pitch = np.deg2rad(rng.uniform(-22, 15))
    roll, yaw = np.deg2rad(rng.uniform(-8, 8)), np.deg2rad(rng.uniform(-10, 10))
    rotation = sitk.Euler3DTransform(centre, pitch, roll, yaw)
    scale = rng.uniform(0.92, 1.08)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(centre)
    similarity.SetMatrix(rotation.GetMatrix())
    similarity.SetScale(1.0 / scale)
    return similarity


def render(
    maps: HeadMaps, hu: np.ndarray, fraction: np.ndarray, geometry: Geometry, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Sample ``hu`` and the blood ``fraction`` on the scanner grid; returns HU, truth, origin (LPS)."""
    ref = maps.reference
    zz, yy, xx = np.nonzero(maps.brain[::4, ::4, ::4])
    centre = ref.TransformContinuousIndexToPhysicalPoint(
        (4 * float(xx.mean()), 4 * float(yy.mean()), 4 * float(zz.mean()))
    )
    transform = _pose(rng, centre)
    t = geometry.slice_thickness
    whole = math.ceil(COVERAGE_MM / t)
    n = geometry.slices or whole
    sub = max(2, int(round(t / 1.25)))  # sub-samples per slice: box profile of width t
    dz = t / sub
    # Field of view placed on the table, not on the head: the head sits off-centre.
    shift = (rng.uniform(-14, 14), rng.uniform(-10, 22), rng.uniform(-6, 6) + geometry.z_offset_mm)
    fov = (geometry.columns * geometry.pixel_spacing, geometry.rows * geometry.pixel_spacing)
    origin = (
        centre[0] + shift[0] - (fov[0] - geometry.pixel_spacing) / 2,
        centre[1] + shift[1] - (fov[1] - geometry.pixel_spacing) / 2,
        centre[2] + shift[2] - (n - 1) * t / 2 + 12.0,
    )
    source = sitk.Compose(sitk.GetImageFromArray(hu + 1000.0), sitk.GetImageFromArray(fraction))
    source.CopyInformation(ref)
    volume = np.empty((n, geometry.rows, geometry.columns), dtype=np.float32)
    blood = np.empty_like(volume)
    chunk = max(1, 48 // sub)
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        grid = sitk.Image([geometry.columns, geometry.rows, count * sub], sitk.sitkUInt8)
        grid.SetSpacing((geometry.pixel_spacing, geometry.pixel_spacing, dz))
        grid.SetOrigin((origin[0], origin[1], origin[2] + first * t - t / 2 + dz / 2))
        sampled = sitk.GetArrayFromImage(
            sitk.Resample(source, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
        )
        shaped = sampled.reshape(count, sub, geometry.rows, geometry.columns, 2).mean(1)
        volume[first : first + count] = shaped[..., 0] - 1000.0
        blood[first : first + count] = shaped[..., 1]
    kernel = rng.uniform(0.25, 0.45) / geometry.pixel_spacing  # mm of blur, as pixels
    volume = ndi.gaussian_filter(volume, (0, kernel, kernel))
    for k in range(n):
        _artefacts(volume[k], geometry.pixel_spacing, rng)
    _noise(volume, geometry, rng)
    np.clip(np.rint(volume), -1024, 3071, out=volume)
    return volume, blood >= 0.5, origin


def _artefacts(image: np.ndarray, pixel: float, rng: np.random.Generator) -> None:
    """Beam hardening near bone and, where dense bone is plentiful, streaks (one slice)."""
    bone = image > 300
    if bone.sum() < 50:
        return
    soft = ndi.binary_fill_holes(bone) & ~bone & (image > -200)
    if soft.any():  # proximity to bone: a blurred bone mask, about 1 at its edge
        near = np.minimum(2.0 * ndi.gaussian_filter(bone.astype(np.float32), rng.uniform(1.2, 3.5) / pixel), 1.0)
        image[soft] += (rng.uniform(2, 11) * near)[soft]
    dense = image > 1200
    if dense.sum() * pixel**2 < 250:  # only at the skull base: petrous bone
        return
    labels, count = ndi.label(dense)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    rows, cols = np.indices(image.shape, dtype=np.float32)
    inside = image > -300
    if count >= 2 and sizes[order[1]] * pixel**2 > 40:  # a dark band between the petrous ridges
        (r0, c0), (r1, c1) = ndi.center_of_mass(dense, labels, [order[0] + 1, order[1] + 1])
        length = math.hypot(r1 - r0, c1 - c0) + 1e-6
        across = np.abs((rows - r0) * (c1 - c0) - (cols - c0) * (r1 - r0)) / length * pixel
        t = ((rows - r0) * (r1 - r0) + (cols - c0) * (c1 - c0)) / length**2
        band = np.exp(-(across**2) / (2 * rng.uniform(1.5, 3.5) ** 2)) * ((t > -0.1) & (t < 1.1))
        image[inside] -= (rng.uniform(12, 40) * band)[inside]
    points = np.argwhere(dense)
    for _ in range(rng.integers(6, 18)):
        r0, c0 = points[rng.integers(len(points))]
        angle = rng.uniform(0, np.pi)
        across = np.abs((rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle)) * pixel
        along = np.hypot(rows - r0, cols - c0) * pixel
        streak = rng.choice([-1, 1]) * rng.uniform(6, 25) * np.exp(-across / 0.8) * np.exp(-along / 45.0)
        image[inside] += streak[inside]


def _noise(volume: np.ndarray, geometry: Geometry, rng: np.random.Generator) -> None:
    sigma = rng.uniform(3.0, 7.0) * math.sqrt(5.0 / geometry.slice_thickness)
    for k in range(volume.shape[0]):
        white = rng.standard_normal(volume.shape[1:], dtype=np.float32)
        fine = rng.uniform(0.6, 1.0) / geometry.pixel_spacing * 0.45
        texture = ndi.gaussian_filter(white, fine) - 0.5 * ndi.gaussian_filter(white, 3 * fine)
        texture /= max(float(texture.std()), 1e-6)
        attenuation = ndi.uniform_filter((volume[k] > 600).astype(np.float32), int(30 / geometry.pixel_spacing))
        head = volume[k] > -500
        volume[k] += (sigma * (1 + 3.0 * attenuation) * texture) * head + (sigma * texture) * ~head
