"""The study-level rule is chosen on validation volumes, and away from any one study."""

from __future__ import annotations

import math

import pytest

from pipeline.lab.evaluate import _best_threshold, _rates

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
