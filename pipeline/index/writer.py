"""A prompt queue for SQLite's one write lock, across the receiver processes.

SQLite lets one writer at a time hold its lock; a ``BEGIN IMMEDIATE`` that finds it taken
goes to the busy handler, which sleeps 1, 2, 5, 10 … ms and tries again, so with four
receiver processes a writer often slept well past the moment the lock was free. The
archive's instance writers therefore first take an exclusive ``flock`` on
``<index>-writer.lock``: a process blocked in ``flock`` is woken by the kernel the
moment the holder releases it, and SQLite's lock is then free (the holder committed
before releasing). Writers that do not take it (the sweep, the web app: rare, short)
still meet the busy handler, as before.

``flock`` excludes open files, not threads, so a thread lock inside the process comes
first. PostgreSQL and in-memory SQLite need none of this: :func:`writer_lock` is then a
no-op.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine

LOCK_SUFFIX = "-writer.lock"


class WriterLock:
    """The writer queue of one SQLite database file (``path`` is the database)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}{LOCK_SUFFIX}")
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = os.getpid()

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the write queue's head for the block (wrap the whole transaction in it)."""
        with self._thread_lock:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def writer_lock_for(engine: Engine) -> WriterLock | None:
    """The :class:`WriterLock` of ``engine``'s SQLite file, or ``None`` (PostgreSQL, memory)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return WriterLock(Path(url.database).resolve())


@contextmanager
def writer_lock(lock: WriterLock | None) -> Iterator[None]:
    """``lock.held()``, or nothing when there is no lock to take."""
    if lock is None:
        yield
        return
    with lock.held():
        yield
