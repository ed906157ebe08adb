"""One query engine over the index, for C-FIND and QIDO-RS.

A :class:`Query` names a level, an information model and the keys asked for (keyword →
the DICOM string value, ``""`` for universal matching). :func:`validate` checks the
hierarchy rules; :func:`find` turns the keys into one SQL statement per page of matches
(SQLite and PostgreSQL alike; nothing is filtered in Python) and yields one ``dict`` per
match with every requested keyword the index holds (absent ones map to ``None``).

Matching (PS3.4 C.2.2.2):

=================  ==================================================================
universal          an empty value, or ``*`` alone: every entity matches
single value       equality; person names (PN) case-insensitive unless ``strict_names``
wildcard           ``*`` any run, ``?`` one character (SQL ``LIKE`` with ``%``/``_``
                   escaped; on SQLite ``GLOB`` when case matters, as its ``LIKE`` never
                   minds case)
range (DA, TM)     ``A-B``, ``A-``, ``-B``; an entity with no value never matches a
                   range; an upper time bound covers its whole precision (``-12`` is
                   up to 12:59:59.999999). The index holds no DT attribute yet.
list               backslash-separated values: any of them (UIDs, and CS such as
                   ``Modality=CT\\MR``)
=================  ==================================================================

``SpecificCharacterSet`` of each match is the one its level's row was received in, so a
caller that encodes with it returns names as they were received. ``ModalitiesInStudy``
covers every series, radtriage's own SEG and SR included (``Study.ModalitiesInStudy``
keeps the received ones only, for the worklist).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from pipeline.errors import PermanentError
from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Patient, Series, Study

PAGE_SIZE = 500


class Level(str, enum.Enum):
    """Query/Retrieve levels, top to bottom."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return list(Level).index(self)


class InformationModel(str, enum.Enum):
    """Patient Root has a PATIENT level; Study Root starts at STUDY (patient keys are study keys)."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


class QueryError(PermanentError):
    """A query the engine refuses, with a reason to show the caller."""


class IdentifierError(QueryError):
    """The identifier breaks the hierarchy rules (C-FIND: 0xA900)."""


class BadValueError(QueryError):
    """A key's value cannot be understood, e.g. a malformed date range (C-FIND: 0xC000-family)."""


@dataclass(frozen=True)
class Query:
    """What was asked: the level, the model, and keyword → value (``""`` universal)."""

    level: Level
    model: InformationModel = InformationModel.STUDY_ROOT
    keys: Mapping[str, str] = field(default_factory=dict)
    strict_names: bool = False
    # Relational queries (PS3.4 C.4.1.2.2.1; QIDO-RS ``/series`` and ``/instances``):
    # the unique keys of the levels above may be absent or match many.
    relational: bool = False


