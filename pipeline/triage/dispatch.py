"""Dispatch stable studies to the Prefect deployment ``triage-study``.

The study state in the index is the outbox: a ``stable`` study is owed a plan. The
dispatcher plans it (:mod:`.planning`): a study no model reads is marked
``not_applicable`` without Prefect; for the others it creates a flow run in the work
queue of the study's urgency, with the idempotency key of :func:`dispatch_key`, and only
then records the run and moves the study to ``dispatched``, in one transaction.
If the Prefect API is down, studies stay ``stable`` and are dispatched when it is back;
if the process dies between the API call and the commit, the next attempt reuses the
same key and Prefect returns the same flow run: nothing lost, nothing twice.

Isolation: READ COMMITTED (PostgreSQL's default), with several dispatchers (one per
receiver host) on one index. Recording a run locks the study row first (see
:class:`~pipeline.index.schema.Study`): a dispatcher that finds the revision already
recorded by another leaves it (same key, same flow run), and a late instance that
reopened the study meanwhile is never overwritten with ``dispatched``.

This is the only module of :mod:`pipeline` that imports Prefect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from uuid import UUID

from prefect.client.orchestration import get_client
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from pipeline.ai.findings import Priority
from pipeline.index.db import session_scope
from pipeline.index.schema import Study, StudyState, lock_study, utcnow
from pipeline.index.triage import AIResult, AIStatus, RunStatus, TriageRun, worklist_entry
from pipeline.process.component import PollLoop
from pipeline.triage.planning import (
    QueueContext,
    StudyPlan,
    Urgency,
    needs_header,
    one_image_path,
    plan_study,
    queue_urgency,
    read_queue_context,
    series_by_study,
)
from pipeline.triage.runtime import Runtime

log = logging.getLogger(__name__)

# The one definition of the names: flows/ defines the flow and registers the deployment
# under them (prefect.yaml repeats them for `prefect deploy`).
FLOW_NAME = "triage-study"
DEPLOYMENT_NAME = "triage-study"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
# One work queue per urgency in the deployment's work pool, most urgent first: Prefect
# hands a polling worker the runs of the queue with the lowest priority number first,
# then the oldest. radtriage's worker and `prefect worker start --pool` both do.
WORK_QUEUES: tuple[str, ...] = tuple(p.value for p in sorted(Priority, key=lambda p: -p.rank))
DEFAULT_WORK_QUEUE = Priority.ROUTINE.value
# The flow-run label naming the worker that claimed a run (its heartbeat name in the pool).
WORKER_LABEL = "radtriage.worker"
# A worker that missed this many heartbeats is dead (as Prefect's own foreman counts).
MISSED_HEARTBEATS = 3


def work_queue_for(urgency: Priority | str) -> str:
    """The Prefect work queue of an urgency (``critical``, ``urgent``, ``routine``)."""
    return Priority(urgency).value


def dispatch_key(study_uid: str, revision: int, first_received_at: datetime) -> str:
    """Prefect's idempotency key of a study's revision: the same for every dispatcher of
    one index (and for a retry after a crash), and different for the same study in
    another index or a rebuilt one sharing the Prefect server, where the study row, and
    so the time it was first received, is another (a key of UID and revision alone
    returned the old, finished flow run there and the study stayed ``dispatched``)."""
    return f"{study_uid}/{revision}/{first_received_at.timestamp():.6f}"


@dataclass(frozen=True)
class _Planned:
    study_id: int
    study_uid: str
    last_received_at: datetime
    plan: StudyPlan
    urgency: Urgency


class Dispatcher(PollLoop):
    """Plan ``stable`` studies and turn those a model reads into flow runs, in a thread.

    A round plans every stable study from the index (the models' series rules; one
    image header when a priority rule needs it): a study no model reads is marked
    ``not_applicable`` and ``analysed`` at once, in one transaction for the round, and
    costs no flow run; the others become flow runs in the Prefect work queue of their
    urgency, most urgent first, then oldest.

    Parameters
    ----------
    runtime
        The index, archive folder, model registry and ``[triage]`` settings.
    on_dispatched
        Called after a round that dispatched something (the in-process worker's wake).
    """

    name = "dispatcher"
    thread_name = "dispatcher"

    def __init__(
        self,
        runtime: Runtime,
        *,
        poll_interval: float = 1.0,
        on_dispatched: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(poll_interval)
        self.runtime = runtime
        self.session_factory = runtime.session_factory
        self.on_dispatched = on_dispatched
        self._deployment_id: UUID | None = None
        self.api_available = True

    def run_once(self) -> None:
        if self.dispatch_pending() and self.on_dispatched is not None:
            self.on_dispatched()

    def dispatch_pending(self, limit: int = 500) -> list[str]:
        """Plan up to ``limit`` stable studies; return the StudyInstanceUIDs given a flow run.

        Studies no model reads are settled in this round without Prefect. Dispatching
        stops at the first API error and leaves the rest ``stable`` for the next round.
        """
        planned = self.plan_pending(limit)
        self._settle_not_applicable([p for p in planned if not p.plan.applicable])
        queue = sorted((p for p in planned if p.plan.applicable), key=lambda p: (-p.urgency.rank, p.last_received_at))
        dispatched: list[str] = []
        for item in queue:
            try:
                if self._dispatch_one(item):
                    dispatched.append(item.study_uid)
            except Exception as err:  # noqa: BLE001 - API unreachable or refused: keep the outbox
                if self.api_available:
                    log.warning("Prefect API unavailable (%s); %d studies wait to be dispatched", err, len(queue))
                self.api_available = False
                self._deployment_id = None
                break
            else:
                if not self.api_available:
                    log.info("Prefect API is back; dispatching")
                self.api_available = True
        return dispatched

    def plan_pending(self, limit: int = 500) -> list[_Planned]:
        """The stable studies (oldest first, up to ``limit``) with their plan and urgency."""
        registry = self.runtime.registry
        rules = self.runtime.settings.triage.priority_rules
        header_rules = needs_header(rules)
        model_urgency = {m.name: m.spec.urgency for m in registry.available}
        unavailable = [f"{u.name}: unavailable ({u.reason})" for u in registry.unavailable]
        out: list[_Planned] = []
        with session_scope(self.session_factory, readonly=True) as session:
            stable = session.execute(
                select(Study.id, Study.StudyInstanceUID, Study.last_received_at)
                .where(Study.state == StudyState.stable)
                .order_by(Study.last_received_at)
                .limit(limit)
            ).all()
            series = series_by_study(session, [row.id for row in stable])
            for row in stable:
                plan = plan_study(series[row.id], registry.available, unavailable)
                context = QueueContext()
                if plan.applicable and header_rules:
                    path = one_image_path(session, self.runtime.archive.data_dir, plan.models[0].series_instance_uid)
                    context = read_queue_context(path) if path is not None else context
                urgency = queue_urgency(plan, series[row.id], rules, context, model_urgency)
                out.append(_Planned(row.id, row.StudyInstanceUID, row.last_received_at, plan, urgency))
        return out

    def _settle_not_applicable(self, planned: list[_Planned]) -> None:
        """Mark studies no model reads: worklist ``not_applicable``, study ``analysed``, no flow run."""
        if not planned:
            return
        with session_scope(self.session_factory) as session:
            now = utcnow()
            for item in planned:
                study = lock_study(session, id=item.study_id)  # see Study: state read, then written
                if study is None or study.state != StudyState.stable:
                    continue  # a late instance arrived since planning: it is planned again
                revision = _next_revision(session, study.id)
                # A revision without a flow run keeps the revision count and the time to triage.
                session.add(
                    TriageRun(
                        study_id=study.id,
                        revision=revision,
                        flow_run_id="",
                        status=RunStatus.done,
                        last_received_at=study.last_received_at,
                        stable_at=study.state_changed_at,
                        dispatched_at=now,
                        started_at=now,
                        finished_at=now,
                        timings=json.dumps(
                            {"stability_wait": (study.state_changed_at - study.last_received_at).total_seconds()}
                        ),
                    )
                )
                # Earlier results (from before a late instance) are no longer current.
                session.execute(
                    update(AIResult)
                    .where(AIResult.study_id == study.id, AIResult.superseded.is_(False))
                    .values(superseded=True)
                )
                entry = worklist_entry(session, study.id)
                entry.ai_status = AIStatus.not_applicable
                entry.ai_error = ""
                entry.priority = Priority.ROUTINE.value
                entry.priority_rank = Priority.ROUTINE.rank
                entry.summary = item.plan.summary()
                entry.updated_at = entry.triaged_at = now
                entry.time_to_triage_seconds = (now - study.last_received_at).total_seconds()
                study.set_state(StudyState.analysed, now)
        log.info("%d studies: no AI model applies (marked not applicable, no flow run)", len(planned))

    def _deployment(self, client: object) -> UUID:
        if self._deployment_id is None:
            self._deployment_id = client.read_deployment_by_name(DEPLOYMENT).id  # type: ignore[attr-defined]
        return self._deployment_id

    def _dispatch_one(self, item: _Planned) -> bool:
        with session_scope(self.session_factory, readonly=True) as session:
            study = session.get(Study, item.study_id)
            if study is None or study.state != StudyState.stable:
                return False
            revision = _next_revision(session, study.id)
            first_received_at = study.first_received_at
        study_uid, urgency = item.study_uid, item.urgency
        with get_client(sync_client=True) as client:
            flow_run = client.create_flow_run_from_deployment(
                self._deployment(client),
                parameters={
                    "study_uid": study_uid,
                    "revision": revision,
                    "models": [asdict(m) for m in item.plan.models],
                },
                idempotency_key=dispatch_key(study_uid, revision, first_received_at),
                name=f"triage-{study_uid[-12:]}-r{revision}",
                work_queue_name=work_queue_for(urgency.level),
            )
        with session_scope(self.session_factory) as session:
            # Locked (see Study): a late instance may reopen the study meanwhile, and a
            # second dispatcher (another receiver host) may have recorded this run.
            study = lock_study(session, id=item.study_id)
            assert study is not None
            if session.scalar(
                select(TriageRun.id).where(TriageRun.study_id == study.id, TriageRun.revision == revision)
            ):
                log.info("study %s revision %d was dispatched by another dispatcher", study_uid, revision)
                return False
            session.add(
                TriageRun(
                    study_id=study.id,
                    revision=revision,
                    flow_run_id=str(flow_run.id),
                    last_received_at=study.last_received_at,
                    stable_at=study.state_changed_at,
                    urgency=urgency.level.value,
                    urgency_rank=urgency.rank,
                    urgency_reason=urgency.reason,
                )
            )
            # A late instance may have arrived meanwhile: then the study stays received and
            # this run's results will be superseded by the next revision.
            if study.state == StudyState.stable:
                study.set_state(StudyState.dispatched)
            worklist_entry(session, study.id).ai_status = AIStatus.pending
        log.info(
            "dispatched study %s revision %d as flow run %s (%s%s)",
            study_uid,
            revision,
            flow_run.id,
            urgency.level.value,
            f": {urgency.reason}" if urgency.reason else "",
        )
        return True


def _next_revision(session: Session, study_id: int) -> int:
    last = session.scalar(select(func.max(TriageRun.revision)).where(TriageRun.study_id == study_id))
    return (last or 0) + 1


def _dispatch_again(session: Session, study_uid: str) -> bool:
    """Put a dispatched study whose run died back to ``stable``, so the dispatcher runs it
    again under the next revision; ``False`` when it has moved on meanwhile."""
    study = lock_study(session, StudyInstanceUID=study_uid)
    if study is None or study.state != StudyState.dispatched:
        return False
    study.set_state(StudyState.stable)
    return True


def _dispatched_runs(session_factory: sessionmaker[Session]) -> list[tuple[str, str]]:
    """``(StudyInstanceUID, flow run id)`` of every dispatched study's latest revision
    (the id is empty where the run was never created)."""
    other = aliased(TriageRun)
    latest = select(func.max(other.revision)).where(other.study_id == Study.id).scalar_subquery()
    with session_scope(session_factory, readonly=True) as session:
        rows = session.execute(
            select(Study.StudyInstanceUID, TriageRun.flow_run_id)
            .join(TriageRun, TriageRun.study_id == Study.id)
            .where(Study.state == StudyState.dispatched, TriageRun.revision == latest)
        ).all()
    return [(uid, run or "") for uid, run in rows]


def recover_interrupted(session_factory: sessionmaker[Session], *, running_is_stale_after: float | None) -> list[str]:
    """Send back to ``stable`` the studies whose flow run can no longer finish.

    A flow run ends Crashed, Failed or Cancelled without recording results when the
    process that ran it died (``kill -9``, power loss). At start the study is then
    dispatched again as a new revision. A run still *Running* is taken as dead when it
    started more than ``running_is_stale_after`` seconds ago; ``0`` treats every running
    run as dead (one-machine installs, where this process is the only worker) and
    ``None`` never does. Scheduled and pending runs are left for a worker to pick up.
    """
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    rows = _dispatched_runs(session_factory)
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
                if _dispatch_again(session, study_uid):
                    recovered.append(study_uid)
            log.warning(
                "study %s: flow run %s ended %s without results; dispatching it again",
                study_uid,
                flow_run_id,
                state.type.value if state is not None else "unknown",
            )
    return recovered


def recover_from_dead_workers(session_factory: sessionmaker[Session], work_pool: str) -> list[str]:
    """Send back to ``stable`` the studies whose flow run's worker stopped heartbeating.

    A worker killed on another machine (``kill -9``, power loss) leaves its run Pending
    or Running for ever: Prefect marks a run Crashed only when its own process reports
    it. radtriage's workers label each run they claim (:data:`WORKER_LABEL`) and
    heartbeat to the work pool; a run whose worker missed :data:`MISSED_HEARTBEATS`
    heartbeats (or is unknown to the pool) is set Crashed and its study dispatched
    again as a new revision. Runs without the label (``prefect worker start``) are left
    to :func:`recover_interrupted`.
    """
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    rows = [(uid, run) for uid, run in _dispatched_runs(session_factory) if run]
    if not rows:
        return []
    recovered: list[str] = []
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        alive = {
            w.name
            for w in client.read_workers_for_work_pool(work_pool)
            if w.last_heartbeat_time is not None
            and (now - w.last_heartbeat_time).total_seconds() < MISSED_HEARTBEATS * (w.heartbeat_interval_seconds or 30)
        }
        for study_uid, flow_run_id in rows:
            try:
                flow_run = client.read_flow_run(flow_run_id)
            except ObjectNotFound:
                continue  # recover_interrupted handles a reset Prefect database at start
            worker = (flow_run.labels or {}).get(WORKER_LABEL)
            state = flow_run.state
            if not worker or worker in alive or state is None or not (state.is_pending() or state.is_running()):
                continue
            client.set_flow_run_state(
                flow_run_id, Crashed(message=f"worker {worker} stopped sending heartbeats"), force=True
            )
            with session_scope(session_factory) as session:
                run = session.scalar(select(TriageRun).where(TriageRun.flow_run_id == flow_run_id))
                if run is not None and run.status in (RunStatus.dispatched, RunStatus.running):
                    run.status = RunStatus.failed
                    run.error = f"worker {worker} died during the run"
                if _dispatch_again(session, study_uid):
                    recovered.append(study_uid)
            log.warning(
                "study %s: worker %s of flow run %s stopped sending heartbeats; run marked Crashed, dispatching again",
                study_uid,
                worker,
                flow_run_id,
            )
    return recovered
