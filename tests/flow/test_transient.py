"""A busy index or a full disk is retried, not reported as "AI failed".

The index is real SQLite with a short busy timeout; another connection holds its write
lock the way a long transaction of another process would.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest

from pipeline.errors import TransientError
from pipeline.index import db
from pipeline.index.db import session_scope
from pipeline.lab.synth import synth_study
from pipeline.triage import steps
from pipeline.triage.runtime import Runtime, set_runtime
from pipeline.web.worklist import get_worklist_item


def _runtime_with_study(flow_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Runtime, str]:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # give up on the lock quickly
    (tmp_path / "no-models").mkdir()
    settings = flow_settings.model_copy(
        update={"models": flow_settings.models.model_copy(update={"dir": tmp_path / "no-models"})}
    )
    runtime = Runtime.from_settings(settings)
    files = synth_study(tmp_path / "study", seed=404, slices=3, rows=32, cols=32)
    for path in files:
        runtime.archive.store_dataset(pydicom.dcmread(path))
    return runtime, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


SQLITE_LOCK = pytest.mark.sqlite_only(
    reason="holds SQLite's write lock; on PostgreSQL writers wait on row locks, there is no busy timeout"
)


def _hold_write_lock(runtime: Runtime) -> sqlite3.Connection:
    holder = sqlite3.connect(runtime.engine.url.database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long writer elsewhere holds it
    return holder


@SQLITE_LOCK
def test_a_locked_index_is_a_transient_error(flow_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, study_uid = _runtime_with_study(flow_settings, tmp_path, monkeypatch)
    holder = _hold_write_lock(runtime)
    try:
        with pytest.raises(TransientError, match="index busy"):
            steps.begin_run(runtime, study_uid, 1)
    finally:
        holder.rollback()
        holder.close()
    steps.begin_run(runtime, study_uid, 1)  # and it passes once the lock is gone


def test_a_full_disk_is_a_transient_error_and_other_os_errors_are_not() -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def missing() -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    with pytest.raises(TransientError, match="disk full"):
        steps.transient_resources(full)()
    with pytest.raises(FileNotFoundError):
        steps.transient_resources(missing)()


@SQLITE_LOCK
@pytest.mark.slow
def test_the_flow_retries_while_the_index_is_locked_and_the_study_is_not_failed(
    prefect_server, flow_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.triage import triage_study

    runtime, study_uid = _runtime_with_study(flow_settings, tmp_path, monkeypatch)
    set_runtime(runtime)
    holder = _hold_write_lock(runtime)
    release = threading.Timer(2.5, lambda: (holder.rollback(), holder.close()))
    release.start()
    try:
        outcome = triage_study(study_uid=study_uid, revision=1)
    finally:
        release.join()
        set_runtime(None)
    # Not "failed": with no model installed, no model applies.
    assert outcome["ai_status"] == "not_applicable"
    with session_scope(runtime.session_factory, readonly=True) as session:
        item = get_worklist_item(session, study_uid)
    assert item.ai_status == "not_applicable" and item.ai_error == ""
    assert item.summary == "No AI model applies"