# keyword -> (level, VR, column or None). Columns are held; None: computed or not held.
_HELD: dict[str, tuple[Level, str, Any]] = {
    "PatientName": (Level.PATIENT, "PN", Patient.PatientName),
    "PatientID": (Level.PATIENT, "LO", Patient.PatientID),
    "IssuerOfPatientID": (Level.PATIENT, "LO", Patient.IssuerOfPatientID),
    "PatientBirthDate": (Level.PATIENT, "DA", Patient.PatientBirthDate),
    "PatientSex": (Level.PATIENT, "CS", Patient.PatientSex),
    "StudyInstanceUID": (Level.STUDY, "UI", Study.StudyInstanceUID),
    "StudyDate": (Level.STUDY, "DA", Study.StudyDate),
    "StudyTime": (Level.STUDY, "TM", Study.StudyTime),
    "AccessionNumber": (Level.STUDY, "SH", Study.AccessionNumber),
    "StudyID": (Level.STUDY, "SH", Study.StudyID),
    "StudyDescription": (Level.STUDY, "LO", Study.StudyDescription),
    "ReferringPhysicianName": (Level.STUDY, "PN", Study.ReferringPhysicianName),
    "InstitutionName": (Level.STUDY, "LO", Study.InstitutionName),
    "NumberOfStudyRelatedSeries": (Level.STUDY, "IS", Study.NumberOfStudyRelatedSeries),
    "NumberOfStudyRelatedInstances": (Level.STUDY, "IS", Study.NumberOfStudyRelatedInstances),
    "SeriesInstanceUID": (Level.SERIES, "UI", Series.SeriesInstanceUID),
    "Modality": (Level.SERIES, "CS", Series.Modality),
    "SeriesNumber": (Level.SERIES, "IS", Series.SeriesNumber),
    "SeriesDescription": (Level.SERIES, "LO", Series.SeriesDescription),
    "SeriesDate": (Level.SERIES, "DA", Series.SeriesDate),
    "SeriesTime": (Level.SERIES, "TM", Series.SeriesTime),
    "BodyPartExamined": (Level.SERIES, "CS", Series.BodyPartExamined),
    "NumberOfSeriesRelatedInstances": (Level.SERIES, "IS", Series.NumberOfSeriesRelatedInstances),
    "SOPInstanceUID": (Level.IMAGE, "UI", Instance.SOPInstanceUID),
    "SOPClassUID": (Level.IMAGE, "UI", Instance.SOPClassUID),
    "InstanceNumber": (Level.IMAGE, "IS", Instance.InstanceNumber),
    "AvailableTransferSyntaxUID": (Level.IMAGE, "UI", Instance.TransferSyntaxUID),
}
# Computed return keys: returned, never matched on (PS3.4 C.6: return keys only).
_COMPUTED = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "ModalitiesInStudy": Level.STUDY,  # matched, though: any series' modality
}
# Keys workstations ask for that the index does not hold: returned empty; their level
# still counts for the "no keys below the query level" rule.
_NOT_HELD = {
    Level.PATIENT: (
        "OtherPatientIDs OtherPatientNames PatientBirthTime PatientComments EthnicGroup "
        "PatientMotherBirthName OtherPatientIDsSequence"
    ),
    Level.STUDY: (
        "NameOfPhysiciansReadingStudy AdmittingDiagnosesDescription PatientAge PatientSize PatientWeight "
        "Occupation AdditionalPatientHistory OtherStudyNumbers SOPClassesInStudy IssuerOfAccessionNumberSequence "
        "ProcedureCodeSequence RequestingPhysician"
    ),
    Level.SERIES: (
        "PerformedProcedureStepStartDate PerformedProcedureStepStartTime RequestAttributesSequence ProtocolName "
        "Laterality OperatorsName PerformingPhysicianName StationName Manufacturer ManufacturerModelName"
    ),
    Level.IMAGE: (
        "ContentDate ContentTime AcquisitionDate AcquisitionTime AcquisitionDateTime NumberOfFrames Rows Columns "
        "ImageComments ReferencedSOPClassUIDInFile ImageType"
    ),
}
_LEVEL_OF = {kw: level for level, names in _NOT_HELD.items() for kw in names.split()}
_LEVEL_OF.update(_COMPUTED)
_LEVEL_OF.update({kw: spec[0] for kw, spec in _HELD.items()})
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_TABLE = {Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series, Level.IMAGE: Instance}


def returnable_keys(level: Level, model: InformationModel = InformationModel.STUDY_ROOT) -> list[str]:
    """Every keyword the index holds or computes at ``level`` and the levels above it."""
    keys = [*_HELD, *_COMPUTED]
    return [kw for kw in keys if (lv := level_of(kw, model)) is not None and lv.depth <= level.depth]


def is_known(keyword: str) -> bool:
    """Whether the engine knows the level of ``keyword`` (held, computed or returned empty)."""
    return keyword in _LEVEL_OF


def level_of(keyword: str, model: InformationModel) -> Level | None:
    """The level ``keyword`` belongs to in ``model`` (``None``: unknown, or of no level)."""
    level = _LEVEL_OF.get(keyword)
    if level is Level.PATIENT and model is InformationModel.STUDY_ROOT:
        return Level.STUDY  # Study Root: patient attributes are study attributes
    return level


def validate(query: Query) -> None:
    """Raise :class:`IdentifierError` unless ``query`` keeps the hierarchical rules.

    The model must have the level; no key may belong to a level below it; each level
    above it needs its unique key with a single value (Patient Root: PatientID above
    STUDY). Keys of levels above other than unique keys are accepted and matched, as
    most SCPs do (relational-style, tolerant on read).
    """
    if query.model is InformationModel.STUDY_ROOT and query.level is Level.PATIENT:
        raise IdentifierError("QueryRetrieveLevel PATIENT is not in the Study Root model; use Patient Root (-P)")
    below = sorted(
        kw for kw in query.keys if (lv := level_of(kw, query.model)) is not None and lv.depth > query.level.depth
    )
    if below:
        raise IdentifierError(f"keys below the {query.level.value} level: {', '.join(below)}")
    if query.relational:
        return
    top = Level.PATIENT if query.model is InformationModel.PATIENT_ROOT else Level.STUDY
    for level in list(Level)[top.depth : query.level.depth]:
        key = UNIQUE_KEYS[level]
        value = query.keys.get(key, "")
        if not value or value == "*":
            raise IdentifierError(f"{key} is required at {query.level.value} level (a single value)")
        if "\\" in value or "*" in value or "?" in value:
            raise IdentifierError(f"{key} must be a single value above the {query.level.value} level")


