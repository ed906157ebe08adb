"""What every request handler of the web app shares: settings, index, archive, renderer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastapi import Request
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.archive import StoredInstance
from pipeline.config import Settings
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Series, SeriesOrigin, Study
from pipeline.web.auth import Authenticator
from pipeline.web.imaging import SliceRenderer

log = logging.getLogger(__name__)


def client_address(request: Request) -> str:
    """The client's address as the audit log and the lockout count it: the TCP peer, or
    what a ``[web] trusted_proxies`` proxy forwarded (uvicorn has already applied that)."""
    return request.client.host if request.client else ""


class ArchiveFiles(Protocol):
    """What the web app needs of :class:`pipeline.archive.Archive`."""

    incoming_dir: Path  # temp files of uploads in progress (same file system as the archive)

    def path_of(self, sop_instance_uid: str) -> Path: ...

    def store_encoded_file(
        self,
        path: Path,
        offset: int,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str | None = None,
    ) -> StoredInstance: ...


@dataclass
class WebContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    archive: ArchiveFiles
    authenticator: Authenticator
    secret: bytes
    renderer: SliceRenderer
    templates: Jinja2Templates

    def audit(
        self,
        *,
        username: str,
        remote_addr: str,
        method: str,
        path: str,
        status_code: int,
        action: str = "",
        study_uid: str = "",
        detail: str = "",
    ) -> None:
        """Append one access to the audit log (a failure to write it is logged, never hidden)."""
        try:
            with session_scope(self.session_factory) as session:
                session.add(
                    AuditEvent(
                        username=username[:64],
                        remote_addr=remote_addr[:64],
                        method=method[:8],
                        path=path[:512],
                        status_code=status_code,
                        action=action[:64],
                        StudyInstanceUID=study_uid[:64],
                        detail=detail,
                    )
                )
        except Exception as err:  # noqa: BLE001 - logged, never hidden; the request is answered anyway
            # Not the query nor the error's text: either may quote patient data.
            log.error(
                "could not write audit record %s %s %s by %s: %s",
                method,
                path.partition("?")[0],
                status_code,
                username,
                type(err).__name__,
            )


def study_instance(session: Session, study_uid: str, sop_instance_uid: str) -> tuple[str, str] | None:
    """``(SeriesInstanceUID, Modality)`` of the instance when it belongs to the study, else ``None``."""
    row = session.execute(
        select(Series.SeriesInstanceUID, Series.Modality)
        .join(Instance, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.StudyInstanceUID == study_uid, Instance.SOPInstanceUID == sop_instance_uid)
    ).first()
    return (str(row[0]), str(row[1] or "")) if row is not None else None


def series_slices(session: Session, series_uid: str) -> list[str]:
    """SOP Instance UIDs of a series in InstanceNumber order."""
    return list(
        session.scalars(
            select(Instance.SOPInstanceUID)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.SeriesInstanceUID == series_uid)
            .order_by(Instance.InstanceNumber, Instance.SOPInstanceUID)
        )
    )


def received_series(session: Session, study_uid: str) -> list[Series]:
    """The study's received (not derived) series, largest first."""
    return list(
        session.scalars(
            select(Series)
            .join(Study, Series.study_id == Study.id)
            .where(Study.StudyInstanceUID == study_uid, Series.origin == SeriesOrigin.received)
            .order_by(Series.NumberOfSeriesRelatedInstances.desc(), Series.SeriesNumber)
        )
    )
