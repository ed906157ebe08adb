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
from pipeline.lab.phantom.lesions import ADDERS, BleedKind, add_mimics

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
    roll, pitch, yaw = np.deg2rad(rng.uniform(-5, 5)), np.deg2rad(rng.uniform(-12, 12)), np.deg2rad(rng.uniform(-6, 6))
    rot = sitk.Euler3DTransform(centre, pitch, roll, yaw)
    scale = np.diag(1.0 / rng.uniform(0.9, 1.1, size=3))
    matrix = np.asarray(rot.GetMatrix()).reshape(3, 3) @ scale
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(tuple(rng.uniform(-8, 8, size=3) * np.array([1, 1, 0.5])))
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3])
    bspline.SetParameters((rng.standard_normal(len(bspline.GetParameters())) * 2.5).tolist())
    return sitk.CompositeTransform([affine, bspline])


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
    hu = build_head(anatomy, rng)
    label = np.zeros(anatomy.shape, dtype=np.float32)
    add_mimics(anatomy, hu, rng)
    chosen: list[BleedKind] = []
    if finding == "hemorrhage":
        if kinds:
            chosen = [BleedKind(k) for k in kinds]
        else:
            chosen = [BleedKind(rng.choice([k.value for k in BleedKind]))]
            if rng.random() < 0.2:
                chosen.append(BleedKind(rng.choice([k.value for k in BleedKind if k not in chosen])))
        for kind in chosen:
            ADDERS[kind](anatomy, hu, label, rng)
    # Slice sensitivity profile: a thick slice averages the tissue across its thickness
    # (FWHM = thickness, cut at +-thickness/2 like a real, nearly rectangular profile).
    sigma_z = slice_thickness / 2.355
    hu = ndi.gaussian_filter1d(hu, sigma_z, axis=0, truncate=max(1.0, slice_thickness / 2 / sigma_z))
    if pixel_spacing / 2.355 > 0.5:
        hu = ndi.gaussian_filter(hu, (0, pixel_spacing / 2.355, pixel_spacing / 2.355), truncate=2.5)
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

    sigma = noise_hu if noise_hu is not None else rng.uniform(2.0, 5.0) * math.sqrt(5.0 / slice_thickness)
    noise = ndi.gaussian_filter(rng.standard_normal(volume.shape, dtype=np.float32), (0, 0.7, 0.7))
    volume += noise * (sigma / max(float(noise.std()), 1e-6))
    np.clip(volume, -1024, 3071, out=volume)
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
