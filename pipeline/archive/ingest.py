"""Record one stored instance in the index: patient, study, series rows and counters.

Called by :class:`pipeline.archive.Archive` inside one write transaction, after the
file is safely on disk. Study state rules live here:

* a received instance stamps ``last_received_at`` and returns a study that had left
  ``received`` to ``received`` (a late instance must be analysed again);
* a derived instance (radtriage's own SEG/SR) changes neither.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, String, bindparam, insert, select, update
from sqlalchemy.orm import Session

from pipeline.archive.header import InstanceHeader
from pipeline.index.prepared import Prepared
from pipeline.index.schema import Instance, Patient, Series, SeriesOrigin, Study, StudyState

log = logging.getLogger(__name__)


def _fit(model: type, keyword: str, value: Any) -> Any:
    """Truncate strings to the column length (PostgreSQL enforces it, SQLite does not)."""
    if not isinstance(value, str):
        return value
    column = model.__table__.c[keyword]
    if isinstance(column.type, String) and column.type.length and len(value) > column.type.length:
        log.warning("%s truncated to %d characters", keyword, column.type.length)
        return value[: column.type.length]
    return value


def _values(model: type, header: InstanceHeader, keywords: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in keywords:
        column = model.__table__.c[kw]
        value = header.get(kw, None)
        if value is None and not column.nullable:
            value = ""
        out[kw] = _fit(model, kw, value)
    return out


# Read once per new patient, study or series, never on the per-image path.
_PATIENT = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "SpecificCharacterSet")
_STUDY = (
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "InstitutionName",
    "SpecificCharacterSet",
)
_SERIES = (
    "SpecificCharacterSet",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "ImageType",
    "SliceThickness",
)


def _patient(session: Session, header: InstanceHeader) -> Patient:
    values = _values(Patient, header, _PATIENT)
    patient = session.scalar(
        select(Patient).where(
            Patient.PatientID == values["PatientID"], Patient.IssuerOfPatientID == values["IssuerOfPatientID"]
        )
    )
    if patient is None:
        patient = Patient(**values)
        session.add(patient)
    return patient


def _study(session: Session, header: InstanceHeader, now: datetime, derived: bool) -> Study:
    # Locked: its counters and state are read and written back below (see Study).
    study = session.scalar(select(Study).where(Study.StudyInstanceUID == header.StudyInstanceUID).with_for_update())
    if study is None:
        # A study first seen through our own output has nothing left to analyse.
        state = StudyState.analysed if derived else StudyState.received
        study = Study(
            StudyInstanceUID=header.StudyInstanceUID,
            patient=_patient(session, header),
            state=state,
            state_changed_at=now,
            first_received_at=now,
            last_received_at=now,
            NumberOfStudyRelatedSeries=0,
            NumberOfStudyRelatedInstances=0,
            ModalitiesInStudy="",
            **_values(Study, header, _STUDY),
        )
        session.add(study)
    return study


_instance, _series, _study_t = Instance.__table__, Series.__table__, Study.__table__
# Compiled once: the per-image statements (see pipeline.index.prepared for why).
_PATH_OF = Prepared(select(_instance.c.path).where(_instance.c.SOPInstanceUID == bindparam("b_sop")))
_FIND_SERIES = Prepared(
    select(_series.c.id, _series.c.study_id, _study_t.c.StudyInstanceUID, _study_t.c.state)
    .join(_study_t, _series.c.study_id == _study_t.c.id)
    .where(_series.c.SeriesInstanceUID == bindparam("b_series"))
    # The study row stays locked until commit: its state, read here, decides the update
    # below, and a sweep or dispatcher must not change it in between (see Study).
    .with_for_update(of=_study_t)
)
_INSTANCE_COLUMNS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "series_id",
    "InstanceNumber",
    "TransferSyntaxUID",
    "path",
    "size",
    "received_at",
)
_ADD_INSTANCE = Prepared(insert(_instance), column_keys=_INSTANCE_COLUMNS)
_COUNT_SERIES = Prepared(
    update(_series)
    .where(_series.c.id == bindparam("b_id"))
    .values(
        NumberOfSeriesRelatedInstances=_series.c.NumberOfSeriesRelatedInstances + 1,
        last_received_at=bindparam("b_now", type_=_series.c.last_received_at.type),
    )
)
_count_study = (
    update(_study_t)
    .where(_study_t.c.id == bindparam("b_id"))
    .values(NumberOfStudyRelatedInstances=_study_t.c.NumberOfStudyRelatedInstances + 1)
)
_now = bindparam("b_now", type_=_study_t.c.last_received_at.type)
_COUNT_STUDY_DERIVED = Prepared(_count_study)
_COUNT_STUDY_RECEIVED = Prepared(_count_study.values(last_received_at=_now))
_REOPEN_STUDY = Prepared(_count_study.values(last_received_at=_now, state=StudyState.received, state_changed_at=_now))


def indexed_path(conn: Connection, sop_instance_uid: str) -> str | None:
    """The archive path of ``sop_instance_uid`` relative to data_dir, or ``None``."""
    rows = _PATH_OF.execute(conn, {"b_sop": sop_instance_uid})
    return rows[0][0] if rows else None


def record_instance(
    conn: Connection,
    header: InstanceHeader,
    *,
    path: str,
    transfer_syntax: str,
    size: int,
    now: datetime,
    derived: bool = False,
    known_new: bool = False,
) -> bool:
    """Add one instance to the index; return ``False`` if its SOP Instance UID is known.

    Runs in the caller's transaction on ``conn``; the caller commits. Concurrent
    creation of the same study or series by two associations surfaces as an
    ``IntegrityError``; the caller retries. The common case (an instance of a series
    already indexed) is four prepared statements, since it runs once per received image.
    ``known_new`` skips the resend check when the caller made it in this transaction.
    """
    if not known_new and indexed_path(conn, header.SOPInstanceUID) is not None:
        return False
    rows = _FIND_SERIES.execute(conn, {"b_series": header.SeriesInstanceUID})
    if not rows:
        with Session(bind=conn) as session:
            _record_in_new_series(
                session, header, path=path, transfer_syntax=transfer_syntax, size=size, now=now, derived=derived
            )
        return True
    series_id, study_id, study_uid, state = rows[0]
    if study_uid != header.StudyInstanceUID:
        log.warning(
            "instance %s names study %s but its series %s belongs to study %s; indexed under the latter",
            header.SOPInstanceUID,
            header.StudyInstanceUID,
            header.SeriesInstanceUID,
            study_uid,
        )
    _ADD_INSTANCE.execute(
        conn,
        {
            "SOPInstanceUID": header.SOPInstanceUID,
            "SOPClassUID": header.SOPClassUID,
            "series_id": series_id,
            "InstanceNumber": header.get("InstanceNumber", None),
            "TransferSyntaxUID": transfer_syntax,
            "path": path,
            "size": size,
            "received_at": now,
        },
    )
    _COUNT_SERIES.execute(conn, {"b_id": series_id, "b_now": now})
    if derived:
        _COUNT_STUDY_DERIVED.execute(conn, {"b_id": study_id})
    elif StudyState(state) != StudyState.received:
        log.info("study %s was %s; a late instance returns it to received", study_uid, StudyState(state).value)
        _REOPEN_STUDY.execute(conn, {"b_id": study_id, "b_now": now})
    else:
        _COUNT_STUDY_RECEIVED.execute(conn, {"b_id": study_id, "b_now": now})
    return True


def _record_in_new_series(
    session: Session,
    header: InstanceHeader,
    *,
    path: str,
    transfer_syntax: str,
    size: int,
    now: datetime,
    derived: bool,
) -> None:
    study = _study(session, header, now, derived)
    origin = SeriesOrigin.derived if derived else SeriesOrigin.received
    series = Series(
        SeriesInstanceUID=header.SeriesInstanceUID,
        study=study,
        origin=origin,
        NumberOfSeriesRelatedInstances=1,
        first_received_at=now,
        last_received_at=now,
        **_values(Series, header, _SERIES),
    )
    session.add(series)
    session.add(
        Instance(
            SOPInstanceUID=header.SOPInstanceUID,
            SOPClassUID=header.SOPClassUID,
            series=series,
            InstanceNumber=header.get("InstanceNumber", None),
            TransferSyntaxUID=transfer_syntax,
            path=path,
            size=size,
            received_at=now,
        )
    )
    study.NumberOfStudyRelatedSeries += 1
    study.NumberOfStudyRelatedInstances += 1
    if not derived and series.Modality:
        present = [m for m in study.ModalitiesInStudy.split("\\") if m]
        if series.Modality not in present:
            study.ModalitiesInStudy = _fit(Study, "ModalitiesInStudy", "\\".join([*present, series.Modality]))
    if not derived:
        study.last_received_at = now
        if study.state != StudyState.received:
            log.info(
                "study %s was %s; a late instance returns it to received", study.StudyInstanceUID, study.state.value
            )
            study.set_state(StudyState.received, now)
    session.flush()
