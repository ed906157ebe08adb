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

from sqlalchemy import String, insert, select, update
from sqlalchemy.orm import Session

from pipeline.header import InstanceHeader
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


_PATIENT = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
_STUDY = ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "ReferringPhysicianName")
_SERIES = ("Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber", "SeriesDate",
           "SeriesTime", "ImageType", "SliceThickness")


def _patient(session: Session, header: InstanceHeader) -> Patient:
    values = _values(Patient, header, _PATIENT)
    patient = session.scalar(select(Patient).where(
        Patient.PatientID == values["PatientID"], Patient.IssuerOfPatientID == values["IssuerOfPatientID"]))
    if patient is None:
        patient = Patient(**values)
        session.add(patient)
    return patient


def _study(session: Session, header: InstanceHeader, now: datetime, derived: bool) -> Study:
    study = session.scalar(select(Study).where(Study.StudyInstanceUID == header.StudyInstanceUID))
    if study is None:
        # A study first seen through our own output has nothing left to analyse.
        state = StudyState.analysed if derived else StudyState.received
        study = Study(StudyInstanceUID=header.StudyInstanceUID, patient=_patient(session, header),
                      state=state, state_changed_at=now, first_received_at=now, last_received_at=now,
                      NumberOfStudyRelatedSeries=0, NumberOfStudyRelatedInstances=0,
                      ModalitiesInStudy="", **_values(Study, header, _STUDY))
        session.add(study)
    return study


def record_instance(session: Session, header: InstanceHeader, *, path: str, transfer_syntax: str,
                    size: int, now: datetime, derived: bool = False) -> bool:
    """Add one instance to the index; return ``False`` if its SOP Instance UID is known.

    The caller commits. Concurrent creation of the same study or series by two
    associations surfaces as an ``IntegrityError``; the caller retries. The common case
    (an instance of a series already indexed) runs as four plain statements, since it
    runs once per received image.
    """
    if session.scalar(select(Instance.id).where(Instance.SOPInstanceUID == header.SOPInstanceUID)) is not None:
        return False
    row = session.execute(
        select(Series.id, Series.study_id, Study.StudyInstanceUID, Study.state)
        .join(Study, Series.study_id == Study.id)
        .where(Series.SeriesInstanceUID == header.SeriesInstanceUID)).first()
    if row is None:
        _record_in_new_series(session, header, path=path, transfer_syntax=transfer_syntax, size=size,
                              now=now, derived=derived)
        return True
    if row.StudyInstanceUID != header.StudyInstanceUID:
        log.warning("instance %s names study %s but its series %s belongs to study %s; indexed under the latter",
                    header.SOPInstanceUID, header.StudyInstanceUID, header.SeriesInstanceUID, row.StudyInstanceUID)
    no_sync = {"synchronize_session": False}
    session.execute(insert(Instance).values(
        SOPInstanceUID=header.SOPInstanceUID, SOPClassUID=header.SOPClassUID, series_id=row.id,
        InstanceNumber=header.get("InstanceNumber", None), TransferSyntaxUID=transfer_syntax,
        path=path, size=size, received_at=now))
    session.execute(update(Series).where(Series.id == row.id).values(
        NumberOfSeriesRelatedInstances=Series.NumberOfSeriesRelatedInstances + 1,
        last_received_at=now).execution_options(**no_sync))
    values: dict[str, Any] = {"NumberOfStudyRelatedInstances": Study.NumberOfStudyRelatedInstances + 1}
    if not derived:
        values["last_received_at"] = now
        if StudyState(row.state) != StudyState.received:
            log.info("study %s was %s; a late instance returns it to received", row.StudyInstanceUID,
                     StudyState(row.state).value)
            values.update(state=StudyState.received, state_changed_at=now)
    session.execute(update(Study).where(Study.id == row.study_id).values(**values).execution_options(**no_sync))
    return True


def _record_in_new_series(session: Session, header: InstanceHeader, *, path: str, transfer_syntax: str,
                          size: int, now: datetime, derived: bool) -> None:
    study = _study(session, header, now, derived)
    origin = SeriesOrigin.derived if derived else SeriesOrigin.received
    series = Series(SeriesInstanceUID=header.SeriesInstanceUID, study=study, origin=origin,
                    NumberOfSeriesRelatedInstances=1, first_received_at=now, last_received_at=now,
                    **_values(Series, header, _SERIES))
    session.add(series)
    session.add(Instance(SOPInstanceUID=header.SOPInstanceUID, SOPClassUID=header.SOPClassUID, series=series,
                         InstanceNumber=header.get("InstanceNumber", None), TransferSyntaxUID=transfer_syntax,
                         path=path, size=size, received_at=now))
    study.NumberOfStudyRelatedSeries += 1
    study.NumberOfStudyRelatedInstances += 1
    if not derived and series.Modality:
        present = [m for m in study.ModalitiesInStudy.split("\\") if m]
        if series.Modality not in present:
            study.ModalitiesInStudy = _fit(Study, "ModalitiesInStudy", "\\".join([*present, series.Modality]))
    if not derived:
        study.last_received_at = now
        if study.state != StudyState.received:
            log.info("study %s was %s; a late instance returns it to received", study.StudyInstanceUID,
                     study.state.value)
            study.set_state(StudyState.received, now)
    session.flush()
