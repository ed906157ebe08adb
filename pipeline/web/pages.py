"""Server-rendered pages: login, worklist (with a live-updating rows fragment), study."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from pipeline.index.db import session_scope
from pipeline.index.schema import Series, SeriesOrigin
from pipeline.index.triage import AIStatus
from pipeline.web.alerts import critical_state, pending_alerts
from pipeline.web.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_LIFETIME,
    AuthUser,
    LockedOut,
    csrf_ok,
    csrf_token,
    login_csrf_ok,
    login_csrf_token,
)
from pipeline.web.context import WebContext, client_address, received_series, series_slices, study_instance
from pipeline.web.imaging import OVERLAYS, WINDOWS, NotAnImage, default_window
from pipeline.web.reading import models_registry, study_readings
from pipeline.web.viewer import viewer_url
from pipeline.web.worklist import (
    BadSearch,
    ReadFilter,
    StudyNotFound,
    WorklistFilter,
    WorklistPage,
    check_search,
    get_worklist_item,
    read_action,
    set_read,
    worklist_page,
    worklist_version,
)

log = logging.getLogger(__name__)
router = APIRouter()

POLL_SECONDS = 3
PRIORITIES = ("critical", "urgent", "routine")
# Objects that are not pictures: their slice URL answers 415, not a rendering error.
NOT_IMAGES = {"SR", "SEG", "KO", "PR", "RTSTRUCT", "DOC"}
_NONCE = re.compile(r"[A-Za-z0-9_-]{32}")
READ_CHOICES = {
    ReadFilter.recent.value: "unread + read in 7 days",
    ReadFilter.unread.value: "unread",
    ReadFilter.read.value: "read",
    ReadFilter.all.value: "all",
}
MAX_PAGE = 100_000
# In every rows ETag: after a restart (other templates) no old page is told 304.
_BOOT = secrets.token_hex(8)


def _ctx(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def _user(request: Request) -> AuthUser:
    return request.state.user  # type: ignore[no-any-return]


def _safe_next(target: str | None) -> str:
    # Only local paths: never redirect a login to another site.
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and all(c.isprintable() and not c.isspace() and c != "\\" for c in target)
    ):
        return target
    return "/worklist"


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    ctx = _ctx(request)
    user = getattr(request.state, "user", None)
    context.setdefault("user", user)
    context.setdefault("csrf", csrf_token(ctx.secret, user.session_token) if user and user.session_token else "")
    return ctx.templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


def _login_page(
    request: Request, *, status_code: int = 200, next_url: str | None, username: str = "", error: str = ""
) -> HTMLResponse:
    """The login form, with a token bound to a pre-login cookie (set here when missing)."""
    ctx = _ctx(request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not _NONCE.fullmatch(nonce):
        nonce = secrets.token_urlsafe(24)
    response = _render(
        request,
        "login.html",
        status_code=status_code,
        next=_safe_next(next_url),
        username=username,
        error=error,
        login_csrf=login_csrf_token(ctx.secret, nonce),
    )
    response.set_cookie(
        LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/login"
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/worklist") -> HTMLResponse:
    return _login_page(request, next_url=next)


def _from_browser(request: Request) -> bool:
    # Every current browser sends one of these with a form POST; a cross-site page cannot
    # remove them. A script without them cannot be the victim of a login CSRF.
    return "origin" in request.headers or "sec-fetch-site" in request.headers


@router.post("/login")
def login(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    next: str = Form("/worklist"),
    csrf_token: str = Form(""),
) -> Response:
    ctx = _ctx(request)
    remote = client_address(request)
    request.state.audit_user = username[:64]
    if _from_browser(request) and not login_csrf_ok(ctx.secret, request.cookies.get(LOGIN_COOKIE, ""), csrf_token):
        request.state.audit_action = "login refused: form token"
        return _login_page(
            request,
            status_code=403,
            next_url=next,
            username=username,
            error="The login form expired or came from another site. Log in again.",
        )
    if not username.strip() or not password:
        return _login_page(
            request, status_code=400, next_url=next, username=username, error="Enter your user name and password."
        )
    try:
        with session_scope(ctx.session_factory) as session:
            user = ctx.authenticator.verify(session, username, password, remote)
            token = ctx.authenticator.open_session(session, user, remote) if user is not None else ""
    except LockedOut as err:
        request.state.audit_action = "login locked out"
        response = _login_page(
            request,
            status_code=429,
            next_url=next,
            username=username,
            error=f"Too many failed logins. {str(err).capitalize()}.",
        )
        response.headers["Retry-After"] = str(int(err.retry_after) + 1)
        return response
    if user is None:
        request.state.audit_action = "login failed"
        return _login_page(
            request, status_code=401, next_url=next, username=username, error="Wrong user name or password."
        )
    request.state.audit_action = "login"
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")) -> Response:
    ctx = _ctx(request)
    user = _user(request)
    if not csrf_ok(ctx.secret, user.session_token, csrf_token):
        return Response("Form expired; go back, reload and try again.", status_code=403)
    with session_scope(ctx.session_factory) as session:
        ctx.authenticator.close_session(session, user.session_token)
    request.state.audit_action = "logout"
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _filters(status: str, priority: str, modality: str, q: str, read: str = "", page: str = "") -> dict[str, str]:
    """The worklist filters, tolerant of odd values; raises :class:`BadSearch` for a search over the limits."""
    number = int(page) if page.isdigit() else 1
    return {
        "status": status if status in {s.value for s in AIStatus} else "",
        "priority": priority if priority in PRIORITIES else "",
        "modality": modality.strip().upper()[:16],
        "q": check_search(q),
        "read": read if read in READ_CHOICES else ReadFilter.recent.value,
        "page": str(min(max(number, 1), MAX_PAGE)),
    }


def _href(filters: dict[str, str], **changes: str) -> str:
    """The worklist URL with these filters (defaults left out) and ``changes``."""
    wanted = filters | changes
    defaults = {"read": ReadFilter.recent.value, "page": "1"}
    query = {k: v for k, v in wanted.items() if v and defaults.get(k) != v}
    return "/worklist" + (f"?{urlencode(query)}" if query else "")


def _worklist_page(ctx: WebContext, filters: dict[str, str]) -> WorklistPage:
    size = ctx.settings.web.worklist_page_size
    where = WorklistFilter(
        filters["status"] or None,
        filters["priority"] or None,
        filters["modality"] or None,
        filters["q"] or None,
        filters["read"],
    )
    with session_scope(ctx.session_factory, readonly=True) as session:
        return worklist_page(session, where, offset=(int(filters["page"]) - 1) * size, limit=size)


def _rows_etag(ctx: WebContext, filters: dict[str, str]) -> str:
    """The rows' ETag from :func:`worklist_version`, not from rendering them.

    The minute is part of it: the rows say "12 min ago", and whatever the aggregates
    miss shows within a minute.
    """
    with session_scope(ctx.session_factory, readonly=True) as session:
        version = worklist_version(session)
    key = repr((_BOOT, int(time.time() // 60), sorted(filters.items()), ctx.settings.web.worklist_page_size, version))
    return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'


def _range_headers(page: WorklistPage) -> dict[str, str]:
    return {"X-Total-Count": str(page.total), "X-Range-First": str(page.first), "X-Range-Last": str(page.last)}


@router.get("/worklist", response_class=HTMLResponse)
def worklist_html(
    request: Request,
    status: str = "",
    priority: str = "",
    modality: str = "",
    q: str = "",
    read: str = "",
    page: str = "",
) -> HTMLResponse:
    ctx = _ctx(request)
    try:
        filters = _filters(status, priority, modality, q, read, page)
    except BadSearch as err:
        return _render(request, "message.html", status_code=400, title="Search too long", message=str(err))
    etag = _rows_etag(ctx, filters)  # before the rows: a change in between is seen by the first poll
    shown = _worklist_page(ctx, filters)
    with session_scope(ctx.session_factory, readonly=True) as session:
        modalities = sorted(
            m
            for m in session.scalars(select(Series.Modality).where(Series.origin == SeriesOrigin.received).distinct())
            if m
        )
        alerts = pending_alerts(session)  # filters never hide a critical finding
    number = shown.number
    return _render(
        request,
        "worklist.html",
        page=shown,
        items=shown.items,
        filters=filters,
        filtered=any(filters[k] for k in ("status", "priority", "modality", "q"))
        or filters["read"] != ReadFilter.recent.value,
        previous_href=_href(filters, page=str(number - 1)) if shown.has_previous else "",
        next_href=_href(filters, page=str(number + 1)) if shown.has_next else "",
        first_href=_href(filters, page="1"),
        modalities=modalities,
        statuses=[s.value for s in AIStatus],
        priorities=PRIORITIES,
        read_choices=READ_CHOICES,
        poll_seconds=POLL_SECONDS,
        rows_etag=etag,
        alerts=alerts,
    )


@router.get("/worklist/rows")
def worklist_rows(
    request: Request,
    status: str = "",
    priority: str = "",
    modality: str = "",
    q: str = "",
    read: str = "",
    page: str = "",
) -> Response:
    """The page's rows, polled every few seconds: 304 from a few aggregates when nothing changed."""
    ctx = _ctx(request)
    try:
        filters = _filters(status, priority, modality, q, read, page)
    except BadSearch as err:
        return Response(str(err), status_code=400, media_type="text/plain")
    etag = _rows_etag(ctx, filters)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    shown = _worklist_page(ctx, filters)
    response = _render(request, "_rows.html", items=shown.items)
    response.headers.update({"ETag": etag, **_range_headers(shown)})
    return response


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, window: str = "", overlay: str = "fill") -> HTMLResponse:
    ctx = _ctx(request)
    request.state.audit_study = study_uid
    with session_scope(ctx.session_factory, readonly=True) as session:
        try:
            item = get_worklist_item(session, study_uid)
        except StudyNotFound:
            return _render(
                request,
                "message.html",
                status_code=404,
                title="Study not found",
                message=f"No study {study_uid} is in the archive.",
            )
        received = received_series(session, study_uid)
        key = item.key_finding
        series_uid = key.SourceSeriesInstanceUID if key else ""
        if not series_uid:
            series_uid = next((r.SourceSeriesInstanceUID for r in item.results if r.SourceSeriesInstanceUID), "")
        if not series_uid and received:
            series_uid = received[0].SeriesInstanceUID
        slices = series_slices(session, series_uid) if series_uid else []
        critical = critical_state(session, study_uid)
        readings = study_readings(received, item, models_registry(ctx.settings.models.dir))
        head_window = default_window(
            [s.BodyPartExamined for s in received], [item.StudyDescription] + [s.SeriesDescription for s in received]
        )
    if key is not None and key.key_sop_instance_uid in slices:
        key_index = slices.index(key.key_sop_instance_uid)
    else:
        key_index = len(slices) // 2
    if window not in WINDOWS:
        window = head_window
    if overlay not in OVERLAYS:
        overlay = "fill"
    return _render(
        request,
        "study.html",
        item=item,
        slices=slices,
        key_index=key_index,
        window=window,
        windows=WINDOWS,
        overlay=overlay,
        overlays=OVERLAYS,
        critical=critical,
        readings=readings,
        # OHIF on this study, opened on the key image (the slice where the finding is largest).
        viewer_href=viewer_url(
            item.StudyInstanceUID, series_uid if key else "", key.key_sop_instance_uid if key else ""
        ),
    )


