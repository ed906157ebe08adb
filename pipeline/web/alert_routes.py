"""HTTP side of the critical-finding alerts (:mod:`pipeline.web.alerts`).

``GET /worklist/alerts`` is the banner fragment the worklist polls (ETag, like the rows);
acknowledging is ``POST /studies/{uid}/acknowledge`` (a form: works without scripts) or
``POST /api/studies/{uid}/acknowledge`` (what the page's script calls; JSON). Both need
the session's CSRF token, as marking read does; HTTP Basic and API-token clients are
programs and need none.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from pipeline.index.db import session_scope
from pipeline.web.alerts import ACK_REPEATED, Acknowledgement, NotCritical, acknowledge, pending_alerts
from pipeline.web.auth import AuthUser, csrf_ok, csrf_token
from pipeline.web.context import WebContext, client_address
from pipeline.web.worklist import StudyNotFound

router = APIRouter()
ACK_REFUSED = "acknowledge critical refused: CSRF token"


def _ctx(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


@router.get("/worklist/alerts")
def alerts_fragment(request: Request) -> Response:
    """The banners of every critical finding nobody has acknowledged (filters do not hide them)."""
    ctx = _ctx(request)
    user: AuthUser = request.state.user
    with session_scope(ctx.session_factory, readonly=True) as session:
        alerts = pending_alerts(session)
    csrf = csrf_token(ctx.secret, user.session_token) if user.session_token else ""
    response = ctx.templates.TemplateResponse(request, "_alerts.html", {"alerts": alerts, "csrf": csrf, "user": user})
    etag = '"' + hashlib.sha256(bytes(response.body)).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return response


def _acknowledge(request: Request, study_uid: str, token: str) -> tuple[int, str, Acknowledgement | None, bool]:
    """Check the token and record the acknowledgement: ``(status, message, acknowledgement, recorded)``."""
    ctx = _ctx(request)
    user: AuthUser = request.state.user
    request.state.audit_study = study_uid
    # A browser session must prove the page is ours; HTTP Basic and token clients are scripts.
    if user.session_token and not csrf_ok(ctx.secret, user.session_token, token):
        request.state.audit_action = ACK_REFUSED
        return 403, "the form expired or came from another site: reload the page and acknowledge again", None, False
    try:
        with session_scope(ctx.session_factory) as session:
            ack, recorded = acknowledge(
                session,
                study_uid,
                user.username,
                remote_addr=client_address(request),
                method=request.method,
                path=request.url.path,
            )
    except StudyNotFound as err:
        return 404, str(err), None, False
    except NotCritical as err:
        return 409, str(err), None, False
    if recorded:
        # This request's audit record is the acknowledgement just committed: no second one.
        request.state.audit_written = True
    else:
        request.state.audit_action = ACK_REPEATED
    return 200, "", ack, recorded


def _ack_json(study_uid: str, ack: Acknowledgement, recorded: bool) -> dict[str, Any]:
    return {
        "StudyInstanceUID": study_uid,
        "acknowledged_by": ack.username,
        "acknowledged_at": ack.at.isoformat(),
        "already_acknowledged": not recorded,
    }


@router.post("/api/studies/{study_uid}/acknowledge")
def api_acknowledge(request: Request, study_uid: str) -> JSONResponse:
    """Acknowledge the study's critical finding: who took it and when (someone else's, if first)."""
    status, message, ack, recorded = _acknowledge(request, study_uid, request.headers.get("x-csrf-token", ""))
    if ack is None:
        return JSONResponse({"detail": message}, status_code=status)
    return JSONResponse(_ack_json(study_uid, ack, recorded))


@router.post("/studies/{study_uid}/acknowledge")
def acknowledge_form(request: Request, study_uid: str, csrf_token: str = Form(""), next: str = Form("")) -> Response:
    """The same from a plain form; back to the worklist, or to the study with ``next=study``."""
    status, message, _, _ = _acknowledge(request, study_uid, csrf_token)
    if status != 200:
        return Response(message[:1].upper() + message[1:] + ".", status_code=status, media_type="text/plain")
    # Only these two places: a form field never chooses where the browser goes.
    target = f"/studies/{study_uid}" if next == "study" else "/worklist"
    return RedirectResponse(target, status_code=303)
