"""Evaluate a registered model on generated studies, through the real inference path.

Each study is made by a generator (the training phantom, or the independent source in
:mod:`pipeline.lab.holdout`, which is for evaluation only) at a scanner geometry, run through
:func:`pipeline.ai.inference.run_model` exactly as the flow would run it, and compared
with the generator's true mask: study-level detection, Dice and volume error.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.ai.registry import RegisteredModel
from pipeline.ai.spec import FindingSpec
from pipeline.lab.phantom.generator import case_volume

if TYPE_CHECKING:
    from pipeline.ai.volume import Volume


class Case(Protocol):
    """What the evaluation reads of a generated study (phantom or independent source)."""

    volume_hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    kinds: list[Any]

    @property
    def volume_ml(self) -> float: ...


class Recipe(Protocol):
    seed: int

    def make(self) -> Case: ...


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
            **self._goal_metrics(),
            "seconds_per_study_median": round(float(np.median([o.seconds for o in self.outcomes])), 2)
            if self.outcomes
            else None,
        }

    def _goal_metrics(self) -> dict[str, object]:
        """The issue's goals: sensitivity for bleeds of 2 ml and more, volume error from 5 ml,
        and whether the reported probability agrees with the decision (and how well it is calibrated)."""
        big = [o for o in self.outcomes if o.truth_present and o.truth_ml >= 2.0]
        large = [o for o in self.outcomes if o.truth_present and o.truth_ml >= 5.0]
        relative = [abs(o.predicted_ml - o.truth_ml) / o.truth_ml for o in large]
        probabilities = [o.probability for o in self.outcomes]
        truth = [float(o.truth_present) for o in self.outcomes]
        found = sum(o.predicted_present for o in big)
        negatives = self._count(False, False) + self._count(False, True)
        return {
            "with_bleed_2ml": len(big),
            "sensitivity_2ml": round(found / len(big), 3) if big else None,
            "sensitivity_2ml_ci95": wilson_interval(found, len(big)),
            "specificity_ci95": wilson_interval(self._count(False, False), negatives),
            "with_bleed_5ml": len(large),
            "volume_relative_error_median_5ml": round(float(np.median(relative)), 3) if relative else None,
            "volume_relative_error_mean_5ml": round(float(np.mean(relative)), 3) if relative else None,
            "absent_probability_max": max(
                (o.probability for o in self.outcomes if not o.predicted_present), default=None
            ),
            "present_probability_min": min((o.probability for o in self.outcomes if o.predicted_present), default=None),
            "brier_score": round(float(np.mean((np.array(probabilities) - np.array(truth)) ** 2)), 4)
            if probabilities
            else None,
        }

    def to_dict(self) -> dict[str, object]:
        return {"summary": self.summary(), "studies": [asdict(o) for o in self.outcomes]}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95 % with the default ``z``), rounded to 3 places.

    A test set's sensitivity or specificity is an estimate: 16 of 17 normals is 0.94, and
    17 of 17 would still not show 0.95 with any confidence. The interval says how far the
    number can be trusted; unlike the normal approximation it stays inside [0, 1] and is
    not empty at 0 or ``trials`` successes. None without trials.
    """
    if trials <= 0:
        return None
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def evaluate_model(
    model: RegisteredModel,
    recipes: Iterable[Recipe],
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
BONE_DISTANCE_CANDIDATES_MM = (0.0, 2.0, 3.0, 4.0)
MIN_HU_CANDIDATES = (None, 35.0, 40.0, 45.0)
GROW_CANDIDATES = (0.4, 0.3, 0.2, 0.1)  # hysteresis: besides not growing at all
MAX_HU = 300.0  # bone: never blood
OFFSET_ML = 0.1


@dataclass
class Calibration:
    """The study-level rule chosen on validation studies, and how it was chosen."""

    min_volume_ml: float
    min_component_ml: float
    sensitivity: float
    specificity: float
    studies: list[tuple[bool, float]]  # (truth present, volume detected under the chosen rule, before growing)
    min_bone_distance_mm: float = 0.0
    min_hu: float | None = None
    max_hu: float | None = None
    grow_threshold: float | None = None
    slope: float | None = None  # of the study probability, see pipeline.ai.spec.StudyProbability
    volume_relative_error_median: float | None = None  # validation bleeds of 2 ml and more
    truth_ml: list[float] = field(default_factory=list)
    min_bleed_ml: float = 0.0  # smaller validation bleeds took no part in the choice

    @property
    def fitted_studies(self) -> int:
        """How many validation studies the rule and the slope were chosen on."""
        return sum(
            1
            for (truth, _), ml in zip(self.studies, self.truth_ml, strict=True)
            if not truth or ml >= self.min_bleed_ml
        )

    def finding_fields(self) -> dict[str, object]:
        """The fields of a ``configs/triage.json`` finding this calibration sets."""
        fields: dict[str, object] = {
            "min_component_ml": self.min_component_ml,
            "min_volume_ml": self.min_volume_ml,
            "min_bone_distance_mm": self.min_bone_distance_mm,
            "bone_hu": MAX_HU,
            "min_hu": self.min_hu,
            "max_hu": self.max_hu,
            "grow_threshold": self.grow_threshold,
        }
        if self.slope is not None:
            fields["study_probability"] = {
                "method": "logistic_log_volume",
                "slope": self.slope,
                "offset_ml": OFFSET_ML,
                "fitted_on": f"{self.fitted_studies} validation studies of the training generator"
                + (f" (bleeds of {self.min_bleed_ml:g} ml and more, and normals)" if self.min_bleed_ml else ""),
            }
        return fields


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


def fit_slope(volumes: list[tuple[bool, float]], threshold_ml: float, offset_ml: float = OFFSET_ML) -> float:
    """Slope of ``p = sigmoid(slope * (ln(v + offset) - ln(threshold + offset)))`` by maximum likelihood.

    Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) keep the slope finite
    when the validation studies separate perfectly, as they often do: the probability
    then says how sure a study of that volume can be, given how many were seen.
    """
    from scipy.optimize import minimize_scalar

    positives = sum(t for t, _ in volumes)
    negatives = len(volumes) - positives
    hi, lo = (positives + 1) / (positives + 2), 1 / (negatives + 2)
    x = np.array([math.log(v + offset_ml) - math.log(threshold_ml + offset_ml) for _, v in volumes])
    y = np.array([hi if t else lo for t, _ in volumes])

    def loss(slope: float) -> float:
        z = np.clip(slope * x, -60, 60)
        return float(np.sum(np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y)))

    return round(float(minimize_scalar(loss, bounds=(0.05, 50.0), method="bounded").x), 3)


