"""A real Orthanc queries radtriage and retrieves a study with its AI SEG and SR.

Orthanc (Debian package, loopback, ``TCP_NODELAY=1``) knows radtriage as the modality
``radtriage``; radtriage knows Orthanc as a ``[[dicom.peers]]`` entry allowed to query,
retrieve and be a move destination. Everything goes through Orthanc's REST API, the
way an Orthanc user would do it: ``/modalities/radtriage/query`` (C-FIND at STUDY and
SERIES level), ``/queries/{id}/answers`` and ``/queries/{id}/answers/{n}/retrieve``
(C-MOVE to Orthanc itself). The answers are checked against radtriage's own index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.dicom.receiver import start_receiver
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance, Patient, Series, Study
from pipeline.index.triage import AIStatus
from tests.core.conftest import HOST, make_settings
from tests.peers.orthanc import OrthancPeer
from tests.web.seed import Seeded, seed_study

pytestmark = pytest.mark.slow

STUDY_KEYS = {
    "PatientName": "DOE*",
    "PatientID": "",
    "StudyInstanceUID": "",
    "StudyDate": "",
    "AccessionNumber": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedSeries": "",
    "NumberOfStudyRelatedInstances": "",
}


@dataclass
class Setup:
    orthanc: OrthancPeer
    archive: Archive
    jane: Seeded  # DOE^JANE, analysed: CT + SEG + SR
    john: Seeded  # DOE^JOHN, not analysed: CT only
    smith: Seeded  # SMITH^ANN: must not match DOE*


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    orthanc = OrthancPeer(tmp_path / "orthanc")
    peers = [
        {
            "ae_title": orthanc.ae_title,
            "host": HOST,
            "port": orthanc.dicom_port,
            "allow": ["query", "retrieve", "move_destination"],
        }
    ]
    settings = make_settings(tmp_path, peers=peers)
    migrate(settings.index_url)
    archive = Archive(settings)
    seeds = tmp_path / "seed"
    jane = seed_study(
        archive, seeds, seed=3, name="DOE^JANE", accession="A1", bleed=True, ai_status=AIStatus.done, minutes_ago=5
    )
    john = seed_study(
        archive, seeds, seed=4, name="DOE^JOHN", accession="A2", bleed=False, ai_status=None, minutes_ago=4
    )
    smith = seed_study(
        archive, seeds, seed=5, name="SMITH^ANN", accession="A3", bleed=False, ai_status=None, minutes_ago=3
    )
    assert jane.seg_uid and jane.sr_uid
    server = start_receiver(settings, archive)  # the receiver as radtriage serve runs it
    orthanc.modalities = {"radtriage": ("RADTRIAGE", HOST, int(server.server_address[1]))}
    try:
        with orthanc:
            yield Setup(orthanc, archive, jane, john, smith)
    finally:
        server.shutdown()
        archive.engine.dispose()


def _query(orthanc: OrthancPeer, level: str, keys: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """Orthanc's C-FIND to radtriage: the query's id and its answers as ``{keyword: value}``."""
    created = orthanc.post("/modalities/radtriage/query", {"Level": level, "Query": keys})
    query_id = created["ID"]
    answers = orthanc.get(f"/queries/{query_id}/answers?expand&simplify")
    return query_id, list(answers)


def _index_studies(archive: Archive, name_prefix: str) -> dict[str, dict[str, Any]]:
    """What radtriage's index holds for the studies of patients named ``name_prefix...``."""
    out: dict[str, dict[str, Any]] = {}
    with session_scope(archive.session_factory, readonly=True) as session:
        rows = session.execute(
            select(Study.id, Study.StudyInstanceUID, Patient.PatientName, Patient.PatientID, Study.AccessionNumber)
            .join(Patient, Study.patient_id == Patient.id)
            .where(Patient.PatientName.like(f"{name_prefix}%"))
        ).all()
        for study_id, uid, name, pid, accession in rows:
            modalities = set(
                session.scalars(select(Series.Modality).where(Series.study_id == study_id).distinct()).all()
            )
            series = session.scalar(select(func.count()).select_from(Series).where(Series.study_id == study_id))
            instances = session.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Series, Instance.series_id == Series.id)
                .where(Series.study_id == study_id)
            )
            out[uid] = {
                "PatientName": name,
                "PatientID": pid,
                "AccessionNumber": accession,
                "modalities": modalities,
                "series": series,
                "instances": instances,
            }
    return out


