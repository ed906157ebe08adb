"""Critical-finding banners in real headless Chromium: raised within seconds, acknowledged once for all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.ai.findings import Priority
from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import create_index_engine, migrate, session_scope
from pipeline.index.schema import Patient, Study, utcnow
from pipeline.index.triage import AIStatus, WorklistEntry
from pipeline.web import WebServer
from pipeline.web.alerts import ACK_ACTION, ACK_REPEATED, acknowledge, critical_state, pending_alerts
from pipeline.web.auth import create_user

from .conftest import PASSWORD, login
from .seed import seed_study
from .test_browser import _screenshot

pytestmark = pytest.mark.slow  # the web server and Chromium

SMALL = (8, 48, 48)  # slices, rows, columns: enough for a study, quick to write
FINDING = "Hemorrhage · 31.2 ml · p 0.97"
# Records what the page asks of the real browser APIs, then lets them run.
SPY = """
window.__notes = [];
window.__tones = 0;
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options) { super(title, options); window.__notes.push([title, options && options.body]); }
  };
}
if (window.OscillatorNode) {
  const start = OscillatorNode.prototype.start;
  OscillatorNode.prototype.start = function (...args) { window.__tones += 1; return start.apply(this, args); };
}
"""


@dataclass
class AlertEnv:
    archive: Archive
    server: WebServer
    folder: Path
    routine_uid: str
    count: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    def new_study(self, name: str) -> str:
        """A study the flow is still analysing (running, routine for now)."""
        self.count += 1
        seeded = seed_study(
            self.archive,
            self.folder,
            seed=100 + self.count,
            name=name,
            accession=f"ACC9{self.count:03d}",
            bleed=True,
            ai_status=AIStatus.running,
            minutes_ago=30,
            shape=SMALL,
        )
        return seeded.StudyInstanceUID

    def turn_critical(self, study_uid: str, summary: str = FINDING) -> None:
        """What the flow's worklist step writes when its results say critical."""
        with session_scope(self.archive.session_factory) as session:
            entry = session.scalar(select(WorklistEntry).join(Study).where(Study.StudyInstanceUID == study_uid))
            assert entry is not None
            now = utcnow()
            entry.priority, entry.priority_rank = Priority.CRITICAL.value, Priority.CRITICAL.rank
            entry.summary, entry.ai_status = summary, AIStatus.done
            entry.updated_at = entry.triaged_at = now

    def acks(self, study_uid: str) -> list[AuditEvent]:
        with session_scope(self.archive.session_factory, readonly=True) as session:
            rows = session.scalars(
                select(AuditEvent).where(AuditEvent.StudyInstanceUID == study_uid).order_by(AuditEvent.id)
            ).all()
            session.expunge_all()
            return [r for r in rows if r.action.startswith("acknowledge")]


@pytest.fixture(scope="module")
def alerts_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertEnv]:
    # Its own index: the studies these tests flag must not show on the other tests' worklists.
    folder = tmp_path_factory.mktemp("alerts")
    settings = Settings(storage={"data_dir": folder / "data"}, web={"bind": "127.0.0.1", "port": 0})
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        create_user(session, "alice", PASSWORD, "radiologist")
        create_user(session, "mallory", PASSWORD, "radiologist")
    routine = seed_study(
        archive,
        folder,
        seed=99,
        name="Novak^Jan",
        accession="ACC9000",
        bleed=False,
        ai_status=AIStatus.done,
        minutes_ago=40,
        shape=SMALL,
    )
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    try:
        yield AlertEnv(archive, server, folder, routine.StudyInstanceUID)
    finally:
        server.stop()
        archive.engine.dispose()


@pytest.fixture()
def context_for(browser: object, alerts_web: AlertEnv) -> Iterator[object]:
    contexts = []

    def new(permissions: list[str] | None = None) -> object:
        context = browser.new_context(  # type: ignore[attr-defined]
            viewport={"width": 1280, "height": 800}, base_url=alerts_web.url, permissions=permissions or []
        )
        context.add_init_script(SPY)
        contexts.append(context)
        return context.new_page()

    try:
        yield new
    finally:
        for context in contexts:
            context.close()