@dataclass
class Growth:
    """The components of one HU-gate candidate grown to one probability (:func:`pipeline.ai.measure.grow`).

    Growing is hysteresis, so the grown mask of any set of components is the union of
    the regions (connected components of the gated low-probability mask) they lie in.
    """

    region: list[int]  # per component: the index of its region
    regions_ml: list[float]  # per region index (0: outside every region)

    def volume_ml(self, kept: Iterable[int]) -> float:
        return sum(self.regions_ml[r] for r in {self.region[i] for i in kept})


@dataclass
class ValidationStudy:
    """One validation study as :func:`choose_rule` needs it: the truth and, per HU-gate
    candidate, each component found (its ml, farthest distance from bone, ml on the truth)
    and, per HU-gate and growing candidate, how the components grow."""

    truth: bool
    truth_ml: float
    components: dict[float | None, list[tuple[float, float, float]]]  # min_hu -> (ml, bone mm, ml on truth)
    grown: dict[tuple[float | None, float], Growth] = field(default_factory=dict)  # (min_hu, grow_threshold)

    def volume_ml(self, min_hu: float | None, component_ml: float, bone_mm: float, grow: float | None) -> float:
        """What the rule leaves: components of at least ``component_ml`` reaching ``bone_mm``
        from bone, grown to ``grow`` (None: not grown)."""
        found = self.components[min_hu]
        kept = [i for i, (ml, far, _) in enumerate(found) if ml >= component_ml and far >= bone_mm]
        if grow is None or not kept:
            return sum(found[i][0] for i in kept)
        return self.grown[(min_hu, grow)].volume_ml(kept)


