"""Without a login nothing but /login and /health answers; wrong passwords lock out; every access is audited."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.routing import APIRoute

from pipeline.index.db import session_scope
from pipeline.web import api, pages
from pipeline.web.auth import Authenticator, LockedOut, create_user

from .conftest import MAX_FAILURES, PASSWORD, WebEnv

pytestmark = pytest.mark.slow  # the web server

PUBLIC = {"/login", "/health"}


def _concrete(path: str, web: WebEnv) -> str:
    values = {"study_uid": web.bleed.StudyInstanceUID, "sop_uid": web.bleed.sop_uids[web.bleed.key_index]}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def test_every_path_needs_a_login(web: WebEnv) -> None:
    routes = [r for r in (*pages.router.routes, *api.router.routes) if isinstance(r, APIRoute)]
    assert len(routes) >= 12
    checked = 0
    with httpx.Client(base_url=web.url, follow_redirects=False) as client:
        for route in routes:
            path = _concrete(route.path, web)
            for method in route.methods:
                response = client.request(method, path)
                if route.path in PUBLIC:
                    assert response.status_code in (200, 400), (method, path)
                    continue
                checked += 1
                if path.startswith("/api/"):
                    assert response.status_code == 401, (method, path, response.status_code)
                    assert response.headers["www-authenticate"].startswith("Basic")
                else:
                    assert response.status_code == 303, (method, path, response.status_code)
                    assert response.headers["location"].startswith("/login?next=")
                assert "Garcia" not in response.text, (method, path)
        # A forged cookie is no login either.
        assert client.get("/health").json()["status"] == "ok"
    with httpx.Client(base_url=web.url, cookies={"radtriage_session": "x" * 43}) as forged:
        assert forged.get("/api/worklist").status_code == 401
    assert checked >= 10


def test_api_worklist_with_http_basic(web: WebEnv) -> None:
    with httpx.Client(base_url=web.url, auth=("alice", PASSWORD)) as client:
        body = client.get("/api/worklist").json()
        # A page is not the API: Basic does not open it.
        assert client.get("/worklist", follow_redirects=False).status_code == 303
    studies = body["studies"]
    assert body["count"] == len(studies) >= 4
    by_uid = {s["StudyInstanceUID"]: s for s in studies}
    bleed = by_uid[web.bleed.StudyInstanceUID]
    assert studies.index(bleed) < studies.index(by_uid[web.routine.StudyInstanceUID])
    assert bleed["priority"] == "critical" and bleed["ai_status"] == "done"
    assert (bleed["PatientName"], bleed["AccessionNumber"], bleed["Modality"]) == ("Garcia^Maria", "ACC1003", "CT")
    assert bleed["time_to_triage_seconds"] == 3.4 and bleed["read"] is False
    [finding] = bleed["findings"]
    assert finding["model"] == "ich-detector" and finding["model_version"] == "1.2.0"
    assert finding["label"] == "Hemorrhage" and finding["present"] is True and finding["probability"] == 0.97
    assert abs(finding["volume_ml"] - web.bleed.mask.sum() * 5.0 * 2.2 * 2.2 / 1000) < 1e-6
    failed = by_uid[web.failed.StudyInstanceUID]
    assert failed["ai_status"] == "failed" and "at least 8" in failed["ai_error"]
    pending = by_uid[web.pending.StudyInstanceUID]
    assert (pending["ai_status"], pending["priority"], pending["findings"]) == ("pending", "routine", [])


def test_api_mark_read_with_basic_and_filters(web: WebEnv) -> None:
    uid = web.routine.StudyInstanceUID
    with httpx.Client(base_url=web.url, auth=("alice", PASSWORD)) as client:
        marked = client.post(f"/api/studies/{uid}/read").json()
        assert marked["read"] is True and marked["read_by"] == "alice"
        assert [s["StudyInstanceUID"] for s in client.get("/api/worklist?read=true").json()["studies"]] == [uid]
        assert client.post(f"/api/studies/{uid}/unread").json()["read"] is False
        critical = client.get("/api/worklist", params={"priority": "critical"}).json()["studies"]
        assert web.bleed.StudyInstanceUID in {s["StudyInstanceUID"] for s in critical}
        assert all(s["priority"] == "critical" for s in critical)
        assert (
            client.get("/api/worklist", params={"q": "ACC1002"}).json()["studies"][0]["StudyInstanceUID"]
            == web.failed.StudyInstanceUID
        )
        assert len(client.get("/api/worklist", params={"modality": "ct"}).json()["studies"]) >= 4
        assert client.get("/api/worklist", params={"modality": "MR"}).json()["studies"] == []
        assert client.get("/api/worklist", params={"priority": "bogus"}).status_code == 400
        assert client.post("/api/studies/1.2.3.4/read").status_code == 404


def test_wrong_passwords_lock_the_name_out(web: WebEnv) -> None:
    with httpx.Client(base_url=web.url, follow_redirects=False) as client:
        for _ in range(MAX_FAILURES):
            wrong = client.post("/login", data={"username": "mallory", "password": "guess-guess"})
            assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        refused = client.post("/login", data={"username": "mallory", "password": PASSWORD})
        assert refused.status_code == 429 and "Too many failed logins" in refused.text
        assert int(refused.headers["retry-after"]) > 60
        assert "radtriage_session" not in refused.cookies
        basic = client.get("/api/worklist", auth=("mallory", PASSWORD))
        assert basic.status_code == 429
        # Another user from the same address is not locked out by mallory's typos.
        ok = client.post("/login", data={"username": "alice", "password": PASSWORD})
        assert ok.status_code == 303 and "radtriage_session" in ok.cookies
    with httpx.Client(base_url=web.url, auth=("root", PASSWORD)) as admin:
        events = admin.get("/api/audit", params={"username": "mallory"}).json()["events"]
    actions = [e["action"] for e in events]
    assert actions.count("login failed") == MAX_FAILURES and "login locked out" in actions


def test_lockout_ends_after_the_window(web: WebEnv) -> None:
    auth = Authenticator(max_failures=2, lockout_seconds=1.0)
    with session_scope(web.archive.session_factory) as session:
        create_user(session, "trent", PASSWORD)
    for _ in range(2):
        with session_scope(web.archive.session_factory) as session:
            assert auth.verify(session, "trent", "nope-nope", "10.9.9.9") is None
    refused_at = time.monotonic()
    try:
        with session_scope(web.archive.session_factory) as session:
            auth.verify(session, "trent", PASSWORD, "10.9.9.9")
        raise AssertionError("a locked-out name logged in")
    except LockedOut as err:
        assert 0 < err.retry_after <= 1.0
    deadline = time.monotonic() + 5
    while True:
        try:
            with session_scope(web.archive.session_factory) as session:
                user = auth.verify(session, "trent", PASSWORD, "10.9.9.9")
            break
        except LockedOut:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert user is not None and user.username == "trent"
    assert time.monotonic() - refused_at > 0.3


def test_accesses_are_audited_and_audit_is_admin_only(web: WebEnv) -> None:
    uid = web.bleed.StudyInstanceUID
    with httpx.Client(base_url=web.url, follow_redirects=False) as client:
        client.post("/login", data={"username": "alice", "password": PASSWORD})
        assert client.get(f"/studies/{uid}").status_code == 200
        assert client.get("/api/audit").status_code == 403
    with httpx.Client(base_url=web.url, auth=("root", PASSWORD)) as admin:
        events = admin.get("/api/audit", params={"study": uid, "username": "alice"}).json()["events"]
    assert any(
        e["path"] == f"/studies/{uid}" and e["status_code"] == 200 and e["remote_addr"] == "127.0.0.1" for e in events
    )


def test_live_rows_answer_304_when_nothing_changed(web: WebEnv) -> None:
    with httpx.Client(base_url=web.url, follow_redirects=False) as client:
        client.post("/login", data={"username": "alice", "password": PASSWORD})
        first = client.get("/worklist/rows")
        assert first.status_code == 200 and web.bleed.StudyInstanceUID in first.text
        again = client.get("/worklist/rows", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        forged = client.post(f"/api/studies/{web.pending.StudyInstanceUID}/read", headers={"X-CSRF-Token": "wrong"})
        assert forged.status_code == 403  # a cookie session must show the page's token
        assert client.get("/worklist/rows", headers={"If-None-Match": first.headers["etag"]}).status_code == 304
