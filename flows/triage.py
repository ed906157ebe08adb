"""Prefect flow ``triage-study``: from a stable study to SEG + SR, forwards and worklist.

Thin wiring over :mod:`pipeline.triage.steps`. Tasks pass UIDs and paths. Only
:class:`~pipeline.errors.TransientError` is retried, with backoff: a busy or locked
index, a lost database connection, a full disk, GPU out of memory. Anything else a
model raises is permanent for that study and shown on the worklist.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from pipeline.errors import TransientError, describe_error
from pipeline.triage import steps
from pipeline.triage.dispatch import FLOW_NAME
from pipeline.triage.runtime import get_runtime

log = logging.getLogger(__name__)


def inference_limit_name() -> str:
    """The Prefect global concurrency limit that guards model inference on this worker."""
    return os.environ.get("RADTRIAGE_INFERENCE_LIMIT", f"radtriage-inference-{socket.gethostname()}")


def _only_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is permanent: do not retry
        return False
    return False


_RETRIES: dict[str, Any] = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.2,
    retry_condition_fn=_only_transient,
)


@task(name="begin-run", **_RETRIES)
def begin_run(study_uid: str, revision: int) -> int:
    return steps.begin_run(get_runtime(), study_uid, revision, str(runtime.flow_run.id or ""))


@task(name="plan-models", **_RETRIES)
def plan_models(study_uid: str) -> list[dict[str, str]]:
    return [p.__dict__ for p in steps.plan_models(get_runtime(), study_uid)]


@task(name="run-inference", **_RETRIES)
def run_inference(
    study_uid: str, revision: int, model_name: str, series_uid: str, urgency_rank: int = 0
) -> tuple[str, dict[str, float]]:
    # The model step alone holds the scarce resource (GPU or CPU cores, model memory):
    # this process's slots first, in the queue's order (the worker claimed this run for
    # one of them), then the host's Prefect concurrency limit, which is then free.
    rt = get_runtime()
    t0 = time.perf_counter()
    with (
        rt.inference_gate.slot(str(runtime.flow_run.id or ""), urgency_rank),
        concurrency(inference_limit_name(), occupy=1),
    ):
        t1 = time.perf_counter()
        path, timings = steps.run_inference(rt, study_uid, revision, model_name, series_uid)
    return str(path), {**timings, "inference_wait": t1 - t0}


@task(name="store-results", **_RETRIES)
def store_results(study_uid: str, revision: int, result_path: str) -> dict[str, Any]:
    return steps.store_results(get_runtime(), study_uid, revision, Path(result_path))


@task(name="record-failure", **_RETRIES)
def record_failure(study_uid: str, revision: int, model_name: str, model_version: str, error: str) -> None:
    steps.record_failure(get_runtime(), study_uid, revision, model_name, model_version, error)


@task(name="finish-run", **_RETRIES)
def finish_run(study_uid: str, revision: int, timings: dict[str, float]) -> dict[str, Any]:
    return steps.finish_run(get_runtime(), study_uid, revision, timings)


@flow(name=FLOW_NAME, log_prints=False)
def triage_study(study_uid: str, revision: int = 1, models: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Analyse one study revision with every model that applies to it.

    ``models`` is the dispatcher's plan (model name and version, and the series each
    reads); without it the flow plans itself.
    """
    logger = get_run_logger()
    urgency_rank = begin_run(study_uid, revision)
    timings: dict[str, float] = {}
    planned_models = models
    if planned_models is None:
        try:
            planned_models = plan_models(study_uid)
        except Exception as err:  # noqa: BLE001 - e.g. the model registry cannot be read
            logger.error("cannot plan models for study %s: %s", study_uid, describe_error(err))
            record_failure(study_uid, revision, "radtriage", "-", describe_error(err))
            planned_models = []
    for planned in planned_models:
        name, version = planned["model_name"], planned["model_version"]
        try:
            path, step_timings = run_inference(study_uid, revision, name, planned["series_instance_uid"], urgency_rank)
            stored = store_results(study_uid, revision, path)
        except Exception as err:  # noqa: BLE001 - a model failure must not hide the study
            reason = describe_error(err)
            logger.error("model %s %s failed on study %s: %s", name, version, study_uid, reason)
            record_failure(study_uid, revision, name, version, reason)
            continue
        for key, seconds in [*step_timings.items(), *stored["timings"].items()]:
            timings[key] = timings.get(key, 0.0) + seconds
    return finish_run(study_uid, revision, timings)