def _measure(
    model: RegisteredModel, recipes: Iterable[Recipe], spec: FindingSpec, device: str
) -> list[ValidationStudy]:
    from pipeline.ai.inference import load_model, predict

    loaded = load_model(model, device)
    out = []
    for item in recipes:
        case = item.make()
        volume = case_volume(case, seed=item.seed)  # type: ignore[arg-type]
        out.append(measure_study(predict(loaded, volume)[spec.channel], volume, case.label, spec))
    return out


def measure_study(probability: np.ndarray, volume: "Volume", truth: np.ndarray, spec: FindingSpec) -> ValidationStudy:
    """One validation study's components under every rule candidate (see :func:`choose_rule`)."""
    from scipy import ndimage as ndi

    from pipeline.ai.cranium import cranial_cavity
    from pipeline.ai.measure import bone_distances_mm, components, hu_inside, smoothed_hu

    cap = max(BONE_DISTANCE_CANDIDATES_MM)
    lowest = min((spec.voxel_threshold, *GROW_CANDIDATES))
    cavity = np.ones(volume.shape, dtype=bool)
    if spec.within_cranium:  # once per study, on every slice a candidate can reach
        cavity = cranial_cavity(volume, spec.bone_hu, np.flatnonzero((probability >= lowest).any(axis=(1, 2))))
    hu = smoothed_hu(volume)  # once per study: the gate of pipeline.ai.measure.hu_gate
    raw = (probability >= spec.voxel_threshold) & cavity
    voxel_ml = volume.voxel_volume_ml
    found: dict[float | None, list[tuple[float, float, float]]] = {}
    grown: dict[tuple[float | None, float], Growth] = {}
    reach: tuple[slice, ...] | None = None
    for min_hu in MIN_HU_CANDIDATES:
        gate = hu_inside(hu, min_hu, MAX_HU)
        labels, count = components(raw & gate)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
        on_truth = np.bincount(labels[truth].ravel(), minlength=count + 1)[1:] * voxel_ml
        far = bone_distances_mm(labels, count, volume, MAX_HU, cap)
        found[min_hu] = [(float(a), float(b), float(c)) for a, b, c in zip(sizes, far, on_truth, strict=True)]
        if count == 0:
            continue
        # Every grown region lies inside a component of the lowest candidate's mask that
        # holds a core: label within that box only.
        if reach is None:
            low, _ = components((probability >= lowest) & cavity)
            (reach,) = ndi.find_objects(np.isin(low, np.unique(low[raw])).astype(np.uint8))
        cores = labels[reach]
        inside = np.flatnonzero(cores.ravel())
        first = inside[np.unique(cores.ravel()[inside], return_index=True)[1]]  # one voxel of each
        for grow in GROW_CANDIDATES:
            regions, n = components((probability[reach] >= grow) & gate[reach] & cavity[reach])
            ml = np.bincount(regions.ravel(), minlength=n + 1) * voxel_ml
            grown[(min_hu, grow)] = Growth([int(r) for r in regions.ravel()[first]], [float(v) for v in ml])
    truth_ml = float(truth.sum() * voxel_ml)
    return ValidationStudy(bool(truth.any()), truth_ml, found, grown)


