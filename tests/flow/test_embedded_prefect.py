"""The embedded Prefect server's configuration, as ``radtriage serve`` starts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.serve import EmbeddedPrefect, embedded_prefect
from pipeline.config import Settings, load_settings

RECORDER = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED"


def _context() -> Settings:
    # The factory reads settings only; nothing is started or opened here.
    return load_settings(None)


def test_the_embedded_server_skips_task_history_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("RADTRIAGE_STORAGE__DATA_DIR", str(tmp_path))
    default = embedded_prefect(_context())
    assert isinstance(default, EmbeddedPrefect)
    env = default.server.environment()
    assert env[RECORDER] == "false"
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect") and "PREFECT_API_URL" not in env

    monkeypatch.setenv("RADTRIAGE_TRIAGE__EMBEDDED_PREFECT_TASK_HISTORY", "true")
    asked = embedded_prefect(_context())
    assert asked is not None and asked.server.environment()[RECORDER] == "true"


def test_an_external_prefect_api_means_no_embedded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert embedded_prefect(_context()) is None
