"""The process-wide objects a flow run needs: settings, index, archive, model registry.

Flow runs execute inside ``radtriage serve`` (or ``radtriage worker`` on another
machine); they find what they need here instead of receiving it as parameters, so that
Prefect passes only UIDs. ``radtriage serve`` installs its own runtime with
:func:`set_runtime`; elsewhere it is built lazily from ``$RADTRIAGE_CONFIG``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pipeline.archive import Archive
from pipeline.config import Settings, load_settings
from pipeline.index.db import create_index_engine, migrate
from pipeline.triage.gate import InferenceGate


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    archive: Archive
    # Called after a flow run in this process stored results (the forwarder's wake).
    on_results_stored: Callable[[], None] | None = None
    _registry: Any = field(default=None, repr=False)
    _gate: InferenceGate | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, run_migrations: bool = True) -> Runtime:
        if run_migrations:
            migrate(settings.index_url)
        engine = create_index_engine(settings.index_url)
        archive = Archive(settings, engine=engine)
        return cls(settings=settings, engine=engine, session_factory=archive.session_factory, archive=archive)

    @property
    def registry(self) -> Any:
        """The model registry, discovered once per process (models stay loaded)."""
        with self._lock:
            if self._registry is None:
                from pipeline.ai.registry import load_registry

                self._registry = load_registry(self.settings.models.dir)
            return self._registry

    @property
    def inference_gate(self) -> InferenceGate:
        """This process's inference slots (``[triage] inference_slots``), shared by its flow runs."""
        with self._lock:
            if self._gate is None:
                self._gate = InferenceGate(self.settings.triage.inference_slots)
            return self._gate


_current: Runtime | None = None
_current_lock = threading.Lock()


def set_runtime(runtime: Runtime | None) -> None:
    global _current
    with _current_lock:
        _current = runtime


def get_runtime() -> Runtime:
    """The runtime of this process, built from ``$RADTRIAGE_CONFIG`` on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Runtime.from_settings(load_settings())
        return _current