def calibrate_min_volume(
    model: RegisteredModel,
    recipes: Iterable[Recipe],
    *,
    finding_label: str | None = None,
    device: str = "auto",
    floor_ml: float = 0.1,
    component_candidates_ml: Iterable[float] = COMPONENT_CANDIDATES_ML,
    min_bleed_ml: float = 0.0,
) -> Calibration:
    """Choose the study-level rule and the study probability on validation studies.

    Candidates: the HU gate's lower end (``min_hu``; bone, >= 300 HU, is always out),
    the speck size ``min_component_ml``, the bone distance under which a component is
    a partial-volume sliver (``min_bone_distance_mm``), the volume threshold
    ``min_volume_ml`` and the probability down to which a present finding is grown for
    measuring (``grow_threshold``, :data:`GROW_CANDIDATES` or none). The highest Youden
    index (sensitivity + specificity - 1) of the detected volumes wins (growing takes no
    part in the decision); among ties, the smallest median relative error of the
    measured (grown) volume on validation bleeds of 2 ml and more (0 ml where the
    finding would be absent), then the volume threshold with the widest gap to the
    nearest study on either side (it sits in the geometric middle of that gap), so that
    the rule does not hinge on one validation study, then the shorter bone distance and
    the less growing. The gap's lower edge is never below the candidate's
    ``min_component_ml`` (or ``floor_ml``): a study's volume is 0 or at least one
    component, so when every validation normal measures 0 ml the threshold is set by the
    rule itself, not by an arbitrary floor. The slope of the study probability is then
    fitted (:func:`fit_slope`). Use seeds that neither training nor the final evaluation
    uses; never the independent test source.

    ``min_bleed_ml``: validation bleeds smaller than this take no part in choosing the
    rule or fitting the slope (a goal stated for bleeds of 2 ml and more should not let
    a 1 ml validation bleed pull the threshold down to where specks on normal heads lie);
    they are still measured and reported in :attr:`Calibration.studies`.
    """
    spec = next(f for f in model.spec.findings if f.label == (finding_label or model.spec.findings[0].label))
    studies = _measure(model, recipes, spec, device)
    return choose_rule(
        studies, floor_ml=floor_ml, component_candidates_ml=component_candidates_ml, min_bleed_ml=min_bleed_ml
    )


def _found(study: ValidationStudy) -> list[float | None]:
    """The HU-gate candidates under which ``study`` has components (only those can grow)."""
    return [m for m, found in study.components.items() if found]


def choose_rule(
    studies: list[ValidationStudy],
    *,
    floor_ml: float = 0.1,
    component_candidates_ml: Iterable[float] = COMPONENT_CANDIDATES_ML,
    min_bleed_ml: float = 0.0,
) -> Calibration:
    """The choice of :func:`calibrate_min_volume` on studies already measured."""

    growing = [None, *(g for g in GROW_CANDIDATES if all((m, g) in st.grown for st in studies for m in _found(st)))]

    def volumes(
        min_hu: float | None, component: float, bone: float, grow: float | None, everyone: bool = False
    ) -> list[tuple[bool, float, float]]:
        return [
            (st.truth, st.volume_ml(min_hu, component, bone, grow), st.truth_ml)
            for st in studies
            if everyone or not st.truth or st.truth_ml >= min_bleed_ml
        ]

    choices = []
    for min_hu in MIN_HU_CANDIDATES:
        for component in sorted(component_candidates_ml):
            for bone in BONE_DISTANCE_CANDIDATES_MM:
                detected = [(t, v) for t, v, _ in volumes(min_hu, component, bone, None)]
                youden, margin, threshold = _best_threshold(detected, max(floor_ml, component))
                for rank, grow in enumerate(growing):  # growing measures, it never decides
                    rows = volumes(min_hu, component, bone, grow)
                    errors = [  # what inference reports: 0 ml when the detected volume is under the threshold
                        abs((v if found >= threshold else 0.0) - ml) / ml
                        for (t, v, ml), (_, found) in zip(rows, detected, strict=True)
                        if t and ml >= 2.0
                    ]
                    error = round(float(np.median(errors)), 2) if errors else 0.0
                    choices.append((youden, -error, margin, -bone, -rank, threshold, component, min_hu, grow))
    youden, error, _, bone, _, threshold, component, min_hu, grow = max(choices, key=lambda c: c[:5])
    chosen = [(t, v) for t, v, _ in volumes(min_hu, component, -bone, None)]
    threshold = round(threshold, 2)
    sensitivity, specificity = _rates(chosen, threshold)
    slope = fit_slope(chosen, threshold)
    rows = volumes(min_hu, component, -bone, None, everyone=True)
    return Calibration(
        min_volume_ml=threshold,
        min_component_ml=component,
        sensitivity=sensitivity,
        specificity=specificity,
        studies=[(t, v) for t, v, _ in rows],
        min_bone_distance_mm=-bone,
        min_hu=min_hu,
        max_hu=MAX_HU,
        grow_threshold=grow,
        slope=slope,
        volume_relative_error_median=-error,
        truth_ml=[ml for _, _, ml in rows],
        min_bleed_ml=min_bleed_ml,
    )
