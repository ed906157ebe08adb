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
``media``      multipart/related writing and reading, Accept negotiation
``json``       datasets as ``application/dicom+json`` with BulkDataURIs
=============  ====================================================================

May import the archive, the index, and the web app's context and imaging; nothing of
the triage, AI or DICOM network layers.
"""

from __future__ import annotations

from fastapi import APIRouter

PREFIX = "/dicom-web"


def build_router() -> APIRouter:
    """Every DICOMweb route, under :data:`PREFIX`."""
    from pipeline.web.dicomweb import qido, stow, wado

    router = APIRouter(prefix=PREFIX)
    router.include_router(qido.router)
    router.include_router(wado.router)
    router.include_router(stow.router)
    return router
