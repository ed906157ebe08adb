"""DICOMweb (PS3.18) on the archive: QIDO-RS search, WADO-RS retrieval, STOW-RS storage.

Served by the worklist's FastAPI app under ``/dicom-web`` with the same users: the
session cookie (the viewer, same origin), HTTP Basic or an API token (programs).
Reading needs a login; storing needs a role allowed to write. Every request is audited
by the app's middleware with the study it touched (``request.state.audit_study``).

=============  ====================================================================
``qido``       ``GET /studies``, ``/series``, ``/instances`` and their nested forms,
               on :mod:`pipeline.index.query` (the C-FIND engine)
``wado``       instances, ``/metadata``, ``/frames``, ``/bulkdata``, ``/rendered``,
               ``/thumbnail``
``stow``       ``POST /studies[/{uid}]``: each part through the C-STORE archive path
``metadata``   series metadata built once and cached on disk
``media``      multipart/related bodies, Accept negotiation
``multipart``  reading a multipart/related upload as it streams in (STOW-RS)
``dicomjson``  datasets as ``application/dicom+json`` with BulkDataURIs
``routes``     all of them under :data:`PREFIX`
=============  ====================================================================

May import the archive, the index, and the web app's context and imaging; nothing of
the triage, AI or DICOM network layers.
"""

from __future__ import annotations

from fastapi import Request

PREFIX = "/dicom-web"


def base_url(request: Request) -> str:
    """This server's DICOMweb root: ``[web] public_url`` when set, else as the client
    reached it (``http://host:port/dicom-web``, from the request's Host header)."""
    public = request.app.state.ctx.settings.web.public_url
    return (public or str(request.base_url).rstrip("/")) + PREFIX


def resource_path(study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> str:
    """The WADO-RS path of a study, series or instance below :data:`PREFIX`."""
    path = f"/studies/{study_uid}"
    if series_uid is not None:
        path += f"/series/{series_uid}"
        if sop_uid is not None:
            path += f"/instances/{sop_uid}"
    return path
