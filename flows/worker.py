"""Run ``triage-study`` flow runs inside this process, with models kept in memory.

Prefect's own runner starts a fresh Python process per flow run, which would re-import
torch and reload every model for every study (seconds each). This worker polls the
deployment's work pool the way a Prefect worker does (the queue of the highest
priority first: critical, urgent, routine; then the oldest run), claims runs through
the API (the Pending transition, which only one claimant wins, so several workers can
share the pool) and runs them in a small thread pool here.

It claims a run only when one of this process's inference slots is free for it
(:class:`pipeline.triage.gate.InferenceGate`): runs not yet claimed stay in Prefect's
queues, where an urgent study arriving later still overtakes them. A flow's other steps
overlap with the next run's inference. It is what ``radtriage serve`` and ``radtriage
worker`` start.

Each worker has a name (``[triage] worker_name``), heartbeats to the work pool under it
and labels every run it claims ``radtriage.worker=<name>``: the flow runs say which
worker ran them, and the dispatching node can tell a run whose worker died
(:func:`pipeline.triage.dispatch.recover_from_dead_workers`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import UUID

from prefect.client.orchestration import get_client

from flows.engine import claim_flow_run, label_flow_run, run_flow_run, scheduled_flow_runs, send_worker_heartbeat
from flows.triage import triage_study
from pipeline.process.component import PollLoop
from pipeline.triage.dispatch import WORKER_LABEL
from pipeline.triage.gate import InferenceGate

log = logging.getLogger(__name__)


class InProcessWorker(PollLoop):
    """Poll one deployment's work pool for scheduled runs and execute them in threads.

    Parameters
    ----------
    deployment_id
        The ``triage-study`` deployment (from :func:`flows.deployment.register_deployment`).
    work_pool
        Its work pool (``[triage] work_pool``).
    gate
        This process's inference slots; a run is claimed only when one is free for it.
        ``None``: claim up to ``max_parallel`` runs (no model step to wait for).
    max_parallel
        Flow runs executed at once (at least the inference slots plus one, so that a
        finished inference's remaining steps overlap with the next).
    poll_interval
        Seconds between polls when not woken by :meth:`wake` (a dispatch, a freed slot,
        a finished run).
    name
        This worker in Prefect (heartbeats, the ``radtriage.worker`` label of its runs);
        empty: ``<hostname>-<pid>``.
    heartbeat_seconds
        Seconds between heartbeats to the work pool (sent from the polling thread).
    """

    name = "in-process triage worker"
    thread_name = "triage-worker"

    def __init__(
        self,
        deployment_id: UUID,
        *,
        work_pool: str = "radtriage",
        gate: InferenceGate | None = None,
        max_parallel: int = 2,
        poll_interval: float = 2.0,
        name: str = "",
        heartbeat_seconds: int = 10,
    ) -> None:
        super().__init__(min(poll_interval, heartbeat_seconds))
        self.worker_name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat_seconds = heartbeat_seconds
        self._last_heartbeat = float("-inf")
        self.deployment_id = deployment_id
        self.work_pool = work_pool
        self.gate = gate
        self.max_parallel = max_parallel
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="triage-flow")
        self._running: dict[UUID, Future[object]] = {}
        if gate is not None:
            gate.on_release = self.wake

    @property
    def poll_interval(self) -> float:
        return self.interval

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_once(self) -> None:
        self.heartbeat()
        self.poll_once()

    def heartbeat(self) -> None:
        """Tell the work pool this worker is alive, when one is due."""
        if time.monotonic() - self._last_heartbeat < self.heartbeat_seconds / 2:
            return
        with get_client(sync_client=True) as client:
            send_worker_heartbeat(client, self.work_pool, self.worker_name, self.heartbeat_seconds)
        self._last_heartbeat = time.monotonic()

    def round_failed(self, err: Exception) -> None:
        # The API down is expected during restarts: one line, the traceback only in debug.
        log.warning("cannot poll Prefect for triage runs (%s); retrying", err, exc_info=log.isEnabledFor(logging.DEBUG))

    def _free(self) -> int:
        self._running = {k: f for k, f in self._running.items() if not f.done()}
        free = self.max_parallel - len(self._running)
        return min(free, self.gate.free()) if self.gate is not None else free

    def poll_once(self) -> int:
        """Claim and start the most urgent scheduled runs that fit in the free slots; return how many."""
        free = self._free()
        if free <= 0:
            return 0
        started = 0
        with get_client(sync_client=True) as client:
            for flow_run in scheduled_flow_runs(client, self.work_pool, self.deployment_id, limit=free):
                if flow_run.id in self._running:
                    continue
                key = str(flow_run.id)
                if self.gate is not None and not self.gate.reserve(key):
                    break
                if not claim_flow_run(client, flow_run.id):
                    if self.gate is not None:
                        self.gate.cancel(key)
                    continue  # another worker claimed it
                try:
                    label_flow_run(client, flow_run.id, {WORKER_LABEL: self.worker_name})
                except Exception as err:  # noqa: BLE001 - the run is ours: run it unlabelled
                    log.warning("cannot label flow run %s with its worker (%s)", flow_run.name, err)
                log.info(
                    "worker %s running flow run %s for %s",
                    self.worker_name,
                    flow_run.name,
                    flow_run.parameters.get("study_uid"),
                )
                future = self._pool.submit(self._execute, flow_run)
                self._running[flow_run.id] = future
                future.add_done_callback(lambda _f, key=key: self._finished(key))
                started += 1
        return started

    def _finished(self, key: str) -> None:
        if self.gate is not None:
            self.gate.cancel(key)  # a run that ended before its model step leaves its turn
        self.wake()

    @staticmethod
    def _execute(flow_run: object) -> object:
        try:
            return run_flow_run(triage_study, flow_run)  # type: ignore[arg-type]
        except BaseException:
            log.exception("flow run %s crashed", getattr(flow_run, "name", flow_run))
            return None
