"""Measurements a radiologist can check: volume in ml, largest diameter in mm, priority."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ai.findings import Priority
from pipeline.ai.measure import make_finding, max_diameter_mm, smoothed_hu
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


def _calibrated(**fields: object) -> FindingSpec:
    data = SPEC.model_dump(mode="json")
    data.update({"min_volume_ml": 2.0, "study_probability": {"slope": 3.0, "offset_ml": 0.1}, **fields})
    return FindingSpec.model_validate(data)


def test_the_calibrated_probability_is_the_one_the_decision_is_taken_on() -> None:
    """Present exactly when p >= 0.5: no "absent, p 0.96" when the mask is under the threshold."""
    volume = _volume((40, 80, 80), (2.0, 1.0, 1.0))
    spec = _calibrated()
    seen = []
    for radius in (4.0, 6.0, 7.0, 9.0, 14.0):  # 0.27 .. 11.5 ml, all voxels at p 0.97
        ball = _ball(volume, radius, (40.0, 40.0, 40.0))
        finding = make_finding(np.where(ball, 0.97, 0.02).astype(np.float32), volume, spec)
        assert finding.present == (finding.probability >= 0.5), (radius, finding)
        assert finding.present == (ball.sum() * volume.voxel_volume_ml >= 2.0)
        seen.append(finding.probability)
    assert seen == sorted(seen) and seen[0] < 0.05 and seen[-1] > 0.95  # rises with the volume
    empty = make_finding(np.zeros(volume.shape, np.float32), volume, spec)
    assert not empty.present and empty.probability < 0.01


def test_uncalibrated_absent_findings_report_a_probability_below_the_voxel_threshold() -> None:
    volume = _volume((20, 40, 40), (2.0, 1.0, 1.0))
    probability = np.full(volume.shape, 0.1, np.float32)
    probability[8:10, 10:14, 10:14] = 0.96  # 0.03 ml: a component, but under min_volume_ml
    finding = make_finding(probability, volume, SPEC.model_copy(update={"min_component_ml": 0.0}))
    assert not finding.present and finding.probability < SPEC.voxel_threshold


def test_a_sliver_along_the_bone_is_dropped_and_a_thick_bleed_against_it_is_kept() -> None:
    """Thick slices mix the inner table with brain into blood-dense voxels along the bone."""
    volume = _volume((20, 100, 100), (5.0, 0.5, 0.5))
    volume.array[:] = 35.0
    volume.array[:, :, :10] = 1500.0  # skull along one side
    probability = np.zeros(volume.shape, np.float32)
    probability[5:12, 20:60, 10:13] = 0.9  # 1.5 mm thick along the bone: partial volume
    probability[5:12, 70:95, 10:40] = 0.9  # 15 mm thick against the bone: an epidural
    spec = SPEC.model_copy(update={"min_bone_distance_mm": 3.0, "min_component_ml": 0.0})

    finding = make_finding(probability, volume, spec)

    assert finding.present
    assert not finding.mask[:, 20:60, 10:13].any()
    assert finding.mask[5:12, 70:95, 10:40].all()


def test_air_fat_and_bone_are_never_blood() -> None:
    volume = _volume((10, 60, 60), (5.0, 0.5, 0.5))
    volume.array[:] = 70.0
    volume.array[:, :, 40:] = -80.0  # fat
    volume.array[:, :20, :] = 900.0  # bone
    probability = np.full(volume.shape, 0.9, np.float32)
    spec = SPEC.model_copy(update={"min_hu": 40.0, "max_hu": 300.0})

    finding = make_finding(probability, volume, spec)

    assert finding.present
    assert not finding.mask[:, 25:, 42:].any() and not finding.mask[:, :18, :].any()
    assert finding.mask[:, 25:, 5:35].all()


def _bleed_with_a_faint_rim() -> tuple[Volume, np.ndarray]:
    """A 70 HU ball whose core the network is sure of (p 0.9) and whose outer 2 mm it is
    not (p 0.3); beside it, unconnected, a 0.3 blob and a rim that runs into bone."""
    volume = _volume((30, 80, 80), (2.0, 1.0, 1.0))
    volume.array[:] = 35.0
    ball = _ball(volume, 12.0, (30.0, 40.0, 30.0))
    volume.array[ball] = 70.0
    core = _ball(volume, 10.0, (30.0, 40.0, 30.0))
    probability = np.where(core, 0.9, np.where(ball, 0.3, 0.02)).astype(np.float32)
    probability[20:26, 5:15, 60:70] = 0.3  # nothing above 0.5 here: never a finding of its own
    volume.array[20:26, 5:15, 60:70] = 70.0
    volume.array[:, :, 42:44] = 1500.0  # bone next to the ball, where p is 0.3 as well
    probability[:, 25:55, 42:44] = 0.3
    return volume, probability


def test_growing_extends_a_kept_component_over_its_less_probable_rim_and_starts_nothing() -> None:
    volume, probability = _bleed_with_a_faint_rim()
    spec = SPEC.model_copy(update={"min_hu": 45.0, "max_hu": 300.0, "min_component_ml": 0.0})

    core = make_finding(probability, volume, spec)
    grown = make_finding(probability, volume, spec.model_copy(update={"grow_threshold": 0.25}))

    hu = smoothed_hu(volume)  # the gate's HU
    ball = _ball(volume, 12.0, (30.0, 40.0, 30.0)) & (hu >= 45.0) & (hu < 300.0)
    rim = ball & (probability == np.float32(0.3))
    assert rim.sum() > 0.3 * ball.sum()
    assert not core.mask[rim].any()
    np.testing.assert_array_equal(grown.mask, ball)
    assert not grown.mask[20:26, 5:15, 60:70].any()  # an unconnected 0.3 blob does not start a finding
    assert not grown.mask[:, :, 42:44].any()  # the HU gate holds for what is grown
    assert grown.volume_ml == pytest.approx(ball.sum() * volume.voxel_volume_ml)
    assert grown.volume_ml > core.volume_ml * 1.3


def test_the_calibration_measures_what_inference_finds() -> None:
    """The validation bookkeeping of every candidate rule is the volume make_finding reports."""
    from pipeline.lab.evaluate import measure_study

    volume, probability = _bleed_with_a_faint_rim()
    speck = np.zeros(volume.shape, bool)
    speck[2:4, 70:73, 5:8] = True  # 0.036 ml of p 0.9 at 70 HU: kept or not by min_component_ml
    probability[speck], volume.array[speck] = 0.9, 70.0
    truth = _ball(volume, 12.0, (30.0, 40.0, 30.0))
    study = measure_study(probability, volume, truth, SPEC)

    for min_hu in (None, 45.0):
        for component in (0.0, 0.05):
            for grow in (None, 0.4, 0.2):
                spec = SPEC.model_copy(
                    update={"min_hu": min_hu, "max_hu": 300.0, "min_component_ml": component, "grow_threshold": grow}
                )
                found = make_finding(probability, volume, spec)
                assert study.volume_ml(min_hu, component, 0.0, grow) == pytest.approx(found.volume_ml), (
                    min_hu,
                    component,
                    grow,
                )


def test_growing_measures_a_finding_but_never_makes_one() -> None:
    """Specks under the threshold stay absent however far their faint rims reach."""
    volume, probability = _bleed_with_a_faint_rim()
    probability[probability == np.float32(0.9)] = 0.3  # only a speck is sure now
    probability[30 // 2, 40, 30] = 0.9
    spec = SPEC.model_copy(update={"min_hu": 45.0, "max_hu": 300.0, "min_component_ml": 0.0, "grow_threshold": 0.25})

    finding = make_finding(probability, volume, spec)

    assert not finding.present and not finding.mask.any() and finding.volume_ml == 0.0
