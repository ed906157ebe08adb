"""Critical-finding alerts: the worklist's banner and who acknowledged it.

A study raises an alert while it is flagged ``critical``, unread, and nobody has
acknowledged it since it was flagged. Acknowledgement is per study, not per user: a
department needs to know that *someone* has the finding, so one radiologist's
acknowledgement takes the banner off every worklist and the study page says who.

The acknowledgement is an :class:`~pipeline.index.accounts.AuditEvent` with the action
:data:`ACK_ACTION`, written by the handler in its own transaction (so a failure to
record it is an error the user sees, not a banner that goes away unrecorded). The audit
log already is the place for "who did what to which study, when"; a second table would
hold the same four facts. An acknowledgement covers the flag it answered: when the flow
flags the study again later (new results after a late series), the banner comes back.
The lookup is one seek on the ``(StudyInstanceUID, action, at)`` index per critical,
unread study.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from pipeline.ai.findings import Priority, finding_line
from pipeline.errors import RadtriageError
from pipeline.index.accounts import AuditEvent
from pipeline.index.schema import Patient, Study, utcnow
from pipeline.index.triage import AIFinding, AIResult, WorklistEntry
from pipeline.web.worklist import StudyNotFound

ACK_ACTION = "acknowledge critical"
ACK_REPEATED = "acknowledge critical: already acknowledged"
MAX_ALERTS = 20  # banners shown at once; the rest are counted ("and 3 more")


class NotCritical(RadtriageError):
    """The study is not flagged critical: there is nothing to acknowledge."""


@dataclass(frozen=True)
class Acknowledgement:
    """Who acknowledged a study's critical finding, and when."""

    username: str
    at: datetime


@dataclass(frozen=True)
class CriticalAlert:
    """One banner: a critical, unread, unacknowledged study."""

    StudyInstanceUID: str
    PatientName: str
    PatientID: str
    AccessionNumber: str
    finding: str  # the critical finding line(s): "Hemorrhage · 12.4 ml · p 0.97"
    flagged_at: datetime


@dataclass(frozen=True)
class Alerts:
    """The banners to show (most urgent first) and how many more were left off."""

    shown: list[CriticalAlert]
    more: int


@dataclass(frozen=True)
class CriticalState:
    """What the study page says about a study's critical finding."""

    critical: bool
    pending: bool  # critical, unread and not acknowledged since it was flagged
    acknowledgement: Acknowledgement | None  # the one covering the current flag
    earlier: Acknowledgement | None  # the latest one, when it answered an earlier flag
    flagged_at: datetime | None = None  # when the flow last wrote the priority


def _flagged_at() -> Any:
    # When the flow last wrote the priority; seeded or older rows have only updated_at.
    return func.coalesce(WorklistEntry.triaged_at, WorklistEntry.updated_at)


def _is_ack(study_uid: Any) -> Any:
    return and_(
        AuditEvent.StudyInstanceUID == study_uid,
        AuditEvent.action == ACK_ACTION,
        AuditEvent.status_code == 200,
    )


def _unacknowledged() -> Any:
    """Critical, unread studies without an acknowledgement since they were flagged."""
    flagged = _flagged_at()
    return (
        select(Study.id, flagged.label("flagged_at"))
        .join(WorklistEntry, WorklistEntry.study_id == Study.id)
        .where(
            WorklistEntry.priority_rank == Priority.CRITICAL.rank,
            WorklistEntry.priority == Priority.CRITICAL.value,
            WorklistEntry.read_at.is_(None),
            ~exists().where(_is_ack(Study.StudyInstanceUID), AuditEvent.at >= flagged),
        )
    )


def _critical_lines(session: Session, study_ids: list[int]) -> dict[int, str]:
    """Each study's present critical findings of its current results, largest first."""
    rows = session.execute(
        select(AIResult.study_id, AIFinding)
        .join(AIFinding, AIFinding.result_id == AIResult.id)
        .where(
            AIResult.study_id.in_(study_ids),
            AIResult.superseded.is_(False),
            AIFinding.present.is_(True),
            AIFinding.priority == Priority.CRITICAL.value,
        )
        .order_by(AIResult.study_id, AIFinding.volume_ml.desc(), AIFinding.probability.desc())
    ).all()
    lines: dict[int, list[str]] = {}
    for study_id, finding in rows:
        lines.setdefault(study_id, []).append(finding_line(finding))
    return {study_id: "; ".join(found) for study_id, found in lines.items()}


