"""The index: patients, studies, series and instances held in the archive.

SQLAlchemy 2 declarative models over any SQL database (SQLite by default, PostgreSQL for
scale-out). Column names follow DICOM keywords where the DICOM meaning is meant. Other
parts of radtriage add their own tables to :class:`Base`; every table change needs an
Alembic revision in ``pipeline/index/migrations/versions``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

# Stable constraint names, so migrations work the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (what every timestamp column holds)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite keeps no zone; PostgreSQL ``timestamptz`` does. Either way callers see aware
    UTC datetimes and can compare them with :func:`utcnow`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use pipeline.index.schema.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base for every radtriage table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyState(str, enum.Enum):
    """Where a study is in the triage pipeline (a durable outbox for the dispatcher).

    ``received`` → ``stable`` (quiet for ``stable_age_seconds``) → ``dispatched`` →
    ``analysed`` | ``failed``; a late received instance returns it to ``received``.
    """

    received = "received"
    stable = "stable"
    dispatched = "dispatched"
    analysed = "analysed"
    failed = "failed"


class SeriesOrigin(str, enum.Enum):
    """Who made a series: a remote sender, or radtriage itself (AI SEG/SR)."""

    received = "received"
    derived = "derived"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Plain VARCHAR + CHECK on every backend: adding a state later is a small migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("PatientID", "IssuerOfPatientID", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    PatientID: Mapped[str] = mapped_column(String(64), default="")
    IssuerOfPatientID: Mapped[str] = mapped_column(String(64), default="")
    PatientName: Mapped[str] = mapped_column(String(324), default="", index=True)
    PatientBirthDate: Mapped[str] = mapped_column(String(8), default="", index=True)
    PatientSex: Mapped[str] = mapped_column(String(16), default="")
    # As received (backslash-separated): C-FIND answers carry it, so names come back as sent.
    SpecificCharacterSet: Mapped[str] = mapped_column(String(64), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """One study and its place in the triage state machine.

    Concurrent writers (receivers, the stability sweep, dispatchers, workers, the web
    app; several processes and machines on PostgreSQL) all run at the database's default
    isolation, READ COMMITTED on PostgreSQL; SQLite has one writer at a time anyway.
    That is enough because every transaction that changes a study's state, counters or
    worklist entry either does it in a single ``UPDATE`` whose ``WHERE`` states the
    condition (PostgreSQL re-checks it against the latest committed row), or first
    locks the study row with ``SELECT ... FOR UPDATE`` (:func:`lock_study`) and then
    reads, decides and writes. Without the lock a late instance's return to
    ``received`` could be overwritten by a dispatcher or worker that read the old
    state, and two receivers adding series to one study would lose a count.
    """

    __tablename__ = "study"
    __table_args__ = (Index("ix_study_state_last_received", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    AccessionNumber: Mapped[str] = mapped_column(String(16), default="", index=True)
    StudyID: Mapped[str] = mapped_column(String(16), default="")
    StudyDate: Mapped[str] = mapped_column(String(8), default="", index=True)
    StudyTime: Mapped[str] = mapped_column(String(16), default="")
    StudyDescription: Mapped[str] = mapped_column(String(64), default="")
    ReferringPhysicianName: Mapped[str] = mapped_column(String(324), default="")
    InstitutionName: Mapped[str] = mapped_column(String(64), default="")
    SpecificCharacterSet: Mapped[str] = mapped_column(String(64), default="")
    # Backslash-separated, derived from the received series only (not our own SEG/SR).
    ModalitiesInStudy: Mapped[str] = mapped_column(String(64), default="")
    NumberOfStudyRelatedSeries: Mapped[int] = mapped_column(Integer, default=0)
    NumberOfStudyRelatedInstances: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState, "study_state"), default=StudyState.received)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.SeriesNumber")

    def set_state(self, state: StudyState | str, when: datetime | None = None) -> None:
        """Move to ``state`` and stamp ``state_changed_at`` (no-op if unchanged)."""
        state = StudyState(state)
        if self.state != state:
            self.state = state
            self.state_changed_at = when or utcnow()


def lock_study(session: Session, **where: object) -> Study | None:
    """The study matching ``where`` (``id=`` or ``StudyInstanceUID=``), its row locked
    until the transaction ends (``FOR UPDATE``; SQLite's write lock already is one)."""
    # populate_existing: what the session loaded before the lock may be out of date.
    query = select(Study).filter_by(**where).with_for_update().execution_options(populate_existing=True)
    return session.scalars(query).one_or_none()


class Series(Base):
    __tablename__ = "series"
    # ModalitiesInStudy (received and derived series) is answered from this index alone.
    __table_args__ = (Index("ix_series_study_id_Modality", "study_id", "Modality"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    Modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    BodyPartExamined: Mapped[str] = mapped_column(String(64), default="")
    SeriesDescription: Mapped[str] = mapped_column(String(64), default="")
    SeriesNumber: Mapped[int | None] = mapped_column(Integer, nullable=True)
    SeriesDate: Mapped[str] = mapped_column(String(8), default="")
    SeriesTime: Mapped[str] = mapped_column(String(16), default="")
    ImageType: Mapped[str] = mapped_column(String(256), default="")  # backslash-separated values
    SliceThickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    NumberOfSeriesRelatedInstances: Mapped[int] = mapped_column(Integer, default=0)
    SpecificCharacterSet: Mapped[str] = mapped_column(String(64), default="")
    origin: Mapped[SeriesOrigin] = mapped_column(_enum(SeriesOrigin, "series_origin"), default=SeriesOrigin.received)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.InstanceNumber")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    SOPInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    SOPClassUID: Mapped[str] = mapped_column(String(64), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    InstanceNumber: Mapped[int | None] = mapped_column(Integer, nullable=True)
    TransferSyntaxUID: Mapped[str] = mapped_column(String(64))
    # Relative to storage.data_dir, POSIX separators.
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
