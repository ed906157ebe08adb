"""Study completion by quiet period: a study with no new received instance for
``stable_age_seconds`` moves from ``received`` to ``stable`` (the dispatcher's outbox).

A late instance moves it back to ``received`` (see :mod:`pipeline.archive.ingest`), so
the sweep picks it up again once it is quiet. State lives in the index, so it survives
restarts; the sweep is idempotent and safe to run from several processes.

Isolation: READ COMMITTED (PostgreSQL's default). The sweep locks the quiet studies
with ``FOR UPDATE SKIP LOCKED`` (a study a receiver or another sweep holds is left for
the next round) and repeats the quiet condition in its ``UPDATE``, which PostgreSQL
re-checks against the latest committed row: an instance committed meanwhile keeps
its study ``received``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.index.db import session_scope
from pipeline.index.schema import Study, StudyState, utcnow
from pipeline.process.component import PollLoop

log = logging.getLogger(__name__)


def sweep_once(
    session_factory: sessionmaker[Session] | Engine, stable_age_seconds: float, now: datetime | None = None
) -> list[str]:
    """Mark quiet studies stable; return their StudyInstanceUIDs.

    Parameters
    ----------
    session_factory
        Session factory or engine of the index.
    stable_age_seconds
        A study is quiet when its ``last_received_at`` is at least this old.
    now
        The current time (timezone-aware); defaults to the clock. Tests pass it.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_age_seconds)
    quiet = (Study.state == StudyState.received) & (Study.last_received_at <= cutoff)
    with session_scope(session_factory) as session:
        rows = session.execute(
            select(Study.id, Study.StudyInstanceUID).where(quiet).with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return []
        # The condition is repeated so an instance arriving meanwhile keeps its study received.
        session.execute(
            update(Study)
            .where(Study.id.in_([r.id for r in rows]), quiet)
            .values(state=StudyState.stable, state_changed_at=now)
            .execution_options(synchronize_session=False)
        )
        changed = list(
            session.execute(
                select(Study.StudyInstanceUID).where(
                    Study.id.in_([r.id for r in rows]), Study.state == StudyState.stable, Study.state_changed_at == now
                )
            ).scalars()
        )
    for uid in changed:
        log.info("study %s is stable (quiet for %gs)", uid, stable_age_seconds)
    return changed


class StabilitySweeper(PollLoop):
    """A service component: runs :func:`sweep_once` every ``interval_seconds``.

    ``on_stable`` is called with the StudyInstanceUIDs that just turned stable (the
    dispatcher's wake).
    """

    name = "stability sweep"
    thread_name = "stability-sweep"

    def __init__(
        self,
        session_factory: sessionmaker[Session] | Engine,
        stable_age_seconds: float,
        interval_seconds: float,
        *,
        on_stable: Callable[[list[str]], None] | None = None,
    ) -> None:
        super().__init__(interval_seconds)
        self.session_factory = session_factory
        self.stable_age_seconds = stable_age_seconds
        self.on_stable = on_stable

    def run_once(self) -> None:
        changed = sweep_once(self.session_factory, self.stable_age_seconds)
        if changed and self.on_stable is not None:
            self.on_stable(changed)
