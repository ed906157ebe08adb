"""The worklist in pages: 123 studies, 50 a page, over a real server and in headless Chromium.

Order, totals and the AI column are checked against the index itself (sorted here in
Python, not by the query under test); the live poll's 304 is checked by the SQL it
runs, so a server that renders the rows to find its ETag fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, insert, select, update

from pipeline.ai.findings import Priority
from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Series, SeriesOrigin, Study, utcnow
from pipeline.index.triage import AIStatus, WorklistEntry
from pipeline.web import WebServer
from pipeline.web.auth import create_user

from .bulk import NOT_APPLICABLE, RowSpec, SeededRow, seed_rows
from .conftest import PASSWORD, login

pytestmark = pytest.mark.slow  # the web server and Chromium

PAGE = 50
OLD_READ_DAYS = 10  # read longer ago than the page's default shows


@dataclass
class PagingEnv:
    archive: Archive
    server: WebServer
    rows: list[SeededRow]

    @property
    def url(self) -> str:
        return self.server.url

    def by_accession(self, accession: str) -> SeededRow:
        return next(r for r in self.rows if r.AccessionNumber == accession)

    def expected(self, *, include_old_read: bool) -> list[str]:
        """The worklist order from the index rows, sorted here: unread first, then
        critical → urgent → routine, then oldest, then id."""
        with session_scope(self.archive.session_factory, readonly=True) as session:
            rows = session.execute(
                select(Study.id, Study.StudyInstanceUID, Study.first_received_at, WorklistEntry).outerjoin(
                    WorklistEntry, WorklistEntry.study_id == Study.id
                )
            ).all()
        old = utcnow() - timedelta(days=7)
        kept = [
            r
            for r in rows
            if include_old_read
            or r.WorklistEntry is None
            or r.WorklistEntry.read_at is None
            or r.WorklistEntry.read_at >= old
        ]

        def key(r: object) -> tuple:
            entry = r.WorklistEntry  # type: ignore[attr-defined]
            read = entry is not None and entry.read_at is not None
            rank = entry.priority_rank if entry is not None else 0
            return (read, -rank, r.first_received_at, r.id)  # type: ignore[attr-defined]

        return [r.StudyInstanceUID for r in sorted(kept, key=key)]


def _specs() -> list[RowSpec]:
    specs = []
    for n in range(120):
        # Arrival order is not id order, and the urgent ones are not the oldest.
        minutes = 10.0 + (n * 37) % 600
        priority = Priority.URGENT if n % 17 == 5 else Priority.CRITICAL if n == 60 else Priority.ROUTINE
        specs.append(RowSpec(minutes, priority, AIStatus.done, read_minutes_ago=3.0 if n % 9 == 2 else None))
    specs[7] = RowSpec(30.0, ai_status=AIStatus.not_applicable)
    # Three waiting in the AI queue: the urgent one goes first although dispatched last.
    specs[8] = RowSpec(31.0, ai_status=AIStatus.pending, queued_minutes_ago=9.0)
    specs[9] = RowSpec(32.0, ai_status=AIStatus.pending, queued_minutes_ago=2.0, queue_urgency=Priority.URGENT)
    specs[10] = RowSpec(33.0, ai_status=AIStatus.pending, queued_minutes_ago=5.0)
    specs[11] = RowSpec(34.0, ai_status=None)  # not yet stable: no entry, plain "pending"
    days = 60 * 24 * OLD_READ_DAYS
    return specs + [RowSpec(days + n, read_minutes_ago=days) for n in range(3)]


@pytest.fixture(scope="module")
def paging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagingEnv]:
    # Its own index: 123 studies must not show on the other tests' worklists.
    folder = tmp_path_factory.mktemp("paging")
    settings = Settings(
        storage={"data_dir": folder / "data"},
        web={"bind": "127.0.0.1", "port": 0, "worklist_page_size": PAGE},
        models={"dir": Path(__file__).resolve().parents[2] / "models"},
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        create_user(session, "alice", PASSWORD, "radiologist")
    rows = seed_rows(archive.session_factory, _specs(), prefix="PG")
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    try:
        yield PagingEnv(archive, server, rows)
    finally:
        server.stop()
        archive.engine.dispose()


def _walk_api(client: httpx.Client, **params: str) -> tuple[list[str], list[dict]]:
    uids, answers, offset = [], [], 0
    while offset is not None:
        body = client.get("/api/worklist", params={**params, "offset": str(offset)}).json()
        answers.append(body)
        uids += [s["StudyInstanceUID"] for s in body["studies"]]
        offset = body["next_offset"]
    return uids, answers


def test_api_pages_keep_the_order_and_the_total(paging: PagingEnv) -> None:
    with httpx.Client(base_url=paging.url, auth=("alice", PASSWORD)) as client:
        uids, answers = _walk_api(client, read="recent")
        assert [len(a["studies"]) for a in answers] == [50, 50, 20]
        assert {a["total"] for a in answers} == {120} and [a["offset"] for a in answers] == [0, 50, 100]
        assert uids == paging.expected(include_old_read=False)
        # The API's default is every study: also the three read 10 days ago.
        everything, answers = _walk_api(client)
        assert answers[0]["total"] == 123 and everything == paging.expected(include_old_read=True)
        assert set(everything) - set(uids) == {r.StudyInstanceUID for r in paging.rows[-3:]}
        small = client.get("/api/worklist", params={"limit": "7", "offset": "14"}).json()
        assert [s["StudyInstanceUID"] for s in small["studies"]] == everything[14:21] and small["next_offset"] == 21
        assert client.get("/api/worklist", params={"limit": "1001"}).status_code == 400
        assert client.get("/api/worklist", params={"offset": "-1"}).status_code == 400
        urgent = client.get("/api/worklist", params={"priority": "urgent", "limit": "500"}).json()
        assert (
            urgent["total"]
            == len(urgent["studies"])
            == sum(1 for r in paging.rows if r.spec.priority is Priority.URGENT)
        )
        na = client.get("/api/worklist", params={"status": "not_applicable"}).json()["studies"]
        assert [(s["ai_label"], s["queue_position"]) for s in na] == [("not applicable", None)]
        queued = client.get("/api/worklist", params={"status": "pending", "limit": "500"}).json()["studies"]
        positions = {s["AccessionNumber"]: s["queue_position"] for s in queued}
        assert positions == {"PG000009": 2, "PG000010": 1, "PG000011": 3, "PG000012": None}


class _Statements:
    """Every SQL statement the server runs on the index while counting (a real listener)."""

    def __init__(self, engine: object) -> None:
        self.engine, self.seen, self.lock = engine, [], threading.Lock()

    def __enter__(self) -> list[str]:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self.seen

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        with self.lock:
            self.seen.append(" ".join(statement.split()).lower())


def _renders(statements: list[str]) -> list[str]:
    """The statements only building the rows needs: the page's studies and their results."""
    return [s for s in statements if "from ai_result" in s or "join patient" in s]


