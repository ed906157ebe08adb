"""Every C-FIND, C-MOVE and C-GET in the audit log, beside the web app's accesses.

One :class:`~pipeline.index.accounts.AuditEvent` per operation: who (calling AE title and
address), when, what was asked (the query keys or the UIDs), how many matched or were
sent, and the DIMSE status it ended with. Admins read it through ``/api/audit``.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy.orm import Session, sessionmaker

from pipeline.index.accounts import AuditEvent
from pipeline.index.db import session_scope

log = logging.getLogger(__name__)


def audit_dimse(
    session_factory: sessionmaker[Session],
    *,
    operation: str,
    calling_ae: str,
    address: str,
    request: str,
    status: int,
    study_uid: str = "",
    **outcome: object,
) -> None:
    """Record one DIMSE operation; a failure to write is logged, never raised.

    Parameters
    ----------
    operation
        ``"C-FIND"``, ``"C-MOVE"`` or ``"C-GET"``.
    request
        What was asked, in a line: the level and keys (``STUDY PatientName=DOE*``) or UIDs.
    status
        The final DIMSE status (``0x0000`` success, ``0xFE00`` cancelled, failures).
    outcome
        Counts and names for the detail column, e.g. ``matches=3`` or
        ``completed=300, failed=0, destination="WS1"``.
    """
    try:
        with session_scope(session_factory) as session:
            session.add(
                AuditEvent(
                    username=calling_ae.strip()[:64],
                    remote_addr=address[:64],
                    method=operation[:8],
                    path=request[:512],
                    status_code=status,
                    action={"C-FIND": "query", "C-MOVE": "retrieve", "C-GET": "retrieve"}.get(operation, operation),
                    StudyInstanceUID=study_uid[:64],
                    detail=json.dumps(outcome, default=str, sort_keys=True),
                )
            )
    except Exception as err:  # noqa: BLE001 - the operation went through; the audit gap must be seen
        log.error(
            "could not write the audit record of a %s from %s: %s: %s", operation, calling_ae, type(err).__name__, err
        )
