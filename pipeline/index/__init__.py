"""The index database: what the archive holds and what triage made of it.

:mod:`.schema` (patients, studies, series, instances and a study's state),
:mod:`.triage` (triage runs, AI results and findings, worklist entries, forward jobs),
:mod:`.accounts` (web users, sessions, login failures, the audit log), :mod:`.db`
(engine, sessions, which errors are transient, Alembic migrations in ``migrations/``)
and :mod:`.prepared` (per-image statements compiled once). SQLite by default,
PostgreSQL for more than one machine; nothing here is SQLite-only.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`. Never the packages that use it.
"""

from pipeline.index.db import create_index_engine, make_session_factory, migrate, session_scope
from pipeline.index.schema import (
    Base,
    Instance,
    Patient,
    Series,
    SeriesOrigin,
    Study,
    StudyState,
    utcnow,
)

__all__ = [
    "Base",
    "Instance",
    "Patient",
    "Series",
    "SeriesOrigin",
    "Study",
    "StudyState",
    "create_index_engine",
    "make_session_factory",
    "migrate",
    "session_scope",
    "utcnow",
]