def pending_alerts(session: Session, limit: int = MAX_ALERTS) -> Alerts:
    """The critical findings nobody has acknowledged yet, the longest waiting first."""
    # Every pending study in one query: few in practice, and counted for "and 3 more".
    pending = session.execute(_unacknowledged().order_by(_flagged_at(), Study.id)).all()
    ids = [study_id for study_id, _ in pending[:limit]]
    if not ids:
        return Alerts([], len(pending))
    rows = {
        study.id: (study, patient, entry)
        for study, patient, entry in session.execute(
            select(Study, Patient, WorklistEntry)
            .join(Patient, Study.patient_id == Patient.id)
            .join(WorklistEntry, WorklistEntry.study_id == Study.id)
            .where(Study.id.in_(ids))
        )
    }
    lines = _critical_lines(session, ids)
    shown = []
    for study_id, flagged_at in pending[:limit]:
        study, patient, entry = rows[study_id]
        shown.append(
            CriticalAlert(
                StudyInstanceUID=study.StudyInstanceUID,
                PatientName=patient.PatientName or "",
                PatientID=patient.PatientID or "",
                AccessionNumber=study.AccessionNumber or "",
                # The flow's summary when no result row says which finding (older rows).
                finding=lines.get(study_id) or entry.summary or "critical finding",
                flagged_at=flagged_at,
            )
        )
    return Alerts(shown, len(pending) - len(shown))


def critical_state(session: Session, study_uid: str) -> CriticalState:
    """Is the study's critical finding pending, or who acknowledged it?

    Raises
    ------
    StudyNotFound
        When the index has no such study.
    """
    row = session.execute(
        select(Study.id, WorklistEntry.priority, WorklistEntry.read_at, _flagged_at())
        .outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
        .where(Study.StudyInstanceUID == study_uid)
    ).first()
    if row is None:
        raise StudyNotFound(f"no study {study_uid} in the index")
    _, priority, read_at, flagged_at = row
    critical = priority == Priority.CRITICAL.value
    latest = session.execute(
        select(AuditEvent.username, AuditEvent.at).where(_is_ack(study_uid)).order_by(AuditEvent.at.desc()).limit(1)
    ).first()
    ack = Acknowledgement(latest[0], latest[1]) if latest is not None else None
    if ack is not None and flagged_at is not None and ack.at >= flagged_at:
        # The first one since the flag: that is who took it on.
        first = session.execute(
            select(AuditEvent.username, AuditEvent.at)
            .where(_is_ack(study_uid), AuditEvent.at >= flagged_at)
            .order_by(AuditEvent.at)
            .limit(1)
        ).one()
        return CriticalState(critical, False, Acknowledgement(first[0], first[1]), None, flagged_at)
    return CriticalState(critical, critical and read_at is None, None, ack, flagged_at)


def acknowledge(
    session: Session, study_uid: str, username: str, *, remote_addr: str, method: str, path: str
) -> tuple[Acknowledgement, bool]:
    """Record that ``username`` acknowledged the study's critical finding now.

    Returns the acknowledgement that covers the finding and whether it is this one:
    when someone else got there first, theirs is returned and nothing is written (the
    request is still audited, as :data:`ACK_REPEATED`).

    Raises
    ------
    StudyNotFound
        When the index has no such study.
    NotCritical
        When the study is not flagged critical.
    """
    state = critical_state(session, study_uid)
    if not state.critical:
        raise NotCritical(f"study {study_uid} is not flagged critical: there is nothing to acknowledge")
    if state.acknowledgement is not None:
        return state.acknowledgement, False
    # Never before the flag it answers: the flow may run on a machine whose clock is a
    # little ahead, and an acknowledgement that seems older than its flag covers nothing.
    now = max(utcnow(), state.flagged_at) if state.flagged_at else utcnow()
    session.add(
        AuditEvent(
            at=now,
            username=username[:64],
            remote_addr=remote_addr[:64],
            method=method[:8],
            path=path[:512],
            status_code=200,
            action=ACK_ACTION,
            StudyInstanceUID=study_uid[:64],
            detail="",
        )
    )
    session.flush()
    return Acknowledgement(username, now), True
