"""The forwarder: a ``radtriage serve`` component that empties the forward queue.

Each destination is delivered on its own worker thread, one association per round, so
a node that is down (or slow to time out) never holds up the others.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import Settings
from pipeline.errors import ConfigError, RadtriageError
from pipeline.forward.queue import (
    ClaimedJob,
    Outcome,
    Target,
    check_destinations,
    claim_due,
    next_due_at,
    record_outcomes,
    release_claims,
)
from pipeline.forward.scu import Item, store_items
from pipeline.index.db import session_scope
from pipeline.index.schema import utcnow
from pipeline.process.component import PollLoop

log = logging.getLogger(__name__)


class ArchiveLike(Protocol):
    """What the forwarder needs from :class:`pipeline.archive.Archive`."""

    def path_of(self, sop_instance_uid: str) -> Path: ...


@dataclass
class RoundResult:
    """What one delivery round did, per destination."""

    outcomes: dict[Target, list[Outcome]] = field(default_factory=dict)

    @property
    def delivered(self) -> int:
        return sum(o.delivered for results in self.outcomes.values() for o in results)

    @property
    def failed(self) -> int:
        return sum(not o.delivered for results in self.outcomes.values() for o in results)


def deliver_target(
    settings: Settings,
    archive: ArchiveLike,
    session_factory: sessionmaker[Session],
    target: Target,
    jobs: list[ClaimedJob],
) -> list[Outcome]:
    """Deliver one destination's claimed jobs over one association and record the outcomes."""
    items: list[Item] = []
    for job in jobs:
        try:
            path = Path(archive.path_of(job.SOPInstanceUID))
        except (RadtriageError, OSError, LookupError) as err:
            items.append(
                Item(job.id, job.SOPInstanceUID, None, f"cannot find {job.SOPInstanceUID} in the archive: {err}")
            )
            continue
        if not path.is_file():
            items.append(Item(job.id, job.SOPInstanceUID, None, f"archived file {path} is missing"))
            continue
        items.append(Item(job.id, job.SOPInstanceUID, path))
    try:
        outcomes, not_tried = store_items(target, items, settings.dicom)
    except Exception as err:
        log.exception("forwarding to %s failed unexpectedly", target)
        outcomes, not_tried = [Outcome(j.id, False, f"unexpected error: {err!r}") for j in jobs], []
    with session_scope(session_factory) as session:
        record_outcomes(session, outcomes, settings.forward)
        release_claims(session, not_tried)
    delivered = sum(o.delivered for o in outcomes)
    if delivered:
        log.info("forwarded %d objects to %s", delivered, target)
    return outcomes


def deliver_due(
    settings: Settings,
    archive: ArchiveLike,
    session_factory: sessionmaker[Session],
    *,
    now: datetime | None = None,
) -> RoundResult:
    """One synchronous round: deliver every due job, destinations in parallel.

    Used by tests and ``radtriage forwards --retry-now``; the :class:`Forwarder` runs
    the same steps continuously.
    """
    with session_scope(session_factory) as session:
        claimed = claim_due(session, settings.forward.destinations, now=now)
    result = RoundResult()
    if not claimed:
        return result
    with ThreadPoolExecutor(max_workers=min(len(claimed), 16), thread_name_prefix="forward") as pool:
        futures = {
            target: pool.submit(deliver_target, settings, archive, session_factory, target, jobs)
            for target, jobs in claimed.items()
        }
    for target, future in futures.items():
        result.outcomes[target] = future.result()
    return result


class Forwarder(PollLoop):
    """Deliver queued forwards in the background (a ``radtriage serve`` component).

    Parameters
    ----------
    settings
        Uses ``forward`` (destinations, attempts, backoff) and ``dicom`` (our AE title,
        PDU size, timeouts).
    archive
        Maps a SOP Instance UID to its file.
    session_factory
        The index.
    poll_interval
        The longest wait between looks at the queue; jobs queued by other processes
        (flow runs) are seen within it. :meth:`wake` looks at once.
    """

    name = "forwarder"
    thread_name = "forwarder"

    def __init__(
        self,
        settings: Settings,
        archive: ArchiveLike,
        session_factory: sessionmaker[Session],
        *,
        poll_interval: float = 1.0,
    ) -> None:
        try:
            check_destinations(settings.forward.destinations)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        super().__init__(poll_interval)
        self.settings = settings
        self.archive = archive
        self.session_factory = session_factory
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[list[Outcome]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def poll_interval(self) -> float:
        return self.interval

    def start(self) -> None:
        if self.running:
            return
        workers = max(4, len(self.settings.forward.destinations))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forward")
        super().start()
        log.info("forwarder started: %d destinations", len(self.settings.forward.destinations))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop looking at the queue; wait up to ``timeout`` s for deliveries in flight.

        Deliveries still running after that finish on their own (bounded by the DICOM
        timeouts) and record their outcomes; jobs not started are released.
        """
        super().stop(timeout)
        if self._pool is not None:
            with self._lock:
                futures = list(self._in_flight.values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            wait_futures(futures, timeout)
            self._pool = None

    @property
    def in_flight(self) -> set[str]:
        """AE titles of the destinations being delivered to right now."""
        with self._lock:
            return set(self._in_flight)

    def run_once(self) -> float:
        self._dispatch_round()
        return self._seconds_until_due()

    def _dispatch_round(self) -> None:
        busy = self.in_flight
        with session_scope(self.session_factory) as session:
            claimed = claim_due(session, self.settings.forward.destinations, exclude=busy)
        assert self._pool is not None
        for target, jobs in claimed.items():
            if self.stopping:
                with session_scope(self.session_factory) as session:
                    release_claims(session, [j.id for j in jobs])
                continue
            future = self._pool.submit(deliver_target, self.settings, self.archive, self.session_factory, target, jobs)
            with self._lock:
                self._in_flight[target.ae_title] = future
            future.add_done_callback(lambda f, t=target, j=jobs: self._finished(t, j, f))

    def _finished(self, target: Target, jobs: list[ClaimedJob], future: Future[list[Outcome]]) -> None:
        with self._lock:
            self._in_flight.pop(target.ae_title, None)
        if future.cancelled():
            try:
                with session_scope(self.session_factory) as session:
                    release_claims(session, [j.id for j in jobs])
            except Exception:
                log.exception("could not release %d forward jobs for %s", len(jobs), target)
        elif future.exception() is not None:
            log.error("forwarding to %s failed: %r", target, future.exception())
        self.wake()  # that destination may have more due jobs

    def _seconds_until_due(self) -> float:
        with session_scope(self.session_factory, readonly=True) as session:
            due = next_due_at(session, exclude=self.in_flight)
        if due is None:
            return self.poll_interval
        return min(self.poll_interval, max(0.0, (due - utcnow()).total_seconds()))
