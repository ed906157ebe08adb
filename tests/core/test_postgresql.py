"""The archive on a real PostgreSQL index: migrations, the receiver, the stability sweep,
the worklist and C-FIND, as they run on SQLite (the scale-out configuration)."""

from __future__ import annotations

import subprocess
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