def test_poll_answers_304_from_the_counter_without_rendering(paging: PagingEnv) -> None:
    while time.time() % 60 > 56:  # the ETag holds the minute: do not straddle one
        time.sleep(0.5)
    with httpx.Client(base_url=paging.url, follow_redirects=False) as client:
        client.post("/login", data={"username": "alice", "password": PASSWORD})
        with _Statements(paging.archive.engine) as full:
            first = client.get("/worklist/rows", params={"page": "2"})
        assert first.status_code == 200 and first.text.count('<tr class="row') == PAGE
        assert first.headers["x-total-count"] == "120" and first.headers["x-range-first"] == "51"
        assert _renders(full), "the rows were built without reading the studies"
        etag = first.headers["etag"]
        with _Statements(paging.archive.engine) as polled:
            again = client.get("/worklist/rows", params={"page": "2"}, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert _renders(polled) == [], "a 304 poll built the rows"
        assert len(polled) < len(full)
        # Another page has its own ETag; a change anywhere gives a new one.
        assert client.get("/worklist/rows", params={"page": "3"}, headers={"If-None-Match": etag}).status_code == 200
        mark = client.get("/worklist")  # for the page's CSRF token
        token = mark.text.split('name="csrf_token" value="')[1].split('"')[0]
        uid = paging.expected(include_old_read=False)[60]
        assert client.post(f"/studies/{uid}/read", data={"csrf_token": token}).status_code == 303
        changed = client.get("/worklist/rows", params={"page": "2"}, headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert client.post(f"/studies/{uid}/unread", data={"csrf_token": token}).status_code == 303
        back = client.get("/worklist/rows", params={"page": "2"}, headers={"If-None-Match": changed.headers["etag"]})
        assert back.status_code == 200  # unread again: the count of read studies fell


def _row_uids(page: object) -> list[str]:
    return page.eval_on_selector_all("#rows tr.row", "rows => rows.map(r => r.dataset.uid)")  # type: ignore[attr-defined]


@pytest.fixture()
def paging_page(browser: object, paging: PagingEnv) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=paging.url)  # type: ignore[attr-defined]
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_pages_in_chromium_and_a_study_turning_critical_reaches_page_one(
    paging_page: object, paging: PagingEnv
) -> None:
    page = paging_page
    login(page)
    expected = paging.expected(include_old_read=False)
    seen, ranges = [], []
    for number in (1, 2, 3):
        ranges.append(page.inner_text("#range"))  # type: ignore[attr-defined]
        seen += _row_uids(page)
        if number < 3:
            page.click("#next-page")  # type: ignore[attr-defined]
            page.wait_for_url(f"**page={number + 1}")  # type: ignore[attr-defined]
    assert ranges == ["1–50 of 120", "51–100 of 120", "101–120 of 120"]
    assert seen == expected
    assert page.locator("#next-page").count() == 0  # type: ignore[attr-defined]

    # Honest AI status: not applicable with the planner's reason, the queue position.
    page.goto("/worklist?q=PG000008")  # type: ignore[attr-defined]
    na = page.locator("#rows tr.row .ai")  # type: ignore[attr-defined]
    assert na.inner_text() == "not applicable" and na.get_attribute("title") == NOT_APPLICABLE
    assert "ai-not_applicable" in (na.get_attribute("class") or "")
    assert page.evaluate("() => getComputedStyle(document.querySelector('.ai-not_applicable')).fontStyle") == "italic"  # type: ignore[attr-defined]
    page.goto("/worklist?q=PG000010")  # type: ignore[attr-defined]
    assert page.inner_text("#rows tr.row .ai") == "pending (position 1)"  # type: ignore[attr-defined]
    page.goto("/worklist?status=pending")  # type: ignore[attr-defined]
    labels = page.eval_on_selector_all("#rows tr.row .ai", "els => els.map(e => e.textContent)")  # type: ignore[attr-defined]
    assert sorted(labels) == ["pending", "pending (position 1)", "pending (position 2)", "pending (position 3)"]
    page.goto("/worklist?read=all")  # type: ignore[attr-defined]
    assert page.inner_text("#range") == "1–50 of 123"  # type: ignore[attr-defined]

    # The newest unread routine study, on page three, turns critical: page one shows it
    # among the critical ones (after the one that waited longer) at the next poll,
    # without a reload, flashing.
    page.goto("/worklist")  # type: ignore[attr-defined]
    page.evaluate("() => { window.__noReload = true; }")  # type: ignore[attr-defined]
    plain = {
        r.StudyInstanceUID
        for r in paging.rows
        if r.spec.ai_status is AIStatus.done and r.spec.priority is Priority.ROUTINE and r.spec.read_minutes_ago is None
    }
    target = next(uid for uid in reversed(expected) if uid in plain)
    assert expected.index(target) >= 2 * PAGE and target not in _row_uids(page)
    with session_scope(paging.archive.session_factory) as session:
        now = utcnow()
        session.execute(
            update(WorklistEntry)
            .where(WorklistEntry.study_id == select(Study.id).where(Study.StudyInstanceUID == target).scalar_subquery())
            .values(
                priority=Priority.CRITICAL.value,
                priority_rank=Priority.CRITICAL.rank,
                summary="Intracranial hemorrhage · 40.0 ml · p 0.99",
                ai_status=AIStatus.done,
                updated_at=now,
                triaged_at=now,
            )
        )
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => document.querySelector('#rows tr.row[data-uid=\"{target}\"]') !== null"
    )
    assert page.evaluate("() => window.__noReload") is True  # type: ignore[attr-defined]
    row = page.locator(f'#rows tr.row[data-uid="{target}"]')  # type: ignore[attr-defined]
    assert "flash" in (row.get_attribute("class") or "") and row.locator(".badge").inner_text().lower() == "critical"
    assert page.inner_text("#range") == "1–50 of 120"  # type: ignore[attr-defined]
    assert _row_uids(page) == paging.expected(include_old_read=False)[:PAGE]


