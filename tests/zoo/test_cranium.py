"""The cranial cavity: scalp and temporalis muscle are never an intracranial finding."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ai.cranium import CranialCavity, cranial_cavity, within_cranium
from pipeline.ai.measure import make_finding
from pipeline.ai.spec import FindingSpec
from pipeline.ai.volume import Volume
from pipeline.lab.holdout.study import make_holdout_case
from pipeline.lab.phantom.generator import case_volume, make_head_case

PIXEL_MM = 0.5


def _head(gap_mm: float = 0.0, open_degrees: float = 0.0) -> Volume:
    """Three 5 mm slices of a 200 x 200 mm field: a 6 mm skull ring of 150 mm across,
    brain at 35 HU inside, a 10 mm scalp band at 45 HU outside. ``gap_mm``: a suture of
    that width through the ring on the right; ``open_degrees``: a wide opening at the
    bottom, as at the skull base."""
    n = int(200 / PIXEL_MM)
    rows, columns = (np.indices((n, n)) - n / 2) * PIXEL_MM
    radius = np.hypot(rows, columns)
    image = np.full((n, n), -1000.0, np.float32)
    image[radius < 91] = 45.0  # scalp
    image[radius < 81] = 1200.0  # skull
    image[radius < 75] = 35.0  # brain
    if gap_mm:
        image[(np.abs(rows) < gap_mm / 2) & (columns > 70) & (radius < 81)] = 45.0
    if open_degrees:
        angle = np.degrees(np.arctan2(columns, rows))  # 0 at the bottom
        image[(np.abs(angle) < open_degrees / 2) & (radius >= 75) & (radius < 81)] = 45.0
    return Volume(
        array=np.repeat(image[None], 3, axis=0),
        spacing=(5.0, PIXEL_MM, PIXEL_MM),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3)[::-1],
        sop_instance_uids=["1", "2", "3"],
    )


def _blob(volume: Volume, row_mm: float, column_mm: float, radius_mm: float = 3.0) -> np.ndarray:
    n = volume.shape[1]
    rows, columns = (np.indices((n, n)) - n / 2) * PIXEL_MM
    disk = np.hypot(rows - row_mm, columns - column_mm) < radius_mm
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1] = disk
    return mask


@pytest.mark.parametrize("gap_mm", [0.0, 4.0], ids=["closed ring", "4 mm suture"])
def test_a_blob_in_the_scalp_is_dropped_and_one_in_the_brain_kept(gap_mm):
    head = _head(gap_mm=gap_mm)
    scalp = _blob(head, 0.0, -86.0)  # lateral, in the temporalis band
    brain = _blob(head, 0.0, 60.0)  # near the suture, inside
    kept = within_cranium(scalp | brain, head)
    assert not (kept & scalp).any()
    assert (kept == brain).all()


def test_a_skull_open_at_the_base_is_judged_by_its_convex_hull():
    head = _head(open_degrees=60.0)  # 80 mm wide: no closing bridges that
    inside = _blob(head, 60.0, 0.0)  # towards the opening, inside the chord across it
    scalp = _blob(head, 0.0, 86.0)
    kept = within_cranium(inside | scalp, head)
    assert (kept == inside).all()


def test_a_slice_without_bone_is_not_judged():
    head = _head()
    head.array[1] = 40.0  # soft tissue only
    mask = _blob(head, 0.0, -86.0)
    assert (within_cranium(mask, head) == mask).all()
    assert cranial_cavity(head)[1].all()


def test_only_the_occupied_slices_are_computed():
    head = _head()
    cavity = cranial_cavity(head, slices=[1])
    assert cavity[0].all() and cavity[2].all()  # not judged
    assert not cavity[1].all() and cavity[1, head.shape[1] // 2, head.shape[2] // 2]


def test_a_cavity_judges_each_slice_once_and_agrees_with_the_whole_volume_one(monkeypatch):
    import pipeline.ai.cranium as cranium

    head = _head(gap_mm=4.0)
    whole = cranial_cavity(head)
    judged = []
    judge = cranium._judge_slice
    monkeypatch.setattr(cranium, "_judge_slice", lambda v, z, b: judged.append(z) or judge(v, z, b))
    cavity = CranialCavity(head)
    core, rim = _blob(head, 0.0, 60.0), _blob(head, 0.0, -86.0, radius_mm=8.0)
    rim[2] = rim[1]  # the rim reaches one more slice

    assert (cavity.within(core) == core).all()
    assert (cavity.within(rim) == (rim & whole)).all()
    assert (within_cranium(rim, head, cavity=cavity) == cavity.within(rim)).all()
    assert sorted(judged) == [1, 2]  # slice 0 never asked for, slices 1 and 2 judged once


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_holdout_case(5, kinds=["subdural"], rows=256, columns=256),
        lambda: make_holdout_case(6, kinds=["epidural"], rows=256, columns=256, slice_thickness=2.5),
        lambda: make_head_case(7, "hemorrhage", kinds=["subdural"], rows=256, columns=256, pixel_spacing=0.9),
        lambda: make_head_case(8, "hemorrhage", kinds=["epidural"], rows=256, columns=256, pixel_spacing=0.9),
    ],
    ids=["independent subdural", "independent epidural 2.5 mm", "generator subdural", "generator epidural"],
)
def test_no_blood_below_bone_density_lies_outside_the_cavity(make):
    """Extra-axial bleeds hug the inner table: the cavity must hold every voxel of them
    that is not as dense as bone (those the HU gate drops anyway)."""
    case = make()
    volume = case_volume(case, seed=1)
    blood = case.label & (volume.array < 300)
    assert blood.sum() * volume.voxel_volume_ml > 2.0
    assert (within_cranium(blood, volume) == blood).all()


def test_the_spec_switch_drops_a_scalp_finding():
    head = _head()
    probability = (_blob(head, 0.0, -86.0, radius_mm=5.0)).astype(np.float32)
    spec = {
        "channel": 1,
        "label": "Intracranial hemorrhage",
        "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"},
        "type": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
        "min_volume_ml": 0.1,
    }
    assert make_finding(probability, head, FindingSpec.model_validate(spec)).present
    finding = make_finding(probability, head, FindingSpec.model_validate({**spec, "within_cranium": True}))
    assert not finding.present and finding.volume_ml == 0.0