# -- matching -----------------------------------------------------------------------


class _CaseSensitiveLike(FunctionElement[bool]):
    """``column LIKE pattern`` that minds case on every backend (SQLite: ``GLOB``)."""

    type = Boolean()
    inherit_cache = True
    name = "cs_like"


@compiles(_CaseSensitiveLike)
def _cs_like(element: _CaseSensitiveLike, compiler: Any, **kw: Any) -> str:
    column, like, _glob = list(element.clauses)
    return f"({compiler.process(column, **kw)} LIKE {compiler.process(like, **kw)} ESCAPE '!')"


@compiles(_CaseSensitiveLike, "sqlite")
def _cs_glob(element: _CaseSensitiveLike, compiler: Any, **kw: Any) -> str:
    column, _like, glob = list(element.clauses)
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)})"


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def _glob_pattern(value: str) -> str:
    return value.replace("[", "[[]")  # * and ? are GLOB's own wildcards


def _is_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _bound(keyword: str, vr: str, text: str) -> str:
    text = text.strip()
    if vr == "DA":
        text = text.replace(".", "") if len(text) == 10 else text  # ACR-NEMA YYYY.MM.DD
        ok = _DATE.match(text)
    elif vr == "TM":
        text = text.replace(":", "")
        ok = _TIME.match(text)
    else:
        raise BadValueError(f"{keyword}: no range matching for VR {vr}")
    if not ok:
        raise BadValueError(f"{keyword} {text!r} is not a valid {vr} value")
    return text


def _range(column: Any, keyword: str, vr: str, value: str) -> ColumnElement[bool]:
    low_text, _, high_text = value.partition("-")
    if not low_text.strip() and not high_text.strip():
        raise BadValueError(f"{keyword} range {value!r} has neither bound")
    terms: list[ColumnElement[bool]] = [column != ""]
    if low_text.strip():
        terms.append(column >= _bound(keyword, vr, low_text))
    if high_text.strip():
        high = _bound(keyword, vr, high_text)
        # DA is always 8 digits; a shorter TM/DT bound covers its whole precision.
        terms.append(column <= (high if vr == "DA" else high + "~"))
    return and_(*terms)


def _single(column: Any, keyword: str, vr: str, value: str, strict_names: bool) -> ColumnElement[bool]:
    if vr == "IS":
        try:
            return column == int(value)
        except ValueError:
            raise BadValueError(f"{keyword} {value!r} is not a number") from None
    if vr in ("DA", "TM") and "-" in value:
        return _range(column, keyword, vr, value)
    if vr in ("DA", "TM") and not _is_wildcard(value):
        return column == _bound(keyword, vr, value)
    fold = vr == "PN" and not strict_names
    if vr == "UI" or not _is_wildcard(value):
        return func.lower(column) == func.lower(value) if fold else column == value
    if fold:
        return func.lower(column).like(func.lower(_like_pattern(value)), escape="!")
    return _CaseSensitiveLike(column, _like_pattern(value), _glob_pattern(value))


def _universal(value: str) -> bool:
    return value.strip() in ("", "*")


def _condition(keyword: str, vr: str, column: Any, value: str, strict_names: bool) -> ColumnElement[bool] | None:
    if _universal(value):
        return None
    values = [v for v in value.split("\\") if v.strip()] if vr != "PN" else [value]
    terms = [_single(column, keyword, vr, v.strip(), strict_names) for v in values]
    return terms[0] if len(terms) == 1 else or_(*terms)


def _modalities_condition(value: str) -> ColumnElement[bool] | None:
    if _universal(value):
        return None
    terms = [_single(Series.Modality, "ModalitiesInStudy", "CS", v.strip(), True) for v in value.split("\\") if v]
    if not terms:
        return None
    other = Series.__table__.alias("other_series")
    cond = or_(*terms).self_group()
    # Re-target the Series conditions at the alias, correlated to the study.
    adapted = _retarget(cond, other)
    return exists(select(other.c.id).where(other.c.study_id == Study.id, adapted))


def _retarget(cond: ColumnElement[bool], alias: Any) -> ColumnElement[bool]:
    from sqlalchemy.sql.util import ClauseAdapter

    return ClauseAdapter(alias).traverse(cond)


# -- statements -----------------------------------------------------------------------


