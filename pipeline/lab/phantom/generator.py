"""Synthetic non-contrast head CTs, with or without acute intracranial hemorrhage.

:func:`make_head_ct` starts from real anatomy (the cached brain atlas), adds skull and
scalp, varies size, shape, position and attenuation, paints bleeds of the real kinds
(intraparenchymal, subdural crescent, epidural lens, intraventricular) and mimics, then
samples the head on a scanner grid with slice-thickness blur, a random pose, a smooth
deformation and noise. The same seed gives the same study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.lab.phantom.anatomy import build_head, load_anatomy
from pipeline.lab.phantom.lesions import (
    ADDERS,
    BleedKind,
    add_beam_hardening,
    add_dura,
    add_mimics,
    add_skull_base,
)

if TYPE_CHECKING:
    from pipeline.ai.volume import Volume

Finding = Literal["hemorrhage", "none"]
BLOOD_VISIBLE_HU = (50.0, 130.0)
HEAD_COVERAGE_MM = 175.0  # scan range that covers the whole head


@dataclass
class PhantomCase:
    """One generated study: HU volume and the true bleed mask on the same grid.

    Arrays are ``(slices, rows, columns)``; ``spacing`` is in the same order (mm). The
    grid is axial with the standard patient orientation (columns run to the patient's
    left, rows to posterior, slices to superior); ``origin`` is the LPS position (mm) of
    the first voxel.
    """

    volume_hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    kinds: list[BleedKind] = field(default_factory=list)

    @property
    def volume_ml(self) -> float:
        return float(self.label.sum() * np.prod(self.spacing) / 1000.0)


def _pose(rng: np.random.Generator, centre: tuple[float, ...], reference: sitk.Image) -> sitk.Transform:
    """Random head pose, size and smooth deformation (output point -> atlas point)."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    roll, pitch, yaw = (
        np.deg2rad(rng.uniform(-8, 8)),
        np.deg2rad(rng.uniform(-22, 16)),
        np.deg2rad(rng.uniform(-7, 7)),
    )
    rot = sitk.Euler3DTransform(centre, pitch, roll, yaw)
    scale = np.diag(1.0 / rng.uniform(0.9, 1.1, size=3))
    matrix = np.asarray(rot.GetMatrix()).reshape(3, 3) @ scale
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(tuple(rng.uniform(-16, 16, size=3) * np.array([0.6, 1, 0.25])))
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3])
    bspline.SetParameters((rng.standard_normal(len(bspline.GetParameters())) * 2.5).tolist())
    return sitk.CompositeTransform([affine, bspline])


def _streaks(volume: np.ndarray, pixel_spacing: float, rng: np.random.Generator) -> None:
    """Streaks from dense bone at the skull base: bright and dark rays from the petrous
    bone and, sometimes, a dark band across the posterior fossa between them."""
    strength = rng.uniform(0, 30)
    if strength < 3:
        return
    rows, cols = np.indices(volume.shape[1:], dtype=np.float32)
    for k in range(volume.shape[0]):
        dense = volume[k] > 1100
        if dense.sum() * pixel_spacing**2 < 200:
            continue
        inside = volume[k] > -300
        points = np.argwhere(dense)
        centre = points.mean(0)
        for _ in range(rng.integers(3, 12)):
            r0, c0 = points[rng.integers(len(points))]
            angle = np.arctan2(r0 - centre[0], c0 - centre[1]) + rng.normal(0, 0.8)
            across = np.abs((rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle)) * pixel_spacing
            fall = np.exp(-np.hypot(rows - r0, cols - c0) * pixel_spacing / rng.uniform(20, 60))
            ray = rng.choice([-1.0, 1.0]) * strength * rng.uniform(0.3, 1.0) * np.exp(-across / rng.uniform(0.5, 1.5))
            volume[k][inside] += (ray * fall)[inside]
        if rng.random() < 0.5:
            band = np.exp(-(((rows - centre[0]) * pixel_spacing / rng.uniform(1.5, 4)) ** 2))
            band *= np.abs(cols - centre[1]) * pixel_spacing < rng.uniform(20, 40)
            volume[k][inside] -= (strength * band)[inside]


