"""The radiologist's worklist: every study, urgent AI findings first.

Reads the index (:mod:`pipeline.index.schema`) and the triage tables the flow fills
(:mod:`pipeline.index.triage`). A study without a :class:`WorklistEntry` is shown as
AI pending, routine, unread: a study is never hidden because its AI did not run.

Order: unread before read; within each, critical → urgent → routine; within each
priority, the study received first comes first (it has waited longest); the study's
index id breaks the last ties, so the order is total and pages (``OFFSET``) never
overlap or skip a study while nothing changes.

A department has tens of thousands of studies: the worklist is read a page at a time
(:func:`worklist_page`, with the total), and the page polls :func:`worklist_version`,
a few aggregates that change when anything a page shows changes, instead of rendering
the page to find out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from pipeline.ai.findings import Priority
from pipeline.errors import RadtriageError
from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Patient, Series, SeriesOrigin, Study, lock_study, utcnow
from pipeline.index.triage import (
    AIResult,
    AIStatus,
    RunStatus,
    TriageRun,
    WorklistEntry,
    queue_positions,
    worklist_entry,
)
from pipeline.web.worklist_items import WorklistItem, build_item

DEFAULT_LIMIT = 1000
MAX_LIMIT = 1000  # one API answer; more is paged
# The page's default: every unread study (never hidden for its age) and what was read lately.
RECENT_READ = timedelta(days=7)
# A search is a few words typed by a person; each word is three LIKEs in the query, and
# SQLite refuses an expression tree deeper than 1000.
MAX_SEARCH_WORDS = 8
MAX_SEARCH_CHARS = 128


class StudyNotFound(RadtriageError):
    """No study with that StudyInstanceUID is in the index."""


class ReadFilter(str, enum.Enum):
    """Which studies by read state; ``recent`` is the worklist page's default."""

    recent = "recent"  # unread, and read within RECENT_READ
    unread = "unread"
    read = "read"
    all = "all"


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


def _value(choice: str | enum.Enum | None) -> str | None:
    if choice is None or choice == "":
        return None
    return choice.value if isinstance(choice, enum.Enum) else str(choice)


def _base_query(*columns: Any, patient: bool = True) -> Any:
    """The worklist's studies in its order; ``columns`` default to the whole rows."""
    priority = func.coalesce(WorklistEntry.priority, Priority.ROUTINE.value)
    # The flow writes priority_rank (Priority.rank) with the priority: the order is one
    # indexed column, not a CASE over the names.
    rank = func.coalesce(WorklistEntry.priority_rank, Priority.ROUTINE.rank)
    unread_first = case((WorklistEntry.read_at.is_(None), 0), else_=1)
    query = select(*(columns or (Study, Patient, WorklistEntry))).select_from(Study)
    if patient:
        query = query.join(Patient, Study.patient_id == Patient.id)
    query = query.outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id).order_by(
        unread_first, rank.desc(), Study.first_received_at, Study.id
    )
    return query, priority


@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist is narrowed to; every field optional (``None``: no filter).

    Parameters
    ----------
    status
        AI status (``pending``, ``running``, ``done``, ``failed``, ``not_applicable``); a
        study the flow has not touched yet counts as ``pending``.
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
        ``True``/``"read"`` only read studies, ``False``/``"unread"`` only unread ones,
        ``"recent"`` unread ones and those read within :data:`RECENT_READ`.
    """

    status: AIStatus | str | None = None
    priority: Priority | str | None = None
    modality: str | None = None
    search: str | None = None
    read: bool | ReadFilter | str | None = None


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist and where it sits in the whole."""

    items: list[WorklistItem]
    total: int  # studies matching the filter, on every page together
    offset: int
    limit: int

    @property
    def first(self) -> int:
        """1-based number of the first study shown (0 when none is)."""
        return self.offset + 1 if self.items else 0

    @property
    def last(self) -> int:
        return self.offset + len(self.items)

    @property
    def has_previous(self) -> bool:
        return self.offset > 0

    @property
    def has_next(self) -> bool:
        return self.offset + self.limit < self.total

    @property
    def number(self) -> int:
        """1-based page number."""
        return self.offset // self.limit + 1

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.limit))

    def range_text(self) -> str:
        """``"1–50 of 5,000"``; ``"0 of 0"`` for an empty worklist."""
        if not self.items:
            return f"0 of {self.total:,}"
        return f"{self.first:,}–{self.last:,} of {self.total:,}"


def _read_filter(read: bool | ReadFilter | str | None) -> ReadFilter:
    if read is None or read == "":
        return ReadFilter.all
    if isinstance(read, bool):
        return ReadFilter.read if read else ReadFilter.unread
    return ReadFilter(read.value if isinstance(read, enum.Enum) else read)