def _values(text: str) -> set[str]:
    return {v for v in str(text).split("\\") if v}


def test_orthanc_queries_radtriage_and_retrieves_a_study_with_its_seg_and_sr(setup: Setup) -> None:
    orthanc, jane = setup.orthanc, setup.jane

    # STUDY level: PatientName wildcard; the answers are what the index holds.
    study_query, answers = _query(orthanc, "Study", STUDY_KEYS)
    expected = _index_studies(setup.archive, "DOE")
    assert set(expected) == {jane.StudyInstanceUID, setup.john.StudyInstanceUID}
    by_uid = {a["StudyInstanceUID"]: a for a in answers}
    assert len(answers) == len(by_uid) == 2, answers
    assert set(by_uid) == set(expected)
    for uid, held in expected.items():
        got = by_uid[uid]
        assert got["PatientName"] == held["PatientName"]
        assert got["PatientID"] == held["PatientID"]
        assert got["AccessionNumber"] == held["AccessionNumber"]
        assert _values(got["ModalitiesInStudy"]) == held["modalities"]
        assert int(got["NumberOfStudyRelatedSeries"]) == held["series"]
        assert int(got["NumberOfStudyRelatedInstances"]) == held["instances"]
        assert got.get("RetrieveAETitle", "RADTRIAGE") == "RADTRIAGE"
    jane_answer = by_uid[jane.StudyInstanceUID]
    assert _values(jane_answer["ModalitiesInStudy"]) == {"CT", "SEG", "SR"}
    assert int(jane_answer["NumberOfStudyRelatedInstances"]) == len(jane.sop_uids) + 2
    assert _values(by_uid[setup.john.StudyInstanceUID]["ModalitiesInStudy"]) == {"CT"}

    # SERIES level for the analysed study: the CT series and radtriage's own SEG and SR.
    series_keys = {
        "StudyInstanceUID": jane.StudyInstanceUID,
        "SeriesInstanceUID": "",
        "Modality": "",
        "NumberOfSeriesRelatedInstances": "",
    }
    _, series_answers = _query(orthanc, "Series", series_keys)
    with session_scope(setup.archive.session_factory, readonly=True) as session:
        held_series = {
            uid: (modality, count)
            for uid, modality, count in session.execute(
                select(Series.SeriesInstanceUID, Series.Modality, Series.NumberOfSeriesRelatedInstances)
                .join(Study, Series.study_id == Study.id)
                .where(Study.StudyInstanceUID == jane.StudyInstanceUID)
            ).all()
        }
    got_series = {
        a["SeriesInstanceUID"]: (a["Modality"], int(a["NumberOfSeriesRelatedInstances"])) for a in series_answers
    }
    assert got_series == held_series
    assert sorted(m for m, _ in got_series.values()) == ["CT", "SEG", "SR"]
    assert got_series[jane.SeriesInstanceUID] == ("CT", len(jane.sop_uids))

    # Retrieve DOE^JANE through the study query's answer: C-MOVE to Orthanc itself.
    assert orthanc.sop_instance_uids() == set()
    index = answers.index(jane_answer)
    orthanc.post(
        f"/queries/{study_query}/answers/{index}/retrieve",
        {"TargetAet": orthanc.ae_title, "Synchronous": True, "Timeout": 60},
    )
    wanted = {*jane.sop_uids, jane.seg_uid, jane.sr_uid}
    stored = orthanc.wait_for_instances(wanted, timeout=30)
    assert stored == wanted  # the whole study, SEG and SR included, and nothing else
    studies = orthanc.get("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [jane.StudyInstanceUID]
    modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in studies[0]["Series"])
    assert modalities == ["CT", "SEG", "SR"]
