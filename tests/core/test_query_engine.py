"""The query engine on its own (SQLite): PS3.4 C.2.2.2 matching and the hierarchy rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, SegmentationStorage

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.db import migrate
from pipeline.index.query import (
    BadValueError,
    IdentifierError,
    InformationModel,
    Level,
    Query,
    find,
)

ROOT = "1.2.826.0.1.3680043.10.1234"
P_ROOT, S_ROOT = InformationModel.PATIENT_ROOT, InformationModel.STUDY_ROOT


def _instance(patient: tuple[str, str], study: str, series: str, sop: str, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = attrs.pop("SOPClassUID", CTImageStorage)
    ds.SOPInstanceUID = f"{ROOT}.3.{sop}"
    ds.StudyInstanceUID = f"{ROOT}.1.{study}"
    ds.SeriesInstanceUID = f"{ROOT}.2.{series}"
    ds.PatientName, ds.PatientID = patient
    ds.Modality = "CT"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """The same studies in a real SQLite index and a real PostgreSQL one: one engine, both SQLs."""
    tmp = tmp_path_factory.mktemp("query")
    url = request.getfixturevalue("postgres").database() if request.param == "postgresql" else ""
    settings = Settings(storage={"data_dir": tmp / "data", "fsync": False}, index={"url": url})
    migrate(settings.index_url)
    archive = Archive(settings)
    john, jane = ("Doe^John", "P1"), ("DOE^JANE", "P2")
    for i in range(3):
        archive.store_dataset(
            _instance(
                john, "1", "11", f"11{i}", StudyDate="20240115", StudyTime="101500", AccessionNumber="A1",
                InstanceNumber=i + 1, PatientBirthDate="19700101", InstitutionName="General",
            )
        )  # fmt: skip
    archive.store_dataset(
        _instance(john, "1", "12", "120", SOPClassUID=SegmentationStorage, Modality="SEG"), derived=True
    )
    archive.store_dataset(
        _instance(john, "2", "21", "210", SOPClassUID=MRImageStorage, Modality="MR", StudyDate="20240301")
    )
    archive.store_dataset(_instance(jane, "3", "31", "310", StudyDate="20231231", StudyTime="2359"))
    utf8 = _instance(("Müller^Jürgen", "P3"), "4", "41", "410", StudyDate="")
    utf8.SpecificCharacterSet = "ISO_IR 192"
    archive.store_dataset(utf8)
    archive.store_dataset(_instance(("A%B_C^D", "P4"), "5", "51", "510", StudyDate="20200101"))
    archive.store_dataset(_instance(("AXBYC^D", "P5"), "6", "61", "610", StudyDate="20200101"))
    archive.store_dataset(_instance(("[x]^Y", "P6"), "7", "71", "710", StudyDate="20200101"))
    return archive


def _find(archive: Archive, level: Level, model: InformationModel = S_ROOT, **keys: str) -> list[dict]:
    return list(find(archive.session_factory, Query(level, model, keys)))


def _studies(archive: Archive, **keys: str) -> list[str]:
    rows = _find(archive, Level.STUDY, **{"StudyInstanceUID": "", **keys})
    return [r["StudyInstanceUID"].rsplit(".", 1)[1] for r in rows]


def test_person_name_wildcards_case_insensitive_by_default_and_strict_on_request(archive: Archive) -> None:
    assert _studies(archive, PatientName="doe*") == ["1", "2", "3"]
    assert _studies(archive, PatientName="DO?^J*N*") == ["1", "2", "3"]
    assert _studies(archive, PatientName="doe^jane") == ["3"]
    strict = lambda value: [  # noqa: E731
        r["PatientName"]
        for r in find(archive.session_factory, Query(Level.STUDY, S_ROOT, {"PatientName": value}, strict_names=True))
    ]
    assert strict("doe*") == []
    assert strict("Doe*") == ["Doe^John", "Doe^John"]
    assert strict("doe^jane") == []


def test_sql_wildcard_characters_in_values_are_literal(archive: Archive) -> None:
    assert _studies(archive, PatientName="A%*") == ["5"]
    assert _studies(archive, PatientName="A?B_*") == ["5"]
    assert _studies(archive, PatientName="[x]*") == ["7"]
    assert _studies(archive, AccessionNumber="A*") == ["1"]
    assert _studies(archive, AccessionNumber="a*") == []  # SH matches case-sensitively, on SQLite too


def test_date_and_time_ranges(archive: Archive) -> None:
    assert _studies(archive, StudyDate="20240101-20241231") == ["1", "2"]
    assert _studies(archive, StudyDate="20240201-") == ["2"]
    assert _studies(archive, StudyDate="-20231231") == ["3", "5", "6", "7"]  # study 4 has no date: no match
    assert _studies(archive, StudyDate="20240115") == ["1"]
    assert _studies(archive, StudyTime="-1015") == ["1"]  # 101500 is within the minute 10:15
    assert _studies(archive, StudyTime="2300-") == ["3"]
    with pytest.raises(BadValueError, match="StudyDate"):
        _studies(archive, StudyDate="2024-01-01")


def test_uid_lists_and_universal_keys(archive: Archive) -> None:
    assert _studies(archive, StudyInstanceUID=f"{ROOT}.1.1\\{ROOT}.1.3") == ["1", "3"]
    rows = _find(archive, Level.STUDY, PatientName="", StudyDate="", AccessionNumber="")
    assert len(rows) == 7
    assert rows[0]["PatientName"] == "Doe^John" and rows[0]["AccessionNumber"] == "A1"
    assert rows[3]["StudyDate"] == ""


def test_computed_keys_count_our_own_seg(archive: Archive) -> None:
    (row,) = _find(
        archive,
        Level.STUDY,
        StudyInstanceUID=f"{ROOT}.1.1",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        NumberOfPatientRelatedStudies="",
        InstitutionName="",
    )
    assert row["ModalitiesInStudy"] == "CT\\SEG"
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert row["NumberOfPatientRelatedStudies"] == 2
    assert row["InstitutionName"] == "General"
    assert _studies(archive, ModalitiesInStudy="SEG") == ["1"]
    assert _studies(archive, ModalitiesInStudy="MR\\XA") == ["2"]


def test_series_and_image_levels(archive: Archive) -> None:
    series = _find(
        archive, Level.SERIES, StudyInstanceUID=f"{ROOT}.1.1", Modality="", NumberOfSeriesRelatedInstances=""
    )
    assert [(s["Modality"], s["NumberOfSeriesRelatedInstances"]) for s in series] == [("CT", 3), ("SEG", 1)]
    images = _find(
        archive,
        Level.IMAGE,
        P_ROOT,
        PatientID="P1",
        StudyInstanceUID=f"{ROOT}.1.1",
        SeriesInstanceUID=f"{ROOT}.2.11",
        InstanceNumber="2",
        SOPInstanceUID="",
    )
    assert [i["SOPInstanceUID"] for i in images] == [f"{ROOT}.3.111"]


def test_patient_level_and_charset_as_received(archive: Archive) -> None:
    rows = _find(archive, Level.PATIENT, P_ROOT, PatientName="m*", NumberOfPatientRelatedStudies="")
    assert [(r["PatientName"], r["SpecificCharacterSet"], r["NumberOfPatientRelatedStudies"]) for r in rows] == [
        ("Müller^Jürgen", "ISO_IR 192", 1)
    ]


def test_hierarchy_rules(archive: Archive) -> None:
    with pytest.raises(IdentifierError, match="below the STUDY level: Modality"):
        _find(archive, Level.STUDY, Modality="CT")
    with pytest.raises(IdentifierError, match="StudyInstanceUID is required"):
        _find(archive, Level.SERIES, Modality="CT")
    with pytest.raises(IdentifierError, match="PatientID is required"):
        _find(archive, Level.STUDY, P_ROOT, StudyInstanceUID="")
    with pytest.raises(IdentifierError, match="not in the Study Root"):
        _find(archive, Level.PATIENT, S_ROOT, PatientName="")
    with pytest.raises(IdentifierError, match="single value"):
        _find(archive, Level.SERIES, StudyInstanceUID=f"{ROOT}.1.1\\{ROOT}.1.2")


def test_pages_cover_every_match(archive: Archive) -> None:
    paged = list(find(archive.session_factory, Query(Level.IMAGE, S_ROOT, {
        "StudyInstanceUID": f"{ROOT}.1.1", "SeriesInstanceUID": f"{ROOT}.2.11", "SOPInstanceUID": ""
    }), page_size=1))  # fmt: skip
    assert [r["SOPInstanceUID"][-3:] for r in paged] == ["110", "111", "112"]


def test_migration_0004_matches_the_models(tmp_path: Path) -> None:
    from tests.schema import drift_after_migrations

    diffs = drift_after_migrations(f"sqlite:///{tmp_path / 'index.sqlite'}")
    assert diffs == []
