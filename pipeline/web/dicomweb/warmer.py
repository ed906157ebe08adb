"""Build a study's DICOMweb series metadata when it turns stable, before a viewer asks.

The first ``/metadata`` request of a series reads every file's header (~1 ms an
instance); a radiologist opening a study from the worklist would wait for it. The
stability sweep hands the studies that just became complete to :meth:`MetadataWarmer.warm`;
one background thread builds their arrays into the on-disk cache the web app serves
from (:class:`pipeline.web.dicomweb.metadata.MetadataCache`), so the viewer's first open
is a warm one. A late instance changes the cache key, and the next request rebuilds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from pipeline.index.db import session_scope
from pipeline.process.component import PollLoop
from pipeline.web.dicomweb.metadata import MetadataCache, study_series

log = logging.getLogger(__name__)

MAX_WAITING = 10_000  # studies; beyond that the oldest are left to the first request


class MetadataWarmer(PollLoop):
    """A component: warms the metadata cache of the studies :meth:`warm` is given."""

    name = "DICOMweb metadata warmer"
    thread_name = "metadata-warmer"

    def __init__(self, data_dir: Path, session_factory: sessionmaker[Session], interval: float = 30.0) -> None:
        super().__init__(interval)
        self.cache = MetadataCache(data_dir, session_factory)
        self.session_factory = session_factory
        self._waiting: deque[str] = deque(maxlen=MAX_WAITING)
        self._lock = threading.Lock()

    def warm(self, study_uids: list[str]) -> None:
        """Queue ``study_uids`` (e.g. those that just turned stable) and wake the thread."""
        with self._lock:
            self._waiting.extend(study_uids)
        self.wake()

    def run_once(self) -> float | None:
        while not self.stopping:
            with self._lock:
                if not self._waiting:
                    return None
                study_uid = self._waiting.popleft()
            self.warm_study(study_uid)
        return None

    def warm_study(self, study_uid: str) -> int:
        """Build (or find current) the metadata of every series of the study; the count."""
        started = time.monotonic()
        with session_scope(self.session_factory, readonly=True) as session:
            series = study_series(session, study_uid)
        for series_uid in series:
            self.cache.series(study_uid, series_uid)
        log.debug("metadata of %d series of %s ready in %.2f s", len(series), study_uid, time.monotonic() - started)
        return len(series)