def _banner(study_uid: str) -> str:
    return f'#alerts .alert-critical[data-uid="{study_uid}"]'


def test_critical_raises_banner_then_one_acknowledgement_clears_it_for_everyone(
    context_for: object, alerts_web: AlertEnv, tmp_path: Path
) -> None:
    uid = alerts_web.new_study("Silva^Ines")
    alice = context_for()  # type: ignore[operator]
    login(alice)
    mallory = context_for()  # type: ignore[operator]
    login(mallory, "mallory")
    assert alice.locator("#alerts .alert-critical").count() == 0  # still running: nothing to say yet

    alerts_web.turn_critical(uid)
    started = time.monotonic()
    alice.wait_for_selector(_banner(uid), timeout=10_000)
    latency = time.monotonic() - started
    assert latency < 8, f"banner took {latency:.1f} s"  # the page polls every 3 s
    banner = alice.locator(_banner(uid))
    assert banner.get_attribute("role") == "alert"
    text = banner.inner_text()
    assert "Silva, Ines" in text and FINDING in text and "ACC9" in text
    # The row rises and flashes as before, the banner besides.
    alice.wait_for_function(f"() => document.querySelector('#rows tr.row').dataset.uid === '{uid}'")
    mallory.wait_for_selector(_banner(uid), timeout=10_000)

    # Without the session's CSRF token the acknowledgement is refused and nothing recorded.
    assert alice.request.post(f"/api/studies/{uid}/acknowledge").status == 403
    assert alice.request.post(f"/api/studies/{uid}/acknowledge", headers={"X-CSRF-Token": "0" * 64}).status == 403
    form = alice.request.post(f"/studies/{uid}/acknowledge", form={"csrf_token": "x"}, max_redirects=0)
    assert form.status == 403
    assert not [e for e in alerts_web.acks(uid) if e.action == ACK_ACTION]
    # A second critical stacks below it; the first stays the same node (not announced again).
    alice.evaluate(f"() => {{ document.querySelector('{_banner(uid)}').__mark = 1; }}")
    second = alerts_web.new_study("Berg^Ola")
    alerts_web.turn_critical(second)
    alice.wait_for_selector(_banner(second), timeout=10_000)
    assert alice.evaluate(f"() => document.querySelector('{_banner(uid)}').__mark") == 1
    stacked = alice.eval_on_selector_all("#alerts .alert-critical", "els => els.map(e => e.dataset.uid)")
    assert stacked == [uid, second]
    _screenshot(alice, tmp_path, "worklist-alerts.png")

    # Keyboard: Tab reaches Open, then Acknowledge; Enter acknowledges.
    banner.locator("a.button").focus()
    alice.keyboard.press("Tab")
    assert alice.evaluate("() => document.activeElement.closest('.alert-ack') !== null")
    before = time.monotonic()
    alice.keyboard.press("Enter")
    alice.wait_for_selector(_banner(uid), state="detached", timeout=5_000)
    ack_ms = (time.monotonic() - before) * 1000
    # Focus moves on to the next banner, not to the top of the page.
    assert alice.evaluate("() => document.activeElement.closest('.alert-critical').dataset.uid") == second
    assert alice.locator(_banner(second)).count() == 1
    recorded = [e for e in alerts_web.acks(uid) if e.action == ACK_ACTION]
    assert [(e.username, e.status_code) for e in recorded] == [("alice", 200)]
    assert (utcnow() - recorded[0].at).total_seconds() < 30
    # The acknowledgement is the request's audit record: not written twice.
    with session_scope(alerts_web.archive.session_factory, readonly=True) as session:
        posts = session.scalars(select(AuditEvent).where(AuditEvent.path == f"/api/studies/{uid}/acknowledge")).all()
        assert sorted(e.status_code for e in posts) == [200, 403, 403]

    # Per study: mallory's worklist drops it on its next poll; a reload does not bring it back.
    mallory.wait_for_selector(_banner(uid), state="detached", timeout=10_000)
    alice.reload()
    assert alice.locator(_banner(uid)).count() == 0
    alice.goto(f"/studies/{uid}")
    assert alice.inner_text("#ack-state").startswith("Critical finding acknowledged by alice at")

    # Mallory pressing too (a stale page) is answered with alice's, and recorded as a repeat only.
    token = mallory.get_attribute("input[name=csrf_token]", "value")
    again = mallory.request.post(f"/api/studies/{uid}/acknowledge", headers={"X-CSRF-Token": token})
    assert again.status == 200
    assert again.json()["acknowledged_by"] == "alice" and again.json()["already_acknowledged"] is True
    assert [e.action for e in alerts_web.acks(uid) if e.username == "mallory"] == [ACK_REPEATED]
    # A study that is not critical has nothing to acknowledge.
    routine = mallory.request.post(
        f"/api/studies/{alerts_web.routine_uid}/acknowledge", headers={"X-CSRF-Token": token}
    )
    assert routine.status == 409 and "not flagged critical" in routine.json()["detail"]
    # The plain form (no script) records it the same way.
    assert mallory.request.post(f"/studies/{second}/acknowledge", form={"csrf_token": token}).ok
    assert [(e.username, e.action) for e in alerts_web.acks(second)] == [("mallory", ACK_ACTION)]
    with session_scope(alerts_web.archive.session_factory, readonly=True) as session:
        assert pending_alerts(session).shown == []
    print(f"banner after {latency:.2f} s; acknowledged and gone in {ack_ms:.0f} ms")


