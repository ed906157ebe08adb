"""What a component of a radtriage process is, and the poll loop most of them are.

A component has a ``name``, ``start()`` and ``stop()``; :class:`pipeline.process.runner.ProcessRunner`
starts them in order and stops them in reverse. :class:`PollLoop` is the component
that does one round of work in a thread, then waits ``interval`` seconds or until
:meth:`PollLoop.wake` is called: the stability sweep, the dispatcher, the forwarder and
the in-process Prefect worker are all one.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Component(Protocol):
    """Something a radtriage process starts and stops."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class PollLoop:
    """Call :meth:`run_once` in a thread, every ``interval`` seconds or when woken.

    Subclasses implement :meth:`run_once`; it may return how long to wait before the
    next round (``None``: ``interval``). An exception in a round is logged by
    :meth:`round_failed` and the loop carries on: a locked database or an unreachable
    API passes, and the next round retries.

    Parameters
    ----------
    interval
        Seconds between rounds when nothing wakes the loop.
    """

    name = "poll loop"
    thread_name = "poll-loop"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> float | None:
        """One round of work; return the seconds to wait before the next (or ``None``)."""
        raise NotImplementedError

    def round_failed(self, err: Exception) -> None:
        """Log a failed round (override to log less, e.g. an expected outage)."""
        log.error(
            "%s round failed (%s: %s); retrying in %g s",
            self.name,
            type(err).__name__,
            err,
            self.interval,
            exc_info=err,
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called; long rounds check it to end early."""
        return self._stop.is_set()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the next round now instead of after the interval."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current round; wait up to ``timeout`` s for it to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            delay: float | None = None
            try:
                delay = self.run_once()
            except Exception as err:  # noqa: BLE001 - keep the loop alive; the next round retries
                self.round_failed(err)
            if self._stop.is_set():
                break
            self._wake.wait(self.interval if delay is None else delay)
            self._wake.clear()
