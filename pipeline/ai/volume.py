"""One DICOM series as one oriented volume in Hounsfield units.

Conventions (used by the model zoo and the result writers alike):

* ``Volume.array`` is float32 ``(slices, rows, columns)``; slice ``k`` is the image
  ``sop_instance_uids[k]`` / ``files[k]``, sorted along the slice normal (increasing).
* ``spacing`` is in mm in the same order: distance between slice origins, then
  PixelSpacing (row spacing, column spacing).
* ``direction[a]`` is the LPS unit vector along array axis ``a``: ``direction[0]`` the
  stacking direction, ``direction[1]`` down the rows (ImageOrientationPatient[3:6]),
  ``direction[2]`` along a row (ImageOrientationPatient[0:3]).
* ``origin`` is the LPS position of voxel ``(0, 0, 0)`` (ImagePositionPatient of slice 0).

A gantry-tilted series is kept as it was acquired: its stacking direction is not the
slice normal. What cannot be one volume is refused with a :class:`VolumeError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.errors import PermanentError

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # difference in direction cosines
SPACING_TOLERANCE = 0.05  # relative difference between slice gaps
MIN_SLICES = 3


class VolumeError(PermanentError):
    """The series cannot be made into one volume; the message says why and what to do."""


class UnreadableImageError(VolumeError):
    pass


class NotAVolumeError(VolumeError):
    pass


class TooFewSlicesError(VolumeError):
    pass


class MixedOrientationError(VolumeError):
    pass


class MissingSlicesError(VolumeError):
    pass


class NonUniformSpacingError(VolumeError):
    pass


@dataclass
class Volume:
    """A series in HU with its geometry; see the module docstring for the conventions."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    sop_instance_uids: list[str]
    files: list[Path] = field(default_factory=list)
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking ``(slice, row, column, 1)`` to LPS millimetres."""
        out = np.eye(4)
        out[:3, :3] = (self.direction * np.asarray(self.spacing)[:, None]).T
        out[:3, 3] = self.origin
        return out

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """``(n, 3)`` array of ``(slice, row, column)`` indices to ``(n, 3)`` LPS points."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_sitk(self):  # type: ignore[no-untyped-def]
        """The volume as a SimpleITK image (index order x=column, y=row, z=slice)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(np.asarray(self.direction[::-1]).T.ravel().tolist()))
        return image


def _header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, force=False)
    except (InvalidDicomError, OSError) as err:
        raise UnreadableImageError(f"{path}: not a readable DICOM file ({err})") from None


def _vector(ds: pydicom.Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise NotAVolumeError(
            f"{path}: no {keyword}; a localizer, secondary capture or report cannot be part of a volume"
        )
    return np.asarray([float(v) for v in value])


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    from pydicom.pixels import apply_rescale

    if ds.get("PhotometricInterpretation", "MONOCHROME2") not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotAVolumeError(f"{path}: PhotometricInterpretation {ds.PhotometricInterpretation} is not grayscale")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for undecodable data
        raise UnreadableImageError(
            f"{path}: pixel data cannot be decoded ({err}); install the codec for "
            f"transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')} or send it uncompressed"
        ) from None
    return np.asarray(apply_rescale(pixels, ds), dtype=np.float32)


def load_volume(files: Sequence[Path | str], *, min_slices: int = MIN_SLICES) -> Volume:
    """Read a single-frame series into a :class:`Volume` (HU applied, sorted, checked).

    Raises
    ------
    VolumeError
        ``TooFewSlicesError``, ``NotAVolumeError`` (no geometry, multi-frame, several
        series, different image sizes), ``MixedOrientationError``, ``MissingSlicesError``
        (a gap of more than 1.5 slice spacings), ``NonUniformSpacingError`` (gaps differ
        by more than 5 %) or ``UnreadableImageError``.
    """
    paths = [Path(f) for f in files]
    if len(paths) < min_slices:
        raise TooFewSlicesError(f"{len(paths)} image(s); a volume needs at least {min_slices} slices")
    datasets = [_header(p) for p in paths]
    first = datasets[0]
    series = {ds.get("SeriesInstanceUID", "") for ds in datasets}
    if len(series) > 1:
        raise NotAVolumeError(f"the files belong to {len(series)} series; load one series at a time")
    for ds, path in zip(datasets, paths, strict=True):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise NotAVolumeError(f"{path}: multi-frame (enhanced) images are not supported; send single-frame images")
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise NotAVolumeError(
                f"{path}: image size {ds.get('Rows')}x{ds.get('Columns')} differs from the rest of the series"
            )
    orientations = np.stack(
        [_vector(ds, "ImageOrientationPatient", 6, p) for ds, p in zip(datasets, paths, strict=True)]
    )
    positions = np.stack([_vector(ds, "ImagePositionPatient", 3, p) for ds, p in zip(datasets, paths, strict=True)])
    pixel_spacings = np.stack([_vector(ds, "PixelSpacing", 2, p) for ds, p in zip(datasets, paths, strict=True)])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        bad = int(np.argmax(np.abs(orientations - orientations[0]).max(axis=1)))
        raise MixedOrientationError(
            f"mixed orientations: {paths[bad].name} has ImageOrientationPatient {orientations[bad].round(4).tolist()}, "
            f"{paths[0].name} has {orientations[0].round(4).tolist()}; a series must be one stack"
        )
    if np.abs(pixel_spacings - pixel_spacings[0]).max() > 1e-4:
        raise NotAVolumeError("PixelSpacing differs between images of the series")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if gaps.min() < 1e-3:
        k = int(np.argmin(gaps))
        raise NotAVolumeError(
            f"two images at the same position ({paths[order[k]].name}, {paths[order[k + 1]].name}): "
            "a repeated acquisition or a duplicate instance"
        )
    typical = float(np.median(gaps))
    if gaps.max() > 1.5 * typical:
        k = int(np.argmax(gaps))
        raise MissingSlicesError(
            f"missing slices: a gap of {gaps[k]:.2f} mm between {paths[order[k]].name} and "
            f"{paths[order[k + 1]].name} where slices are {typical:.2f} mm apart; send the whole series"
        )
    if gaps.max() - gaps.min() > SPACING_TOLERANCE * typical + 0.01:
        raise NonUniformSpacingError(
            f"non-uniform slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(tolerance {SPACING_TOLERANCE:.0%}); resample the series to uniform spacing"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    if np.linalg.norm(positions - expected, axis=1).max() > 0.1 * typical + 0.01:
        raise NotAVolumeError("the image positions do not lie on a straight line; this is not one stack")
    array = np.stack([_pixels(datasets[i], paths[i]) for i in order])
    direction = np.stack([step / np.linalg.norm(step), col_dir, row_dir])
    return Volume(
        array=array,
        spacing=(float(np.linalg.norm(step)), float(pixel_spacings[0][0]), float(pixel_spacings[0][1])),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=direction,
        sop_instance_uids=[str(datasets[i].SOPInstanceUID) for i in order],
        files=[paths[i] for i in order],
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "")),
    )
