"""Index tables for triage: dispatch outbox, AI results, the worklist and forwards.

They hang off :class:`pipeline.index.schema.Study`. Everything that must survive a
crash lives here: which study state was dispatched to which flow run, which results
are current and which superseded, and which forwards are still owed to which node.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column, relationship

from pipeline.index.schema import Base, Study, UTCDateTime, _enum, utcnow


class RunStatus(str, enum.Enum):
    """A triage run (one dispatch of one study revision)."""

    dispatched = "dispatched"
    running = "running"
    done = "done"
    failed = "failed"


class AIStatus(str, enum.Enum):
    """What the worklist shows for a study's AI analysis."""

    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"
    # No model's series rules match any series of the study: it never goes to the AI
    # queue. Distinct from ``done`` with no finding, where a model did read it.
    not_applicable = "not_applicable"


class ForwardState(str, enum.Enum):
    pending = "pending"
    delivered = "delivered"
    dead = "dead"


class TriageRun(Base):
    """One dispatch of a study revision to the ``triage-study`` deployment.

    ``revision`` counts the times the study was dispatched; the idempotency key
    ``<StudyInstanceUID>/<revision>`` makes a repeated dispatch (after a crash between
    the Prefect call and the commit) return the same flow run instead of a second one.
    """

    __tablename__ = "triage_run"
    __table_args__ = (
        UniqueConstraint("study_id", "revision", name="uq_triage_run_study_revision"),
        # The AI queue (queue_positions): the few dispatched runs, in the order workers get them.
        Index("ix_triage_run_queue", "status", "urgency_rank", "dispatched_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    flow_run_id: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), default=RunStatus.dispatched)
    error: Mapped[str] = mapped_column(Text, default="")
    # When the study's last instance had arrived at dispatch time (start of time-to-triage).
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    dispatched_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # JSON: seconds per step (volume_load, inference, writing, storing, ...)
    timings: Mapped[str] = mapped_column(Text, default="{}")
    # Place in the AI queue, decided at dispatch from what is known before inference
    # (pipeline.triage.planning): the Prefect work queue is named after the level.
    urgency: Mapped[str] = mapped_column(String(16), default="routine")
    urgency_rank: Mapped[int] = mapped_column(Integer, default=0)
    urgency_reason: Mapped[str] = mapped_column(String(256), default="")

    study: Mapped[Study] = relationship()


class AIResult(Base):
    """One model's analysis of one study revision (its SEG and SR, or its failure)."""

    __tablename__ = "ai_result"
    __table_args__ = (
        UniqueConstraint("study_id", "revision", "model_name", "model_version", name="uq_ai_result_run_model"),
        Index("ix_ai_result_study_current", "study_id", "superseded"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    SourceSeriesInstanceUID: Mapped[str] = mapped_column(String(64), default="")
    SegSOPInstanceUID: Mapped[str] = mapped_column(String(64), default="")
    SRSOPInstanceUID: Mapped[str] = mapped_column(String(64), default="")
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    findings: Mapped[list[AIFinding]] = relationship(back_populates="result", cascade="all, delete-orphan")


class AIFinding(Base):
    """One finding (one output channel) of an :class:`AIResult`."""

    __tablename__ = "ai_finding"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("ai_result.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column(Boolean)
    probability: Mapped[float] = mapped_column(Float)
    volume_ml: Mapped[float] = mapped_column(Float)
    max_diameter_mm: Mapped[float] = mapped_column(Float)
    priority: Mapped[str] = mapped_column(String(16))
    segment_number: Mapped[int] = mapped_column(Integer)
    # The source image where the finding is largest: the worklist's key image.
    key_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")

    result: Mapped[AIResult] = relationship(back_populates="findings")


class WorklistEntry(Base):
    """The worklist's view of a study beyond what the index already says.

    A study without an entry is shown as AI pending, routine, unread.
    """

    __tablename__ = "worklist_entry"

    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), primary_key=True)
    ai_status: Mapped[AIStatus] = mapped_column(_enum(AIStatus, "ai_status"), default=AIStatus.pending)
    ai_error: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    priority_rank: Mapped[int] = mapped_column(Integer, default=0, index=True)
    summary: Mapped[str] = mapped_column(String(256), default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Time-to-triage: last instance received -> results stored -> worklist updated.
    results_stored_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    triaged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    time_to_triage_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    read_by: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship()


def worklist_entry(session: Session, study_id: int) -> WorklistEntry:
    """The study's worklist entry, created when missing as a study without one is shown:
    AI pending, routine (rank 0), no summary, unread."""
    entry = session.get(WorklistEntry, study_id)
    if entry is None:
        entry = WorklistEntry(
            study_id=study_id,
            ai_status=AIStatus.pending,
            priority="routine",
            priority_rank=0,
            summary="",
            updated_at=utcnow(),
        )
        session.add(entry)
    return entry


def queue_positions(session: Session, study_ids: Iterable[int] | None = None) -> dict[int, int]:
    """Each waiting study's place in the AI queue (1 = next), by study id.

    A study waits while its latest revision is dispatched and no worker has begun it.
    The order is the one Prefect's work pool hands to workers: the urgency's work queue
    first (critical, urgent, routine), then the order the runs were created in, which is
    the dispatch time. ``study_ids`` restricts the answer (the queue is still counted
    whole); studies not waiting are absent.
    """
    other = aliased(TriageRun)
    latest = select(func.max(other.revision)).where(other.study_id == TriageRun.study_id).scalar_subquery()
    waiting = session.execute(
        select(TriageRun.study_id)
        .join(WorklistEntry, WorklistEntry.study_id == TriageRun.study_id)
        .where(
            TriageRun.status == RunStatus.dispatched,
            TriageRun.revision == latest,
            WorklistEntry.ai_status == AIStatus.pending,
        )
        .order_by(TriageRun.urgency_rank.desc(), TriageRun.dispatched_at, TriageRun.id)
    ).scalars()
    positions = {study_id: place for place, study_id in enumerate(waiting, start=1)}
    if study_ids is None:
        return positions
    wanted = set(study_ids)
    return {k: v for k, v in positions.items() if k in wanted}


class ForwardJob(Base):
    """One object owed to one archive node: a durable, retried C-STORE."""

    __tablename__ = "forward_job"
    __table_args__ = (
        UniqueConstraint("SOPInstanceUID", "destination_ae", name="uq_forward_job_sop_destination"),
        Index("ix_forward_job_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    SOPInstanceUID: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    destination_ae: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[ForwardState] = mapped_column(_enum(ForwardState, "forward_state"), default=ForwardState.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
