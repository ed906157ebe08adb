"""The ``triage-study`` deployment, its work queues and the inference concurrency limit.

``radtriage serve`` (and ``radtriage worker``) register them at start; ``prefect.yaml``
defines the same deployment for ``prefect deploy`` and Prefect's process worker
(``tests/cluster/test_cluster.py`` runs both; registering again keeps its pull step). The deployment
lives in the work pool ``[triage] work_pool`` with one work queue per urgency
(critical, urgent, routine: Prefect's queue priorities 1, 2, 3); the dispatcher puts
each flow run in the queue of its study's urgency.
"""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists

from flows.engine import apply_deployment, ensure_work_queues
from flows.triage import inference_limit_name, triage_study
from pipeline.triage.dispatch import DEFAULT_WORK_QUEUE, DEPLOYMENT_NAME, FLOW_NAME, WORK_QUEUES

log = logging.getLogger(__name__)

# As in prefect.yaml: where a Prefect worker with this repository finds the flow.
ENTRYPOINT = "flows/triage.py:triage_study"


def register_deployment(work_pool: str = "radtriage") -> UUID:
    """Create or update the work queues and the ``triage-study/triage-study`` deployment
    in ``work_pool``; return the deployment's id."""
    # The sync client: called from threads and from code that may have an event loop
    # around (Playwright in tests, uvicorn).
    with get_client(sync_client=True) as client:
        priorities = ensure_work_queues(client, work_pool, WORK_QUEUES)
        deployment_id = apply_deployment(
            client,
            triage_study,
            DEPLOYMENT_NAME,
            entrypoint=ENTRYPOINT,
            tags=["radtriage"],
            work_pool_name=work_pool,
            work_queue_name=DEFAULT_WORK_QUEUE,
        )
    log.info(
        "registered Prefect deployment %s/%s (%s) in work pool %s, queues %s",
        FLOW_NAME,
        DEPLOYMENT_NAME,
        deployment_id,
        work_pool,
        ", ".join(f"{name} ({priorities.get(name)})" for name in WORK_QUEUES),
    )
    return deployment_id


def ensure_inference_limit(slots: int = 1) -> str:
    """Create (or resize) this worker's inference concurrency limit; return its name.

    Its occupied slots are reset: the limit is this host's worker's alone, and a worker
    killed inside an inference (``kill -9``) never released its slot, which would
    otherwise block the restarted worker's every inference.
    """
    name = inference_limit_name()
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active_slots=0))
    return name
