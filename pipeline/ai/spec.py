"""The triage spec: ``configs/triage.json`` in every model bundle.

It says which series a model reads and what its output channels mean clinically:
the label, the SNOMED CT codes for SEG segments and SR findings, and how a finding
turns into a worklist priority. :func:`load_spec` refuses a bad spec with a message
that names the field.

Example (abridged)::

    {
      "series": {"modality": ["CT"], "body_part_examined": ["HEAD", "BRAIN"],
                 "image_type_excluded": ["LOCALIZER"], "min_slices": 16,
                 "slice_thickness_mm": {"min": 0.5, "max": 6},
                 "prefer": ["closest_thickness", "most_slices"],
                 "target_slice_thickness_mm": 5},
      "findings": [{"channel": 1, "label": "Intracranial hemorrhage",
                    "category": {"value": "49755003", "scheme": "SCT",
                                 "meaning": "Morphologically Abnormal Structure"},
                    "type": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
                    "voxel_threshold": 0.5, "min_volume_ml": 0.2,
                    "min_bone_distance_mm": 2.5, "within_cranium": true,
                    "study_probability": {"slope": 3.0, "offset_ml": 0.1},
                    "priority": [{"level": "critical", "min_volume_ml": 30},
                                 {"level": "urgent"}]}],
      "urgency": "routine"
    }
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.ai.findings import Code, Priority
from pipeline.config import regular_expression
from pipeline.errors import ConfigError

SCHEMES = {"SCT", "DCM", "LN", "RADLEX", "99LOCAL"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept; SNOMED CT (``SCT``) codes are numeric SCTIDs."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str
    meaning: str = Field(min_length=1, max_length=64)

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value not in SCHEMES and not value.startswith("99"):
            raise ValueError(f"coding scheme {value!r} is not one of {sorted(SCHEMES)} (or a private 99... scheme)")
        return value

    @model_validator(mode="after")
    def _sct_numeric(self) -> "CodeSpec":
        if self.scheme == "SCT" and not self.value.isdigit():
            raise ValueError(f"SNOMED CT code value must be a numeric SCTID, not {self.value!r}")
        return self

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class Range(_Strict):
    min: float | None = Field(None, ge=0)
    max: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


Preference = Literal["closest_thickness", "thinnest", "thickest", "most_slices", "fewest_slices"]


class SeriesRules(_Strict):
    """Which series match (all rules must hold), and which wins among several."""

    modality: list[str] = Field(min_length=1)
    body_part_examined: list[str] = Field(default_factory=list)
    body_part_missing_ok: bool = True
    series_description: str | None = None  # regex, searched
    series_description_exclude: str | None = None
    image_type_required: list[str] = Field(default_factory=list)
    image_type_excluded: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    min_slices: int = Field(8, ge=1)
    max_slices: int | None = Field(None, ge=1)
    slice_thickness_mm: Range | None = None
    prefer: list[Preference] = Field(default_factory=lambda: ["most_slices"])
    target_slice_thickness_mm: float | None = Field(None, gt=0)

    @field_validator("modality", "body_part_examined", "image_type_required", "image_type_excluded")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]

    @field_validator("series_description", "series_description_exclude")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return regular_expression(value)

    @model_validator(mode="after")
    def _consistent(self) -> "SeriesRules":
        if self.max_slices is not None and self.max_slices < self.min_slices:
            raise ValueError(f"max_slices {self.max_slices} is less than min_slices {self.min_slices}")
        if "closest_thickness" in self.prefer and self.target_slice_thickness_mm is None:
            raise ValueError("prefer 'closest_thickness' needs target_slice_thickness_mm")
        return self


class PriorityRule(_Strict):
    """A present finding gets ``level`` when every given condition holds."""

    level: Priority
    min_volume_ml: float | None = Field(None, ge=0)
    min_probability: float | None = Field(None, ge=0, le=1)
    min_diameter_mm: float | None = Field(None, ge=0)

    def applies(self, volume_ml: float, probability: float, diameter_mm: float) -> bool:
        return (
            (self.min_volume_ml is None or volume_ml >= self.min_volume_ml)
            and (self.min_probability is None or probability >= self.min_probability)
            and (self.min_diameter_mm is None or diameter_mm >= self.min_diameter_mm)
        )


class StudyProbability(_Strict):
    """How a finding's study-level probability follows from its measured volume.

    ``p = 1 / (1 + exp(-slope * (ln(volume_ml + offset_ml) - ln(min_volume_ml + offset_ml))))``:
    a logistic (Platt) fit of the study's volume on validation studies, pinned to cross
    0.5 exactly at the finding's ``min_volume_ml``. So the probability the worklist, the
    SR and the JSON report is the one the present/absent decision was taken on: present
    exactly when ``p >= 0.5``.
    """

    method: Literal["logistic_log_volume"] = "logistic_log_volume"
    slope: float = Field(gt=0, le=100)
    offset_ml: float = Field(0.1, gt=0)
    fitted_on: str = Field("", max_length=300)  # which validation studies, for the model card

    def probability(self, volume_ml: float, min_volume_ml: float) -> float:
        score = math.log(max(volume_ml, 0.0) + self.offset_ml) - math.log(min_volume_ml + self.offset_ml)
        return 1.0 / (1.0 + math.exp(-max(min(self.slope * score, 60.0), -60.0)))


class FindingSpec(_Strict):
    """What one output channel of the network means."""

    channel: int = Field(ge=0)
    label: str = Field(min_length=1, max_length=64)
    category: CodeSpec
    type: CodeSpec
    anatomic_site: CodeSpec | None = None
    voxel_threshold: float = Field(0.5, gt=0, lt=1)
    min_component_ml: float = Field(0.0, ge=0)
    min_volume_ml: float = Field(0.0, ge=0)
    # Components whose every voxel lies closer than this to bone (HU >= bone_hu) are
    # dropped: partial volume of the inner table or the skull base, not blood. 0: off.
    min_bone_distance_mm: float = Field(0.0, ge=0, le=20)
    bone_hu: float = Field(300.0, gt=0)
    # Voxels whose HU (lightly smoothed in-plane) lies outside [min_hu, max_hu) are never
    # part of the finding: air, fat and CSF are not acute blood, nor is bone.
    min_hu: float | None = None
    max_hu: float | None = None
    # True: voxels outside the cranial cavity (pipeline.ai.cranium) are never part of the
    # finding: for intracranial findings, where scalp and temporalis muscle look like blood.
    within_cranium: bool = False
    # Hysteresis, for measuring: a present finding's components are extended over the
    # connected voxels of probability >= grow_threshold that pass the same HU and cavity
    # gates (a network's 0.5 contour lies inside a bleed's visible edge, so the volume comes
    # out short). The decision and the study probability stay on the detected volume.
    # None: no growing.
    grow_threshold: float | None = Field(None, gt=0, lt=1)
    study_probability: StudyProbability | None = None  # None: the highest voxel probability
    priority: list[PriorityRule] = Field(default_factory=list)
    absent_priority: Priority = Priority.ROUTINE

    @model_validator(mode="after")
    def _calibrated_needs_a_threshold(self) -> "FindingSpec":
        if self.min_hu is not None and self.max_hu is not None and self.min_hu >= self.max_hu:
            raise ValueError(f"min_hu {self.min_hu} must be below max_hu {self.max_hu}")
        if self.grow_threshold is not None and self.grow_threshold > self.voxel_threshold:
            raise ValueError(
                f"grow_threshold {self.grow_threshold} must not exceed voxel_threshold {self.voxel_threshold}: "
                "growing extends a component over less probable voxels"
            )
        if self.study_probability is not None and self.min_volume_ml <= 0:
            raise ValueError("study_probability crosses 0.5 at min_volume_ml: set min_volume_ml above 0")
        return self

    def priority_for(self, present: bool, volume_ml: float, probability: float, diameter_mm: float) -> Priority:
        """First matching rule for a present finding; ``absent_priority`` otherwise."""
        if not present:
            return self.absent_priority
        for rule in self.priority:
            if rule.applies(volume_ml, probability, diameter_mm):
                return rule.level
        return Priority.ROUTINE


class TriageSpec(_Strict):
    """``configs/triage.json``."""

    series: SeriesRules
    findings: list[FindingSpec] = Field(min_length=1)
    # The place in the AI queue of a study this model will read, before its findings
    # are known (a stroke or trauma model may be "urgent"); [triage] priority_rules can
    # raise it further.
    urgency: Priority = Priority.ROUTINE
    algorithm_family: CodeSpec = CodeSpec(value="123110", scheme="DCM", meaning="Artificial Intelligence")

    @model_validator(mode="after")
    def _unique(self) -> "TriageSpec":
        channels = [f.channel for f in self.findings]
        if len(set(channels)) != len(channels):
            raise ValueError(f"two findings use the same channel: {channels}")
        labels = [f.label for f in self.findings]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two findings have the same label: {labels}")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field path, e.g. ``findings.0.type.scheme``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(root)"
        lines.append(f"{source}: {where}: {problem['msg']}")
    return "; ".join(lines)


def parse_spec(data: object, source: str = "triage spec") -> TriageSpec:
    """Validate a spec already parsed from JSON."""
    try:
        return TriageSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_spec(path: Path | str) -> TriageSpec:
    """Read and validate ``configs/triage.json``.

    Raises
    ------
    ConfigError
        Naming the file and the field (``findings.0.category.value: ...``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; every model needs a triage spec") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    return parse_spec(data, str(path))
