"""The worklist web app: :func:`create_app` builds the FastAPI application.

Every path except ``/login``, ``/health`` and ``/static/`` needs a login: a session
cookie (pages and API), or HTTP Basic or an API token (``Authorization: Bearer``, API
and DICOMweb only). An uploader's login may only store (STOW-RS): anything else is 403.
Pages without a login redirect to ``/login``; API paths answer 401. Every request but
static files and health checks is written to the audit log with the user, address, path
and answer.

A failure inside a handler is answered ``500`` with a request id (also sent as
``X-Request-ID``), audited as ``server error``, and logged with that id, the exception
type and the code locations only: never the exception's message or the query, which may
hold patient names (an SQL error quotes the search terms).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings
from pipeline.index.db import session_scope
from pipeline.web.auth import SESSION_COOKIE, Authenticator, AuthUser, LockedOut, load_secret, may_read
from pipeline.web.context import ArchiveFiles, WebContext, client_address
from pipeline.web.imaging import SliceRenderer
from pipeline.web.tokens import check_token

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PUBLIC_PATHS = {"/login", "/health", "/favicon.ico"}
# Paths programs call: no login answers 401 (never a redirect to the login page), and
# HTTP Basic is accepted besides the session cookie.
PROGRAM_PREFIXES = ("/api/", "/dicom-web/")


def is_program_path(path: str) -> bool:
    return path.startswith(PROGRAM_PREFIXES) or path == "/dicom-web"


# Only this server's own files run or style a page: an injected <script> or inline
# handler does nothing. (study.html's slice list is a JSON data block, not a script.)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HSTS = "max-age=31536000"


def relative_time(when: datetime | None, now: datetime | None = None) -> str:
    """``"just now"``, ``"12 min ago"``, ``"3 h ago"``, ``"2 d ago"``."""
    if when is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min ago"
    return f"{int(seconds // 86400)} d ago"


def _local(when: datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else ""


def _dicom_date(value: str) -> str:
    """DICOM ``YYYYMMDD`` as ``YYYY-MM-DD`` (anything else unchanged)."""
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def _person_name(value: str) -> str:
    """DICOM ``FAMILY^GIVEN`` as ``FAMILY, GIVEN``."""
    parts = [p for p in value.split("^") if p]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "")


def _authenticate(ctx: WebContext, request: Request) -> tuple[AuthUser | None, Response | None]:
    token = request.cookies.get(SESSION_COOKIE, "")
    with session_scope(ctx.session_factory) as session:
        user = ctx.authenticator.resume_session(session, token)
    if user is not None:
        return user, None
    if is_program_path(request.url.path):
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return _authenticate_token(ctx, request, header[7:].strip())
        if header[:6].lower() == "basic ":
            try:
                name, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                name, password = "", ""
            try:
                with session_scope(ctx.session_factory) as session:
                    user = ctx.authenticator.verify(session, name, password, client_address(request), cached=True)
            except LockedOut as err:
                request.state.audit_user = name
                request.state.audit_action = "login locked out"
                return None, JSONResponse(
                    {"detail": str(err)}, status_code=429, headers={"Retry-After": str(int(err.retry_after) + 1)}
                )
            if user is not None:
                return user, None
            request.state.audit_user = name
            request.state.audit_action = "login failed"
        return None, JSONResponse(
            {"detail": "login required: log in, use HTTP Basic or an API token (Authorization: Bearer)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="radtriage", charset="UTF-8"'},
        )
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return None, RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def _authenticate_token(ctx: WebContext, request: Request, token: str) -> tuple[AuthUser | None, Response | None]:
    """An API token: one indexed lookup, no argon2. Never logged nor audited, only its name."""
    check = check_token(ctx.session_factory, token)
    if check.user is not None:
        return check.user, None
    request.state.audit_user = f"token:{check.name}" if check.name else ""
    request.state.audit_action = "token refused"
    log.warning("API token %s refused from %s: %s", check.name or "(unknown)", client_address(request), check.reason)
    return None, JSONResponse(
        {"detail": "API token refused: unknown, revoked or expired; see radtriage token list"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="radtriage", error="invalid_token"'},
    )


def create_app(settings: Settings, session_factory: sessionmaker[Session], archive: ArchiveFiles) -> FastAPI:
    """The worklist web app and JSON API.

    Parameters
    ----------
    settings
        ``[web]`` (login limits, secret key) and ``storage.data_dir``.
    session_factory
        Sessions on the migrated index (revision 0003 or later).
    archive
        Where slices and SEG/SR files are read from (``path_of(sop_instance_uid)``),
        normally :class:`pipeline.archive.Archive`.
    """
    from pipeline.web import alert_routes, api, pages, viewer
    from pipeline.web.dicomweb.routes import build_router as dicomweb_router

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["relative_time"] = relative_time
    templates.env.filters["local_time"] = _local
    templates.env.filters["person_name"] = _person_name
    templates.env.filters["dicom_date"] = _dicom_date
    ctx = WebContext(
        settings=settings,
        session_factory=session_factory,
        archive=archive,
        authenticator=Authenticator(
            settings.web.login_max_failures,
            settings.web.login_lockout_seconds,
            max_lockout_seconds=settings.web.login_lockout_max_seconds,
            cache_seconds=settings.web.basic_auth_cache_seconds,
        ),
        secret=load_secret(settings),
        renderer=SliceRenderer(archive.path_of),
        templates=templates,
    )
    app = FastAPI(title="radtriage worklist", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(alert_routes.router)
    app.include_router(dicomweb_router())
    app.include_router(viewer.build_router())

    @app.middleware("http")
    async def login_and_audit(request: Request, call_next: Any) -> Response:
        path = request.url.path
        quiet = path.startswith("/static/") or path in ("/health", "/favicon.ico")
        request.state.user = None
        request.state.request_id = request_id = secrets.token_hex(8)
        try:
            response = await _login_then_handle(ctx, request, call_next, quiet)
        except Exception as err:  # noqa: BLE001 - answered 500, audited and logged without data
            response = await _server_error(ctx, request, err)
        response.headers["X-Request-ID"] = request_id
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.url.scheme == "https":
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        if not path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app


async def _login_then_handle(ctx: WebContext, request: Request, call_next: Any, quiet: bool) -> Response:
    path = request.url.path
    if not (quiet or path in PUBLIC_PATHS):
        user, refusal = await run_in_threadpool(_authenticate, ctx, request)
        if refusal is not None:
            await run_in_threadpool(
                ctx.audit,
                username=getattr(request.state, "audit_user", ""),
                remote_addr=client_address(request),
                method=request.method,
                path=path,
                status_code=refusal.status_code,
                action=getattr(request.state, "audit_action", "refused: no login"),
            )
            return refusal
        request.state.user = user
        # An uploader may store (STOW-RS) and log out; every other request reads patient data.
        storing = request.method == "POST" and (path.startswith("/dicom-web/studies") or path == "/logout")
        if user is not None and not may_read(user) and not storing:
            request.state.audit_action = "refused: role may not read"
            detail = f"role {user.role.value} may store over STOW-RS but not read patient data"
            refused = JSONResponse({"detail": detail}, 403) if is_program_path(path) else PlainTextResponse(detail, 403)
            await run_in_threadpool(_audit_request, ctx, request, refused.status_code)
            return refused
    response: Response = await call_next(request)
    if not (quiet or _is_viewer_asset(path)):
        await run_in_threadpool(_audit_request, ctx, request, response.status_code)
    return response


def _is_viewer_asset(path: str) -> bool:
    """The viewer's own files (scripts, fonts, wasm): behind the login, but no patient
    data, so not audited (a first load fetches ~85). Its DICOMweb requests are audited."""
    return path.startswith("/viewer/") and "." in path.rsplit("/", 1)[-1]


def _audit_request(ctx: WebContext, request: Request, status_code: int, detail: str = "") -> None:
    if getattr(request.state, "audit_written", False) and status_code < 400:
        return  # the handler committed this request's record with its own change (an acknowledgement)
    user = request.state.user
    if user is not None and user.token_name and not detail:
        detail = f"API token {user.token_name}"
    ctx.audit(
        username=user.username if user else getattr(request.state, "audit_user", ""),
        remote_addr=client_address(request),
        method=request.method,
        path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        status_code=status_code,
        action=getattr(request.state, "audit_action", ""),
        study_uid=getattr(request.state, "audit_study", ""),
        detail=detail,
    )


async def _server_error(ctx: WebContext, request: Request, err: Exception) -> Response:
    """500 with the request id; logged and audited without the message (it may quote patient data)."""
    request_id = request.state.request_id
    route = getattr(request.scope.get("route"), "path", "") or "(no route)"
    where = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
    log.error(
        "request %s failed: %s %s raised %s\n%s",
        request_id,
        request.method,
        route,
        type(err).__name__,
        where.rstrip(),
    )
    request.state.audit_action = "server error"
    try:
        await run_in_threadpool(_audit_request, ctx, request, 500, f"{type(err).__name__}; request {request_id}")
    except Exception:  # noqa: BLE001 - ctx.audit logs its own failures; nothing more to do
        pass
    message = f"internal error (request {request_id}); the administrator can look it up in the log"
    if is_program_path(request.url.path):
        return JSONResponse({"detail": message, "request_id": request_id}, status_code=500)
    return PlainTextResponse(message, status_code=500)
