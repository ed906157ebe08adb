"""The study-level rule is chosen on validation volumes, and away from any one study."""

from __future__ import annotations

import math

import pytest

from pipeline.lab.evaluate import (
    MIN_HU_CANDIDATES,
    ValidationStudy,
    _best_threshold,
    _rates,
    choose_rule,
    wilson_interval,
)

pytestmark = pytest.mark.usefixtures("atlas")  # the real head-CT atlas the phantom is made of


def test_the_threshold_separates_and_sits_in_the_middle_of_the_widest_gap() -> None:
    volumes = [(False, 0.0), (False, 0.4), (False, 1.0), (True, 4.0), (True, 9.0), (True, 30.0)]

    youden, margin, threshold = _best_threshold(volumes, floor_ml=0.1)

    assert youden == pytest.approx(1.0)
    assert threshold == pytest.approx(2.0)  # sqrt(1 * 4), not just above the largest normal study
    assert margin == pytest.approx(math.log(4.0))
    assert _rates(volumes, threshold) == (1.0, 1.0)


def test_overlap_keeps_the_best_youden_index() -> None:
    volumes = [(False, 0.0), (False, 3.0), (True, 2.0), (True, 5.0), (True, 8.0)]

    youden, _, threshold = _best_threshold(volumes, floor_ml=0.1)

    sensitivity, specificity = _rates(volumes, threshold)
    assert youden == pytest.approx(sensitivity + specificity - 1)
    assert (sensitivity, specificity) in [(1.0, 0.5), (2 / 3, 1.0)]
    # Nothing better exists among all cuts.
    for cut in (0.1, 1.0, 2.5, 4.0, 6.0, 9.0):
        assert sum(_rates(volumes, cut)) - 1 <= youden + 1e-9


def _study(truth_ml: float, found_ml: float) -> ValidationStudy:
    """A validation study whose one component, far from bone, measured ``found_ml``."""
    return ValidationStudy(
        truth_ml > 0, truth_ml, {m: [(found_ml, 6.0, min(found_ml, truth_ml))] for m in MIN_HU_CANDIDATES}
    )


def test_bleeds_under_the_goals_size_do_not_pull_the_threshold_down() -> None:
    """Normals find up to 0.5 ml; a 1 ml bleed is measured 0.6 ml; the others 3 ml and more."""
    studies = [_study(0.0, v) for v in (0.0, 0.2, 0.5)] + [_study(1.0, 0.6)] + [_study(m, m) for m in (3.0, 8.0, 20.0)]

    everyone = choose_rule(studies)
    goal = choose_rule(studies, min_bleed_ml=2.0)

    assert everyone.min_volume_ml == pytest.approx(math.sqrt(0.5 * 0.6), abs=0.01)  # hugging the normals
    assert goal.min_volume_ml == pytest.approx(math.sqrt(0.5 * 3.0), abs=0.01)  # the middle of the wide gap
    assert (goal.sensitivity, goal.specificity) == (1.0, 1.0)
    assert len(goal.studies) == 7 and goal.fitted_studies == 6  # the 1 ml bleed is reported, not fitted
    assert goal.finding_fields()["study_probability"]["fitted_on"].startswith("6 validation studies")


def test_with_every_normal_at_0_ml_the_gap_starts_at_the_component_size() -> None:
    """A normal study measures 0 ml or at least one component: nothing lies between."""
    studies = [_study(0.0, 0.0) for _ in range(4)] + [_study(m, m * 0.8) for m in (2.5, 6.0, 15.0)]

    calibration = choose_rule(studies, component_candidates_ml=(0.5,))

    assert calibration.min_component_ml == 0.5
    assert calibration.min_volume_ml == pytest.approx(math.sqrt(0.5 * 2.0), abs=0.01)  # not sqrt(0.1 * 2.0)


def test_growing_is_chosen_on_validation_only_when_it_brings_the_volumes_closer() -> None:
    """The core finds 70 % of each bleed; growing to 0.3 finds it all, lower overshoots."""
    from pipeline.lab.evaluate import GROW_CANDIDATES, Growth

    reach = {0.4: 0.85, 0.3: 1.0, 0.2: 1.3, 0.1: 1.8}
    studies = [ValidationStudy(False, 0.0, {m: [] for m in MIN_HU_CANDIDATES}) for _ in range(4)]  # nothing found
    for ml in (2.5, 6.0, 15.0, 40.0):
        study = _study(ml, 0.7 * ml)
        study.grown = {(m, g): Growth([1], [0.0, reach[g] * ml]) for m in MIN_HU_CANDIDATES for g in reach}
        studies.append(study)
    assert set(reach) == set(GROW_CANDIDATES)

    calibration = choose_rule(studies)

    assert calibration.grow_threshold == 0.3
    assert calibration.volume_relative_error_median == 0.0
    assert calibration.finding_fields()["grow_threshold"] == 0.3
    for study in studies:  # without growing measured, nothing is grown
        study.grown = {}
    assert choose_rule(studies).grow_threshold is None


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(5, 10, (0.237, 0.763)), (0, 10, (0.0, 0.278)), (17, 17, (0.816, 1.0)), (16, 17, (0.730, 0.990))],
)
def test_wilson_interval_matches_the_textbook_values(
    successes: int, trials: int, expected: tuple[float, float]
) -> None:
    low, high = wilson_interval(successes, trials)  # type: ignore[misc]
    assert low == pytest.approx(expected[0], abs=0.0015) and high == pytest.approx(expected[1], abs=0.0015)


def test_wilson_interval_of_no_trials_is_none() -> None:
    assert wilson_interval(0, 0) is None
