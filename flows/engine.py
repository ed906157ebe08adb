"""Prefect beyond its plain client API, in one place, pinned and tested.

radtriage executes flow runs in its own long-lived process (models stay in memory),
which no interface Prefect 3 documents as supported offers (checked for 3.9.1):

- ``flow.serve()`` and ``prefect worker start`` (the process worker) start a fresh
  Python process per flow run: torch and every model load again for each study;
  served deployments are not in a work pool, so there are no queue priorities either.
- A custom worker type (``prefect.workers.base.BaseWorker``) still has to execute the
  run itself in ``run()``: in this process that is ``run_flow`` again, under an async
  poller that claims runs without our inference gate (an urgent study arriving later
  would wait behind runs already claimed).
- Task workers (``task.serve()``, ``.delay()``) keep a process warm but have no work
  queues or priorities, no flow run per study, no idempotency key for the dispatcher
  and nothing that re-runs the task of a worker killed with ``kill -9``.
- The client API alone would mean re-implementing the engine (states, task runs,
  logs, retries) by hand.

So the two calls that need Prefect's internals live here, written against the Prefect
version pinned exactly in ``pyproject.toml`` and ``constraints.txt``;
``tests/flow/test_engine.py`` pins their signatures and the behaviour relied on, and
fails when an upgrade changes either.

=======================  ===============================================================
:func:`run_flow_run`     execute a flow run the API scheduled, in this thread
                         (``prefect.flow_engine.run_flow``, what Prefect's own runner
                         calls in its subprocess)
:func:`use_api_url`      make every thread use a Prefect API chosen after import
                         (``prefect.context.refresh_global_settings_context``)
=======================  ===============================================================

The rest is the public client API, kept here because the worker and the deployment
share it: :func:`claim_flow_run` (the Pending transition, which Prefect's orchestration
rules grant to one claimant only), :func:`label_flow_run` and
:func:`send_worker_heartbeat` (which worker runs what, and that it is alive),
:func:`apply_deployment`, :func:`ensure_work_queues`
(the work pool with one queue per urgency, in priority order) and
:func:`scheduled_flow_runs` (what a Prefect worker polling the pool is handed: the
queue with the highest priority first, then the oldest run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.context import refresh_global_settings_context
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.states import Pending, State
from prefect.utilities.callables import parameter_schema

log = logging.getLogger(__name__)

PREFECT_VERSION = "3.9.1"  # pyproject.toml pins this; the tests check the installed one


def apply_deployment(
    client: SyncPrefectClient,
    flow: Flow[..., Any],
    name: str,
    *,
    entrypoint: str,
    tags: list[str],
    work_pool_name: str | None = None,
    work_queue_name: str | None = None,
) -> UUID:
    """Create or update the deployment ``<flow name>/<name>`` (the API upserts); return its id."""
    flow_id = client.create_flow_from_name(flow.name)
    return client.create_deployment(
        flow_id=flow_id,
        name=name,
        entrypoint=entrypoint,
        tags=tags,
        parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
        work_pool_name=work_pool_name,
        work_queue_name=work_queue_name,
    )


def ensure_work_queues(client: SyncPrefectClient, work_pool_name: str, queues: Sequence[str]) -> dict[str, int]:
    """Make ``queues`` the first queues of the work pool, in this priority order; return
    every queue's priority by name (1 is served first).

    The pool is created (type ``process``, as ``prefect work-pool create`` in
    prefect.yaml) when missing; other queues of the pool (its ``default``) keep their
    order below these.
    """
    try:
        client.read_work_pool(work_pool_name)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=work_pool_name, type="process"))
        except ObjectAlreadyExists:  # another process created it meanwhile
            pass
    for priority, name in enumerate(queues, start=1):
        try:
            client.create_work_queue(name=name, priority=priority, work_pool_name=work_pool_name)
        except ObjectAlreadyExists:
            queue = client.read_work_queue_by_name(name, work_pool_name=work_pool_name)
            if queue.priority != priority:
                client.update_work_queue(queue.id, priority=priority)
    return {q.name: q.priority for q in client.read_work_queues(work_pool_name=work_pool_name)}


def scheduled_flow_runs(
    client: SyncPrefectClient, work_pool_name: str, deployment_id: UUID, *, limit: int
) -> list[FlowRun]:
    """Up to ``limit`` scheduled runs of one deployment that are due, in the order the
    work pool serves them: queue priority, then the oldest."""
    responses = client.get_scheduled_flow_runs_for_work_pool(work_pool_name, scheduled_before=datetime.now(UTC))
    runs = [r.flow_run for r in responses if r.flow_run.deployment_id == deployment_id]
    return runs[:limit]


def claim_flow_run(client: SyncPrefectClient, flow_run_id: UUID) -> bool:
    """Move a scheduled flow run to Pending; ``False`` when another worker got it first."""
    result = client.set_flow_run_state(flow_run_id, Pending())
    return result.status == SetStateStatus.ACCEPT


def label_flow_run(client: SyncPrefectClient, flow_run_id: UUID, labels: dict[str, str]) -> None:
    """Add ``labels`` to a flow run (the UI and API show them; e.g. which worker ran it)."""
    client.update_flow_run_labels(flow_run_id, labels)


def send_worker_heartbeat(client: SyncPrefectClient, work_pool_name: str, worker_name: str, interval: int) -> None:
    """Tell the work pool that ``worker_name`` is alive and will say so every ``interval`` s."""
    client.send_worker_heartbeat(work_pool_name, worker_name, heartbeat_interval_seconds=interval)


def run_flow_run(flow: Flow[..., Any], flow_run: FlowRun) -> State[Any]:
    """Execute ``flow_run`` (claimed, Pending) in this thread; return its final state.

    The engine proposes Running, runs ``flow`` with the run's parameters and records the
    final state, exactly as it would in a runner's subprocess. It does not check the
    claim: hand it only a run :func:`claim_flow_run` won, or it runs twice.
    """
    return run_flow(flow, flow_run=flow_run, return_type="state")  # type: ignore[return-value]


def use_api_url(url: str, *, auth_string: str | None = None) -> None:
    """Point this process's Prefect client, in every thread, at ``url``.

    Prefect reads its settings at import; the embedded server's URL is known only once
    it runs, so the global settings context is rebuilt from the environment.
    ``auth_string`` (``user:secret``) is what the server's API requires, sent as HTTP
    Basic by every client of this process; ``None`` keeps what the environment says.
    """
    os.environ["PREFECT_API_URL"] = url
    if auth_string is not None:
        os.environ["PREFECT_API_AUTH_STRING"] = auth_string
    refresh_global_settings_context()
