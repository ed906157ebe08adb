"""Many worklist studies at once: index rows only (patient, study, one series, the flow's
rows), no image files, for studies that are listed but never opened.

One executemany per table, so 50,000 studies take seconds, not the minutes that
storing images through the archive would.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.uid import generate_uid
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.ai.findings import Priority
from pipeline.index.db import session_scope
from pipeline.index.schema import Patient, Series, SeriesOrigin, Study, StudyState, utcnow
from pipeline.index.triage import AIStatus, RunStatus, TriageRun, WorklistEntry

NOT_APPLICABLE = "No AI model applies (head-ct-hemorrhage: Modality CR not in ['CT'])"


@dataclass(frozen=True)
class RowSpec:
    """One study to seed, as the flow (or the dispatcher) left it."""

    minutes_ago: float
    priority: Priority = Priority.ROUTINE
    ai_status: AIStatus | None = AIStatus.done  # None: no worklist entry (not yet stable)
    read_minutes_ago: float | None = None
    queued_minutes_ago: float | None = None  # a dispatched run waiting for a worker
    queue_urgency: Priority = Priority.ROUTINE
    modality: str = "CT"


@dataclass(frozen=True)
class SeededRow:
    study_id: int
    StudyInstanceUID: str
    AccessionNumber: str
    spec: RowSpec


def _summary(spec: RowSpec) -> str:
    if spec.ai_status is AIStatus.not_applicable:
        return NOT_APPLICABLE
    if spec.priority is Priority.CRITICAL:
        return "Intracranial hemorrhage · 31.2 ml · p 0.97"
    if spec.priority is Priority.URGENT:
        return "Intracranial hemorrhage · 2.1 ml · p 0.71"
    return ""


def seed_rows(session_factory: sessionmaker[Session], specs: list[RowSpec], prefix: str = "BULK") -> list[SeededRow]:
    """Insert one study per spec; accession numbers ``<prefix><n>``, names ``<prefix>^<n>``."""
    now = utcnow()
    with session_scope(session_factory) as session:
        base = int(session.scalar(select(func.max(Study.id))) or 0)
        patient_base = int(session.scalar(select(func.max(Patient.id))) or 0)
        series_base = int(session.scalar(select(func.max(Series.id))) or 0)
        patients, studies, series, entries, runs, seeded = [], [], [], [], [], []
        for n, spec in enumerate(specs, start=1):
            received: datetime = now - timedelta(minutes=spec.minutes_ago)
            uid, accession = str(generate_uid()), f"{prefix}{n:06d}"[:16]
            patients.append({"id": patient_base + n, "PatientID": f"{prefix}P{n}", "PatientName": f"{prefix}^{n:06d}"})
            studies.append(
                {
                    "id": base + n,
                    "StudyInstanceUID": uid,
                    "patient_id": patient_base + n,
                    "AccessionNumber": accession,
                    "StudyDate": received.strftime("%Y%m%d"),
                    "StudyDescription": "CT HEAD" if spec.modality == "CT" else f"{spec.modality} CHEST",
                    "ModalitiesInStudy": spec.modality,
                    "NumberOfStudyRelatedSeries": 1,
                    "NumberOfStudyRelatedInstances": 40,
                    "state": StudyState.analysed,
                    "state_changed_at": received,
                    "first_received_at": received,
                    "last_received_at": received,
                }
            )
            series.append(
                {
                    "id": series_base + n,
                    "SeriesInstanceUID": str(generate_uid()),
                    "study_id": base + n,
                    "Modality": spec.modality,
                    "BodyPartExamined": "HEAD",
                    "SeriesDescription": "Head 5mm",
                    "SeriesNumber": 2,
                    "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
                    "SliceThickness": 5.0,
                    "NumberOfSeriesRelatedInstances": 40,
                    "origin": SeriesOrigin.received,
                    "first_received_at": received,
                    "last_received_at": received,
                }
            )
            if spec.ai_status is not None:
                read_at = now - timedelta(minutes=spec.read_minutes_ago) if spec.read_minutes_ago is not None else None
                entries.append(
                    {
                        "study_id": base + n,
                        "ai_status": spec.ai_status,
                        "ai_error": "volume: series has 2 slices, the model needs at least 8"
                        if spec.ai_status is AIStatus.failed
                        else "",
                        "priority": spec.priority.value,
                        "priority_rank": spec.priority.rank,
                        "summary": _summary(spec),
                        "updated_at": received,
                        "read_at": read_at,
                        "read_by": "alice" if read_at else "",
                    }
                )
            if spec.queued_minutes_ago is not None:
                runs.append(
                    {
                        "study_id": base + n,
                        "revision": 1,
                        "status": RunStatus.dispatched,
                        "last_received_at": received,
                        "dispatched_at": now - timedelta(minutes=spec.queued_minutes_ago),
                        "urgency": spec.queue_urgency.value,
                        "urgency_rank": spec.queue_urgency.rank,
                    }
                )
            seeded.append(SeededRow(base + n, uid, accession, spec))
        for model, rows in ((Patient, patients), (Study, studies), (Series, series)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(model), rows[start : start + 5000])
        for model, rows in ((WorklistEntry, entries), (TriageRun, runs)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(model), rows[start : start + 5000])
        if session.get_bind().dialect.name == "postgresql":
            # The ids above were given, not drawn: move the sequences past them, as the
            # archive's own inserts draw from them afterwards (SQLite takes max(id) + 1).
            for name in ("patient", "study", "series"):
                session.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
                )
    return seeded


def mixed_specs(count: int) -> list[RowSpec]:
    """A department's mix, deterministic: mostly routine and done, some urgent and critical,
    a third read, one in ten not applicable, a few failed and a few waiting in the AI queue."""
    specs = []
    for n in range(count):
        minutes = 5.0 + (n * 7919) % (60 * 24 * 30)  # spread over 30 days, not in id order
        priority = Priority.CRITICAL if n % 97 == 0 else Priority.URGENT if n % 23 == 0 else Priority.ROUTINE
        status = AIStatus.done
        if n % 10 == 3:
            status, priority = AIStatus.not_applicable, Priority.ROUTINE
        elif n % 50 == 7:
            status, priority = AIStatus.failed, Priority.ROUTINE
        queued = None
        if n % 200 == 11:
            status, priority, queued = AIStatus.pending, Priority.ROUTINE, float(n % 60)
        read = float(minutes / 2) if n % 3 == 1 and status is AIStatus.done else None
        specs.append(RowSpec(minutes, priority, status, read, queued))
    return specs
