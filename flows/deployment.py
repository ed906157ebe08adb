"""The ``triage-study`` deployment and the inference concurrency limit.

``radtriage serve`` (and ``radtriage worker``) register them at start; ``prefect.yaml``
defines the same deployment for a Prefect work pool on other machines.
"""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists

from flows.engine import apply_deployment
from flows.triage import inference_limit_name, triage_study
from pipeline.triage.dispatch import DEPLOYMENT_NAME, FLOW_NAME

log = logging.getLogger(__name__)

# As in prefect.yaml: where a Prefect worker with this repository finds the flow.
ENTRYPOINT = "flows/triage.py:triage_study"


def register_deployment() -> UUID:
    """Create or update the ``triage-study/triage-study`` deployment; return its id."""
    # The sync client: called from threads and from code that may have an event loop
    # around (Playwright in tests, uvicorn).
    with get_client(sync_client=True) as client:
        deployment_id = apply_deployment(
            client, triage_study, DEPLOYMENT_NAME, entrypoint=ENTRYPOINT, tags=["radtriage"]
        )
    log.info("registered Prefect deployment %s/%s (%s)", FLOW_NAME, DEPLOYMENT_NAME, deployment_id)
    return deployment_id


def ensure_inference_limit(slots: int = 1) -> str:
    """Create (or resize) this worker's inference concurrency limit; return its name."""
    name = inference_limit_name()
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots))
    return name
