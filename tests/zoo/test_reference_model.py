"""The reference model finds bleeds in studies it never saw, and stays silent without one.

Seeds 3,000,000+ were used neither for training (0-159) nor for the model card's
evaluation (1,000,000+). Assertions are on the study-level result a radiologist sees.
Some scans cover the whole head, others only part of it (the first or last image cuts
through the brain).
"""

from __future__ import annotations

import pytest

from pipeline.ai.findings import Priority
from pipeline.ai.inference import run_model
from pipeline.lab.phantom.generator import case_volume, make_head_case

pytestmark = pytest.mark.usefixtures("atlas")  # the real head-CT atlas the phantom is made of

GEOMETRY = dict(rows=256, columns=256, pixel_spacing=0.9, slice_thickness=5.0)
WHOLE, PARTIAL = None, 24  # slices: the whole head, or 120 mm of it around its centre
# Known failures of 0.5.0 (and 0.4.0) on the randomised generator (card: specificity 0.94 there), strict,
# so a model that fixes them turns these into errors to remove: 3000002's subdural is found
# but only 11 % of it is segmented; 3000006 is a 1.0 ml false alarm (p 0.66).
KNOWN = pytest.mark.xfail(strict=True, reason="0.5.0 under-segments this / false alarm; see the model card")
CASES = [
    (3_000_001, "hemorrhage", "intraparenchymal", WHOLE),
    pytest.param(3_000_002, "hemorrhage", "subdural", WHOLE, marks=KNOWN),
    (3_000_003, "hemorrhage", "epidural", PARTIAL),
    (3_000_004, "hemorrhage", "intraventricular", WHOLE),
    (3_000_005, "none", None, WHOLE),
    pytest.param(3_000_006, "none", None, WHOLE, marks=KNOWN),
    (3_000_007, "none", None, PARTIAL),
    (3_000_008, "none", None, PARTIAL),
]


@pytest.mark.parametrize(
    ("seed", "finding", "kind", "slices"),
    CASES,
    ids=[f"{v[0]}-{v[2] or 'none'}-{'partial' if v[3] else 'whole'}" for v in (getattr(c, "values", c) for c in CASES)],
)
def test_bleeds_are_found_and_normal_heads_are_silent(
    reference_model,
    seed: int,
    finding: str,
    kind: str | None,  # type: ignore[no-untyped-def]
    slices: int | None,
) -> None:
    case = make_head_case(seed, finding, kinds=[kind] if kind else None, slices=slices, **GEOMETRY)
    assert finding == "none" or case.volume_ml > 0.5, "the bleed must be inside the scanned range"
    volume = case_volume(case, seed=seed)

    result = run_model(reference_model, volume, device="cpu")

    (found,) = result.findings
    assert result.source_sop_instance_uids == volume.sop_instance_uids
    if finding == "hemorrhage":
        assert found.present, f"missed a {kind} bleed of {case.volume_ml:.1f} ml (p={found.probability:.2f})"
        assert result.priority in (Priority.URGENT, Priority.CRITICAL)
        assert (found.mask & case.label).sum() > 0.3 * case.label.sum()  # on the bleed, not elsewhere
        assert found.volume_ml == pytest.approx(case.volume_ml, rel=0.6, abs=1.0)
    else:
        assert not found.present, f"false alarm: {found.volume_ml:.1f} ml, p={found.probability:.2f}"
        assert result.priority is Priority.ROUTINE
        assert not found.mask.any()
