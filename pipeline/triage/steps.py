"""The steps of triaging one study, as plain functions over the index and archive.

``flows/triage.py`` wraps each in a Prefect task; they take and return UIDs, paths and
small dicts, never arrays. Every step is idempotent for a given study revision, so a
retried task or a re-run flow creates nothing twice.

A busy or locked index, a lost database connection and a full disk are
:class:`~pipeline.errors.TransientError` (see :func:`transient_resources`): the flow
retries the step with backoff instead of marking the study AI failed.

Isolation: READ COMMITTED (PostgreSQL's default) is what the steps need, with workers on
several machines and receivers writing the same studies: each step that writes locks
the study row first (``_study(..., lock=True)``, see :class:`~pipeline.index.schema.Study`),
so a late instance's reopening and a step's "still the dispatched revision?" check take
turns; a deadlock or serialization failure is transient and the step is retried.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import pydicom
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from pipeline.ai.findings import Priority, findings_summary
from pipeline.errors import PermanentError, TransientError
from pipeline.index.db import is_transient
from pipeline.index.schema import Study, StudyState, utcnow
from pipeline.index.triage import AIFinding, AIResult, AIStatus, RunStatus, TriageRun, worklist_entry
from pipeline.triage.planning import PlannedModel, plan_study, series_by_study
from pipeline.triage.runtime import Runtime

log = logging.getLogger(__name__)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
P = ParamSpec("P")
R = TypeVar("R")


def transient_resources(step: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors of a busy or full machine into :class:`TransientError` (retried).

    The index (locked, busy, connection lost: :func:`pipeline.index.db.is_transient`)
    and the disk (no space) recover by themselves; anything else is left as it is.
    """

    @functools.wraps(step)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except DBAPIError as err:
            if is_transient(err):
                raise TransientError(f"index busy or unavailable, retrying: {err.orig}") from err
            raise
        except OSError as err:
            if err.errno in _NO_SPACE:
                raise TransientError(f"disk full, retrying once space is freed: {err}") from err
            raise

    return wrapper


def _study(session, study_uid: str, *, lock: bool = False) -> Study:
    """The study; with ``lock``, its row locked until commit, for a transaction that reads
    its state and writes from it (see :class:`~pipeline.index.schema.Study`)."""
    query = select(Study).where(Study.StudyInstanceUID == study_uid)
    study = session.scalar(query.with_for_update() if lock else query)
    if study is None:
        raise PermanentError(f"study {study_uid} is not in the index")
    return study


@transient_resources
def begin_run(rt: Runtime, study_uid: str, revision: int, flow_run_id: str = "") -> int:
    """Mark the run and the worklist entry as running; return the run's urgency rank
    (its turn at the inference slots)."""
    from pipeline.index.db import session_scope

    with session_scope(rt.session_factory) as session:
        study = _study(session, study_uid, lock=True)
        run = session.scalar(select(TriageRun).where(TriageRun.study_id == study.id, TriageRun.revision == revision))
        now = utcnow()
        if run is None:  # the flow was called directly (tests, a notebook), not dispatched: record it anyway
            run = TriageRun(
                study_id=study.id, revision=revision, last_received_at=study.last_received_at, dispatched_at=now
            )
            session.add(run)
        run.status = RunStatus.running
        run.started_at = now
        if flow_run_id:
            run.flow_run_id = flow_run_id
        entry = worklist_entry(session, study.id)
        entry.ai_status = AIStatus.running
        entry.ai_error = ""
        entry.updated_at = now
        return run.urgency_rank or 0


@transient_resources
def plan_models(rt: Runtime, study_uid: str) -> list[PlannedModel]:
    """Every available model whose series rules match a received series of the study.

    The dispatcher plans the same way and passes its plan to the flow; this is for a
    flow run started without one (a notebook, ``prefect deployment run``).
    """
    from pipeline.index.db import session_scope

    with session_scope(rt.session_factory, readonly=True) as session:
        study = _study(session, study_uid)
        series = series_by_study(session, [study.id])[study.id]
    return list(plan_study(series, rt.registry.available).models)


