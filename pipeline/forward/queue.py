"""The durable forward queue: one :class:`ForwardJob` row per object owed to a node.

A job is ``pending`` until a C-STORE to its destination succeeds (``delivered``) or
``max_attempts`` attempts have failed (``dead``). After a failed attempt the job waits
``backoff_seconds * 2**(attempts-1)`` seconds (at most ``backoff_max_seconds``).

A round *claims* the due jobs of each destination by moving their ``next_attempt_at``
``CLAIM_SECONDS`` ahead in one short transaction, delivers them with no transaction
open, then records the outcomes. A second forwarder (another machine) therefore skips
jobs in flight, and jobs of a forwarder that crashed mid-round become due again when
the claim lapses: a C-STORE may be repeated, an object is never lost.

Isolation: READ COMMITTED (PostgreSQL's default) is enough for any number of forwarders.
The claim's ``SELECT ... FOR UPDATE SKIP LOCKED`` passes over rows another forwarder is
claiming, and a row it claimed is no longer due for the next statement's snapshot;
:func:`record_outcomes` locks each job row before counting the attempt, so it cannot
lose a concurrent ``--retry-now``. SQLite has one writer at a time and ignores the locks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.config import ForwardDestination, ForwardSettings
from pipeline.index.schema import utcnow
from pipeline.index.triage import ForwardJob, ForwardState

log = logging.getLogger(__name__)

KINDS = ("SEG", "SR")
CLAIM_SECONDS = 300.0
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Target:
    """Where one destination's jobs go in this round."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    SOPInstanceUID: str
    kind: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt to deliver one job.

    ``error`` explains a failed attempt; ``warning`` a delivery the peer accepted with
    a warning status (kept in ``last_error`` so the administrator can see it).
    """

    job_id: int
    delivered: bool
    error: str = ""
    warning: str = ""


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...)."""
    exponent = min(max(attempts - 1, 0), 62)
    return float(min(cap, base * (2.0**exponent)))


def check_destinations(destinations: Sequence[ForwardDestination]) -> None:
    """Raise ``ValueError`` when two destinations share an AE title (the queue's key)."""
    seen: set[str] = set()
    for destination in destinations:
        if destination.ae_title in seen:
            raise ValueError(
                f"forward destination AE title {destination.ae_title!r} appears twice in [[forward.destinations]]: "
                "give each archive node its own AE title"
            )
        seen.add(destination.ae_title)


