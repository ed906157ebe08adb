"""Evaluate a registered model on generated studies, through the real inference path.

Each study is made by the phantom generator at a scanner geometry, run through
:func:`pipeline.ai.inference.run_model` exactly as the flow would run it, and compared
with the generator's true mask: study-level detection, Dice and volume error.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.ai.registry import RegisteredModel
from pipeline.lab.phantom.dataset import CaseRecipe
from pipeline.lab.phantom.generator import case_volume


@dataclass
class StudyOutcome:
    seed: int
    kinds: list[str]
    truth_present: bool
    predicted_present: bool
    probability: float
    truth_ml: float
    predicted_ml: float
    dice: float | None
    seconds: float
    shape: tuple[int, int, int]


@dataclass
class Evaluation:
    """Study-level and voxel-level results of one model on one set of studies."""

    outcomes: list[StudyOutcome] = field(default_factory=list)

    def _count(self, truth: bool, predicted: bool) -> int:
        return sum(o.truth_present == truth and o.predicted_present == predicted for o in self.outcomes)

    @property
    def sensitivity(self) -> float:
        positives = self._count(True, True) + self._count(True, False)
        return self._count(True, True) / positives if positives else float("nan")

    @property
    def specificity(self) -> float:
        negatives = self._count(False, False) + self._count(False, True)
        return self._count(False, False) / negatives if negatives else float("nan")

    def summary(self) -> dict[str, object]:
        positives = [o for o in self.outcomes if o.truth_present]
        dice = [o.dice for o in positives if o.dice is not None]
        errors = [o.predicted_ml - o.truth_ml for o in positives]
        by_kind: dict[str, list[bool]] = {}
        for o in positives:
            for kind in o.kinds:
                by_kind.setdefault(kind, []).append(o.predicted_present)
        return {
            "studies": len(self.outcomes),
            "with_bleed": len(positives),
            "without_bleed": len(self.outcomes) - len(positives),
            "true_positives": self._count(True, True),
            "false_negatives": self._count(True, False),
            "true_negatives": self._count(False, False),
            "false_positives": self._count(False, True),
            "sensitivity": round(self.sensitivity, 3),
            "specificity": round(self.specificity, 3),
            "dice_mean": round(float(np.mean(dice)), 3) if dice else None,
            "dice_median": round(float(np.median(dice)), 3) if dice else None,
            "volume_error_ml_mean": round(float(np.mean(errors)), 2) if errors else None,
            "volume_abs_error_ml_median": round(float(np.median(np.abs(errors))), 2) if errors else None,
            "volume_relative_error_median": round(
                float(np.median([abs(o.predicted_ml - o.truth_ml) / o.truth_ml for o in positives if o.truth_ml > 0])),
                3,
            )
            if positives
            else None,
            "sensitivity_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
            "seconds_per_study_median": round(float(np.median([o.seconds for o in self.outcomes])), 2)
            if self.outcomes
            else None,
        }

    def to_dict(self) -> dict[str, object]:
        return {"summary": self.summary(), "studies": [asdict(o) for o in self.outcomes]}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def evaluate_model(
    model: RegisteredModel,
    recipes: Iterable[CaseRecipe],
    *,
    finding_label: str | None = None,
    device: str = "auto",
    progress: Callable[[StudyOutcome], object] | None = None,
) -> Evaluation:
    """Run ``model`` on each generated study and compare with the truth.

    ``finding_label`` picks which of the model's findings is compared (default: the first).
    """
    from pipeline.ai.inference import run_model

    label = finding_label or model.spec.findings[0].label
    evaluation = Evaluation()
    for item in recipes:
        case = item.make()
        volume = case_volume(case, seed=item.seed)
        started = time.perf_counter()
        result = run_model(model, volume, device)
        seconds = time.perf_counter() - started
        finding = next(f for f in result.findings if f.label == label)
        truth = bool(case.label.any())
        outcome = StudyOutcome(
            seed=item.seed,
            kinds=[k.value for k in case.kinds],
            truth_present=truth,
            predicted_present=finding.present,
            probability=round(finding.probability, 4),
            truth_ml=round(case.volume_ml, 3),
            predicted_ml=round(finding.volume_ml, 3),
            dice=round(dice(finding.mask, case.label), 4) if truth else None,
            seconds=round(seconds, 3),
            shape=tuple(case.volume_hu.shape),  # type: ignore[arg-type]
        )
        evaluation.outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    return evaluation


COMPONENT_CANDIDATES_ML = (0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass
class Calibration:
    """The study-level rule chosen on validation studies, and how it was chosen."""

    min_volume_ml: float
    min_component_ml: float
    sensitivity: float
    specificity: float
    studies: list[tuple[bool, float]]  # (truth present, volume found under the chosen speck size)


def _rates(volumes: list[tuple[bool, float]], threshold: float) -> tuple[float, float]:
    pos = [v >= threshold for t, v in volumes if t]
    neg = [v < threshold for t, v in volumes if not t]
    return (sum(pos) / len(pos) if pos else 1.0), (sum(neg) / len(neg) if neg else 1.0)


def _best_threshold(volumes: list[tuple[bool, float]], floor_ml: float) -> tuple[float, float, float]:
    """``(youden, margin, threshold)``: the best cut between two neighbouring volumes.

    The threshold sits at the geometric middle of the gap it cuts (volumes below
    ``floor_ml`` count as ``floor_ml``); ``margin`` is the log width of that gap.
    """
    values = sorted({max(v, floor_ml) for _, v in volumes} | {floor_ml})
    best = (-1.0, 0.0, floor_ml)
    for low, high in itertools.pairwise(values):
        threshold = math.sqrt(low * high)
        sensitivity, specificity = _rates(volumes, threshold)
        best = max(best, (round(sensitivity + specificity - 1, 9), math.log(high / low), threshold))
    return best


def calibrate_min_volume(
    model: RegisteredModel,
    recipes: Iterable[CaseRecipe],
    *,
    finding_label: str | None = None,
    device: str = "auto",
    floor_ml: float = 0.1,
    component_candidates_ml: Iterable[float] = COMPONENT_CANDIDATES_ML,
) -> Calibration:
    """Choose ``min_component_ml`` and ``min_volume_ml`` on validation studies.

    A finding is present when the components of at least ``min_component_ml`` add up to
    ``min_volume_ml``. The pair with the highest Youden index (sensitivity +
    specificity - 1) wins; among ties, the one whose volume threshold has the widest gap
    to the nearest study on either side (it sits in the geometric middle of that gap), so
    that the rule does not hinge on one validation study. Use seeds that neither
    training nor the final evaluation uses.
    """
    from pipeline.ai.inference import load_model, predict
    from pipeline.ai.measure import components

    spec = next(f for f in model.spec.findings if f.label == (finding_label or model.spec.findings[0].label))
    loaded = load_model(model, device)
    found: list[tuple[bool, list[float]]] = []
    for item in recipes:
        case = item.make()
        volume = case_volume(case, seed=item.seed)
        labels, count = components(predict(loaded, volume)[spec.channel] >= spec.voxel_threshold)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * volume.voxel_volume_ml
        found.append((bool(case.label.any()), [float(s) for s in sizes]))

    def volumes(min_component_ml: float) -> list[tuple[bool, float]]:
        return [(truth, sum(s for s in sizes if s >= min_component_ml)) for truth, sizes in found]

    choices = [(*_best_threshold(volumes(c), floor_ml), c) for c in sorted(component_candidates_ml)]
    _, _, threshold, component = max(choices)
    chosen = volumes(component)
    sensitivity, specificity = _rates(chosen, round(threshold, 2))
    return Calibration(round(threshold, 2), component, sensitivity, specificity, chosen)