def test_study_page_says_which_series_each_model_read_and_why_not_the_others(paging: PagingEnv) -> None:
    row = paging.by_accession("PG000001")  # a CT head series the model's rules take
    scout_uid = "1.2.826.0.1.3680043.8.498.1.424242"
    with session_scope(paging.archive.session_factory) as session:
        session.execute(
            insert(Series).values(
                SeriesInstanceUID=scout_uid,
                study_id=row.study_id,
                Modality="CT",
                BodyPartExamined="HEAD",
                SeriesDescription="Scout",
                SeriesNumber=1,
                ImageType="ORIGINAL\\PRIMARY\\LOCALIZER",
                NumberOfSeriesRelatedInstances=2,
                origin=SeriesOrigin.received,
            )
        )
    with httpx.Client(base_url=paging.url, auth=None, follow_redirects=False) as client:
        client.post("/login", data={"username": "alice", "password": PASSWORD})
        html = client.get(f"/studies/{row.StudyInstanceUID}").text
        reading = html.split('id="reading"')[1].split("</div>")[0]
        assert "head_ct_hemorrhage 0.5.0: read series 2 Head 5mm" in reading
        scout = reading.split(f'data-series="{scout_uid}"')[1].split("</li>")[0]
        assert "not read: SeriesDescription &#39;Scout&#39; matches exclude" in scout
        na = client.get(f"/studies/{paging.by_accession('PG000008').StudyInstanceUID}").text
        assert "No AI model reads this study: " + NOT_APPLICABLE.replace("'", "&#39;") in na
