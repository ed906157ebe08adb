"""The archive on a real PostgreSQL index: migrations, the receiver, the stability sweep,
the worklist and C-FIND, as they run on SQLite (the scale-out configuration)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.dicom.receiver import start_receiver
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance, Study, StudyState
from pipeline.triage.stability import sweep_once
from pipeline.web.worklist import get_worklist_item, list_worklist, set_read
from tests.core.conftest import ENV, HOST, statuses, storescu
from tests.peers.postgres import PostgresServer

pytestmark = pytest.mark.slow  # a PostgreSQL server


def test_migrations_on_postgresql_match_the_models(postgres: PostgresServer) -> None:
    from tests.schema import drift_after_migrations

    diffs = drift_after_migrations(postgres.database(), times=2)  # twice: idempotent
    assert diffs == []


def test_receive_sweep_worklist_and_find_on_postgresql(
    postgres: PostgresServer, tmp_path: Path, study_files: list[Path]
) -> None:
    peers = [{"ae_title": "FINDSCU", "host": HOST, "port": 104, "allow": ["query"]}]
    settings = Settings(
        storage={"data_dir": tmp_path / "data"},
        index={"url": postgres.database()},
        dicom={"bind": HOST, "port": 0, "allowed_aes": ["*"], "peers": peers},
        triage={"enabled": False},
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)
    port = int(server.server_address[1])
    try:
        assert statuses(storescu(port, *study_files)) == [0] * len(study_files)
        assert statuses(storescu(port, study_files[0])) == [0]  # a resend is stored once
        with session_scope(archive.session_factory, readonly=True) as session:
            assert session.scalar(select(func.count(Instance.id))) == len(study_files)
            study = session.scalars(select(Study)).one()
            assert study.NumberOfStudyRelatedInstances == len(study_files)
        assert sweep_once(archive.session_factory, 0) == [study.StudyInstanceUID]
        assert sweep_once(archive.session_factory, 0) == []
        with session_scope(archive.session_factory, readonly=True) as session:
            assert session.scalars(select(Study)).one().state == StudyState.stable
            [item] = list_worklist(session)
        assert item.StudyInstanceUID == study.StudyInstanceUID and item.ai_status == "pending"
        assert set_read(archive.session_factory, study.StudyInstanceUID, "alice", True).read_by == "alice"
        with session_scope(archive.session_factory, readonly=True) as session:
            assert get_worklist_item(session, study.StudyInstanceUID).read
        found = subprocess.run(
            ["findscu", "-S", "-aet", "FINDSCU", "-aec", "RADTRIAGE", "-k", "QueryRetrieveLevel=STUDY",
             "-k", "PatientName=*", "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances", HOST, str(port)],
            env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        assert study.StudyInstanceUID in found.stdout + found.stderr
    finally:
        server.shutdown()
        archive.engine.dispose()


# Each process imports first, says it is ready, then migrates when the test says go: the
# migrations themselves start together, as when serve and workers start at once.
_MIGRATE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from pipeline.index.db import migrate
folder, url = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
migrate(url)
"""


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_processes_migrating_an_empty_database_at_once_all_succeed(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    """Serve, workers and the CLI all migrate at start: on an empty database they take
    turns (PostgreSQL: an advisory lock; SQLite: its write lock) instead of racing to
    create the same tables, which failed one of them about every other time."""
    import sys

    from tests.schema import drift_after_migrations

    processes = 3
    if database == "postgresql":
        url = request.getfixturevalue("postgres").database()
    else:
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_WHEN_TOLD, str(tmp_path), url, str(n)],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(processes)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < processes:
            assert time.monotonic() < deadline, "the migrating processes never got ready"
            assert all(child.poll() is None for child in children), [c.communicate()[0] for c in children]
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outputs = [child.communicate(timeout=120)[0] for child in children]
    finally:
        for child in children:
            child.kill()
    assert [child.returncode for child in children] == [0] * processes, "\n".join(outputs)
    assert drift_after_migrations(url) == []


def test_two_archives_adding_series_to_one_study_at_once_count_them_all(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Two receiver hosts on one index, each storing new series of the same study: the
    study's counts (C-FIND's NumberOfStudyRelated*) include every one. At READ COMMITTED
    this needs the study row locked while its counters are read and written back; with
    a plain read about half the counts were lost."""
    import copy
    import threading

    import pydicom
    from pydicom.uid import generate_uid

    from pipeline.index.schema import Series
    from pipeline.lab.synth import synth_study

    settings = Settings(storage={"data_dir": tmp_path / "data", "fsync": False}, index={"url": postgres.database()})
    migrate(settings.index_url)
    archives = [Archive(settings), Archive(settings)]
    first = pydicom.dcmread(synth_study(tmp_path / "study", seed=1, slices=1, rows=16, cols=16)[0])
    archives[0].store_dataset(first)
    per_archive = 20
    errors: list[BaseException] = []

    def add_series(archive: Archive) -> None:
        try:
            for _ in range(per_archive):
                ds = copy.deepcopy(first)
                ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
                archive.store_dataset(ds)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=add_series, args=(archive,)) for archive in archives]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        with session_scope(archives[0].session_factory, readonly=True) as session:
            study = session.scalars(select(Study)).one()
            assert session.scalar(select(func.count(Series.id))) == 1 + 2 * per_archive
            assert study.NumberOfStudyRelatedSeries == 1 + 2 * per_archive
            assert study.NumberOfStudyRelatedInstances == 1 + 2 * per_archive
    finally:
        for archive in archives:
            archive.engine.dispose()
