"""The radiologist's worklist: every study, urgent AI findings first.

Reads the index (:mod:`pipeline.index.schema`) and the triage tables the flow fills
(:mod:`pipeline.index.triage`). A study without a :class:`WorklistEntry` is shown as
AI pending, routine, unread: a study is never hidden because its AI did not run.

Order: unread before read; within each, critical → urgent → routine; within each
priority, the study received first comes first (it has waited longest).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from pipeline.ai.findings import Priority, finding_line, findings_summary
from pipeline.errors import RadtriageError
from pipeline.index.db import session_scope
from pipeline.index.schema import Patient, Series, SeriesOrigin, Study, utcnow
from pipeline.index.triage import AIFinding, AIResult, AIStatus, WorklistEntry, worklist_entry

DEFAULT_LIMIT = 1000
# A search is a few words typed by a person; each word is three LIKEs in the query, and
# SQLite refuses an expression tree deeper than 1000.
MAX_SEARCH_WORDS = 8
MAX_SEARCH_CHARS = 128


class StudyNotFound(RadtriageError):
    """No study with that StudyInstanceUID is in the index."""


class BadSearch(RadtriageError):
    """A worklist search longer than :data:`MAX_SEARCH_WORDS` words or :data:`MAX_SEARCH_CHARS` characters."""


def check_search(text: str | None) -> str:
    """The search text, stripped.

    Raises
    ------
    BadSearch
        When it has too many words or characters (the message says the limits).
    """
    text = (text or "").strip()
    if len(text) > MAX_SEARCH_CHARS or len(text.split()) > MAX_SEARCH_WORDS:
        raise BadSearch(
            f"search is too long: at most {MAX_SEARCH_WORDS} words and {MAX_SEARCH_CHARS} characters "
            "(name, patient ID or accession number)"
        )
    return text


@dataclass(frozen=True)
class FindingItem:
    """One finding of one model, as the worklist shows it."""

    model_name: str
    model_version: str
    label: str
    present: bool
    probability: float
    volume_ml: float
    max_diameter_mm: float
    priority: str
    segment_number: int
    key_sop_instance_uid: str
    SegSOPInstanceUID: str
    SourceSeriesInstanceUID: str

    def summary(self) -> str:
        """``"Hemorrhage · 12.4 ml · p 0.97"``."""
        return finding_line(self)


@dataclass(frozen=True)
class ResultItem:
    """One model's current (not superseded) result on a study: its objects or its error."""

    model_name: str
    model_version: str
    ok: bool
    error: str
    priority: str
    SourceSeriesInstanceUID: str
    SegSOPInstanceUID: str
    SRSOPInstanceUID: str
    created_at: datetime


@dataclass(frozen=True)
class WorklistItem:
    """One row of the worklist (one study)."""

    StudyInstanceUID: str
    PatientName: str
    PatientID: str
    AccessionNumber: str
    ModalitiesInStudy: tuple[str, ...]
    StudyDescription: str
    StudyDate: str
    received_at: datetime
    last_received_at: datetime
    ai_status: str
    ai_error: str
    priority: str
    summary: str
    read_at: datetime | None
    read_by: str
    time_to_triage_seconds: float | None
    findings: tuple[FindingItem, ...] = field(default=())
    results: tuple[ResultItem, ...] = field(default=())

    @property
    def read(self) -> bool:
        return self.read_at is not None

    @property
    def modality(self) -> str:
        return "/".join(self.ModalitiesInStudy)

    @property
    def present_findings(self) -> list[FindingItem]:
        """Present findings, most urgent and largest first."""
        found = [f for f in self.findings if f.present]
        return sorted(found, key=lambda f: (-_rank(f.priority), -f.volume_ml, -f.probability))

    @property
    def key_finding(self) -> FindingItem | None:
        """The finding shown on the key image: most urgent, then largest."""
        found = self.present_findings
        return found[0] if found else None

    def to_json(self) -> dict[str, Any]:
        """The ``GET /api/worklist`` form of this study."""
        return {
            "StudyInstanceUID": self.StudyInstanceUID,
            "PatientName": self.PatientName,
            "PatientID": self.PatientID,
            "AccessionNumber": self.AccessionNumber,
            "Modality": self.modality,
            "ModalitiesInStudy": list(self.ModalitiesInStudy),
            "StudyDescription": self.StudyDescription,
            "StudyDate": self.StudyDate,
            "received_at": self.received_at.isoformat(),
            "last_received_at": self.last_received_at.isoformat(),
            "ai_status": self.ai_status,
            "ai_error": self.ai_error,
            "priority": self.priority,
            "summary": self.summary,
            "read": self.read,
            "read_at": self.read_at.isoformat() if self.read_at else None,
            "read_by": self.read_by,
            "time_to_triage_seconds": self.time_to_triage_seconds,
            "findings": [
                {
                    "model": f.model_name,
                    "model_version": f.model_version,
                    "label": f.label,
                    "present": f.present,
                    "probability": f.probability,
                    "volume_ml": f.volume_ml,
                    "max_diameter_mm": f.max_diameter_mm,
                    "priority": f.priority,
                    "segment_number": f.segment_number,
                    "key_sop_instance_uid": f.key_sop_instance_uid,
                }
                for f in self.findings
            ],
            "results": [
                {
                    "model": r.model_name,
                    "model_version": r.model_version,
                    "ok": r.ok,
                    "error": r.error,
                    "priority": r.priority,
                    "SourceSeriesInstanceUID": r.SourceSeriesInstanceUID,
                    "SegSOPInstanceUID": r.SegSOPInstanceUID,
                    "SRSOPInstanceUID": r.SRSOPInstanceUID,
                }
                for r in self.results
            ],
        }


