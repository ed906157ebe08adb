"""flows/engine.py: the Prefect calls radtriage relies on still do what it needs.

If a Prefect upgrade changes any of them, these fail before the worker silently stops
claiming runs or runs them twice. The two internals (``prefect.flow_engine.run_flow``,
``prefect.context.refresh_global_settings_context``) are pinned by their exact
signature and by the behaviour the worker relies on: a run executes in the calling
thread, several at once in threads, a failure comes back as a state, and the engine
itself does not check who claimed a run (the Pending claim is the only guard).
"""

from __future__ import annotations

import inspect
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import prefect
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import refresh_global_settings_context
from prefect.flow_engine import run_flow
from prefect.settings import get_current_settings
from prefect.states import Running

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


executed: list[tuple[int, str]] = []


@flow(name="engine-threads")
def record(x: int) -> int:
    executed.append((x, threading.current_thread().name))
    return x


@flow(name="engine-failure")
def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


def test_prefect_is_the_version_the_engine_was_written_against() -> None:
    assert prefect.__version__ == PREFECT_VERSION
    pinned = re.search(r'"prefect==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == PREFECT_VERSION
    constrained = re.search(r"^prefect==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert constrained is not None and constrained.group(1) == PREFECT_VERSION


def test_the_private_callables_keep_their_signatures() -> None:
    # What run_flow_run and use_api_url call, by name and default.
    parameters = inspect.signature(run_flow).parameters
    assert list(parameters) == [
        "flow",
        "flow_run",
        "parameters",
        "wait_for",
        "return_type",
        "error_logger",
        "context",
    ]
    assert parameters["flow_run"].default is None and parameters["return_type"].default == "result"
    assert not inspect.iscoroutinefunction(run_flow)
    assert inspect.signature(refresh_global_settings_context).parameters == {}


def test_claimed_runs_execute_in_the_calling_threads_at_once(prefect_server: LocalPrefectServer) -> None:
    executed.clear()
    with get_client(sync_client=True) as client:
        deployment = apply_deployment(client, record, "threads", entrypoint="tests/flow/test_engine.py:record", tags=[])
        runs = [client.create_flow_run_from_deployment(deployment, parameters={"x": x}) for x in (1, 2, 3)]
        assert all(claim_flow_run(client, r.id) for r in runs)
        claimed = [client.read_flow_run(r.id) for r in runs]
    with ThreadPoolExecutor(3, thread_name_prefix="engine-test") as pool:
        states = list(pool.map(lambda r: run_flow_run(record, r), claimed))
    assert [s.result() for s in states] == [1, 2, 3]
    assert sorted(x for x, _ in executed) == [1, 2, 3]
    assert all(name.startswith("engine-test") for _, name in executed)  # not a subprocess, not the main thread
    with get_client(sync_client=True) as client:
        assert all(client.read_flow_run(r.id).state.is_completed() for r in runs)  # type: ignore[union-attr]


def test_a_failing_run_comes_back_as_a_failed_state(prefect_server: LocalPrefectServer) -> None:
    with get_client(sync_client=True) as client:
        deployment = apply_deployment(client, fail, "failure", entrypoint="tests/flow/test_engine.py:fail", tags=[])
        run = client.create_flow_run_from_deployment(deployment, parameters={"x": 7})
        assert claim_flow_run(client, run.id)
        state = run_flow_run(fail, client.read_flow_run(run.id))  # returns, does not raise
        recorded = client.read_flow_run(run.id).state
    assert state.is_failed() and "bad input 7" in (state.message or "")
    assert recorded is not None and recorded.is_failed()


def test_only_the_claim_keeps_a_run_from_running_twice(prefect_server: LocalPrefectServer) -> None:
    """The engine runs whatever run it is handed, even one that already completed: the
    worker must hand it only runs it claimed. A claim fails while the run is Pending or
    Running elsewhere; a Completed run without a persisted result can be claimed again
    (Prefect's re-run), which is why the worker claims only runs it just saw Scheduled."""
    executed.clear()
    with get_client(sync_client=True) as client:
        deployment = apply_deployment(client, record, "twice", entrypoint="tests/flow/test_engine.py:record", tags=[])
        run = client.create_flow_run_from_deployment(deployment, parameters={"x": 5})
        assert claim_flow_run(client, run.id)
        assert run_flow_run(record, client.read_flow_run(run.id)).is_completed()
        assert run_flow_run(record, client.read_flow_run(run.id)).is_completed()  # unclaimed: runs again
        assert [x for x, _ in executed] == [5, 5]

        running = client.create_flow_run_from_deployment(deployment, parameters={"x": 6})
        assert claim_flow_run(client, running.id)
        client.set_flow_run_state(running.id, Running())
        assert claim_flow_run(client, running.id) is False


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