def _filtered(query: Any, where: WorklistFilter, priority_col: Any) -> Any:
    """``query`` (over Study, Patient and the outer-joined WorklistEntry) narrowed by ``where``."""
    status_value = _value(where.status)
    if status_value is not None:
        status_value = AIStatus(status_value).value
        if status_value == AIStatus.pending.value:
            query = query.where(or_(WorklistEntry.study_id.is_(None), WorklistEntry.ai_status == AIStatus.pending))
        else:
            query = query.where(WorklistEntry.ai_status == AIStatus(status_value))
    priority_value = _value(where.priority)
    if priority_value is not None:
        query = query.where(priority_col == Priority(priority_value).value)
    if where.modality:
        query = query.where(
            exists().where(
                and_(
                    Series.study_id == Study.id,
                    Series.origin == SeriesOrigin.received,
                    func.upper(Series.Modality) == where.modality.strip().upper(),
                )
            )
        )
    for word in check_search(where.search).split():
        pattern = f"%{_escape_like(word)}%"
        query = query.where(
            or_(
                Patient.PatientName.ilike(pattern, escape="\\"),
                Patient.PatientID.ilike(pattern, escape="\\"),
                Study.AccessionNumber.ilike(pattern, escape="\\"),
            )
        )
    read = _read_filter(where.read)
    if read is ReadFilter.read:
        query = query.where(WorklistEntry.read_at.is_not(None))
    elif read is ReadFilter.unread:
        query = query.where(WorklistEntry.read_at.is_(None))
    elif read is ReadFilter.recent:
        query = query.where(or_(WorklistEntry.read_at.is_(None), WorklistEntry.read_at >= utcnow() - RECENT_READ))
    return query


def worklist_page(
    session: Session, where: WorklistFilter = WorklistFilter(), *, offset: int = 0, limit: int = 50
) -> WorklistPage:
    """One page of the worklist in its order, with the number of studies on all pages.

    Two queries for the page (the count, the rows) and two for what the rows show (the
    current results of these studies, the AI queue); their cost grows with the page,
    not with the archive, except for the count and the sort, which the database does
    over the filtered studies. Raises :class:`BadSearch` for a search over the limits.
    """
    offset, limit = max(0, int(offset)), max(1, min(int(limit), MAX_LIMIT))
    # The sort and OFFSET run over study ids only (a deep page sorts ids, not whole
    # rows: 5x faster at offset 25,000); the page's 50 rows are read by id after.
    searching = bool((where.search or "").strip())
    ordered, priority_col = _base_query(Study.id, patient=searching)
    ordered = _filtered(ordered, where, priority_col)
    counted = select(func.count()).select_from(Study).outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
    if searching:
        counted = counted.join(Patient, Study.patient_id == Patient.id)
    total = int(session.scalar(_filtered(counted, where, priority_col)) or 0)
    ids = list(session.scalars(ordered.offset(offset).limit(limit))) if offset < total else []
    full, _ = _base_query()
    found = {
        study.id: (study, patient, entry) for study, patient, entry in session.execute(full.where(Study.id.in_(ids)))
    }
    rows = [found[i] for i in ids if i in found]
    results = _current_results(session, ids)
    waiting = [study.id for study, _, entry in rows if entry is not None and entry.ai_status == AIStatus.pending]
    positions = queue_positions(session, waiting) if waiting else {}
    items = [
        build_item(study, patient, entry, results.get(study.id, []), positions.get(study.id))
        for study, patient, entry in rows
    ]
    return WorklistPage(items, total, offset, limit)


def list_worklist(
    session: Session,
    *,
    status: AIStatus | str | None = None,
    priority: Priority | str | None = None,
    modality: str | None = None,
    search: str | None = None,
    read: bool | ReadFilter | str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> list[WorklistItem]:
    """The worklist's studies from ``offset``, at most ``limit``; see :class:`WorklistFilter`."""
    where = WorklistFilter(status, priority, modality, search, read)
    return worklist_page(session, where, offset=offset, limit=limit).items


def worklist_version(session: Session) -> tuple[object, ...]:
    """A few aggregates that change whenever anything a worklist page shows changes.

    The live page asks every few seconds whether its rows changed; rendering them to
    find out (as the first version did) cost a sort and a page of templates per poll.
    These are one index lookup each, plus one pass over ``worklist_entry`` (about 10 ms
    at 50,000 studies on SQLite; an index on ``updated_at`` or a trigger-kept counter
    would make it a lookup too):

    * studies: their number and the highest id (one arrives or goes); the highest
      instance id (an image arrives: modalities, times; a SEG or SR is stored);
    * worklist entries: their number, the latest ``updated_at`` and the sum of the
      priority ranks (the flow and the dispatcher write them), how many are read and
      the latest ``read_at`` (marking read sets it to now; marking unread lowers the
      count);
    * the AI queue: how many runs wait and the highest id among them (a run is
      dispatched or a worker takes one: every queue position may move).

    What none of these see (a patient's name corrected in place) is caught by the
    callers adding the minute to the ETag, which the relative times need anyway.
    """
    # Apart, not in one SELECT: alone, each is answered from an index without a table scan.
    studies = (session.scalar(select(func.count()).select_from(Study)), session.scalar(select(func.max(Study.id))))
    newest_instance = session.scalar(select(func.max(Instance.id)))
    entries = session.execute(
        select(
            func.count(),
            func.max(WorklistEntry.updated_at),
            func.sum(WorklistEntry.priority_rank),
            func.count(WorklistEntry.read_at),
            func.max(WorklistEntry.read_at),
        )
    ).one()
    queue = session.execute(
        select(func.count(), func.max(TriageRun.id)).where(TriageRun.status == RunStatus.dispatched)
    ).one()
    return (*studies, newest_instance, *entries, *queue)


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
    waiting = entry is not None and entry.ai_status == AIStatus.pending
    position = queue_positions(session, [study.id]).get(study.id) if waiting else None
    return build_item(study, patient, entry, _current_results(session, [study.id]).get(study.id, []), position)


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
    study = lock_study(session, StudyInstanceUID=study_uid)  # the entry may be created below
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