def _seg_uids(item: Any, series_uid: str) -> tuple[str, ...]:
    return tuple(
        sorted(
            {
                r.SegSOPInstanceUID
                for r in item.results
                if r.ok and r.SegSOPInstanceUID and r.SourceSeriesInstanceUID == series_uid
            }
        )
    )


@router.get("/studies/{study_uid}/image/{sop_uid}.png")
def slice_image(
    request: Request, study_uid: str, sop_uid: str, window: str = "soft", overlay: str = "fill"
) -> Response:
    ctx = _ctx(request)
    request.state.audit_study = study_uid
    if window not in WINDOWS or overlay not in OVERLAYS:
        return Response(
            f"window must be one of {', '.join(WINDOWS)}; overlay one of {', '.join(OVERLAYS)}", status_code=400
        )
    with session_scope(ctx.session_factory, readonly=True) as session:
        found = study_instance(session, study_uid, sop_uid)
        if found is None:
            return Response("no such image in this study", status_code=404)
        item = get_worklist_item(session, study_uid)
        series_uid, modality = found
    not_image = Response(
        f"{modality or 'this object'} {sop_uid} is not an image; download it from "
        f"/studies/{study_uid}/objects/{sop_uid}.dcm",
        status_code=415,
        media_type="text/plain",
    )
    if modality.upper() in NOT_IMAGES:
        return not_image
    try:
        png = ctx.renderer.render_png(sop_uid, window=window, overlay=overlay, seg_uids=_seg_uids(item, series_uid))
    except NotAnImage:
        return not_image
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/studies/{study_uid}/objects/{sop_uid}.dcm")
def download_object(request: Request, study_uid: str, sop_uid: str) -> Response:
    ctx = _ctx(request)
    request.state.audit_study = study_uid
    request.state.audit_action = "download"
    with session_scope(ctx.session_factory, readonly=True) as session:
        found = study_instance(session, study_uid, sop_uid)
    if found is None:
        return Response("no such object in this study", status_code=404)
    path = ctx.archive.path_of(sop_uid)
    return Response(
        path.read_bytes(),
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{found[1] or "obj"}_{sop_uid}.dcm"'},
    )


def _mark(request: Request, study_uid: str, csrf: str, next_url: str, read: bool) -> Response:
    ctx = _ctx(request)
    user = _user(request)
    request.state.audit_study = study_uid
    request.state.audit_action = read_action(read)
    if not csrf_ok(ctx.secret, user.session_token, csrf):
        return Response("Form expired; go back, reload and try again.", status_code=403)
    try:
        set_read(ctx.session_factory, study_uid, user.username, read)
    except StudyNotFound as err:
        return Response(str(err), status_code=404)
    return RedirectResponse(_safe_next(next_url or f"/studies/{study_uid}"), status_code=303)


@router.post("/studies/{study_uid}/read")
def read_form(request: Request, study_uid: str, csrf_token: str = Form(""), next: str = Form("")) -> Response:
    return _mark(request, study_uid, csrf_token, next, True)


@router.post("/studies/{study_uid}/unread")
def unread_form(request: Request, study_uid: str, csrf_token: str = Form(""), next: str = Form("")) -> Response:
    return _mark(request, study_uid, csrf_token, next, False)
