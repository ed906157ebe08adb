"""Planning at dispatch, without Prefect: what no model reads never costs a flow run, and
the AI queue's order follows the configured priority rules."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import encode
from sqlalchemy import select

from flows.engine import use_api_url
from pipeline.config import load_settings
from pipeline.index.db import session_scope
from pipeline.index.schema import Study, StudyState
from pipeline.index.triage import TriageRun, WorklistEntry
from pipeline.lab.synth import synth_study
from pipeline.triage.dispatch import Dispatcher
from pipeline.triage.gate import InferenceGate
from pipeline.triage.runtime import Runtime
from pipeline.triage.stability import sweep_once

CONFIG = Path(__file__).resolve().parents[2] / "config" / "default.toml"


def _store(rt: Runtime, files: list[Path], *, source_ae: str | None = None, **attributes: str) -> str:
    """Store a study as a sender would (``source_ae``: the calling AE title), with extra attributes."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        if source_ae is None:
            rt.archive.store_dataset(ds)
            continue
        # The encoded dataset, as a C-STORE carries it (explicit VR little endian).
        rt.archive.store_encoded(
            encode(ds, False, True),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            source_ae=source_ae,
        )
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _head_ct(tmp_path: Path, seed: int, **kw) -> list[Path]:
    return synth_study(tmp_path / f"ct{seed}", seed=seed, slices=16, rows=32, cols=32, **kw)


@pytest.fixture
def dead_prefect_api():
    """A Prefect API nobody listens on: any call the dispatcher made to Prefect would fail."""
    import os

    before = os.environ.get("PREFECT_API_URL")
    use_api_url("http://127.0.0.1:9/api")
    yield
    if before is not None:
        use_api_url(before)
    else:
        os.environ.pop("PREFECT_API_URL", None)
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def test_a_study_no_model_reads_is_not_applicable_at_once_without_a_flow_run(
    flow_settings, tmp_path: Path, dead_prefect_api
) -> None:
    rt = Runtime.from_settings(flow_settings)
    single = _store(rt, synth_study(tmp_path / "single", seed=21, slices=1, rows=32, cols=32))
    chest = _store(rt, _head_ct(tmp_path, 22, BodyPartExamined="CHEST", StudyDescription="CT CHEST"))
    head = _store(rt, _head_ct(tmp_path, 23))
    assert set(sweep_once(rt.session_factory, 0)) == {single, chest, head}

    dispatcher = Dispatcher(rt)
    assert dispatcher.dispatch_pending() == []  # the head CT needs Prefect, which is down
    assert not dispatcher.api_available

    with session_scope(rt.session_factory, readonly=True) as session:
        rows = {
            s.StudyInstanceUID: (s.state, e.ai_status.value if e else None, e.summary if e else "")
            for s, e in session.execute(
                select(Study, WorklistEntry).outerjoin(WorklistEntry, WorklistEntry.study_id == Study.id)
            )
        }
        runs = {
            r.study.StudyInstanceUID: (r.flow_run_id, r.status.value) for r in session.scalars(select(TriageRun)).all()
        }
    assert rows[single][:2] == (StudyState.analysed, "not_applicable")
    assert rows[chest][:2] == (StudyState.analysed, "not_applicable")
    assert "1 slices < 16" in rows[single][2], rows[single]
    assert "BodyPartExamined CHEST" in rows[chest][2], rows[chest]
    # No flow run: a revision is recorded without one; the head CT still waits for Prefect.
    assert runs == {single: ("", "done"), chest: ("", "done")}
    assert rows[head][0] == StudyState.stable


def test_priority_rules_from_the_config_place_studies_in_the_queue(
    flow_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = [
        {"level": "urgent", "calling_ae": ["ed_ct1"]},
        {"level": "critical", "requested_procedure_priority": ["STAT"], "body_part_examined": ["HEAD"]},
        {"level": "urgent", "institutional_department_name": "emergency"},
        {"level": "urgent", "model": ["no_such_model"]},
    ]
    monkeypatch.setenv("RADTRIAGE_TRIAGE__PRIORITY_RULES", json.dumps(rules))
    rt = Runtime.from_settings(load_settings(CONFIG))
    studies = {
        "routine": _store(rt, _head_ct(tmp_path, 31)),
        "from ED scanner": _store(rt, _head_ct(tmp_path, 32), source_ae="ED_CT1"),
        "stat": _store(rt, _head_ct(tmp_path, 33), RequestedProcedurePriority="STAT"),
        "department": _store(rt, _head_ct(tmp_path, 34), InstitutionalDepartmentName="Adult Emergency"),
    }
    sweep_once(rt.session_factory, 0)

    planned = {p.study_uid: p.urgency for p in Dispatcher(rt).plan_pending()}
    got = {name: (planned[uid].level.value, planned[uid].reason) for name, uid in studies.items()}
    assert got == {
        "routine": ("routine", ""),
        "from ED scanner": ("urgent", "urgent: calling_ae=ED_CT1"),
        "stat": ("critical", "critical: body_part_examined=HEAD requested_procedure_priority=STAT"),
        "department": ("urgent", "urgent: institutional_department_name=emergency"),
    }


def test_the_gate_serves_the_most_urgent_waiter_first_then_in_arrival_order() -> None:
    gate = InferenceGate(1)
    served: list[str] = []

    def wait(name: str, rank: int) -> None:
        with gate.slot(name, rank):
            served.append(name)

    with gate.slot("running"):
        threads = []
        for name, rank in [("routine-1", 0), ("routine-2", 0), ("critical", 2), ("urgent", 1)]:
            threads.append(threading.Thread(target=wait, args=(name, rank)))
            threads[-1].start()
            while gate.committed < len(threads) + 1:  # each is waiting before the next comes
                time.sleep(0.001)
        assert gate.free() == 0 and not gate.reserve("one more")
    for thread in threads:
        thread.join(5)
    assert served == ["critical", "urgent", "routine-1", "routine-2"]
    assert gate.reserve("next") and gate.free() == 0
    gate.cancel("next")
    assert gate.free() == 1
