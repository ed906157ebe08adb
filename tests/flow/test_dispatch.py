"""The dispatch outbox against a real Prefect API server."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import delete, select

from pipeline.index.db import session_scope
from pipeline.index.schema import Study, StudyState
from pipeline.index.triage import TriageRun
from pipeline.lab.synth import synth_study
from pipeline.triage.runtime import Runtime
from pipeline.triage.stability import sweep_once

pytestmark = pytest.mark.slow  # a Prefect server


def _eventually(attempt, timeout: float = 30.0):
    """The first truthy result of ``attempt()``, as the dispatcher's own loop would get it."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def _stable_study(rt: Runtime, tmp_path: Path, seed: int) -> str:
    # 16 slices: the head CT model reads it, so the study is owed a flow run.
    files = synth_study(tmp_path / f"in{seed}", seed=seed, slices=16, rows=64, cols=64)
    for path in files:
        rt.archive.store_dataset(pydicom.dcmread(path))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study_uid in sweep_once(rt.session_factory, 0)
    return study_uid


def _study_and_runs(rt: Runtime, study_uid: str) -> tuple[StudyState, list[tuple[int, str]]]:
    """The study's state and its runs as (revision, flow run id)."""
    with session_scope(rt.session_factory, readonly=True) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
        runs = session.scalars(select(TriageRun).where(TriageRun.study_id == study.id)).all()
        return study.state, [(r.revision, r.flow_run_id) for r in runs]


def test_study_waits_while_prefect_is_down_and_is_dispatched_when_it_is_back(prefect_server, flow_settings, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deployment import register_deployment
    from pipeline.triage.dispatch import Dispatcher

    register_deployment()
    rt = Runtime.from_settings(flow_settings)
    study_uid = _stable_study(rt, tmp_path, seed=11)
    dispatcher = Dispatcher(rt)

    prefect_server.stop()
    assert dispatcher.dispatch_pending() == []
    assert not dispatcher.api_available
    state, runs = _study_and_runs(rt, study_uid)
    assert state == StudyState.stable and runs == []

    prefect_server.start()
    # A server that just came up may refuse a first call while it settles; the loop retries.
    assert _eventually(dispatcher.dispatch_pending) == [study_uid]
    state, runs = _study_and_runs(rt, study_uid)
    assert state == StudyState.dispatched
    assert [revision for revision, _ in runs] == [1]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(runs[0][1])
    assert flow_run.parameters["study_uid"] == study_uid and flow_run.parameters["revision"] == 1
    assert [m["model_name"] for m in flow_run.parameters["models"]] == ["head_ct_hemorrhage"]
    assert flow_run.work_queue_name == "routine"
    assert flow_run.state.is_scheduled()
    # Nothing more to dispatch: the study left the outbox.
    assert dispatcher.dispatch_pending() == []


def test_a_crash_between_the_api_call_and_the_commit_does_not_dispatch_twice(prefect_server, flow_settings, tmp_path):
    from flows.deployment import register_deployment
    from pipeline.triage.dispatch import Dispatcher

    register_deployment()
    rt = Runtime.from_settings(flow_settings)
    study_uid = _stable_study(rt, tmp_path, seed=12)
    dispatcher = Dispatcher(rt)
    assert dispatcher.dispatch_pending() == [study_uid]
    _, runs = _study_and_runs(rt, study_uid)
    first_flow_run = runs[0][1]

    # Undo the commit, as if the process had died right after Prefect answered.
    with session_scope(rt.session_factory) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
        session.execute(delete(TriageRun).where(TriageRun.study_id == study.id))
        study.set_state(StudyState.stable)

    assert dispatcher.dispatch_pending() == [study_uid]
    _, runs = _study_and_runs(rt, study_uid)
    assert runs == [(1, first_flow_run)]


def test_the_same_study_in_a_rebuilt_index_gets_a_flow_run_of_its_own(prefect_server, flow_settings, tmp_path):
    """A second index (or a rebuilt one) on the same Prefect server must not be handed the
    old, finished flow run of a study UID it sees again: its study would stay dispatched."""
    from datetime import timedelta

    from flows.deployment import register_deployment
    from pipeline.triage.dispatch import Dispatcher

    register_deployment()
    rt = Runtime.from_settings(flow_settings)
    study_uid = _stable_study(rt, tmp_path, seed=14)
    dispatcher = Dispatcher(rt)
    assert dispatcher.dispatch_pending() == [study_uid]
    _, [(_, first_flow_run)] = _study_and_runs(rt, study_uid)

    # The index rebuilt: the study row and its runs are new, received again later.
    with session_scope(rt.session_factory) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
        session.execute(delete(TriageRun).where(TriageRun.study_id == study.id))
        study.first_received_at = study.first_received_at + timedelta(hours=1)
        study.set_state(StudyState.stable)

    assert dispatcher.dispatch_pending() == [study_uid]
    _, runs = _study_and_runs(rt, study_uid)
    assert [revision for revision, _ in runs] == [1] and runs[0][1] != first_flow_run


def test_a_run_that_died_with_its_process_is_dispatched_again_at_start(prefect_server, flow_settings, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.deployment import register_deployment
    from pipeline.triage.dispatch import Dispatcher, recover_interrupted

    register_deployment()
    rt = Runtime.from_settings(flow_settings)
    study_uid = _stable_study(rt, tmp_path, seed=13)
    dispatcher = Dispatcher(rt)
    assert dispatcher.dispatch_pending() == [study_uid]
    _, [(_, flow_run_id)] = _study_and_runs(rt, study_uid)

    # Scheduled runs are left for a worker.
    assert recover_interrupted(rt.session_factory, running_is_stale_after=0) == []
    # The worker that was running it died (kill -9): Prefect still says Running.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(), force=True)
    assert recover_interrupted(rt.session_factory, running_is_stale_after=3600) == []
    assert recover_interrupted(rt.session_factory, running_is_stale_after=0) == [study_uid]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_crashed()

    assert dispatcher.dispatch_pending() == [study_uid]
    state, runs = _study_and_runs(rt, study_uid)
    assert state == StudyState.dispatched
    assert [revision for revision, _ in runs] == [1, 2] and runs[1][1] != flow_run_id
