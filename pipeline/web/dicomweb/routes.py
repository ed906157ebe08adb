"""Every DICOMweb route of the app, under :data:`pipeline.web.dicomweb.PREFIX`."""

from __future__ import annotations

from fastapi import APIRouter

from pipeline.web.dicomweb import PREFIX, qido, stow, wado


def build_router() -> APIRouter:
    """Every DICOMweb route, under :data:`PREFIX`."""
    router = APIRouter(prefix=PREFIX)
    router.include_router(qido.router)
    router.include_router(wado.router)
    router.include_router(stow.router)
    return router
