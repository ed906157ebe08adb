"""Run ``triage-study`` flow runs inside this process, with models kept in memory.

Prefect's own runner starts a fresh Python process per flow run, which would re-import
torch and reload every model for every study (seconds each). This worker claims the
deployment's scheduled runs through the Prefect API (the Pending transition, which
only one claimant wins, so several workers can share a deployment) and runs them in a
small thread pool here. It is what ``radtriage serve`` and ``radtriage worker`` start.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from uuid import UUID

from prefect.client.orchestration import get_client

from flows.engine import claim_flow_run, run_flow_run
from flows.triage import triage_study
from pipeline.process.component import PollLoop

log = logging.getLogger(__name__)


class InProcessWorker(PollLoop):
    """Poll one deployment for scheduled runs and execute them in threads.

    Parameters
    ----------
    deployment_id
        The ``triage-study`` deployment (from :func:`flows.deployment.register_deployment`).
    max_parallel
        Flow runs executed at once; inference inside them is further limited by the
        Prefect concurrency limit.
    poll_interval
        Seconds between polls when not woken by :meth:`wake`.
    """

    name = "in-process triage worker"
    thread_name = "triage-worker"

    def __init__(self, deployment_id: UUID, *, max_parallel: int = 2, poll_interval: float = 2.0) -> None:
        super().__init__(poll_interval)
        self.deployment_id = deployment_id
        self.max_parallel = max_parallel
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="triage-flow")
        self._running: dict[UUID, Future[object]] = {}

    @property
    def poll_interval(self) -> float:
        return self.interval

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_once(self) -> None:
        self.poll_once()

    def round_failed(self, err: Exception) -> None:
        # The API down is expected during restarts: one line, the traceback only in debug.
        log.warning("cannot poll Prefect for triage runs (%s); retrying", err, exc_info=log.isEnabledFor(logging.DEBUG))

    def poll_once(self) -> int:
        """Claim and start the scheduled runs that fit in the free slots; return how many."""
        self._running = {k: f for k, f in self._running.items() if not f.done()}
        free = self.max_parallel - len(self._running)
        if free <= 0:
            return 0
        started = 0
        with get_client(sync_client=True) as client:
            runs = client.get_scheduled_flow_runs_for_deployments(
                [self.deployment_id], scheduled_before=datetime.now(UTC), limit=free
            )
            for flow_run in runs:
                if flow_run.id in self._running:
                    continue
                if not claim_flow_run(client, flow_run.id):
                    continue  # another worker claimed it
                log.info("running flow run %s for %s", flow_run.name, flow_run.parameters)
                self._running[flow_run.id] = self._pool.submit(self._execute, flow_run)
                started += 1
        return started

    @staticmethod
    def _execute(flow_run: object) -> object:
        try:
            return run_flow_run(triage_study, flow_run)  # type: ignore[arg-type]
        except BaseException:
            log.exception("flow run %s crashed", getattr(flow_run, "name", flow_run))
            return None
