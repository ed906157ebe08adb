"""Planning at dispatch: which models read a study, and its place in the AI queue.

Both are decided before a flow run exists, from the index and at most one image
header, so that a study no model can read never costs a flow run (it is marked
``not_applicable`` at once) and an urgent study overtakes routine ones in the queue.

The urgency is what is known before inference: the ``urgency`` of the models that
will read the study (their triage spec) and the ``[triage] priority_rules`` (modality
and body part of the series read, Requested Procedure Priority, Study Priority ID,
calling AE, Institutional Department Name). The most urgent wins; ``routine`` is the
floor. Within one urgency the oldest study goes first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.ai.findings import Priority
from pipeline.ai.selection import SeriesInfo, rejection_reason, select_series, series_info_of_row
from pipeline.config import QueueRule
from pipeline.index.schema import Instance, Series, SeriesOrigin

log = logging.getLogger(__name__)

# What the queue rules may read from an image header (file meta included).
_HEADER_TAGS = [
    "RequestedProcedurePriority",
    "StudyPriorityID",
    "InstitutionalDepartmentName",
    "RequestAttributesSequence",
]


@dataclass(frozen=True)
class PlannedModel:
    """One model that applies to a study, and the series it will read."""

    model_name: str
    model_version: str
    series_instance_uid: str


@dataclass(frozen=True)
class StudyPlan:
    """The models that will read a study, and why the others will not."""

    models: tuple[PlannedModel, ...]
    # "<model>: <why no series matched>", one per available model that reads nothing.
    not_read: tuple[str, ...] = ()

    @property
    def applicable(self) -> bool:
        return bool(self.models)

    def summary(self) -> str:
        """The worklist line for a study no model reads (at most 256 characters)."""
        why = "; ".join(self.not_read) if self.not_read else "no model is available"
        return f"No AI model applies ({why})"[:256]


@dataclass(frozen=True)
class QueueContext:
    """What the queue rules may know of a study beyond the index (from one image)."""

    requested_procedure_priority: str = ""
    study_priority_id: str = ""
    calling_ae: str = ""
    institutional_department_name: str = ""


@dataclass(frozen=True)
class Urgency:
    """A study's place in the AI queue and the reason for it."""

    level: Priority = Priority.ROUTINE
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rank(self) -> int:
        return self.level.rank

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)[:256]


def series_by_study(session: Session, study_ids: Sequence[int]) -> dict[int, list[SeriesInfo]]:
    """The received series of each study as selection sees them, from the index alone (one query)."""
    found: dict[int, list[SeriesInfo]] = {study_id: [] for study_id in study_ids}
    if not study_ids:
        return found
    rows = session.scalars(
        select(Series)
        .where(Series.study_id.in_(list(study_ids)), Series.origin == SeriesOrigin.received)
        .order_by(Series.study_id, Series.id)
    ).all()
    for row in rows:
        found[row.study_id].append(series_info_of_row(row))
    return found


def plan_study(series: Sequence[SeriesInfo], models: Iterable[object], unavailable: Iterable[str] = ()) -> StudyPlan:
    """Every model whose series rules match a series, with the series it reads.

    ``models`` are the registry's available models (``name``, ``version``, ``spec``);
    ``unavailable`` what the registry says of the others, kept as the reason they did
    not read the study.
    """
    planned: list[PlannedModel] = []
    not_read: list[str] = [f"{why}" for why in unavailable]
    for model in models:
        spec = model.spec  # type: ignore[attr-defined]
        chosen = select_series(spec, list(series))
        if chosen is not None:
            planned.append(PlannedModel(model.name, model.version, chosen.series_instance_uid))  # type: ignore[attr-defined]
            continue
        reasons = [rejection_reason(spec.series, s) for s in series]
        first = next((r for r in reasons if r), "the study has no series")
        more = f" and {len(reasons) - 1} other series" if len(reasons) > 1 else ""
        not_read.append(f"{model.name}: {first}{more}")  # type: ignore[attr-defined]
    return StudyPlan(tuple(planned), tuple(not_read))


