"""The archive index: ORM schema (:mod:`.schema`) and database plumbing (:mod:`.db`)."""

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
