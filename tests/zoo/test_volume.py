"""A DICOM series becomes a correctly oriented HU volume, or a clear refusal."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.ai.volume import (
    MissingSlicesError,
    MixedOrientationError,
    NonUniformSpacingError,
    NotAVolumeError,
    TooFewSlicesError,
    load_volume,
)
from pipeline.errors import PermanentError

from .dicom import write_series

SLICES, ROWS, COLUMNS = 6, 12, 10


def _phantom() -> np.ndarray:
    """Every slice its own HU; a bright marker whose position tells rows from columns."""
    volume = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.float32)
    volume += (np.arange(SLICES) * 10.0 - 20.0)[:, None, None]
    volume[:, 2, 7] = 900.0
    volume[3, 9, 1] = -700.0
    return volume


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    a, b, c = np.deg2rad([a, b, c])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _assert_geometry_matches_headers(volume, paths: list[Path]) -> None:  # type: ignore[no-untyped-def]
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
    for k, uid in enumerate(volume.sop_instance_uids):
        ds = by_uid[uid]
        np.testing.assert_allclose(
            volume.index_to_lps(np.array([[k, 0, 0]]))[0], [float(v) for v in ds.ImagePositionPatient], atol=1e-3
        )
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], hu)
        assert str(pydicom.dcmread(volume.files[k]).SOPInstanceUID) == uid


def test_axial_series_geometry_and_hounsfield_units(tmp_path: Path) -> None:
    data = _phantom()
    paths = write_series(tmp_path, data, spacing=(2.5, 0.7, 0.6), origin=(-3.0, -4.0, 100.0))
    shuffled = paths[:]
    random.Random(1).shuffle(shuffled)

    volume = load_volume(shuffled)

    assert volume.shape == (SLICES, ROWS, COLUMNS)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert volume.origin == pytest.approx((-3.0, -4.0, 100.0))
    np.testing.assert_allclose(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-9)
    np.testing.assert_array_equal(volume.array, data)  # HU back, slices in order, rows vs columns right
    assert volume.files == paths
    # The marker at row 2, column 7 lies 2 rows (0.7 mm) down and 7 columns (0.6 mm) to the left.
    np.testing.assert_allclose(volume.index_to_lps(np.array([[0, 2, 7]]))[0], [-3.0 + 4.2, -4.0 + 1.4, 100.0])
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 0.7 * 0.6 / 1000)
    _assert_geometry_matches_headers(volume, paths)


def test_reversed_slice_order_is_sorted_along_the_normal(tmp_path: Path) -> None:
    """Instance 1 is the most superior image: the volume still goes inferior to superior."""
    data = _phantom()
    paths = write_series(
        tmp_path, data, spacing=(3.0, 0.5, 0.5), origin=(0.0, 0.0, 50.0), stack_direction=(0.0, 0.0, -1.0)
    )

    volume = load_volume(paths)

    np.testing.assert_array_equal(volume.array, data[::-1])
    assert volume.origin == pytest.approx((0.0, 0.0, 50.0 - 3.0 * (SLICES - 1)))
    np.testing.assert_allclose(volume.direction[0], [0, 0, 1], atol=1e-9)
    assert volume.files == paths[::-1]
    _assert_geometry_matches_headers(volume, paths)


def test_oblique_series(tmp_path: Path) -> None:
    rotation = _rotation(20, -15, 10)
    row, col = rotation[:, 0], rotation[:, 1]
    data = _phantom()
    paths = write_series(
        tmp_path, data, spacing=(4.0, 0.8, 0.9), origin=(10.0, -20.0, 30.0), row_direction=row, column_direction=col
    )

    volume = load_volume(paths[::-1])

    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.direction, np.stack([np.cross(row, col), col, row]), atol=1e-6)
    np.testing.assert_allclose(
        volume.index_to_lps(np.array([[0, 2, 7]]))[0],
        np.array([10.0, -20.0, 30.0]) + 2 * 0.8 * col + 7 * 0.9 * row,
        atol=1e-3,
    )
    _assert_geometry_matches_headers(volume, paths)
    image = volume.to_sitk()  # the same geometry in SimpleITK's conventions
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint((7, 2, 3)), volume.index_to_lps(np.array([[3, 2, 7]]))[0], atol=1e-3
    )


def test_gantry_tilt_keeps_the_acquired_stacking_direction(tmp_path: Path) -> None:
    tilt = np.deg2rad(15)
    stack = (0.0, np.sin(tilt), np.cos(tilt))
    paths = write_series(tmp_path, _phantom(), spacing=(5.0, 0.5, 0.5), stack_direction=stack)

    volume = load_volume(paths)

    np.testing.assert_allclose(volume.direction[0], stack, atol=1e-6)
    assert volume.spacing[0] == pytest.approx(5.0)
    _assert_geometry_matches_headers(volume, paths)


def _edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _phantom())
    _edit(paths[2], ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"])
    with pytest.raises(MixedOrientationError, match=f"mixed orientations: {paths[2].name}"):
        load_volume(paths)


def test_a_missing_slice_is_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _phantom(), spacing=(5.0, 0.5, 0.5))
    with pytest.raises(MissingSlicesError, match=r"missing slices: a gap of 10\.00 mm .* 5\.00 mm apart"):
        load_volume(paths[:3] + paths[4:])


def test_non_uniform_spacing_beyond_tolerance_is_refused(tmp_path: Path) -> None:
    z = [0.0, 5.0, 10.0, 15.6, 20.6, 25.6]
    paths = write_series(tmp_path, _phantom(), positions=[(0.0, 0.0, v) for v in z])
    with pytest.raises(NonUniformSpacingError, match="non-uniform slice spacing"):
        load_volume(paths)
    # Jitter within tolerance is accepted.
    jitter = [0.0, 5.0, 10.02, 15.0, 19.99, 25.0]
    write_series(tmp_path / "ok", _phantom(), positions=[(0.0, 0.0, v) for v in jitter])
    assert load_volume(sorted((tmp_path / "ok").iterdir())).shape == (SLICES, ROWS, COLUMNS)


def test_too_few_slices_are_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _phantom())
    with pytest.raises(TooFewSlicesError, match="2 image"):
        load_volume(paths[:2])


@pytest.mark.parametrize(
    ("what", "attributes", "message"),
    [
        ("localizer without position", {"ImagePositionPatient": None}, "no ImagePositionPatient"),
        ("duplicate position", {"ImagePositionPatient": ["-60", "-70", "15"]}, "same position"),
        ("another series", {"SeriesInstanceUID": "1.2.3.4.5"}, "belong to 2 series"),
        ("other image size", {"Rows": 6, "PixelData": b"\0" * 6 * COLUMNS * 2}, "image size"),
    ],
)
def test_what_cannot_be_a_volume_is_refused(tmp_path: Path, what: str, attributes: dict, message: str) -> None:
    paths = write_series(tmp_path, _phantom())
    _edit(paths[3], **attributes)
    with pytest.raises(NotAVolumeError, match=message) as caught:
        load_volume(paths)
    assert isinstance(caught.value, PermanentError)  # shown on the worklist, never retried


def test_a_file_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, _phantom())
    paths[1].write_bytes(b"garbage")
    with pytest.raises(PermanentError, match="not a readable DICOM file"):
        load_volume(paths)
