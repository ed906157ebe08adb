"""The Prefect side of ``radtriage serve`` and ``radtriage worker``.

:class:`TriageOrchestration` registers the ``triage-study`` deployment and the
inference concurrency limit, runs the in-process worker, and (for ``serve``) the
dispatcher that turns stable studies into flow runs. When the Prefect API is down at
start it keeps trying in the background; the receiver never waits for it.

A front node with ``[triage] local_worker = false`` runs no worker: ``radtriage
worker`` processes on other machines execute the runs, and the dispatching node
watches their heartbeats (:class:`DeadWorkerWatch`) to dispatch again the studies of a
worker that died.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from flows.engine import use_api_url
from pipeline.config import Settings
from pipeline.process.component import PollLoop
from pipeline.triage.dispatch import Dispatcher, recover_from_dead_workers, recover_interrupted
from pipeline.triage.prefect_server import AUTH_FILE, LocalPrefectServer, load_auth_string
from pipeline.triage.runtime import Runtime, set_runtime

log = logging.getLogger(__name__)


class DeadWorkerWatch(PollLoop):
    """Every heartbeat interval: crash the runs of workers that stopped heartbeating and
    dispatch their studies again (:func:`recover_from_dead_workers`)."""

    name = "dead-worker watch"
    thread_name = "dead-worker-watch"

    def __init__(self, runtime: Runtime, work_pool: str, interval: float, on_recovered: Callable[[], None]) -> None:
        super().__init__(interval)
        self.runtime = runtime
        self.work_pool = work_pool
        self.on_recovered = on_recovered

    def run_once(self) -> None:
        if recover_from_dead_workers(self.runtime.session_factory, self.work_pool):
            self.on_recovered()

    def round_failed(self, err: Exception) -> None:
        log.warning("cannot check the triage workers' heartbeats (%s); retrying", err)


class TriageOrchestration:
    """Deployment registration + in-process worker (+ dispatcher when ``dispatch``)."""

    name = "triage orchestration"

    def __init__(
        self,
        runtime: Runtime,
        *,
        dispatch: bool = True,
        embedded: bool = False,
        max_parallel_flows: int = 2,
        inference_slots: int = 1,
        poll_interval: float = 2.0,
        local_worker: bool = True,
        worker_name: str = "",
        heartbeat_seconds: int = 10,
    ) -> None:
        self.runtime = runtime
        self.local_worker = local_worker
        self.worker_name = worker_name
        self.heartbeat_seconds = heartbeat_seconds
        self.watch: DeadWorkerWatch | None = None
        self.embedded = embedded
        self.inference_slots = inference_slots
        self.max_parallel_flows = max_parallel_flows
        self.poll_interval = poll_interval
        self.worker = None
        self.work_pool = runtime.settings.triage.work_pool
        self.dispatcher = Dispatcher(runtime, on_dispatched=self._wake_worker) if dispatch else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.deployment_id: UUID | None = None

    def wake_dispatcher(self) -> None:
        """Dispatch now (the stability sweep calls this when studies turn stable)."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def _wake_worker(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def start(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.start()
        self._thread = threading.Thread(target=self._register_then_work, name="triage-orchestration", daemon=True)
        self._thread.start()

    def _register_then_work(self) -> None:
        from flows.deployment import ensure_inference_limit, register_deployment
        from flows.worker import InProcessWorker

        delay = 1.0
        while not self._stop.is_set():
            try:
                self.deployment_id = register_deployment(self.work_pool)
                if self.local_worker:  # the limit is this host's worker's (it resets it)
                    ensure_inference_limit(self.inference_slots)
                break
            except Exception as err:  # noqa: BLE001 - API not reachable yet
                log.warning("cannot register the triage-study deployment yet (%s); retrying in %.0f s", err, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        if self._stop.is_set() or self.deployment_id is None:
            return
        if self.dispatcher is not None:
            try:
                # Embedded: this process is the only worker, so a run left running is dead.
                recover_interrupted(self.runtime.session_factory, running_is_stale_after=0 if self.embedded else 3600)
            except Exception:
                log.exception("could not check for interrupted triage runs")
            if not self.embedded:  # other workers may share the pool: watch their heartbeats
                self.watch = DeadWorkerWatch(self.runtime, self.work_pool, self.heartbeat_seconds, self.dispatcher.wake)
                self.watch.start()
        if self.local_worker:
            self.worker = InProcessWorker(
                self.deployment_id,
                work_pool=self.work_pool,
                gate=self.runtime.inference_gate,
                max_parallel=self.max_parallel_flows,
                poll_interval=self.poll_interval,
                name=self.worker_name,
                heartbeat_seconds=self.heartbeat_seconds,
            )
            self.worker.start()
            log.info("triage worker %s polling work pool %s", self.worker.worker_name, self.work_pool)
        else:
            log.info("no local triage worker ([triage] local_worker = false): workers elsewhere run the flow runs")
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def stop(self) -> None:
        self._stop.set()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self._thread is not None:
            self._thread.join(10)
        if self.watch is not None:
            self.watch.stop()
        if self.worker is not None:
            self.worker.stop()


class EmbeddedPrefect:
    """A local Prefect server for one-machine installs, when ``PREFECT_API_URL`` is unset.

    Its API requires the auth string kept in ``<home>/api-auth`` (see
    :mod:`pipeline.triage.prefect_server`); this process's client sends it.
    """

    name = "embedded Prefect server"

    def __init__(self, home: Path, port: int, *, task_history: bool = False) -> None:
        self.server = LocalPrefectServer(
            home, port or None, ui=True, task_history=task_history, auth_string=load_auth_string(home)
        )

    def start(self) -> None:
        use_api_url(self.server.start(), auth_string=self.server.auth_string)
        log.info(
            "Prefect UI at %s (user:password in %s)",
            self.server.api_url.removesuffix("/api"),
            self.server.home / AUTH_FILE,
        )

    def stop(self) -> None:
        self.server.stop()


def embedded_prefect(settings: Settings) -> EmbeddedPrefect | None:
    """The embedded server, or nothing when an external API is configured."""
    if os.environ.get("PREFECT_API_URL"):
        log.info("using the Prefect API at %s", os.environ["PREFECT_API_URL"])
        return None
    triage = settings.triage
    return EmbeddedPrefect(
        Path(settings.storage.data_dir) / "prefect",
        triage.embedded_prefect_port,
        task_history=triage.embedded_prefect_task_history,
    )


def triage_orchestration(runtime: Runtime, *, dispatch: bool = True, embedded: bool = False) -> TriageOrchestration:
    """Deployment, in-process worker and (for serve) the dispatcher, over ``runtime``.

    ``runtime`` becomes this process's runtime: the flow runs the worker executes here
    use its index, archive and model registry.
    """
    set_runtime(runtime)
    settings = runtime.settings.triage
    return TriageOrchestration(
        runtime,
        dispatch=dispatch,
        embedded=embedded,
        max_parallel_flows=settings.max_parallel_flows,
        inference_slots=settings.inference_slots,
        # A worker machine always runs its worker; only serve may leave it to others.
        local_worker=settings.local_worker or not dispatch,
        worker_name=settings.worker_name,
        heartbeat_seconds=settings.worker_heartbeat_seconds,
    )
