"""API tokens (``Authorization: Bearer``) and the uploader role, against the real server;
migration 0005 on an index that already has users and sessions (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import select, update

from pipeline.cli import main
from pipeline.index.accounts import ApiToken, AuditEvent, Role
from pipeline.index.db import create_index_engine, migrate, session_scope
from pipeline.index.schema import utcnow
from pipeline.web.auth import AuthUser, create_user, may_read, may_store
from pipeline.web.tokens import TokenError, create_token, revoke_token
from tests.peers.postgres import PostgresServer

from .conftest import PASSWORD, WebEnv


def _token(web: WebEnv, name: str, role: str, username: str | None = None, **kw: int) -> str:
    with session_scope(web.archive.session_factory) as session:
        return create_token(session, name, role, username=username, **kw)[1]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _audit(web: WebEnv, after: int) -> list[AuditEvent]:
    with session_scope(web.archive.session_factory, readonly=True) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id)))


def _last_audit_id(web: WebEnv) -> int:
    with session_scope(web.archive.session_factory, readonly=True) as session:
        return int(session.scalar(select(sa.func.max(AuditEvent.id))) or 0)


def _index_bytes(web: WebEnv) -> bytes:
    """Everything the index holds: SQLite's files, or every row of every table."""
    if web.settings.index_url.startswith("sqlite"):
        folder = Path(web.settings.storage.data_dir)
        return b"".join(p.read_bytes() for p in folder.glob("*.sqlite*"))
    from pipeline.index.schema import Base

    with web.archive.engine.connect() as connection:
        return repr([connection.execute(table.select()).all() for table in Base.metadata.sorted_tables]).encode()


@pytest.mark.slow  # the web server
def test_token_reads_the_api_with_no_argon2_and_marks_last_use(web: WebEnv) -> None:
    token = _token(web, "alice-script", "radiologist", "alice")
    assert token.startswith("rt_") and len(token) >= 40
    authenticator = web.server.app.state.ctx.authenticator
    hashes = authenticator.hash_verifications
    before = _last_audit_id(web)
    with httpx.Client(base_url=web.url, headers=_bearer(token), follow_redirects=False) as client:
        body = client.get("/api/worklist").json()
        assert web.bleed.StudyInstanceUID in {s["StudyInstanceUID"] for s in body["studies"]}
        with session_scope(web.archive.session_factory, readonly=True) as session:
            first_use = session.scalar(select(ApiToken.last_used_at).where(ApiToken.name == "alice-script"))
        assert first_use is not None and utcnow() - first_use < timedelta(seconds=30)
        for _ in range(3):
            assert client.get(f"/api/studies/{web.bleed.StudyInstanceUID}").status_code == 200
        # A token is for programs: a page still wants the login form.
        assert client.get("/worklist").status_code == 303
    assert authenticator.hash_verifications == hashes
    with session_scope(web.archive.session_factory, readonly=True) as session:
        # Not rewritten on every request: at most once a minute.
        assert session.scalar(select(ApiToken.last_used_at).where(ApiToken.name == "alice-script")) == first_use
    rows = _audit(web, before)
    assert [(r.username, r.path, r.status_code) for r in rows[:2]] == [
        ("alice", "/api/worklist", 200),
        ("alice", f"/api/studies/{web.bleed.StudyInstanceUID}", 200),
    ]


