"""Run a process's components: start them in order, stop them in reverse.

``radtriage serve`` and ``radtriage worker`` decide which components they run
(:mod:`pipeline.cli.serve`, :mod:`pipeline.cli.worker`) and hand them to a
:class:`ProcessRunner`, which blocks until SIGINT/SIGTERM and then stops everything,
also when a component fails to start.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from pipeline.process.component import Component

log = logging.getLogger(__name__)


class ProcessRunner:
    """Starts ``components`` in order and stops them in reverse.

    Parameters
    ----------
    components
        Started in this order; a component that fails to start stops the ones before it.
    on_stop
        Called once after every component stopped (e.g. close the index's connections).
    """

    def __init__(self, components: Sequence[Component], *, on_stop: Callable[[], None] | None = None) -> None:
        self.pending = list(components)
        self.components: list[Component] = []
        self.on_stop = on_stop
        self._stopped = threading.Event()

    def start(self) -> None:
        try:
            for component in self.pending:
                component.start()
                self.components.append(component)
                log.debug("started %s", component.name)
        except BaseException:
            self.stop()
            raise
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # garbage collector, whose full passes otherwise stall the receiver (~75 ms each).
        gc.freeze()
        log.info("radtriage running: %s", ", ".join(c.name for c in self.components))

    def stop(self) -> None:
        while self.components:
            component = self.components.pop()
            try:
                component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        if self.on_stop is not None:
            on_stop, self.on_stop = self.on_stop, None
            on_stop()
        self._stopped.set()

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
        self._stopped.set()

    def run(self) -> int:
        """Start, block until SIGINT/SIGTERM, stop cleanly. Returns the exit code."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not self._stopped.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("radtriage stopped")
        return 0
