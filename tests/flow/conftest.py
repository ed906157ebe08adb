"""Fixtures for the triage flow: one real Prefect API server for the session.

The server is the same embedded server ``radtriage serve`` starts; its URL goes into
the environment (and Prefect's global settings) so that threads and child processes
use it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.triage.prefect_server import LocalPrefectServer, load_auth_string


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefectServer]:
    home = tmp_path_factory.mktemp("prefect-home")
    # With an API auth string, as radtriage serve runs its embedded server.
    server = LocalPrefectServer(home, ui=False, auth_string=load_auth_string(home))
    from flows.engine import use_api_url

    use_api_url(server.start(), auth_string=server.auth_string)
    yield server
    server.stop()


@pytest.fixture
def flow_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings for an installation in ``tmp_path`` (SQLite index, archive folder)."""
    from pipeline.config import load_settings

    monkeypatch.setenv("RADTRIAGE_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS", "0")
    return load_settings(Path(__file__).resolve().parents[2] / "config" / "default.toml")
