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
    MAX_LIMIT,
    BadSearch,
    ReadFilter,
    StudyNotFound,
    WorklistFilter,
    check_search,
    get_worklist_item,
    read_action,
    set_read,
    worklist_page,
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


READ_VALUES = {"true": ReadFilter.read, "false": ReadFilter.unread} | {r.value: r for r in ReadFilter}


@router.get("/api/worklist")
def api_worklist(
    request: Request,
    status: str = "",
    priority: str = "",
    modality: str = "",
    q: str = "",
    read: str = "",
    limit: int | None = None,
    offset: int = 0,
) -> JSONResponse:
    """One page of the worklist, most urgent first, as the worklist page orders it.

    ``{"generated_at", "total", "offset", "limit", "count", "next_offset", "studies": [...]}``:
    ``total`` counts the matching studies on all pages, ``next_offset`` is the ``offset``
    of the next page (``null`` on the last). ``limit`` defaults to ``[web]
    worklist_page_size``, at most 1000. Filters: ``status``
    (pending|running|done|failed|not_applicable), ``priority`` (critical|urgent|routine),
    ``modality``, ``q`` (name, ID or accession; at most 8 words, 128 characters),
    ``read`` (true|false, or recent|unread|read|all; default all). A bad parameter is
    answered 400.
    """
    if status and status not in {s.value for s in AIStatus}:
        return _error(400, f"status must be one of {', '.join(s.value for s in AIStatus)}")
    if priority and priority not in {p.value for p in Priority}:
        return _error(400, f"priority must be one of {', '.join(p.value for p in Priority)}")
    if read and read not in READ_VALUES:
        return _error(400, f"read must be one of {', '.join(READ_VALUES)}")
    if len(modality) > MAX_MODALITY_CHARS:
        return _error(400, f"modality must be at most {MAX_MODALITY_CHARS} characters (e.g. CT)")
    if offset < 0 or (limit is not None and not 1 <= limit <= MAX_LIMIT):
        return _error(400, f"offset must be 0 or more and limit 1 to {MAX_LIMIT}")
    try:
        search = check_search(q)
    except BadSearch as err:
        return _error(400, str(err))
    ctx = _ctx(request)
    where = WorklistFilter(status or None, priority or None, modality or None, search or None, READ_VALUES.get(read))
    with session_scope(ctx.session_factory, readonly=True) as session:
        page = worklist_page(session, where, offset=offset, limit=limit or ctx.settings.web.worklist_page_size)
    return JSONResponse(
        {
            "generated_at": datetime.now(UTC).isoformat(),
            "total": page.total,
            "offset": page.offset,
            "limit": page.limit,
            "count": len(page.items),
            "next_offset": page.offset + page.limit if page.has_next else None,
            "studies": [item.to_json() for item in page.items],
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
