"""``radtriage serve``: one process running the components of radtriage together.

A component is anything with ``name``, ``start()`` and ``stop()``. Components are made
by the factories in :data:`COMPONENT_FACTORIES` from a shared :class:`ServiceContext`,
started in that order and stopped in reverse. To add one (dispatcher, web app, ...),
append its factory to the list; a factory may return ``None`` to stay off (e.g. when
its config section disables it).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.db import create_index_engine, migrate

log = logging.getLogger(__name__)


class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class ServiceContext:
    """What components share: settings, the index and the archive."""

    settings: Settings
    engine: Engine
    archive: Archive
    extras: dict[str, Any] = field(default_factory=dict)  # for components to share state

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self.archive.session_factory


ComponentFactory = Callable[[ServiceContext], "Component | None"]


class ReceiverComponent:
    """The DICOM receiver (C-ECHO, C-STORE)."""

    name = "DICOM receiver"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.server: Any = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        from pipeline.receiver import start_receiver

        self.server = start_receiver(self.ctx.settings, self.ctx.archive)
        self.ctx.extras["dicom_port"] = self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def _receiver(ctx: ServiceContext) -> Component:
    return ReceiverComponent(ctx)


def _stability(ctx: ServiceContext) -> Component:
    from pipeline.stability import StabilitySweeper

    triage = ctx.settings.triage
    sweeper = StabilitySweeper(ctx.session_factory, triage.stable_age_seconds, triage.sweep_interval_seconds)
    ctx.extras["stability"] = sweeper
    return sweeper


def _prefect(ctx: ServiceContext) -> Component | None:
    if not ctx.settings.triage.enabled:
        return None
    from flows.serve import embedded_prefect  # Prefect stays out of the receiver's imports

    return embedded_prefect(ctx)


def _triage(ctx: ServiceContext) -> Component | None:
    if not ctx.settings.triage.enabled:
        return None
    from flows.serve import triage

    return triage(ctx)


def _forwarder(ctx: ServiceContext) -> Component:
    from pipeline.forward import Forwarder

    forwarder = Forwarder(ctx.settings, ctx.archive, ctx.session_factory)
    ctx.extras["forwarder"] = forwarder
    return forwarder


def _web(ctx: ServiceContext) -> Component:
    from pipeline.web.server import WebServer

    return WebServer(ctx.settings, ctx.session_factory, ctx.archive)


# The components of `radtriage serve`, in start order. Add yours here (one line).
COMPONENT_FACTORIES: list[ComponentFactory] = [
    _receiver,
    _stability,
    _forwarder,
    _web,
    _prefect,
    _triage,
]


class Service:
    """Migrates the index, recovers the archive, then runs the components.

    Parameters
    ----------
    factories
        Component factories; defaults to :data:`COMPONENT_FACTORIES`.
    recover_archive
        Clean up after a crash of the archive's writer. Only the machine that receives
        does this; a worker sharing the archive must not (it would remove the
        receiver's files in flight).
    """

    def __init__(self, settings: Settings, factories: list[ComponentFactory] | None = None, *,
                 recover_archive: bool = True) -> None:
        self.settings = settings
        self.recover_archive = recover_archive
        self.factories = list(COMPONENT_FACTORIES if factories is None else factories)
        self.components: list[Component] = []
        self._stopped = threading.Event()
        self.ctx: ServiceContext | None = None

    def start(self) -> ServiceContext:
        url = self.settings.index_url
        migrate(url)
        engine = create_index_engine(url)
        archive = Archive(self.settings, engine=engine)
        if self.recover_archive:
            archive.recover()
        self.ctx = ServiceContext(self.settings, engine, archive)
        try:
            for factory in self.factories:
                component = factory(self.ctx)
                if component is None:
                    continue
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
        return self.ctx

    def stop(self) -> None:
        while self.components:
            component = self.components.pop()
            try:
                component.stop()
            except Exception:  # stop the others regardless
                log.exception("stopping %s failed", component.name)
        if self.ctx is not None:
            self.ctx.engine.dispose()
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
