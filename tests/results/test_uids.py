"""Result UIDs: the same study state and model version give the same objects."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from pipeline.results import result_uids

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"


def test_same_study_state_and_model_give_the_same_uids() -> None:
    first = result_uids(STUDY, "ich-detector", "1.2.0", 3)
    again = result_uids(STUDY, "ich-detector", "1.2.0", 3)
    assert first == again
    assert len(set(first)) == 4, "SEG/SR series and instances need four distinct UIDs"
    for uid in first:
        assert UID(uid).is_valid, uid


@pytest.mark.parametrize(
    "changed",
    [
        ("1.2.826.0.1.3680043.8.498.1234567891", "ich-detector", "1.2.0", 3),  # other study
        (STUDY, "ich-detector2", "1.2.0", 3),  # other model
        (STUDY, "ich-detector", "1.2.1", 3),  # new model version
        (STUDY, "ich-detector", "1.2.0", 4),  # study changed: new revision
        (STUDY, "ich-detecto", "r1.2.0", 3),  # same characters, other split
    ],
)
def test_any_change_gives_new_uids(changed: tuple[str, str, str, int]) -> None:
    base = set(result_uids(STUDY, "ich-detector", "1.2.0", 3))
    assert base.isdisjoint(result_uids(*changed))


@pytest.mark.parametrize(
    "args",
    [("", "m", "1", 0), (STUDY, "", "1", 0), (STUDY, "m", "", 0), (STUDY, "m", "1", -1), (STUDY, "m", "1", True)],
)
def test_bad_arguments_are_refused(args: tuple[str, str, str, int]) -> None:
    with pytest.raises(ValueError):
        result_uids(*args)
