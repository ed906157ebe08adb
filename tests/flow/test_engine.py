"""flows/engine.py: the Prefect calls radtriage relies on still do what it needs.

If a Prefect upgrade changes any of them, these fail before the worker silently stops
claiming runs or runs them twice.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import prefect
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings

from flows.engine import (
    PREFECT_VERSION,
    apply_deployment,
    claim_flow_run,
    ensure_work_queues,
    run_flow_run,
    scheduled_flow_runs,
    use_api_url,
)
from pipeline.triage.prefect_server import LocalPrefectServer

pytestmark = pytest.mark.slow  # a Prefect server

ROOT = Path(__file__).resolve().parents[2]


@flow(name="engine-check")
def double(x: int) -> int:
    return 2 * x


def test_prefect_is_the_version_the_engine_was_written_against() -> None:
    assert prefect.__version__ == PREFECT_VERSION
    pinned = re.search(r'"prefect==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == PREFECT_VERSION


def test_applying_a_deployment_twice_updates_the_one_deployment(prefect_server: LocalPrefectServer) -> None:
    with get_client(sync_client=True) as client:
        first = apply_deployment(client, double, "engine", entrypoint="tests/flow/test_engine.py:double", tags=["t"])
        again = apply_deployment(client, double, "engine", entrypoint="tests/flow/test_engine.py:double", tags=["t"])
        found = client.read_deployment_by_name("engine-check/engine")
    assert first == again == found.id
    assert found.parameter_openapi_schema["properties"]["x"]["type"] == "integer"


def test_one_claim_wins_and_the_claimed_run_executes_as_itself(prefect_server: LocalPrefectServer) -> None:
    with get_client(sync_client=True) as client:
        deployment = apply_deployment(client, double, "claims", entrypoint="tests/flow/test_engine.py:double", tags=[])
        scheduled = client.create_flow_run_from_deployment(deployment, parameters={"x": 21})
        assert claim_flow_run(client, scheduled.id) is True
        assert claim_flow_run(client, scheduled.id) is False  # a second worker loses
        state = run_flow_run(double, client.read_flow_run(scheduled.id))
        recorded = client.read_flow_run(scheduled.id)
    assert state.is_completed() and state.result() == 42
    assert recorded.state is not None and recorded.state.is_completed()


def test_the_work_pool_serves_the_most_urgent_queue_first_then_the_oldest(prefect_server: LocalPrefectServer) -> None:
    queues = ["q-critical", "q-urgent", "q-routine"]
    with get_client(sync_client=True) as client:
        priorities = ensure_work_queues(client, "engine-pool", queues)
        assert [priorities[q] for q in queues] == [1, 2, 3]
        # Someone reordered the queues in the UI: applying again restores the order.
        client.update_work_queue(
            client.read_work_queue_by_name("q-routine", work_pool_name="engine-pool").id, priority=1
        )
        assert [ensure_work_queues(client, "engine-pool", queues)[q] for q in queues] == [1, 2, 3]
        deployment = apply_deployment(
            client,
            double,
            "pool",
            entrypoint="tests/flow/test_engine.py:double",
            tags=[],
            work_pool_name="engine-pool",
            work_queue_name="q-routine",
        )
        for x, queue in [(1, "q-routine"), (2, "q-routine"), (3, "q-urgent"), (4, "q-critical"), (5, None)]:
            client.create_flow_run_from_deployment(deployment, parameters={"x": x}, work_queue_name=queue)
        order = [r.parameters["x"] for r in scheduled_flow_runs(client, "engine-pool", deployment, limit=10)]
    assert order == [4, 3, 1, 2, 5]


def test_a_new_api_url_reaches_every_thread(prefect_server: LocalPrefectServer) -> None:
    seen: list[str] = []
    try:
        use_api_url("http://127.0.0.1:9/api")
        thread = threading.Thread(target=lambda: seen.append(str(get_current_settings().api.url)))
        thread.start()
        thread.join()
    finally:
        use_api_url(prefect_server.api_url)
    assert seen == ["http://127.0.0.1:9/api"]
    assert str(get_current_settings().api.url) == prefect_server.api_url