def _select(query: Query) -> tuple[Select[Any], list[str]]:
    """The statement for one page (before keyset and limit) and the keywords it returns."""
    level = query.level
    table = _TABLE[level]
    columns: list[Any] = [table.id.label("_id")]
    names: list[str] = []
    charset = {Level.PATIENT: Patient, Level.STUDY: Study}.get(level, Series).SpecificCharacterSet
    columns.append(charset.label("SpecificCharacterSet"))
    if level.depth >= Level.STUDY.depth:
        columns.append(Study.id.label("_study_id"))
    where: list[ColumnElement[bool]] = []
    for keyword, value in query.keys.items():
        spec = _HELD.get(keyword)
        if spec is not None:
            key_level = level_of(keyword, query.model)
            assert key_level is not None
            if key_level.depth > level.depth:
                continue  # validate() refuses these; a caller that skipped it gets nothing extra
            _, vr, column = spec
            columns.append(column.label(keyword))
            names.append(keyword)
            # Counters are return keys only; matching on them is not defined.
            if not keyword.startswith("NumberOf"):
                cond = _condition(keyword, vr, column, value, query.strict_names)
                if cond is not None:
                    where.append(cond)
        elif keyword == "ModalitiesInStudy" and level.depth >= Level.STUDY.depth:
            cond = _modalities_condition(value)
            if cond is not None:
                where.append(cond)
        elif keyword.startswith("NumberOfPatientRelated"):
            columns.append(_patient_count(keyword).label(keyword))
            names.append(keyword)
    stmt = select(*columns).select_from(table)
    if level.depth >= Level.IMAGE.depth:
        stmt = stmt.join(Series, Instance.series_id == Series.id)
    if level.depth >= Level.SERIES.depth:
        stmt = stmt.join(Study, Series.study_id == Study.id)
    if level.depth >= Level.STUDY.depth:
        stmt = stmt.join(Patient, Study.patient_id == Patient.id)
    return stmt.where(*where), names


def _patient_count(keyword: str) -> Any:
    # An alias: at STUDY level and below the outer query has ``study`` too.
    other = aliased(Study)
    counted = {
        "NumberOfPatientRelatedStudies": func.count(other.id),
        "NumberOfPatientRelatedSeries": func.coalesce(func.sum(other.NumberOfStudyRelatedSeries), 0),
        "NumberOfPatientRelatedInstances": func.coalesce(func.sum(other.NumberOfStudyRelatedInstances), 0),
    }[keyword]
    return select(counted).where(other.patient_id == Patient.id).correlate(Patient).scalar_subquery()


def _modalities(session: Session, study_ids: list[int]) -> dict[int, str]:
    """ModalitiesInStudy per study, every series counted, in order of first arrival."""
    rows = session.execute(
        select(Series.study_id, Series.Modality)
        .where(Series.study_id.in_(study_ids), Series.Modality != "")
        .group_by(Series.study_id, Series.Modality)
        .order_by(Series.study_id, func.min(Series.id))
    ).all()
    out: dict[int, list[str]] = {}
    for study_id, modality in rows:
        out.setdefault(study_id, []).append(modality)
    return {k: "\\".join(v) for k, v in out.items()}


def find(
    session_factory: sessionmaker[Session],
    query: Query,
    *,
    page_size: int = PAGE_SIZE,
    offset: int = 0,
    newest_first: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the matches of ``query`` in index order, one page per short read transaction.

    Each match maps every requested keyword the index holds or computes to its value
    (``None`` when empty), plus ``SpecificCharacterSet`` (as received, ``""`` default).
    A consumer that stops iterating (a C-CANCEL, a QIDO ``limit``) stops the queries.
    ``offset`` skips that many matches (QIDO-RS); ``newest_first`` yields the most
    recently indexed first (a web study list). Raises :class:`QueryError` (before the
    first match) for a query it cannot run.
    """
    validate(query)
    stmt, names = _select(query)
    want_modalities = "ModalitiesInStudy" in query.keys and query.level.depth >= Level.STUDY.depth
    table = _TABLE[query.level]
    last: int | None = None
    while True:
        page = stmt
        if last is not None:
            page = page.where(table.id < last if newest_first else table.id > last)
        page = page.order_by(table.id.desc() if newest_first else table.id)
        if last is None and offset:
            page = page.offset(offset)
        with session_scope(session_factory, readonly=True) as session:
            rows = session.execute(page.limit(page_size)).all()
            modalities = _modalities(session, sorted({r._study_id for r in rows})) if want_modalities and rows else {}
        for row in rows:
            match: dict[str, Any] = {name: getattr(row, name) for name in names}
            match["SpecificCharacterSet"] = row.SpecificCharacterSet or ""
            if want_modalities:
                match["ModalitiesInStudy"] = modalities.get(row._study_id)
            yield match
        if len(rows) < page_size:
            return
        last = rows[-1]._id