def test_new_result_flags_again_and_study_page_form(context_for: object, alerts_web: AlertEnv) -> None:
    uid = alerts_web.new_study("Okafor^Ada")
    alerts_web.turn_critical(uid)
    page = context_for()  # type: ignore[operator]
    login(page)
    assert page.locator(_banner(uid)).count() == 1  # rendered with the page, not only by the script
    # From the study page, with the plain form (no script involved).
    page.goto(f"/studies/{uid}")
    assert page.inner_text("#ack-state").startswith("Critical finding not yet acknowledged")
    page.click("#acknowledge")
    page.wait_for_selector("#ack-state.ack:not(.pending)")
    assert "acknowledged by alice" in page.inner_text("#ack-state")

    # New results (a late series, re-analysed) flag it again: the banner returns, the old
    # acknowledgement is shown as an earlier one.
    alerts_web.turn_critical(uid, "Hemorrhage · 44.0 ml · p 0.99")
    with session_scope(alerts_web.archive.session_factory, readonly=True) as session:
        state = critical_state(session, uid)
        assert state.pending and state.earlier is not None and state.earlier.username == "alice"
        assert uid in [a.StudyInstanceUID for a in pending_alerts(session).shown]
    page.goto(f"/studies/{uid}")
    assert "earlier critical result was acknowledged by alice" in page.inner_text("#ack-earlier")
    page.goto("/worklist")
    assert "44.0 ml" in page.inner_text(_banner(uid))
    # Marking it read answers it too.
    page.goto(f"/studies/{uid}")
    page.click("#mark-read")
    page.wait_for_url("**/worklist")
    assert page.locator(_banner(uid)).count() == 0


def test_sound_and_notification_for_a_new_critical(context_for: object, alerts_web: AlertEnv) -> None:
    page = context_for(["notifications"])  # type: ignore[operator]
    login(page)
    assert page.inner_text("#alert-notify") == "Notifications on"
    assert page.inner_text("#alert-sound") == "Sound off"  # off by default
    page.click("#alert-sound")
    assert page.get_attribute("#alert-sound", "aria-pressed") == "true"
    assert page.evaluate("() => window.__tones") == 2  # the two-beep tone, as a preview
    page.reload()  # the choice is kept in this browser
    assert page.inner_text("#alert-sound") == "Sound on"
    page.click("#search")  # a gesture: browsers start audio only after one

    uid = alerts_web.new_study("Lindqvist^Sven")
    alerts_web.turn_critical(uid)
    page.wait_for_selector(_banner(uid), timeout=10_000)
    page.wait_for_function("() => window.__notes.length > 0", timeout=2_000)
    assert page.evaluate("() => window.__notes") == [["Critical finding: Lindqvist, Sven", FINDING]]
    assert page.evaluate("() => window.__tones") == 2
    # Refused (headless Chromium refuses unless granted): the control says so, asks no more.
    other = context_for()  # type: ignore[operator]
    login(other)
    assert other.inner_text("#alert-notify") == "Notifications blocked"
    assert not other.is_enabled("#alert-notify")


