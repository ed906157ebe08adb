"""The JSON API: ``GET /api/worklist`` and friends (session cookie or HTTP Basic)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from pipeline.ai.findings import Priority
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import session_scope
from pipeline.index.triage import AIStatus
from pipeline.web.auth import AuthUser, csrf_ok
from pipeline.web.context import WebContext
from pipeline.web.worklist import (
    BadSearch,
    StudyNotFound,
    check_search,
    get_worklist_item,
    list_worklist,
    read_action,
    set_read,
)

router = APIRouter()
MAX_MODALITY_CHARS = 16  # a DICOM CS value


def _ctx(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


@router.get("/health")
def health(request: Request) -> JSONResponse:
    """Public: 200 when the index answers, 503 when it does not."""
    try:
        with session_scope(_ctx(request).session_factory, readonly=True) as session:
            session.execute(text("SELECT 1"))
    except Exception as err:  # noqa: BLE001 - any database failure means unhealthy
        return JSONResponse({"status": "unhealthy", "index": str(err)[:200]}, status_code=503)
    return JSONResponse({"status": "ok", "index": "ok"})


@router.get("/api/worklist")
def api_worklist(
    request: Request,
    status: str = "",
    priority: str = "",
    modality: str = "",
    q: str = "",
    read: str = "",
    limit: int = 1000,
) -> JSONResponse:
    """The worklist, most urgent first: ``{"generated_at", "count", "studies": [...]}``.

    Filters: ``status`` (pending|running|done|failed), ``priority``
    (critical|urgent|routine), ``modality``, ``q`` (name, ID or accession; at most 8
    words, 128 characters), ``read`` (true|false). A bad filter is answered 400.
    """
    if status and status not in {s.value for s in AIStatus}:
        return _error(400, f"status must be one of {', '.join(s.value for s in AIStatus)}")
    if priority and priority not in {p.value for p in Priority}:
        return _error(400, f"priority must be one of {', '.join(p.value for p in Priority)}")
    if read not in ("", "true", "false"):
        return _error(400, "read must be true or false")
    if len(modality) > MAX_MODALITY_CHARS:
        return _error(400, f"modality must be at most {MAX_MODALITY_CHARS} characters (e.g. CT)")
    try:
        search = check_search(q)
    except BadSearch as err:
        return _error(400, str(err))
    with session_scope(_ctx(request).session_factory, readonly=True) as session:
        items = list_worklist(
            session,
            status=status or None,
            priority=priority or None,
            modality=modality or None,
            search=search or None,
            read={"true": True, "false": False}.get(read),
            limit=max(1, min(limit, 10_000)),
        )
    return JSONResponse(
        {
            "generated_at": datetime.now(UTC).isoformat(),
            "count": len(items),
            "studies": [item.to_json() for item in items],
        }
    )


@router.get("/api/studies/{study_uid}")
def api_study(request: Request, study_uid: str) -> JSONResponse:
    request.state.audit_study = study_uid
    with session_scope(_ctx(request).session_factory, readonly=True) as session:
        try:
            return JSONResponse(get_worklist_item(session, study_uid).to_json())
        except StudyNotFound as err:
            return _error(404, str(err))


def _api_mark(request: Request, study_uid: str, read: bool) -> JSONResponse:
    ctx = _ctx(request)
    user: AuthUser = request.state.user
    request.state.audit_study = study_uid
    request.state.audit_action = read_action(read)
    # A browser session must prove the page is ours; HTTP Basic clients are scripts.
    if user.session_token and not csrf_ok(ctx.secret, user.session_token, request.headers.get("x-csrf-token", "")):
        return _error(403, "missing or wrong X-CSRF-Token header")
    try:
        item = set_read(ctx.session_factory, study_uid, user.username, read)
    except StudyNotFound as err:
        return _error(404, str(err))
    return JSONResponse(item.to_json())


@router.post("/api/studies/{study_uid}/read")
def api_read(request: Request, study_uid: str) -> JSONResponse:
    return _api_mark(request, study_uid, True)


@router.post("/api/studies/{study_uid}/unread")
def api_unread(request: Request, study_uid: str) -> JSONResponse:
    return _api_mark(request, study_uid, False)


@router.get("/api/audit")
def api_audit(request: Request, limit: int = 200, username: str = "", study: str = "") -> JSONResponse:
    """Admins only: the latest audit records, newest first."""
    user: AuthUser = request.state.user
    if not user.is_admin:
        return _error(403, "the audit log is for admins")
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 5000)))
    if username:
        query = query.where(AuditEvent.username == username)
    if study:
        query = query.where(AuditEvent.StudyInstanceUID == study)
    with session_scope(_ctx(request).session_factory, readonly=True) as session:
        rows = session.scalars(query).all()
        events = [
            {
                "at": e.at.isoformat(),
                "username": e.username,
                "remote_addr": e.remote_addr,
                "method": e.method,
                "path": e.path,
                "status_code": e.status_code,
                "action": e.action,
                "StudyInstanceUID": e.StudyInstanceUID,
            }
            for e in rows
        ]
    return JSONResponse({"count": len(events), "events": events})
