"""Suite-wide settings: real peers need TCP_NODELAY, Prefect needs a private home."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.postgres import PostgresServer

os.environ.setdefault("TCP_NODELAY", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="radtriage-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session, started only when a test asks for it.

    Its folder is not under pytest's temp folder, which the ``postgres`` user (the server
    runs as it when the tests run as root) cannot enter.
    """
    folder = Path(tempfile.mkdtemp(prefix="radtriage-postgres-"))
    server = PostgresServer(folder).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