def _rank(priority: str) -> int:
    try:
        return Priority(priority).rank
    except ValueError:
        return 0


def _value(choice: str | enum.Enum | None) -> str | None:
    if choice is None or choice == "":
        return None
    return choice.value if isinstance(choice, enum.Enum) else str(choice)


def _base_query() -> Any:
    priority = func.coalesce(WorklistEntry.priority, Priority.ROUTINE.value)
    # The flow writes priority_rank (Priority.rank) with the priority: the order is one
    # indexed column, not a CASE over the names.
    rank = func.coalesce(WorklistEntry.priority_rank, Priority.ROUTINE.rank)
    unread_first = case((WorklistEntry.read_at.is_(None), 0), else_=1)
    query = (
        select(Study, Patient, WorklistEntry)
        .join(Patient, Study.patient_id == Patient.id)
        .outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
        .order_by(unread_first, rank.desc(), Study.first_received_at, Study.id)
    )
    return query, priority


def list_worklist(
    session: Session,
    *,
    status: AIStatus | str | None = None,
    priority: Priority | str | None = None,
    modality: str | None = None,
    search: str | None = None,
    read: bool | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[WorklistItem]:
    """The worklist, sorted and optionally filtered.

    Parameters
    ----------
    status
        AI status (``pending``, ``running``, ``done``, ``failed``); a study the flow has
        not touched yet counts as ``pending``.
    priority
        ``critical``, ``urgent`` or ``routine`` (no finding is routine).
    modality
        A modality of the received series, e.g. ``CT``.
    search
        Words that must each appear (case-insensitively) in the patient name, patient
        ID or accession number; ``"doe 123"`` finds ``DOE^JOHN`` with ID ``P123``.
        At most :data:`MAX_SEARCH_WORDS` words, :data:`MAX_SEARCH_CHARS` characters
        (else :class:`BadSearch`).
    read
        ``True`` only read studies, ``False`` only unread ones.
    limit
        At most this many studies (the most urgent ones).
    """
    query, priority_col = _base_query()
    status_value = _value(status)
    if status_value is not None:
        status_value = AIStatus(status_value).value
        if status_value == AIStatus.pending.value:
            query = query.where(or_(WorklistEntry.study_id.is_(None), WorklistEntry.ai_status == AIStatus.pending))
        else:
            query = query.where(WorklistEntry.ai_status == AIStatus(status_value))
    priority_value = _value(priority)
    if priority_value is not None:
        query = query.where(priority_col == Priority(priority_value).value)
    if modality:
        query = query.where(
            exists().where(
                and_(
                    Series.study_id == Study.id,
                    Series.origin == SeriesOrigin.received,
                    func.upper(Series.Modality) == modality.strip().upper(),
                )
            )
        )
    for word in check_search(search).split():
        pattern = f"%{_escape_like(word)}%"
        query = query.where(
            or_(
                Patient.PatientName.ilike(pattern, escape="\\"),
                Patient.PatientID.ilike(pattern, escape="\\"),
                Study.AccessionNumber.ilike(pattern, escape="\\"),
            )
        )
    if read is True:
        query = query.where(WorklistEntry.read_at.is_not(None))
    elif read is False:
        query = query.where(WorklistEntry.read_at.is_(None))
    rows = session.execute(query.limit(limit)).all()
    results = _current_results(session, [study.id for study, _, _ in rows])
    return [_item(study, patient, entry, results.get(study.id, [])) for study, patient, entry in rows]


def get_worklist_item(session: Session, study_uid: str) -> WorklistItem:
    """The worklist row of one study.

    Raises
    ------
    StudyNotFound
        When the index has no such study.
    """
    query, _ = _base_query()
    row = session.execute(query.where(Study.StudyInstanceUID == study_uid)).first()
    if row is None:
        raise StudyNotFound(f"no study {study_uid} in the index")
    study, patient, entry = row
    return _item(study, patient, entry, _current_results(session, [study.id]).get(study.id, []))


def mark_read(session: Session, study_uid: str, user: str) -> datetime:
    """Record that ``user`` read the study now; returns the time recorded."""
    entry = _entry_for_update(session, study_uid)
    entry.read_at = utcnow()
    entry.read_by = user
    session.flush()
    return entry.read_at


def mark_unread(session: Session, study_uid: str) -> None:
    """Put the study back among the unread ones."""
    entry = _entry_for_update(session, study_uid)
    entry.read_at = None
    entry.read_by = ""
    session.flush()


def set_read(session_factory: sessionmaker[Session], study_uid: str, user: str, read: bool) -> WorklistItem:
    """Mark the study read by ``user`` (or unread again) in one transaction; return its row.

    Raises
    ------
    StudyNotFound
        When the index has no such study.
    """
    with session_scope(session_factory) as session:
        if read:
            mark_read(session, study_uid, user)
        else:
            mark_unread(session, study_uid)
        return get_worklist_item(session, study_uid)


def read_action(read: bool) -> str:
    """The audit log's name for marking a study read or unread."""
    return "mark read" if read else "mark unread"


def _entry_for_update(session: Session, study_uid: str) -> WorklistEntry:
    study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
    if study is None:
        raise StudyNotFound(f"no study {study_uid} in the index")
    # The flow may not have written one yet: create the row it will update (AI pending).
    entry = worklist_entry(session, study.id)
    return entry


def _escape_like(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _current_results(session: Session, study_ids: Iterable[int]) -> dict[int, list[AIResult]]:
    ids = list(study_ids)
    found: dict[int, list[AIResult]] = {}
    for chunk_start in range(0, len(ids), 500):
        chunk = ids[chunk_start : chunk_start + 500]
        query = (
            select(AIResult)
            .where(AIResult.study_id.in_(chunk), AIResult.superseded.is_(False))
            .options(selectinload(AIResult.findings))
            .order_by(AIResult.model_name, AIResult.id)
        )
        for result in session.scalars(query):
            found.setdefault(result.study_id, []).append(result)
    return found


def _finding(result: AIResult, finding: AIFinding) -> FindingItem:
    return FindingItem(
        model_name=result.model_name,
        model_version=result.model_version,
        label=finding.label,
        present=bool(finding.present),
        probability=float(finding.probability),
        volume_ml=float(finding.volume_ml),
        max_diameter_mm=float(finding.max_diameter_mm),
        priority=finding.priority,
        segment_number=int(finding.segment_number),
        key_sop_instance_uid=finding.key_sop_instance_uid or "",
        SegSOPInstanceUID=result.SegSOPInstanceUID or "",
        SourceSeriesInstanceUID=result.SourceSeriesInstanceUID or "",
    )


def _item(study: Study, patient: Patient, entry: WorklistEntry | None, results: list[AIResult]) -> WorklistItem:
    findings = tuple(_finding(r, f) for r in results for f in sorted(r.findings, key=lambda f: f.segment_number))
    # The flow stores the summary when it finishes; until then (or for rows written by
    # an older version) it is made the same way from the findings.
    summary = (entry.summary if entry is not None else "") or findings_summary(findings)
    modalities = tuple(m for m in (study.ModalitiesInStudy or "").split("\\") if m)
    return WorklistItem(
        StudyInstanceUID=study.StudyInstanceUID,
        PatientName=patient.PatientName or "",
        PatientID=patient.PatientID or "",
        AccessionNumber=study.AccessionNumber or "",
        ModalitiesInStudy=modalities,
        StudyDescription=study.StudyDescription or "",
        StudyDate=study.StudyDate or "",
        received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        ai_status=(entry.ai_status.value if entry is not None else AIStatus.pending.value),
        ai_error=(entry.ai_error if entry is not None else "") or "",
        priority=(entry.priority if entry is not None else Priority.ROUTINE.value) or Priority.ROUTINE.value,
        summary=summary,
        read_at=entry.read_at if entry is not None else None,
        read_by=(entry.read_by if entry is not None else "") or "",
        time_to_triage_seconds=entry.time_to_triage_seconds if entry is not None else None,
        findings=findings,
        results=tuple(
            ResultItem(
                model_name=r.model_name,
                model_version=r.model_version,
                ok=bool(r.ok),
                error=r.error or "",
                priority=r.priority,
                SourceSeriesInstanceUID=r.SourceSeriesInstanceUID or "",
                SegSOPInstanceUID=r.SegSOPInstanceUID or "",
                SRSOPInstanceUID=r.SRSOPInstanceUID or "",
                created_at=r.created_at,
            )
            for r in results
        ),
    )
