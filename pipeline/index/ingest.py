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

from sqlalchemy import String, select
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
                    size: int, now: datetime, derived: bool = False) -> Instance | None:
    """Add one instance to the index; return ``None`` if its SOP Instance UID is known.

    The caller commits. Concurrent creation of the same study or series by two
    associations surfaces as an ``IntegrityError`` at flush; the caller retries.
    """
    if session.scalar(select(Instance.id).where(Instance.SOPInstanceUID == header.SOPInstanceUID)) is not None:
        return None
    series = session.scalar(select(Series).where(Series.SeriesInstanceUID == header.SeriesInstanceUID))
    if series is None:
        study = _study(session, header, now, derived)
        origin = SeriesOrigin.derived if derived else SeriesOrigin.received
        series = Series(SeriesInstanceUID=header.SeriesInstanceUID, study=study, origin=origin,
                        NumberOfSeriesRelatedInstances=0, first_received_at=now, last_received_at=now,
                        **_values(Series, header, _SERIES))
        session.add(series)
        study.NumberOfStudyRelatedSeries += 1
        modality = series.Modality
        if not derived and modality:
            present = [m for m in study.ModalitiesInStudy.split("\\") if m]
            if modality not in present:
                study.ModalitiesInStudy = _fit(Study, "ModalitiesInStudy", "\\".join([*present, modality]))
    else:
        study = series.study
        if study.StudyInstanceUID != header.StudyInstanceUID:
            log.warning("instance %s names study %s but its series %s belongs to study %s; indexed under the latter",
                        header.SOPInstanceUID, header.StudyInstanceUID, series.SeriesInstanceUID, study.StudyInstanceUID)
    instance = Instance(SOPInstanceUID=header.SOPInstanceUID, SOPClassUID=header.SOPClassUID, series=series,
                        InstanceNumber=header.get("InstanceNumber", None), TransferSyntaxUID=transfer_syntax,
                        path=path, size=size, received_at=now)
    session.add(instance)
    series.NumberOfSeriesRelatedInstances += 1
    series.last_received_at = now
    study.NumberOfStudyRelatedInstances += 1
    if not derived:
        study.last_received_at = now
        if study.state != StudyState.received:
            log.info("study %s was %s; a late instance returns it to received", study.StudyInstanceUID, study.state.value)
            study.set_state(StudyState.received, now)
    return instance