def make_head_case(
    seed: int,
    finding: Finding = "hemorrhage",
    *,
    kinds: list[BleedKind | str] | None = None,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: float = 0.45,
    slice_thickness: float = 5.0,
    slices: int | None = None,
    z_offset_mm: float = 0.0,
    noise_hu: float | None = None,
) -> PhantomCase:
    """Generate one head CT; see :func:`make_head_ct`. Returns the :class:`PhantomCase`."""
    if finding not in ("hemorrhage", "none"):
        raise ValueError(f"finding must be 'hemorrhage' or 'none', not {finding!r}")
    rng = np.random.default_rng(seed)
    anatomy = load_anatomy()
    hu, out = build_head(anatomy, rng)
    label = np.zeros(anatomy.shape, dtype=np.float32)
    add_mimics(anatomy, hu, rng)
    add_dura(anatomy, hu, out, rng)
    chosen: list[BleedKind] = []
    if finding == "hemorrhage":
        if kinds:
            chosen = [BleedKind(k) for k in kinds]
        else:
            chosen = [BleedKind(rng.choice([k.value for k in BleedKind]))]
            if rng.random() < 0.2:
                chosen.append(BleedKind(rng.choice([k.value for k in BleedKind if k not in chosen])))
        for kind in chosen:
            ADDERS[kind](anatomy, hu, label, rng, out=out)
    add_skull_base(anatomy, hu, label, out, rng)
    add_beam_hardening(hu, out, rng)
    # Slice sensitivity profile: a thick slice averages the tissue across its thickness,
    # either a Gaussian (FWHM = thickness, cut at +-thickness/2) or a box of the thickness.
    if rng.random() < 0.5:
        sigma_z = slice_thickness / 2.355
        hu = ndi.gaussian_filter1d(hu, sigma_z, axis=0, truncate=max(1.0, slice_thickness / 2 / sigma_z))
    else:
        hu = ndi.uniform_filter1d(hu, max(1, round(slice_thickness)), axis=0)
    blur = max(pixel_spacing, rng.uniform(0.5, 1.1)) / 2.355  # reconstruction kernel, mm
    if blur > 0.3:
        hu = ndi.gaussian_filter(hu, (0, blur, blur), truncate=2.5)
    # The truth is the blood a reader can see: not where the slice is mostly bone (a thin
    # bleed under the skull at the vertex), nor where partial volume leaves it no denser
    # than grey matter (the edge of a thin bleed, a ventricle's rim).
    label *= (hu >= BLOOD_VISIBLE_HU[0]) & (hu <= BLOOD_VISIBLE_HU[1])

    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(anatomy.reference)
    truth = sitk.GetImageFromArray(label)
    truth.CopyInformation(anatomy.reference)
    zz, yy, xx = np.nonzero(anatomy.intracranial)
    centre = anatomy.reference.TransformContinuousIndexToPhysicalPoint(
        (float(xx.mean()), float(yy.mean()), float(zz.mean()))
    )
    transform = _pose(rng, centre, anatomy.reference)

    slices = slices or math.ceil(HEAD_COVERAGE_MM / slice_thickness)
    size = (columns, rows, slices)
    spacing_xyz = (pixel_spacing, pixel_spacing, slice_thickness)
    origin = tuple(c - (n - 1) * s / 2 for c, n, s in zip(centre, size, spacing_xyz, strict=True))
    origin = (origin[0], origin[1], origin[2] + z_offset_mm)  # scan range moved up (+) or down
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing_xyz)
    grid.SetOrigin(origin)
    # Evaluating the B-spline at every output voxel is slow; a displacement field on a
    # 4 mm grid covering the output, interpolated linearly, is the same pose 10x faster.
    coarse_spacing = (4.0, 4.0, min(4.0, slice_thickness))
    coarse_size = [math.ceil((n - 1) * s / c) + 2 for n, s, c in zip(size, spacing_xyz, coarse_spacing, strict=True)]
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, coarse_size, origin, coarse_spacing, grid.GetDirection()
    )
    both = sitk.Compose(image + 1000.0, truth)  # +1000: outside the atlas is air, resampled as 0
    sampled = sitk.GetArrayFromImage(
        sitk.Resample(both, grid, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
    )
    volume = sampled[..., 0] - 1000.0
    mask = sampled[..., 1] >= 0.5

    _streaks(volume, pixel_spacing, rng)
    sigma = noise_hu if noise_hu is not None else rng.uniform(2.0, 8.0) * math.sqrt(5.0 / slice_thickness)
    grain = rng.uniform(0.4, 1.3) * 0.45 / pixel_spacing
    white = rng.standard_normal(volume.shape, dtype=np.float32)
    noise = ndi.gaussian_filter(white, (0, grain, grain))
    if rng.random() < 0.5:  # mid-frequency texture of a sharper kernel
        noise -= rng.uniform(0.3, 0.7) * ndi.gaussian_filter(white, (0, 3 * grain, 3 * grain))
    volume += noise * (sigma / max(float(noise.std()), 1e-6))
    np.clip(np.rint(volume), -1024, 3071, out=volume)
    return PhantomCase(
        volume_hu=volume.astype(np.float32),
        label=mask,
        spacing=(slice_thickness, pixel_spacing, pixel_spacing),
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        kinds=chosen,
    )


def make_head_ct(
    seed: int, finding: Finding = "hemorrhage", **kwargs: object
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one non-contrast head CT.

    Parameters
    ----------
    seed
        Same seed, same study.
    finding
        ``"hemorrhage"`` paints one bleed (sometimes two) of a random kind, or the kinds
        given as ``kinds=[...]`` (:class:`BleedKind` values); ``"none"`` paints none.
    **kwargs
        ``rows``, ``columns``, ``pixel_spacing`` (mm), ``slice_thickness`` (mm),
        ``slices`` (default: enough to cover the head; fewer cut the head at the top
        and bottom of the scan range, as a partial scan does), ``z_offset_mm`` (moves
        the scan range along the patient's axis), ``noise_hu``.

    Returns
    -------
    volume_hu, label_mask, spacing
        float32 HU and bool bleed mask, both ``(slices, rows, columns)``, and the
        spacing in mm in that order. The grid is axial, standard orientation.
    """
    case = make_head_case(seed, finding, **kwargs)  # type: ignore[arg-type]
    return case.volume_hu, case.label, case.spacing


def case_volume(case: PhantomCase, *, seed: int | str = 0) -> "Volume":
    """The case as a :class:`~pipeline.ai.volume.Volume` (axial, standard orientation, made-up UIDs)."""
    from pydicom.uid import generate_uid

    from pipeline.ai.volume import Volume

    series = generate_uid(entropy_srcs=["radtriage-phantom", str(seed)])
    return Volume(
        array=case.volume_hu,
        spacing=case.spacing,
        origin=case.origin,
        direction=np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        sop_instance_uids=[generate_uid(entropy_srcs=[series, str(k)]) for k in range(case.volume_hu.shape[0])],
        series_instance_uid=series,
        modality="CT",
    )


def volume_generator(finding: Finding, kinds: list[BleedKind | str] | None = None):  # type: ignore[no-untyped-def]
    """A ``pipeline.lab.synth`` volume generator ``(shape, spacing, rng) -> HU`` drawing on this phantom."""

    def generate(
        shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
    ) -> np.ndarray:
        if abs(spacing[1] - spacing[2]) > 1e-6:
            raise ValueError(f"the head phantom needs square pixels, got row/column spacing {spacing[1:]}")
        volume, _, _ = make_head_ct(
            int(rng.integers(2**31)),
            finding,
            kinds=kinds,
            slices=shape[0],
            rows=shape[1],
            columns=shape[2],
            slice_thickness=spacing[0],
            pixel_spacing=spacing[1],
        )
        return volume

    return generate
