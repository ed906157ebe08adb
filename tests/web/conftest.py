"""A real archive + index seeded like the flow leaves it, served by WebServer on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.db import migrate, session_scope
from pipeline.index.triage import AIStatus
from pipeline.web import WebServer
from pipeline.web.auth import create_user
from tests.peers.chromium import CHROMIUM, CHROMIUM_ARGS

from .seed import Seeded, seed_study

PASSWORD = "correct horse battery"
MAX_FAILURES = 3


@dataclass
class WebEnv:
    settings: Settings
    archive: Archive
    server: WebServer
    folder: Path
    bleed: Seeded
    routine: Seeded
    failed: Seeded
    pending: Seeded

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebEnv]:
    folder = tmp_path_factory.mktemp("web")
    settings = Settings(
        storage={"data_dir": folder / "data"},
        web={"bind": "127.0.0.1", "port": 0, "login_max_failures": MAX_FAILURES, "login_lockout_seconds": 120},
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        create_user(session, "alice", PASSWORD, "radiologist")
        create_user(session, "root", PASSWORD, "admin")
        create_user(session, "mallory", PASSWORD, "radiologist")
    # The routine study arrived first: only the priority can put the bleed above it.
    routine = seed_study(
        archive,
        folder,
        seed=11,
        name="Novak^Jan",
        accession="ACC1001",
        bleed=False,
        ai_status=AIStatus.done,
        minutes_ago=42,
    )
    failed = seed_study(
        archive,
        folder,
        seed=12,
        name="Rossi^Elena",
        accession="ACC1002",
        bleed=False,
        ai_status=AIStatus.failed,
        minutes_ago=25,
        with_results=False,
        error="volume: series has 2 slices, the model needs at least 8",
    )
    bleed = seed_study(
        archive,
        folder,
        seed=13,
        name="Garcia^Maria",
        accession="ACC1003",
        bleed=True,
        ai_status=AIStatus.done,
        minutes_ago=7,
    )
    pending = seed_study(
        archive, folder, seed=14, name="Weber^Karl", accession="ACC1004", bleed=False, ai_status=None, minutes_ago=1
    )
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    try:
        yield WebEnv(settings, archive, server, folder, bleed, routine, failed, pending)
    finally:
        server.stop()
        archive.engine.dispose()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser: object, web: WebEnv) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=web.url)  # type: ignore[attr-defined]
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def login(page: object, username: str = "alice", password: str = PASSWORD) -> None:
    page.goto("/worklist")  # type: ignore[attr-defined]
    assert "/login" in page.url  # type: ignore[attr-defined]
    page.fill("#username", username)  # type: ignore[attr-defined]
    page.fill("#password", password)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url("**/worklist")  # type: ignore[attr-defined]
