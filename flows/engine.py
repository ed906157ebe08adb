"""Prefect beyond its plain client API, in one place, pinned and tested.

radtriage executes flow runs in its own long-lived process (models stay in memory),
which Prefect's public API does not offer: its runners start a fresh process per run.
The two calls that need Prefect's internals live here, written against the Prefect
version pinned exactly in ``pyproject.toml``; ``tests/flow/test_engine.py`` fails when
an upgrade makes any of them ineffective.

=======================  ===============================================================
:func:`run_flow_run`     execute a flow run the API scheduled, in this thread
                         (``prefect.flow_engine.run_flow``, what Prefect's own runner
                         calls in its subprocess)
:func:`use_api_url`      make every thread use a Prefect API chosen after import
                         (``prefect.context.refresh_global_settings_context``)
=======================  ===============================================================

The rest is the public client API, kept here because the worker and the deployment
share it: :func:`claim_flow_run` (the Pending transition, which Prefect's orchestration
rules grant to one claimant only) and :func:`apply_deployment`.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.context import refresh_global_settings_context
from prefect.flow_engine import run_flow
from prefect.states import Pending, State
from prefect.utilities.callables import parameter_schema

log = logging.getLogger(__name__)

PREFECT_VERSION = "3.9.1"  # pyproject.toml pins this; the tests check the installed one


def apply_deployment(
    client: SyncPrefectClient, flow: Flow[..., Any], name: str, *, entrypoint: str, tags: list[str]
) -> UUID:
    """Create or update the deployment ``<flow name>/<name>`` (the API upserts); return its id."""
    flow_id = client.create_flow_from_name(flow.name)
    return client.create_deployment(
        flow_id=flow_id,
        name=name,
        entrypoint=entrypoint,
        tags=tags,
        parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
    )


def claim_flow_run(client: SyncPrefectClient, flow_run_id: UUID) -> bool:
    """Move a scheduled flow run to Pending; ``False`` when another worker got it first."""
    result = client.set_flow_run_state(flow_run_id, Pending())
    return result.status == SetStateStatus.ACCEPT


def run_flow_run(flow: Flow[..., Any], flow_run: FlowRun) -> State[Any]:
    """Execute ``flow_run`` (claimed, Pending) in this thread; return its final state.

    The engine proposes Running, runs ``flow`` with the run's parameters and records the
    final state, exactly as it would in a runner's subprocess.
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