@transient_resources
def run_inference(
    rt: Runtime, study_uid: str, revision: int, model_name: str, series_uid: str
) -> tuple[Path, dict[str, float]]:
    """Load the series as a volume, run the model, and save the result next to the archive.

    Returns the result file and the seconds spent loading and inferring.
    """
    from pipeline.ai.inference import run_model
    from pipeline.ai.result_file import save_model_result
    from pipeline.ai.volume import load_volume

    model = rt.registry.get(model_name)
    t0 = time.perf_counter()
    volume = load_volume(rt.archive.series_files(series_uid))
    t1 = time.perf_counter()
    result = run_model(model, volume, device=rt.settings.models.device)
    t2 = time.perf_counter()
    path = work_dir(rt, study_uid, revision) / f"{model.name}-{model.version}.npz"
    save_model_result(result, path)
    return path, {"volume_load": t1 - t0, "inference": t2 - t1}


def work_dir(rt: Runtime, study_uid: str, revision: int) -> Path:
    return Path(rt.settings.storage.data_dir) / "work" / study_uid / str(revision)


@transient_resources
def store_results(rt: Runtime, study_uid: str, revision: int, result_path: Path) -> dict[str, object]:
    """Write SEG and TID 1500 SR for a saved result, archive them, record them, queue forwards.

    Idempotent: the UIDs are derived from study, model version and revision, the archive
    stores a SOP Instance once, and the result row is unique per revision and model.
    """
    from pipeline.ai.result_file import load_model_result
    from pipeline.forward import enqueue_forwards
    from pipeline.index.db import session_scope
    from pipeline.results import build_seg, build_sr, result_uids

    result = load_model_result(result_path)
    t0 = time.perf_counter()
    sources = [
        pydicom.dcmread(rt.archive.path_of(uid), stop_before_pixels=True) for uid in result.source_sop_instance_uids
    ]
    uids = result_uids(study_uid, result.model.name, result.model.version, revision)
    seg = build_seg(
        sources, result, rt.settings.results, series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop
    )
    sr = build_sr(
        sources, seg, result, rt.settings.results, series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_sop
    )
    t1 = time.perf_counter()
    rt.archive.store_dataset(seg, derived=True)
    rt.archive.store_dataset(sr, derived=True)
    t2 = time.perf_counter()
    with session_scope(rt.session_factory) as session:
        study = _study(session, study_uid, lock=True)  # get-or-create rows of this study
        row = _result_row(session, study, revision, result.model.name, result.model.version)
        row.SourceSeriesInstanceUID = result.series_instance_uid
        row.SegSOPInstanceUID = uids.seg_sop
        row.SRSOPInstanceUID = uids.sr_sop
        row.ok, row.error = True, ""
        row.priority = result.priority.value
        row.findings = [
            AIFinding(
                label=f.label,
                present=f.present,
                probability=f.probability,
                volume_ml=f.volume_ml,
                max_diameter_mm=f.max_diameter_mm,
                priority=Priority(f.priority).value,
                segment_number=i + 1,
                key_sop_instance_uid=_key_image(result.source_sop_instance_uids, f.mask),
            )
            for i, f in enumerate(result.findings)
        ]
        worklist_entry(session, study.id).results_stored_at = utcnow()
        destinations = rt.settings.forward.destinations
        enqueue_forwards(session, uids.seg_sop, "SEG", destinations)
        enqueue_forwards(session, uids.sr_sop, "SR", destinations)
    if destinations and rt.on_results_stored is not None:
        rt.on_results_stored()
    return {
        "seg": uids.seg_sop,
        "sr": uids.sr_sop,
        "priority": result.priority.value,
        "timings": {"writing": t1 - t0, "storing": t2 - t1},
    }


def _result_row(session, study: Study, revision: int, model_name: str, model_version: str) -> AIResult:
    """The result row of one model on one study revision, created when missing (idempotent)."""
    row = session.scalar(
        select(AIResult).where(
            AIResult.study_id == study.id,
            AIResult.revision == revision,
            AIResult.model_name == model_name,
            AIResult.model_version == model_version,
        )
    )
    if row is None:
        row = AIResult(study_id=study.id, revision=revision, model_name=model_name, model_version=model_version)
        session.add(row)
    return row


