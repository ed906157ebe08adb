"""Engine, sessions and migrations for the index database.

SQLite (the default, one machine) runs in WAL mode with a busy timeout and
``synchronous=NORMAL``: a commit survives a crash of the process (``kill -9``), and the
archive files (fsynced before the commit) are the record of truth after a power loss:
:meth:`pipeline.archive.Archive.recover` re-indexes any file whose row was lost. Set
``RADTRIAGE_SQLITE_SYNCHRONOUS=FULL`` to fsync every commit as well. Write transactions
start with ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of
failing when one upgrades a read to a write; the archive's instance writers (one per
receiver process) queue on :mod:`pipeline.index.writer` first, which wakes the next
one the moment the lock is free instead of after the busy handler's sleep. Nothing here emits
SQLite-only SQL to the database a PostgreSQL URL names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_READONLY = "radtriage_readonly"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_SYNCHRONOUS = {"FULL": "FULL", "NORMAL": "NORMAL", "EXTRA": "EXTRA"}.get(
    os.environ.get("RADTRIAGE_SQLITE_SYNCHRONOUS", "NORMAL").upper(), "NORMAL"
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite otherwise defers it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    readonly = conn.get_execution_options().get(_READONLY, False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def create_index_engine(url: str, **kwargs: Any) -> Engine:
    """Create the engine for the index at ``url``.

    For SQLite the parent folder is created and the connection set up as described in
    the module docstring; other databases get a pre-ping pool.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("check_same_thread", False)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose sessions keep loaded objects usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session] | Engine, *, readonly: bool = False) -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back if it raises.

    Parameters
    ----------
    factory
        A session factory from :func:`make_session_factory`, or an engine.
    readonly
        Start a plain (deferred) transaction: on SQLite it does not take the write lock,
        so long reads (the worklist) never hold up the receiver. Do not write in it.
    """
    if isinstance(factory, Engine):
        factory = make_session_factory(factory)
    session = factory()
    try:
        if readonly:
            session.connection(execution_options={_READONLY: True})
        yield session
        if not readonly:
            session.commit()
        # read-only: close() below ends the transaction and keeps loaded objects usable
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    """The Alembic :class:`~alembic.config.Config` for ``url`` (for ``alembic`` commands)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# pg_advisory_lock key taken while migrating: any fixed number; this one reads "radtriag".
MIGRATION_LOCK_KEY = 0x7261647472696167


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock :data:`MIGRATION_LOCK_KEY` for the block.

    Every process that starts (``radtriage serve``, ``worker``, the CLI) migrates first;
    two of them on an empty database would otherwise both create the tables and one would
    fail. The lock lives on its own autocommit connection, so Alembic's transaction is
    untouched, and a process that dies releases it with its connection. SQLite needs no
    lock: Alembic reads the version and migrates inside one ``BEGIN IMMEDIATE``
    transaction, which already lets one writer at a time in.
    """
    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = create_index_engine(url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the index at ``url`` to ``revision`` (Alembic upgrade; idempotent).

    Safe to call from several processes at once: on PostgreSQL they take turns on an
    advisory lock (:func:`_migration_lock`), on SQLite on the database's write lock.
    """
    from alembic import command

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:  # its INFO lines are noise in `radtriage serve`
        alembic_log.setLevel(logging.WARNING)
    with _migration_lock(url):
        command.upgrade(alembic_config(url), revision)
    log.info("index %s is at revision %s", parsed.render_as_string(hide_password=True), revision)


# SQLSTATEs of PostgreSQL errors that pass: serialization failure, deadlock, disk
# full, out of memory, too many connections, and the connection-exception class.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "53100", "53200", "53300", "57P01", "57P03"}
_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "database or disk is full", "disk i/o error")


def is_transient(err: BaseException) -> bool:
    """Whether a database error may pass when the same transaction is tried again later.

    True for a locked or busy SQLite database (after its busy timeout), a full disk, a
    lost connection, and PostgreSQL's serialization failures and deadlocks; false for
    what retrying cannot fix (a missing table, a constraint violation, bad SQL).
    """
    if not isinstance(err, DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    sqlstate = str(getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None) or "")
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    return isinstance(err, OperationalError) and any(text in str(err.orig).lower() for text in _TRANSIENT_SQLITE)