def enqueue_forwards(
    session: Session, sop_instance_uid: str, kind: str, destinations: Sequence[ForwardDestination]
) -> int:
    """Queue ``sop_instance_uid`` for every destination that subscribes to ``kind``.

    Idempotent: a job that exists for the same SOP Instance and destination (in any
    state) is left as it is. The caller's transaction commits the rows.

    Parameters
    ----------
    session
        An open index session; nothing is committed here.
    sop_instance_uid
        An object already stored in the archive.
    kind
        ``"SEG"`` or ``"SR"``, matched against each destination's ``kinds``.
    destinations
        Usually ``settings.forward.destinations``.

    Returns
    -------
    int
        The number of jobs created now.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown forward kind {kind!r}: use one of {', '.join(KINDS)}")
    if not sop_instance_uid:
        raise ValueError("enqueue_forwards needs a SOP Instance UID")
    check_destinations(destinations)
    wanted = [d for d in destinations if kind in d.kinds]
    if not wanted:
        return 0
    existing = set(
        session.scalars(
            select(ForwardJob.destination_ae).where(
                ForwardJob.SOPInstanceUID == sop_instance_uid,
                ForwardJob.destination_ae.in_([d.ae_title for d in wanted]),
            )
        )
    )
    rows = [
        {
            "SOPInstanceUID": sop_instance_uid,
            "kind": kind,
            "destination_ae": d.ae_title,
            "host": d.host,
            "port": d.port,
        }
        for d in wanted
        if d.ae_title not in existing
    ]
    if not rows:
        return 0
    now = utcnow()
    for row in rows:
        row.update(state=ForwardState.pending, attempts=0, next_attempt_at=now, last_error="", created_at=now)
    # ON CONFLICT DO NOTHING: a concurrent enqueue of the same object is not an error.
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise ValueError(f"forward queue does not support the {dialect} database")
    stmt = (
        insert(ForwardJob)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[ForwardJob.SOPInstanceUID, ForwardJob.destination_ae])
        # RETURNING names the rows inserted (not those skipped); a multi-row INSERT's
        # rowcount is -1 on PostgreSQL (psycopg), so it cannot be the count.
        .returning(ForwardJob.id)
    )
    created = len(session.execute(stmt).all())
    if created:
        log.info("queued %s %s for %s", kind, sop_instance_uid, ", ".join(r["destination_ae"] for r in rows))
    return int(created)


def claim_due(
    session: Session,
    destinations: Sequence[ForwardDestination],
    *,
    now: datetime | None = None,
    per_destination: int = 100,
    exclude: Iterable[str] = (),
) -> dict[Target, list[ClaimedJob]]:
    """Claim the due pending jobs, at most ``per_destination`` per destination.

    The address comes from the current config when the destination is still there (so a
    corrected host or port applies to jobs already queued), else from the job itself.
    Jobs of destinations in ``exclude`` (in flight in this process) are left alone.
    """
    now = now or utcnow()
    configured = {d.ae_title: d for d in destinations}
    excluded = set(exclude)
    query = (
        select(ForwardJob)
        .where(ForwardJob.state == ForwardState.pending, ForwardJob.next_attempt_at <= now)
        .order_by(ForwardJob.next_attempt_at, ForwardJob.id)
        .limit(per_destination * max(len(configured), 1) * 4)
        .with_for_update(skip_locked=True)
    )
    if excluded:
        query = query.where(ForwardJob.destination_ae.not_in(excluded))
    claimed: dict[Target, list[ClaimedJob]] = {}
    taken: dict[str, int] = {}
    claim_ids: list[int] = []
    for job in session.scalars(query):
        if taken.get(job.destination_ae, 0) >= per_destination:
            continue
        taken[job.destination_ae] = taken.get(job.destination_ae, 0) + 1
        dest = configured.get(job.destination_ae)
        if dest is not None and (dest.host, dest.port) != (job.host, job.port):
            job.host, job.port = dest.host, dest.port
        target = Target(job.destination_ae, job.host, job.port)
        claimed.setdefault(target, []).append(ClaimedJob(job.id, job.SOPInstanceUID, job.kind, job.attempts))
        claim_ids.append(job.id)
    if claim_ids:
        session.execute(
            update(ForwardJob)
            .where(ForwardJob.id.in_(claim_ids))
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
            .execution_options(synchronize_session=False)
        )
    return claimed


def release_claims(session: Session, job_ids: Iterable[int], *, now: datetime | None = None) -> None:
    """Make claimed jobs due again without counting an attempt (not tried this round)."""
    ids = list(job_ids)
    if ids:
        session.execute(
            update(ForwardJob)
            .where(ForwardJob.id.in_(ids), ForwardJob.state == ForwardState.pending)
            .values(next_attempt_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )


def record_outcomes(
    session: Session, outcomes: Iterable[Outcome], settings: ForwardSettings, *, now: datetime | None = None
) -> None:
    """Count one attempt per outcome: delivered, or back off, or dead after the last."""
    now = now or utcnow()
    for outcome in outcomes:
        # Locked: attempts is read and written back, and `forwards --retry-now` may reset it.
        job = session.get(ForwardJob, outcome.job_id, with_for_update=True)
        if job is None or job.state != ForwardState.pending:
            continue  # deleted, or settled by another forwarder meanwhile
        job.attempts += 1
        if outcome.delivered:
            job.state = ForwardState.delivered
            job.delivered_at = now
            job.next_attempt_at = now
            job.last_error = outcome.warning[:MAX_ERROR_CHARS]
            continue
        job.last_error = outcome.error[:MAX_ERROR_CHARS] or "unknown error"
        if job.attempts >= settings.max_attempts:
            job.state = ForwardState.dead
            job.next_attempt_at = now
            log.error(
                "giving up forwarding %s %s to %s after %d attempts: %s (radtriage forwards --retry-now re-queues it)",
                job.kind,
                job.SOPInstanceUID,
                job.destination_ae,
                job.attempts,
                job.last_error,
            )
        else:
            delay = backoff_delay(job.attempts, settings.backoff_seconds, settings.backoff_max_seconds)
            job.next_attempt_at = now + timedelta(seconds=delay)


def next_due_at(session: Session, *, exclude: Iterable[str] = ()) -> datetime | None:
    """When the earliest pending job (outside ``exclude``) becomes due, if any."""
    query = select(func.min(ForwardJob.next_attempt_at)).where(ForwardJob.state == ForwardState.pending)
    excluded = set(exclude)
    if excluded:
        query = query.where(ForwardJob.destination_ae.not_in(excluded))
    return session.scalar(query)  # min() keeps the column's UTCDateTime type: aware UTC


def retry_now(session: Session, *, revive_dead: bool = True, destination_ae: str | None = None) -> int:
    """Make pending jobs due now and, with ``revive_dead``, give dead jobs new attempts.

    Returns the number of jobs touched.
    """
    now = utcnow()
    touched = 0
    where = [ForwardJob.destination_ae == destination_ae] if destination_ae else []
    touched += (
        session.execute(
            update(ForwardJob)
            .where(ForwardJob.state == ForwardState.pending, *where)
            .values(next_attempt_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        or 0
    )
    if revive_dead:
        touched += (
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.state == ForwardState.dead, *where)
                .values(state=ForwardState.pending, attempts=0, next_attempt_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            or 0
        )
    return int(touched)


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one :class:`ForwardJob`, usable after its session closed."""

    id: int
    SOPInstanceUID: str
    kind: str
    destination_ae: str
    host: str
    port: int
    state: ForwardState
    attempts: int
    next_attempt_at: datetime
    last_error: str
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, job: ForwardJob) -> JobInfo:
        return cls(**{f: getattr(job, f) for f in cls.__dataclass_fields__})


def list_jobs(session: Session, *, state: ForwardState | str | None = None) -> list[JobInfo]:
    """Jobs by destination, then age (for ``radtriage forwards``)."""
    query = select(ForwardJob).order_by(ForwardJob.destination_ae, ForwardJob.created_at, ForwardJob.id)
    if state is not None:
        query = query.where(ForwardJob.state == ForwardState(state))
    return [JobInfo.of(job) for job in session.scalars(query)]