def _key_image(sop_uids: list[str], mask) -> str:
    """The source image on which the mask is largest (the first image when empty)."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    return sop_uids[int(areas.argmax())] if len(sop_uids) else ""


@transient_resources
def record_failure(rt: Runtime, study_uid: str, revision: int, model_name: str, model_version: str, error: str) -> None:
    """Record that a model could not analyse the study (shown on the worklist)."""
    from pipeline.index.db import session_scope

    with session_scope(rt.session_factory) as session:
        row = _result_row(session, _study(session, study_uid, lock=True), revision, model_name, model_version)
        row.ok, row.error = False, error[:2000]


@transient_resources
def finish_run(
    rt: Runtime, study_uid: str, revision: int, timings: dict[str, float] | None = None
) -> dict[str, object]:
    """Supersede older results, set the worklist priority and status, close the run.

    The study moves to ``analysed`` (or ``failed``) only if it is still the dispatched
    revision: a late instance that arrived meanwhile leaves it ``received``, and the
    next revision's results will supersede these.
    """
    from pipeline.index.db import session_scope

    with session_scope(rt.session_factory) as session:
        study = _study(session, study_uid, lock=True)  # its state decides the outcome below
        session.execute(
            update(AIResult)
            .where(AIResult.study_id == study.id, AIResult.revision < revision, AIResult.superseded.is_(False))
            .values(superseded=True)
        )
        results = session.scalars(
            select(AIResult).where(AIResult.study_id == study.id, AIResult.revision == revision)
        ).all()
        failures = [r for r in results if not r.ok]
        priority = Priority.highest([Priority(r.priority) for r in results if r.ok])
        now = utcnow()
        latest = _latest_revision(session, study.id) <= revision
        run = session.scalar(select(TriageRun).where(TriageRun.study_id == study.id, TriageRun.revision == revision))
        entry = worklist_entry(session, study.id)
        if not latest:
            # A newer revision was dispatched meanwhile: the worklist waits for its results.
            if run is not None:
                run.status, run.finished_at = (RunStatus.failed if failures else RunStatus.done), now
            log.info("study %s revision %d finished after a newer revision; worklist left to it", study_uid, revision)
            return {"priority": priority.value, "ai_status": entry.ai_status.value, "summary": entry.summary}
        entry.priority = priority.value
        entry.priority_rank = priority.rank
        entry.summary = _summary(results)
        if failures:
            entry.ai_status = AIStatus.failed
        else:
            # No result at all: no model read the study (planned in the flow, not at dispatch).
            entry.ai_status = AIStatus.done if results else AIStatus.not_applicable
        entry.ai_error = "; ".join(f"{r.model_name}: {r.error}" for r in failures)
        entry.updated_at = now
        entry.triaged_at = now
        if run is not None:
            run.status = RunStatus.failed if failures else RunStatus.done
            run.error = entry.ai_error
            run.finished_at = now
            all_timings = dict(json.loads(run.timings or "{}"))
            all_timings.update(timings or {})
            if run.stable_at is not None:
                all_timings["stability_wait"] = (run.stable_at - run.last_received_at).total_seconds()
                # Stable until the flow run began: dispatcher, worker claim, flow start.
                all_timings["dispatch"] = (run.started_at - run.stable_at).total_seconds() if run.started_at else 0.0
            run.timings = json.dumps(all_timings)
            entry.time_to_triage_seconds = (now - run.last_received_at).total_seconds()
        if study.state == StudyState.dispatched:
            study.set_state(StudyState.failed if failures else StudyState.analysed)
        return {"priority": priority.value, "ai_status": entry.ai_status.value, "summary": entry.summary}


def _latest_revision(session, study_id: int) -> int:
    runs = session.scalars(select(TriageRun.revision).where(TriageRun.study_id == study_id)).all()
    return max(runs, default=0)


def _summary(results: list[AIResult]) -> str:
    found = findings_summary(f for r in results for f in r.findings)
    if found:
        return found
    return "No AI finding" if any(r.ok for r in results) else ("AI failed" if results else "No AI model applies")
