"""Suite-wide settings: real peers need TCP_NODELAY, Prefect needs a private home, and
``RADTRIAGE_TEST_INDEX`` picks the index database every test runs on.

``RADTRIAGE_TEST_INDEX=sqlite`` (the default) leaves each installation its SQLite file in
its data folder. ``RADTRIAGE_TEST_INDEX=postgresql`` starts one real PostgreSQL server for
the session and points ``RADTRIAGE_INDEX__URL`` at a fresh, migrated database of its own
for every test, every module and the session: an autouse fixture at each scope runs
before the other fixtures of that scope, so whatever builds ``Settings`` or a config file
(in the test, in a module or session fixture, in a ``radtriage serve`` child) gets a
database nobody else writes. A setting passed explicitly (``index={"url": ...}``) still
wins, so tests that need SQLite or an empty PostgreSQL database say so. Tests marked
``sqlite_only`` are skipped on PostgreSQL with their reason.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.postgres import PostgresServer

os.environ.setdefault("TCP_NODELAY", "1")
if "PREFECT_HOME" not in os.environ:  # a private one, removed when the session ends
    _PREFECT_HOME = tempfile.mkdtemp(prefix="radtriage-prefect-")
    os.environ["PREFECT_HOME"] = _PREFECT_HOME
    atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

INDEXES = ("sqlite", "postgresql")
TEST_INDEX = os.environ.get("RADTRIAGE_TEST_INDEX", "sqlite").strip().lower() or "sqlite"
# Folders whose tests set up their own databases (the cluster runs its own processes).
_OWN_INDEX = ("cluster",)


def pytest_configure(config: pytest.Config) -> None:
    if TEST_INDEX not in INDEXES:
        raise pytest.UsageError(f"RADTRIAGE_TEST_INDEX={TEST_INDEX!r}: use one of {', '.join(INDEXES)}")
    config.addinivalue_line(
        "markers", "sqlite_only(reason): the test checks SQLite itself; skipped when RADTRIAGE_TEST_INDEX=postgresql"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_INDEX != "postgresql":
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "checks SQLite itself")
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {reason}"))


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


def _own_index(request: pytest.FixtureRequest) -> Iterator[None]:
    """Point ``RADTRIAGE_INDEX__URL`` at a fresh PostgreSQL database while the scope lasts."""
    if TEST_INDEX != "postgresql" or any(part in _OWN_INDEX for part in Path(str(request.node.path)).parts):
        yield
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.migrated_database()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RADTRIAGE_INDEX__URL", url)
        yield
    server.drop(url, wait=False)


@pytest.fixture(scope="session", autouse=True)
def _session_index(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own_index(request)


@pytest.fixture(scope="module", autouse=True)
def _module_index(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own_index(request)


@pytest.fixture(autouse=True)
def _test_index(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _own_index(request)
