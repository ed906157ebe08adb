"""The AI queue with real Prefect flow runs: a bleed sent after a backlog overtakes the
routine studies queued ahead of it, and what no model reads never enters the queue."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pipeline.index.db import session_scope
from pipeline.index.schema import Study
from pipeline.index.triage import TriageRun, WorklistEntry, queue_positions
from pipeline.lab.phantom.generator import volume_generator
from pipeline.lab.synth import synth_study
from pipeline.triage.runtime import Runtime, set_runtime
from pipeline.triage.stability import sweep_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a Prefect server and a model


def _store(rt: Runtime, files: list[Path], **attributes: str) -> str:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        rt.archive.store_dataset(ds)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _head_ct(tmp_path: Path, seed: int, finding: str = "none") -> list[Path]:
    """80 mm of a head CT as the model is made for: the head's whole width at 0.9 mm (128
    pixels at synth's default 0.45 mm would be a 58 mm crop of brain with no skull in it)."""
    return synth_study(
        tmp_path / f"ct{seed}",
        seed=seed,
        slices=16,
        rows=256,
        cols=256,
        spacing_zyx=(5.0, 0.9, 0.9),
        volume=volume_generator(finding),
    )


def _wait(check, timeout: float = 120.0):
    import time

    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


def test_a_bleed_sent_after_a_backlog_is_analysed_before_the_routine_studies_queued_ahead_of_it(
    prefect_server, flow_settings, tmp_path: Path
) -> None:
    from flows.deployment import ensure_inference_limit, register_deployment
    from flows.worker import InProcessWorker
    from pipeline.triage.dispatch import Dispatcher

    deployment_id = register_deployment()
    ensure_inference_limit(1)
    rt = Runtime.from_settings(flow_settings)
    set_runtime(rt)
    dispatcher = Dispatcher(rt)
    worker = InProcessWorker(deployment_id, gate=rt.inference_gate, max_parallel=2, poll_interval=0.5)
    try:
        # The backlog: studies no model reads (single images, a chest CT) and routine head CTs.
        unreadable = [
            _store(rt, synth_study(tmp_path / f"cr{i}", seed=60 + i, slices=1, rows=32, cols=32)) for i in range(4)
        ]
        routine = [_store(rt, _head_ct(tmp_path, 70 + i)) for i in range(3)]
        sweep_once(rt.session_factory, 0)
        with rt.inference_gate.slot("a long inference"):  # the model is busy: the backlog waits in Prefect
            worker.start()
            assert sorted(dispatcher.dispatch_pending()) == sorted(routine)
            bleed = _store(rt, _head_ct(tmp_path, 80, "hemorrhage"), RequestedProcedurePriority="STAT")
            sweep_once(rt.session_factory, 0)
            assert dispatcher.dispatch_pending() == [bleed]  # created last, after the routine runs
            with session_scope(rt.session_factory, readonly=True) as session:
                ids = dict(session.execute(select(Study.StudyInstanceUID, Study.id)).all())
                positions = queue_positions(session)
            assert [
                uid for uid, _ in sorted(((u, positions[ids[u]]) for u in [bleed, *routine]), key=lambda x: x[1])
            ] == [
                bleed,
                *routine,
            ]
        # The model is free: the worker takes the most urgent run first, then the oldest.

        def all_done():
            with session_scope(rt.session_factory, readonly=True) as session:
                rows = session.execute(
                    select(Study.StudyInstanceUID, TriageRun.started_at, TriageRun.flow_run_id, WorklistEntry)
                    .join(TriageRun, TriageRun.study_id == Study.id)
                    .join(WorklistEntry, WorklistEntry.study_id == Study.id)
                ).all()
                done = {r[0]: r for r in rows if r[3].ai_status.value in ("done", "failed", "not_applicable")}
                return done if len(done) == len(unreadable) + len(routine) + 1 else None

        done = _wait(all_done)
    finally:
        worker.stop()
        set_runtime(None)

    for uid in unreadable:
        _, _, flow_run_id, entry = done[uid]
        assert entry.ai_status.value == "not_applicable" and flow_run_id == "", entry.summary
        assert entry.summary.startswith("No AI model applies"), entry.summary
    started = sorted([bleed, *routine], key=lambda uid: done[uid][1])
    assert started == [bleed, *routine], "the bleed first, then the routine studies oldest first"
    assert all(done[uid][3].ai_status.value == "done" for uid in started)
    assert done[bleed][3].priority in ("critical", "urgent")
