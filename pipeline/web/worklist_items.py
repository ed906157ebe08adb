"""The worklist's rows as the page and the API show them, built from index rows.

Kept apart from the queries (:mod:`pipeline.web.worklist`): what a row says about a
study's AI (the label, its tooltip, the key finding) is decided here once for the page,
the study page and ``GET /api/worklist``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.ai.findings import Priority, finding_line, findings_summary
from pipeline.index.schema import Patient, Study
from pipeline.index.triage import AIFinding, AIResult, AIStatus, WorklistEntry


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
    # Place in the AI queue (1 = next) while the study waits for a worker; else None.
    queue_position: int | None = None

    @property
    def ai_label(self) -> str:
        """What the AI column says: ``not applicable``, ``done · finding``, ``done · no finding``,
        ``failed (reason)``, ``pending (position n)``, ``pending``, ``running``."""
        status = self.ai_status
        if status == AIStatus.not_applicable.value:
            return "not applicable"
        if status == AIStatus.done.value:
            return "done · finding" if self.present_findings else "done · no finding"
        if status == AIStatus.failed.value:
            reason = self.ai_error or "no reason given"
            return f"failed ({reason if len(reason) <= 60 else reason[:59] + '…'})"
        if status == AIStatus.pending.value and self.queue_position is not None:
            return f"pending (position {self.queue_position})"
        return status

    @property
    def ai_title(self) -> str:
        """The AI column's tooltip: the planner's reason, the whole error, the queue place."""
        status = self.ai_status
        if status == AIStatus.not_applicable.value:
            return self.summary or "No AI model reads any series of this study"
        if status == AIStatus.failed.value:
            return self.ai_error
        if status == AIStatus.pending.value:
            if self.queue_position is not None:
                return f"In the AI queue: {self.queue_position - 1} studies go before it"
            return "Waiting for the study to be complete before the AI queue"
        return ""

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
            "ai_label": self.ai_label,
            "ai_error": self.ai_error,
            "queue_position": self.queue_position,
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


def build_item(
    study: Study,
    patient: Patient,
    entry: WorklistEntry | None,
    results: list[AIResult],
    queue_position: int | None = None,
) -> WorklistItem:
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
        queue_position=queue_position,
    )