def needs_header(rules: Sequence[QueueRule]) -> bool:
    return any(rule.reads_headers for rule in rules)


def _text(value: object) -> str:
    return str(value or "").strip()


def read_queue_context(path: Path | str) -> QueueContext:
    """The queue rules' attributes from one image of the study (no pixel data).

    Tolerant when reading: a missing or unreadable file gives an empty context (the
    study is then placed by the index and models alone), with a warning.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError) as err:
        log.warning("cannot read %s for the AI queue's priority rules (%s); placing the study as routine", path, err)
        return QueueContext()
    requested = _text(ds.get("RequestedProcedurePriority"))
    if not requested:
        for item in ds.get("RequestAttributesSequence") or []:
            requested = _text(item.get("RequestedProcedurePriority"))
            if requested:
                break
    meta = getattr(ds, "file_meta", None)
    return QueueContext(
        requested_procedure_priority=requested.upper(),
        study_priority_id=_text(ds.get("StudyPriorityID")).upper(),
        calling_ae=_text(meta.get("SourceApplicationEntityTitle") if meta is not None else "").upper(),
        institutional_department_name=_text(ds.get("InstitutionalDepartmentName")),
    )


def one_image_path(session: Session, data_dir: Path, series_uid: str) -> Path | None:
    """The file of one image of a series (the first indexed), or ``None``."""
    rel = session.scalar(
        select(Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.SeriesInstanceUID == series_uid)
        .order_by(Instance.id)
        .limit(1)
    )
    return data_dir / rel if rel else None


def _rule_matches(rule: QueueRule, plan: StudyPlan, read: list[SeriesInfo], context: QueueContext) -> bool:
    if rule.model and not any(m.model_name.upper() in rule.model for m in plan.models):
        return False
    if rule.modality and not any((s.modality or "").strip().upper() in rule.modality for s in read):
        return False
    if rule.body_part_examined and not any(
        (s.body_part_examined or "").strip().upper() in rule.body_part_examined for s in read
    ):
        return False
    if rule.requested_procedure_priority and context.requested_procedure_priority not in (
        rule.requested_procedure_priority
    ):
        return False
    if rule.study_priority_id and context.study_priority_id not in rule.study_priority_id:
        return False
    if rule.calling_ae and context.calling_ae not in rule.calling_ae:
        return False
    pattern = rule.institutional_department_name
    return pattern is None or re.search(pattern, context.institutional_department_name, re.IGNORECASE) is not None


def _describe(rule: QueueRule) -> str:
    conditions = rule.model_dump(exclude={"level"}, exclude_defaults=True)
    return " ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in conditions.items())


def queue_urgency(
    plan: StudyPlan,
    series: Sequence[SeriesInfo],
    rules: Sequence[QueueRule],
    context: QueueContext = QueueContext(),
    model_urgency: dict[str, Priority] | None = None,
) -> Urgency:
    """The most urgent level among the planned models' own urgency and the matching rules.

    Parameters
    ----------
    plan
        The study's plan (only its ``models`` count).
    series
        The study's series; the rules on modality and body part look at those read.
    rules
        ``[triage] priority_rules``.
    context
        Header attributes (:func:`read_queue_context`); empty when no rule needs them.
    model_urgency
        Model name → the ``urgency`` of its triage spec.
    """
    read_uids = {m.series_instance_uid for m in plan.models}
    read = [s for s in series if s.series_instance_uid in read_uids]
    level, reasons = Priority.ROUTINE, []
    for planned in plan.models:
        own = (model_urgency or {}).get(planned.model_name, Priority.ROUTINE)
        if own.rank > Priority.ROUTINE.rank:
            reasons.append(f"{own.value}: model {planned.model_name}")
            level = Priority.highest([level, own])
    for rule in rules:
        if _rule_matches(rule, plan, read, context):
            reasons.append(f"{rule.level}: {_describe(rule)}")
            level = Priority.highest([level, Priority(rule.level)])
    # Only what decided the level: the reason shown next to the queue position.
    return Urgency(level, tuple(r for r in reasons if r.startswith(f"{level.value}:")))
