"""The reference model on head CTs it was not generated for: the independent source.

:mod:`pipeline.lab.holdout` builds skull, CSF, dura, calcifications, bleeds, slice
profile, artefacts and noise its own way; it shares only the atlas file with the
training phantom and is never used for training or calibration. Seeds 6,000,000+ are
used neither by the model card's evaluation (5,000,000+) nor anywhere else. Assertions
are on the study-level result a radiologist sees, and on the probability agreeing with it.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.ai.findings import Priority
from pipeline.ai.inference import analyze_study, run_model
from pipeline.lab.holdout.study import make_holdout_case
from pipeline.lab.phantom.generator import case_volume, make_head_case

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("atlas")  # the real head-CT atlas both sources start from

WHOLE, PARTIAL = None, 0.6  # slices: the whole head, or 60 % of it around its centre


def test_the_independent_source_shares_nothing_with_the_training_phantom_but_the_atlas_file() -> None:
    imported = set()
    for path in (ROOT / "pipeline" / "lab" / "holdout").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert {m for m in imported if m.startswith("pipeline.lab.phantom")} == {"pipeline.lab.phantom.atlas"}


def test_a_bleed_of_known_volume_is_acute_blood_and_a_normal_head_has_none() -> None:
    bleed = make_holdout_case(6_100_000, "hemorrhage", kinds=["intraparenchymal"], rows=160, slice_thickness=5.0)
    normal = make_holdout_case(6_100_001, "none", rows=160, slice_thickness=2.5)
    assert 1.5 < bleed.volume_ml < 25  # drawn 2-20 ml, measured after the slice profile
    assert 50 < np.median(bleed.volume_hu[bleed.label]) < 95
    assert not normal.label.any() and normal.spacing[0] == 2.5
    assert (normal.volume_hu > 1000).any() and (normal.volume_hu < -900).mean() > 0.2  # bone, air


CASES = [
    (6_000_001, "intraparenchymal", 5.0, WHOLE),
    (6_000_002, "subdural", 2.5, WHOLE),
    (6_000_003, "epidural", 5.0, PARTIAL),
    (6_000_004, "intraventricular", 2.5, WHOLE),
    (6_000_005, None, 5.0, WHOLE),
    (6_000_006, None, 2.5, WHOLE),
    (6_000_007, None, 5.0, PARTIAL),
    (6_000_008, None, 2.5, PARTIAL),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "kind", "thickness", "part"),
    CASES,
    ids=[f"{c[0]}-{c[1] or 'none'}-{c[2]}mm-{'partial' if c[3] else 'whole'}" for c in CASES],
)
def test_on_the_independent_source_normal_heads_are_silent_and_bleeds_are_found(
    reference_model,
    seed: int,
    kind: str | None,  # type: ignore[no-untyped-def]
    thickness: float,
    part: float | None,
) -> None:
    slices = round(180 / thickness * part) if part else None
    case = make_holdout_case(
        seed,
        "hemorrhage" if kind else "none",
        kinds=[kind] if kind else None,
        rows=256,
        slice_thickness=thickness,
        slices=slices,
    )
    assert kind is None or case.volume_ml > 1.0, "the bleed must be inside the scanned range"

    result = run_model(reference_model, case_volume(case, seed=seed), device="cpu")

    (found,) = result.findings
    assert found.present == (found.probability >= 0.5)  # the probability is the decision's
    if kind:
        assert found.present, f"missed a {kind} bleed of {case.volume_ml:.1f} ml (p={found.probability:.2f})"
        assert result.priority in (Priority.URGENT, Priority.CRITICAL)
        assert (found.mask & case.label).sum() > 0.3 * case.label.sum()  # on the bleed, not elsewhere
    else:
        assert not found.present, f"false alarm on a normal head: {found.volume_ml:.1f} ml, p={found.probability:.2f}"
        assert result.priority is Priority.ROUTINE and not found.mask.any()


@pytest.mark.slow
def test_the_seed_7_study_gets_a_decision_and_a_probability_that_agree(registry) -> None:  # type: ignore[no-untyped-def]
    """``radtriage synth --seed 7 --finding hemorrhage`` once came back "absent, p 0.963"."""
    from pipeline.lab.phantom.generator import volume_generator
    from pipeline.lab.synth import synth_study

    with tempfile.TemporaryDirectory() as tmp:
        synth_study(Path(tmp), seed=7, volume=volume_generator("hemorrhage"))
        (analysis,) = analyze_study(registry, Path(tmp), model_name="head_ct_hemorrhage", device="cpu")

    (found,) = analysis.result.findings
    assert found.present == (found.probability >= 0.5), f"present={found.present} with p={found.probability:.3f}"
    assert (analysis.result.priority is Priority.ROUTINE) == (not found.present)
    # The study synth_study made: the generator's own seed drawn from seed 7 (a subdural, ~29 ml).
    truth = make_head_case(int(np.random.default_rng(7).integers(2**31)), "hemorrhage", slices=40)
    assert truth.volume_ml > 2.0
    assert found.present, f"missed a {truth.volume_ml:.1f} ml bleed (p={found.probability:.2f})"
