"""Measurements a radiologist can check: volume in ml, largest diameter in mm, priority."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ai.findings import Priority
from pipeline.ai.measure import make_finding, max_diameter_mm
from pipeline.ai.spec import FindingSpec
from pipeline.ai.volume import Volume

SPEC = FindingSpec.model_validate(
    {
        "channel": 1,
        "label": "Intracranial hemorrhage",
        "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"},
        "type": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
        "voxel_threshold": 0.5,
        "min_component_ml": 0.05,
        "min_volume_ml": 0.3,
        "priority": [{"level": "critical", "min_volume_ml": 30}, {"level": "urgent"}],
    }
)


def _volume(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], direction: np.ndarray | None = None
) -> Volume:
    return Volume(
        array=np.zeros(shape, np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3)[::-1] if direction is None else direction,
        sop_instance_uids=[str(i) for i in range(shape[0])],
    )


def _ball(volume: Volume, radius_mm: float, centre_mm: tuple[float, float, float]) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    points = volume.index_to_lps(index)
    return (np.linalg.norm(points - np.asarray(centre_mm), axis=1) <= radius_mm).reshape(volume.shape)


def test_a_ball_on_an_anisotropic_grid_measures_its_true_volume_and_diameter() -> None:
    volume = _volume((40, 120, 120), (1.5, 0.45, 0.45))
    truth = _ball(volume, 15.0, (27.0, 27.0, 30.0))
    probability = np.where(truth, 0.9, 0.05).astype(np.float32)

    finding = make_finding(probability, volume, SPEC)

    assert finding.present
    assert finding.volume_ml == pytest.approx(4 / 3 * np.pi * 15**3 / 1000, rel=0.03)  # 14.1 ml
    assert finding.max_diameter_mm == pytest.approx(30.0, abs=1.6)
    assert finding.probability == pytest.approx(0.9)
    assert finding.priority is Priority.URGENT
    np.testing.assert_array_equal(finding.mask, truth)
    assert finding.mask.dtype == bool and finding.mask.shape == volume.shape


def test_a_large_bleed_is_critical_and_specks_are_ignored() -> None:
    volume = _volume((40, 80, 80), (2.0, 1.0, 1.0))
    truth = _ball(volume, 22.0, (40.0, 40.0, 40.0))  # 44.6 ml
    probability = np.where(truth, 0.8, 0.0).astype(np.float32)
    probability[2, 2, 2] = 0.99  # one voxel: 0.002 ml, below min_component_ml

    finding = make_finding(probability, volume, SPEC)

    assert finding.priority is Priority.CRITICAL
    assert not finding.mask[2, 2, 2]
    assert finding.probability == pytest.approx(0.8)


def test_nothing_but_specks_is_absent_and_routine() -> None:
    volume = _volume((20, 40, 40), (2.0, 1.0, 1.0))
    probability = np.full(volume.shape, 0.1, np.float32)
    probability[5, 5, 5] = probability[10, 30, 30] = 0.97
    finding = make_finding(probability, volume, SPEC)
    assert not finding.present and finding.priority is Priority.ROUTINE
    assert not finding.mask.any() and finding.volume_ml == 0.0
    assert finding.probability < SPEC.voxel_threshold


def test_diameter_follows_a_tilted_grid() -> None:
    """Gantry tilt: slices stack along a direction that is not the slice normal."""
    tilt = np.deg2rad(30)
    stack, column_dir = np.array([0, np.sin(tilt), np.cos(tilt)]), np.array([0.0, 1.0, 0.0])
    volume = _volume((10, 10, 10), (2.0, 1.0, 1.0), np.stack([stack, column_dir, [1.0, 0.0, 0.0]]))
    mask = np.zeros(volume.shape, bool)
    for k in range(10):  # a connected staircase from (0, 0, 0) to (9, 5, 0)
        mask[k, round(k * 5 / 9), 0] = True
    expected = np.linalg.norm(9 * 2.0 * stack + 5 * 1.0 * column_dir)  # 20.95 mm; 18.68 if the tilt were ignored
    assert max_diameter_mm(mask, volume) == pytest.approx(expected)
