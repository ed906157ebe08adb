"""Study state in the index: stability sweep, late instances, derived results,
restarts, crash recovery of the archive."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.archive.header import InvalidUIDError, validate_uid
from pipeline.config import Settings
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance, Series, SeriesOrigin, Study, StudyState, utcnow
from pipeline.triage.stability import sweep_once
from tests.core.conftest import make_settings


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    settings = make_settings(tmp_path)
    migrate(settings.index_url)
    return Archive(settings)


def _store_files(archive: Archive, files: list[Path]) -> None:
    for path in files:
        archive.store_dataset(dcmread(path))


def _study(archive: Archive) -> Study:
    with session_scope(archive.session_factory, readonly=True) as session:
        return session.scalars(select(Study)).one()


def test_quiet_study_turns_stable_and_late_instance_returns_it(archive: Archive, study_files: list[Path]) -> None:
    _store_files(archive, study_files[:5])
    study = _study(archive)
    assert study.state == StudyState.received
    # not quiet long enough yet
    assert sweep_once(archive.engine, 60, now=study.last_received_at + timedelta(seconds=59)) == []
    later = study.last_received_at + timedelta(seconds=61)
    assert sweep_once(archive.session_factory, 60, now=later) == [study.StudyInstanceUID]
    assert _study(archive).state == StudyState.stable
    assert sweep_once(archive.session_factory, 60, now=later) == []  # idempotent
    # a late instance returns it to received
    archive.store_dataset(dcmread(study_files[5]))
    again = _study(archive)
    assert again.state == StudyState.received and again.last_received_at > study.last_received_at
    assert again.NumberOfStudyRelatedInstances == 6


def test_state_survives_a_restart(tmp_path: Path, study_files: list[Path]) -> None:
    settings = make_settings(tmp_path)
    migrate(settings.index_url)
    first = Archive(settings)
    _store_files(first, study_files[:2])
    sweep_once(first.engine, 0, now=utcnow() + timedelta(seconds=1))
    first.engine.dispose()
    migrate(settings.index_url)  # a second start migrates again: a no-op
    second = Archive(Settings.model_validate(settings.model_dump()))
    assert _study(second).state == StudyState.stable


def test_derived_objects_do_not_retrigger_analysis(archive: Archive, study_files: list[Path]) -> None:
    _store_files(archive, study_files[:3])
    study = _study(archive)
    sweep_once(archive.engine, 0, now=study.last_received_at + timedelta(seconds=1))
    with session_scope(archive.session_factory) as session:
        session.scalars(select(Study)).one().set_state(StudyState.analysed)
    result = dcmread(study_files[0])  # stands in for an AI SEG: same study, new series
    result.SeriesInstanceUID = generate_uid()
    result.SOPInstanceUID = generate_uid()
    result.Modality = "SEG"
    stored = archive.store_dataset(result, derived=True)
    after = _study(archive)
    assert after.state == StudyState.analysed
    assert after.last_received_at == study.last_received_at
    assert after.NumberOfStudyRelatedInstances == 4 and after.NumberOfStudyRelatedSeries == 2
    assert after.ModalitiesInStudy == "CT"  # from received series only
    with session_scope(archive.session_factory, readonly=True) as session:
        origin = session.scalar(select(Series.origin).where(Series.SeriesInstanceUID == result.SeriesInstanceUID))
    assert origin == SeriesOrigin.derived
    assert dcmread(stored.path).SeriesInstanceUID == result.SeriesInstanceUID
    assert archive.series_files(result.SeriesInstanceUID) == [stored.path]


def test_recovery_removes_partial_files_and_indexes_renamed_ones(archive: Archive, study_files: list[Path]) -> None:
    _store_files(archive, study_files[:2])
    kept = archive.path_of(dcmread(study_files[0]).SOPInstanceUID)
    folder = kept.parent
    # a crash mid-write leaves a temp file; a crash between rename and commit, an unindexed file
    (folder / f".{kept.name}.deadbeef.tmp").write_bytes(b"partial")
    (archive.incoming_dir / "0123abcd.tmp").write_bytes(b"partial")
    unindexed = dcmread(study_files[2])
    shutil.copy(study_files[2], folder / f"{unindexed.SOPInstanceUID}.dcm")
    # a derived result renamed but not indexed stays derived
    derived = dcmread(study_files[3])
    derived.SeriesInstanceUID = generate_uid()
    stored = archive.store_dataset(derived, derived=True)
    with session_scope(archive.session_factory) as session:
        row = session.scalars(select(Instance).where(Instance.SOPInstanceUID == derived.SOPInstanceUID)).one()
        session.delete(row)
    assert archive.recover() == (2, 2)
    assert not list(folder.glob("*.tmp")) and not list(archive.incoming_dir.iterdir())
    assert archive.path_of(unindexed.SOPInstanceUID) == folder / f"{unindexed.SOPInstanceUID}.dcm"
    assert archive.path_of(derived.SOPInstanceUID) == stored.path
    assert _study(archive).state == StudyState.received
    with session_scope(archive.session_factory, readonly=True) as session:
        assert session.scalar(select(func.count(Instance.id))) == 4
    assert archive.recover() == (0, 0)


@pytest.mark.parametrize(
    "bad", ["", "1", "1.2.", ".1.2", "1..2", "1.2.03", "1.2.a", "../1.2", "1.2/3", "1.2.3\\4", "1." + "9" * 63]
)
def test_invalid_uids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(bad, "SOPInstanceUID")


def test_valid_uids_pass() -> None:
    for good in ["1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1.2.3.0.4", "1." + "9" * 62]:
        assert validate_uid(good, "SOPInstanceUID") == good
