"""Alembic environment: runs the revisions in ``versions/`` against the index URL.

Called programmatically by :func:`pipeline.index.db.migrate`; the ``alembic`` command
works too with ``-x url=...`` or ``sqlalchemy.url`` set.
"""

from __future__ import annotations

from alembic import context

import pipeline.index.accounts
import pipeline.index.triage  # noqa: F401 - registers the triage tables for autogenerate
from pipeline.index.db import create_index_engine
from pipeline.index.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_index_engine(_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # Batch mode rebuilds a table by copy, drop and rename; with foreign keys on,
                # dropping a referenced table (web_user) fails. SQLite's recipe: keys off
                # (only outside a transaction), rebuild, then check before committing.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("a migration left rows whose foreign key points nowhere; rolled back")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
