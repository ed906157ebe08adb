"""Migration 0003 matches the models; `radtriage user add`; WebServer start/stop and a busy port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.index.db import migrate
from pipeline.web import WebServer
from tests.schema import drift_after_migrations

from .conftest import WebEnv

pytestmark = pytest.mark.slow  # the web server and the CLI

REPO = Path(__file__).resolve().parents[2]


def test_migration_0003_creates_exactly_the_web_tables(tmp_path: Path) -> None:
    diffs = drift_after_migrations(f"sqlite:///{tmp_path / 'index.sqlite'}")
    ours = [d for d in diffs if "web_" in repr(d)]
    assert ours == [], ours


def test_cli_user_add_then_basic_login(web: WebEnv, tmp_path: Path) -> None:
    env = {**os.environ, "RADTRIAGE_STORAGE__DATA_DIR": str(web.settings.storage.data_dir)}
    env["RADTRIAGE_INDEX__URL"] = web.settings.index_url  # the session's installation, on either index
    env.pop("RADTRIAGE_CONFIG", None)
    config = tmp_path / "radtriage.toml"
    config.write_text("")
    add = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "--config",
            str(config),
            "user",
            "add",
            "carol",
            "--role",
            "admin",
            "--password-stdin",
        ],
        input="s3cret-carol\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert add.returncode == 0, add.stderr
    assert "carol (admin)" in add.stdout
    short = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config), "user", "add", "dave", "--password-stdin"],
        input="short\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    with httpx.Client(base_url=web.url) as client:
        assert client.get("/api/audit", auth=("carol", "s3cret-carol")).status_code == 200
        assert client.get("/api/worklist", auth=("dave", "short")).status_code == 401


def test_webserver_port_zero_and_busy_port(tmp_path: Path) -> None:
    settings = Settings(storage={"data_dir": tmp_path / "data"}, web={"bind": "127.0.0.1", "port": 0})
    migrate(settings.index_url)
    from pipeline.archive import Archive

    archive = Archive(settings)
    with WebServer(settings, archive.session_factory, archive) as server:
        assert server.port > 0
        url = server.url
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "index": "ok"}
        with pytest.raises(ConfigError, match="could not listen.*in use"):
            WebServer(settings, archive.session_factory, archive, port=server.port).start()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    archive.engine.dispose()