@pytest.mark.slow  # the web server
def test_revoked_expired_and_wrong_tokens_get_401_and_are_audited(
    web: WebEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    revoked = _token(web, "old-pacs", "radiologist")
    expired = _token(web, "short-lived", "radiologist", expires_days=1)
    wrong = "rt_" + "A" * 43
    with session_scope(web.archive.session_factory) as session:
        session.execute(
            update(ApiToken).where(ApiToken.name == "short-lived").values(expires_at=utcnow() - timedelta(seconds=1))
        )
    before = _last_audit_id(web)
    with httpx.Client(base_url=web.url) as client:
        assert client.get("/api/worklist", headers=_bearer(revoked)).status_code == 200
        with session_scope(web.archive.session_factory) as session:
            revoke_token(session, "old-pacs")
        for token in (revoked, expired, wrong):
            for path in ("/api/worklist", "/dicom-web/studies"):
                response = client.get(path, headers=_bearer(token))
                assert response.status_code == 401, (token, path)
                assert response.headers["www-authenticate"].startswith("Bearer ")
                assert "Garcia" not in response.text
    rows = _audit(web, before)
    assert [(r.username, r.status_code, r.action) for r in rows] == [
        ("token:old-pacs", 200, ""),
        *[("token:old-pacs", 401, "token refused")] * 2,
        *[("token:short-lived", 401, "token refused")] * 2,
        *[("", 401, "token refused")] * 2,
    ]
    assert "old-pacs refused" in caplog.text and "revoked" in caplog.text
    index = _index_bytes(web)
    assert b"old-pacs" in index  # the right file: the token's name is there, the token is not
    for token in (revoked, expired, wrong):
        assert token not in caplog.text
        assert not any(token in f"{r.username} {r.path} {r.action} {r.detail}" for r in rows)
        assert token.encode() not in index


@pytest.mark.slow  # the web server
def test_uploader_may_store_but_not_read(web: WebEnv) -> None:
    with session_scope(web.archive.session_factory) as session:
        create_user(session, "modality1", PASSWORD, "uploader")
    token = _token(web, "ct-scanner", "uploader")
    uid = web.bleed.StudyInstanceUID
    for auth in ({"headers": _bearer(token)}, {"auth": ("modality1", PASSWORD)}):
        with httpx.Client(base_url=web.url, follow_redirects=False, **auth) as client:  # type: ignore[arg-type]
            for method, path in (
                ("GET", "/api/worklist"),
                ("GET", f"/api/studies/{uid}"),
                ("POST", f"/api/studies/{uid}/read"),
                ("GET", "/dicom-web/studies"),
                ("GET", f"/dicom-web/studies/{uid}/metadata"),
            ):
                response = client.request(method, path)
                assert response.status_code == 403, (auth, method, path)
                assert "Garcia" not in response.text
                assert "not read patient data" in response.json()["detail"]
            # STOW-RS passes the login and role check (what it answers is the route's business).
            stow = client.post("/dicom-web/studies", content=b"", headers={"Content-Type": "application/dicom"})
            assert stow.status_code not in (401, 403)
    # An uploader who logs in with the form reaches no page either.
    with httpx.Client(base_url=web.url, follow_redirects=False) as browser:
        login = browser.post("/login", data={"username": "modality1", "password": PASSWORD, "next": "/worklist"})
        assert login.status_code == 303 and "radtriage_session" in browser.cookies
        page = browser.get("/worklist")
        assert page.status_code == 403 and "Garcia" not in page.text
    uploader, radiologist, admin = (AuthUser(1, "u", role) for role in (Role.uploader, Role.radiologist, Role.admin))
    assert may_store(uploader) and not may_read(uploader)
    assert not may_store(radiologist) and may_read(radiologist)
    assert may_store(admin) and may_read(admin)


@pytest.mark.slow  # the web server
def test_a_token_is_no_more_than_its_owner(web: WebEnv) -> None:
    with session_scope(web.archive.session_factory) as session:
        with pytest.raises(TokenError, match="alice is radiologist"):
            create_token(session, "alice-admin", "admin", username="alice")
        with pytest.raises(TokenError, match="no active user"):
            create_token(session, "ghost", "radiologist", username="nobody")
        with pytest.raises(TokenError, match="1-48 letters"):
            create_token(session, "has space", "radiologist")
    with session_scope(web.archive.session_factory) as session:
        create_user(session, "temp-admin", PASSWORD, "admin")
    token = _token(web, "temp-admin-ci", "uploader", "temp-admin")
    with httpx.Client(base_url=web.url, headers=_bearer(token)) as client:
        assert client.get("/api/worklist").status_code == 403  # the token's role, not the owner's
        with session_scope(web.archive.session_factory) as session:
            create_user(session, "temp-admin", PASSWORD, "radiologist")  # demoted: no uploader token any more
        assert client.get("/api/worklist").status_code == 401


@pytest.mark.slow  # the web server
def test_cli_token_create_list_revoke(
    web: WebEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RADTRIAGE_STORAGE__DATA_DIR", str(web.settings.storage.data_dir))
    monkeypatch.setenv("RADTRIAGE_INDEX__URL", web.settings.index_url)  # the session's installation
    monkeypatch.delenv("RADTRIAGE_CONFIG", raising=False)
    config = tmp_path / "radtriage.toml"
    config.write_text("")
    cli = ["--config", str(config)]
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-erin\n"))
    assert main([*cli, "user", "add", "erin", "--role", "uploader", "--password-stdin"]) == 0
    assert "erin (uploader)" in capsys.readouterr().out
    assert main([*cli, "token", "create", "nightly", "--role", "radiologist", "--expires-days", "30"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("rt_") and "\n" not in token and "shown only now" in err
    assert main([*cli, "token", "create", "nightly", "--role", "radiologist"]) == 2
    assert "revoke it first" in capsys.readouterr().err
    with httpx.Client(base_url=web.url, headers=_bearer(token)) as client:
        assert client.get("/api/worklist").status_code == 200
        assert main([*cli, "token", "list"]) == 0
        listing = capsys.readouterr().out
        [line] = [row for row in listing.splitlines() if row.startswith("nightly\t")]
        assert "\tradiologist\t-\tactive\t" in line and "last used 20" in line and "expires 20" in line
        assert token not in listing and token[3:] not in listing
        assert main([*cli, "token", "revoke", "nightly"]) == 0
        assert client.get("/api/worklist").status_code == 401
        assert main([*cli, "token", "list"]) == 0
        assert "\trevoked\t" in capsys.readouterr().out
        # A revoked token's name may be given to a new one.
        assert main([*cli, "token", "create", "nightly", "--role", "uploader"]) == 0
        again = capsys.readouterr().out.strip()
        assert again != token
        assert client.get("/api/worklist").status_code == 401
        assert client.get("/api/worklist", headers=_bearer(again)).status_code == 403
    assert main([*cli, "token", "revoke", "no-such"]) == 2
    assert "no token no-such" in capsys.readouterr().err


def _migrate_0004_users_to_head(url: str) -> None:
    """An index with a user and a login session at 0004 migrates; uploaders then fit, typos not."""
    migrate(url, "0004")
    engine = create_index_engine(url)
    try:
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO web_user (username, password_hash, role, active, created_at)"
                    " VALUES ('ann', 'x', 'admin', true, :now)"
                ),
                {"now": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO web_session (token_sha256, user_id, created_at, last_seen_at, expires_at, remote_addr)"
                    " SELECT 'digest', id, :now, :now, :now, '' FROM web_user"
                ),
                {"now": now},
            )
        migrate(url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM web_session")).scalar() == 1
            conn.execute(
                sa.text(
                    "INSERT INTO web_user (username, password_hash, role, active, created_at)"
                    " VALUES ('up', 'x', 'uploader', true, :now)"
                ),
                {"now": now},
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO web_user (username, password_hash, role, active, created_at)"
                    " VALUES ('bad', 'x', 'uploadr', true, :now)"
                ),
                {"now": now},
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO api_token (name, token_sha256, role, created_at) VALUES ('t', 'd', 'root', :now)"),
                {"now": now},
            )
    finally:
        engine.dispose()


def test_migration_0005_on_sqlite_keeps_sessions_and_admits_uploaders(tmp_path: Path) -> None:
    _migrate_0004_users_to_head(f"sqlite:///{tmp_path / 'index.sqlite'}")


@pytest.mark.slow  # a PostgreSQL server
def test_migration_0005_on_postgresql_keeps_sessions_and_admits_uploaders(postgres: PostgresServer) -> None:
    _migrate_0004_users_to_head(postgres.database())
