"""Dispatch stable studies to the Prefect deployment ``triage-study``.

The study state in the index is the outbox: a ``stable`` study is owed a flow run. The
dispatcher creates it with the idempotency key ``<StudyInstanceUID>/<revision>`` and
only then records the run and moves the study to ``dispatched``, in one transaction.
If the Prefect API is down, studies stay ``stable`` and are dispatched when it is back;
if the process dies between the API call and the commit, the next attempt reuses the
same key and Prefect returns the same flow run: nothing lost, nothing twice.

This is the only module of :mod:`pipeline` that imports Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC
from uuid import UUID

from prefect.client.orchestration import get_client
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from pipeline.index.db import session_scope
from pipeline.index.schema import Study, StudyState
from pipeline.index.triage import AIStatus, TriageRun, worklist_entry
from pipeline.process.component import PollLoop

log = logging.getLogger(__name__)

# The one definition of the names: flows/ defines the flow and registers the deployment
# under them (prefect.yaml repeats them for `prefect deploy`).
FLOW_NAME = "triage-study"
DEPLOYMENT_NAME = "triage-study"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"


def dispatch_key(study_uid: str, revision: int) -> str:
    return f"{study_uid}/{revision}"


class Dispatcher(PollLoop):
    """Turn ``stable`` studies into flow runs, in a thread (see :class:`PollLoop`).

    Parameters
    ----------
    session_factory
        The index.
    on_dispatched
        Called after a round that dispatched something (the in-process worker's wake).
    """

    name = "dispatcher"
    thread_name = "dispatcher"

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        poll_interval: float = 1.0,
        on_dispatched: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(poll_interval)
        self.session_factory = session_factory
        self.on_dispatched = on_dispatched
        self._deployment_id: UUID | None = None
        self.api_available = True

    def run_once(self) -> None:
        if self.dispatch_pending() and self.on_dispatched is not None:
            self.on_dispatched()

    def dispatch_pending(self, limit: int = 50) -> list[str]:
        """Dispatch up to ``limit`` stable studies; return their StudyInstanceUIDs.

        Stops at the first API error and leaves the rest ``stable`` for the next round.
        """
        with session_scope(self.session_factory, readonly=True) as session:
            pending = session.scalars(
                select(Study.StudyInstanceUID)
                .where(Study.state == StudyState.stable)
                .order_by(Study.last_received_at)
                .limit(limit)
            ).all()
        dispatched: list[str] = []
        for study_uid in pending:
            try:
                if self._dispatch_one(study_uid):
                    dispatched.append(study_uid)
            except Exception as err:  # noqa: BLE001 - API unreachable or refused: keep the outbox
                if self.api_available:
                    log.warning("Prefect API unavailable (%s); %d studies wait to be dispatched", err, len(pending))
                self.api_available = False
                self._deployment_id = None
                break
            else:
                if not self.api_available:
                    log.info("Prefect API is back; dispatching")
                self.api_available = True
        return dispatched

    def _deployment(self, client: object) -> UUID:
        if self._deployment_id is None:
            self._deployment_id = client.read_deployment_by_name(DEPLOYMENT).id  # type: ignore[attr-defined]
        return self._deployment_id

    def _dispatch_one(self, study_uid: str) -> bool:
        with session_scope(self.session_factory, readonly=True) as session:
            study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
            if study is None or study.state != StudyState.stable:
                return False
            last = session.scalar(select(func.max(TriageRun.revision)).where(TriageRun.study_id == study.id))
            revision = (last or 0) + 1
        with get_client(sync_client=True) as client:
            flow_run = client.create_flow_run_from_deployment(
                self._deployment(client),
                parameters={"study_uid": study_uid, "revision": revision},
                idempotency_key=dispatch_key(study_uid, revision),
                name=f"triage-{study_uid[-12:]}-r{revision}",
            )
        with session_scope(self.session_factory) as session:
            study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
            assert study is not None
            session.add(
                TriageRun(
                    study_id=study.id,
                    revision=revision,
                    flow_run_id=str(flow_run.id),
                    last_received_at=study.last_received_at,
                    stable_at=study.state_changed_at,
                )
            )
            # A late instance may have arrived meanwhile: then the study stays received and
            # this run's results will be superseded by the next revision.
            if study.state == StudyState.stable:
                study.set_state(StudyState.dispatched)
            worklist_entry(session, study.id).ai_status = AIStatus.pending
        log.info("dispatched study %s revision %d as flow run %s", study_uid, revision, flow_run.id)
        return True


def recover_interrupted(session_factory: sessionmaker[Session], *, running_is_stale_after: float | None) -> list[str]:
    """Send back to ``stable`` the studies whose flow run can no longer finish.

    A flow run ends Crashed, Failed or Cancelled without recording results when the
    process that ran it died (``kill -9``, power loss). At start the study is then
    dispatched again as a new revision. A run still *Running* is taken as dead when it
    started more than ``running_is_stale_after`` seconds ago; ``0`` treats every running
    run as dead (one-machine installs, where this process is the only worker) and
    ``None`` never does. Scheduled and pending runs are left for a worker to pick up.
    """
    from datetime import datetime

    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    other = aliased(TriageRun)
    latest = select(func.max(other.revision)).where(other.study_id == Study.id).scalar_subquery()
    with session_scope(session_factory, readonly=True) as session:
        rows = session.execute(
            select(Study.StudyInstanceUID, TriageRun.flow_run_id)
            .join(TriageRun, TriageRun.study_id == Study.id)
            .where(Study.state == StudyState.dispatched, TriageRun.revision == latest)
        ).all()
    recovered: list[str] = []
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        for study_uid, flow_run_id in rows:
            try:
                state = client.read_flow_run(flow_run_id).state if flow_run_id else None
            except ObjectNotFound:  # the Prefect database was reset: the run is gone
                state = None
            if state is not None and (state.is_scheduled() or state.is_pending()):
                continue
            if state is not None and state.is_running():
                age = (now - state.timestamp).total_seconds()
                if running_is_stale_after is None or age < running_is_stale_after:
                    continue
                client.set_flow_run_state(
                    flow_run_id, Crashed(message="radtriage restarted while this run was running"), force=True
                )
            with session_scope(session_factory) as session:
                study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
                if study is not None and study.state == StudyState.dispatched:
                    study.set_state(StudyState.stable)
                    recovered.append(study_uid)
            log.warning(
                "study %s: flow run %s ended %s without results; dispatching it again",
                study_uid,
                flow_run_id,
                state.type.value if state is not None else "unknown",
            )
    return recovered
