"""Do the migrations build the schema the models describe? One check for every database."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import pipeline.index.accounts
import pipeline.index.triage  # noqa: F401 - all tables on Base.metadata
from pipeline.index.db import create_index_engine, migrate
from pipeline.index.schema import Base


def drift_after_migrations(url: str, *, times: int = 1) -> list[Any]:
    """Migrate the index at ``url`` to head (``times`` times: it must be idempotent) and
    return what Alembic still finds different from the models; empty when they match."""
    for _ in range(times):
        migrate(url)
    engine = create_index_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()