def test_alert_paths_need_a_login(alerts_web: AlertEnv) -> None:
    uid = alerts_web.routine_uid
    with httpx.Client(base_url=alerts_web.url, follow_redirects=False) as client:
        assert client.get("/worklist/alerts").status_code == 303
        assert client.post(f"/studies/{uid}/acknowledge").status_code == 303
        assert client.post(f"/api/studies/{uid}/acknowledge").status_code == 401


def _index_study(session: Session, uid: str) -> None:
    patient = Patient(PatientID=f"P-{uid}", PatientName="Ito^Ken")
    session.add(patient)
    session.flush()
    study = Study(StudyInstanceUID=uid, patient_id=patient.id, AccessionNumber="A1")
    session.add(study)
    session.flush()
    now = utcnow()
    session.add(
        WorklistEntry(
            study_id=study.id,
            ai_status=AIStatus.done,
            priority=Priority.CRITICAL.value,
            priority_rank=Priority.CRITICAL.rank,
            summary=FINDING,
            updated_at=now,
            triaged_at=now,
        )
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_acknowledgement_covers_its_flag_on_both_databases(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'index.sqlite'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres").database()
    )
    migrate(url)
    engine = create_index_engine(url)
    try:
        with session_scope(engine) as session:
            _index_study(session, "1.2.826.0.1.3680043.10.1")
            _index_study(session, "1.2.826.0.1.3680043.10.2")
        with session_scope(engine) as session:
            alerts = pending_alerts(session, limit=1)
            assert [a.finding for a in alerts.shown] == [FINDING] and alerts.more == 1
            ack, recorded = acknowledge(
                session, "1.2.826.0.1.3680043.10.1", "alice", remote_addr="127.0.0.1", method="POST", path="/x"
            )
            assert recorded and ack.username == "alice"
            again, recorded = acknowledge(
                session, "1.2.826.0.1.3680043.10.1", "bob", remote_addr="127.0.0.1", method="POST", path="/x"
            )
            assert not recorded and again == ack  # someone has it already: alice
        with session_scope(engine) as session:
            assert [a.StudyInstanceUID for a in pending_alerts(session).shown] == ["1.2.826.0.1.3680043.10.2"]
            # Flagged again by new results: the old acknowledgement no longer covers it.
            entry = session.scalar(
                select(WorklistEntry).join(Study).where(Study.StudyInstanceUID == "1.2.826.0.1.3680043.10.1")
            )
            entry.triaged_at = utcnow()
        with session_scope(engine, readonly=True) as session:
            state = critical_state(session, "1.2.826.0.1.3680043.10.1")
            assert state.pending and state.acknowledgement is None and state.earlier == ack
            assert len(pending_alerts(session).shown) == 2
        with session_scope(engine) as session:
            # Flagged by a worker whose clock runs ahead: acknowledging still covers it.
            entry = session.scalar(
                select(WorklistEntry).join(Study).where(Study.StudyInstanceUID == "1.2.826.0.1.3680043.10.2")
            )
            entry.triaged_at = utcnow() + timedelta(seconds=30)
        with session_scope(engine) as session:
            acknowledge(session, "1.2.826.0.1.3680043.10.2", "bob", remote_addr="", method="POST", path="/x")
        with session_scope(engine, readonly=True) as session:
            assert [a.StudyInstanceUID for a in pending_alerts(session).shown] == ["1.2.826.0.1.3680043.10.1"]
    finally:
        engine.dispose()
