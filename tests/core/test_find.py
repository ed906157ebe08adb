"""C-FIND SCP against real dcmtk findscu (and pynetdicom for C-CANCEL) over loopback."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from sqlalchemy import select

from pipeline.archive import Archive
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Patient, Series, Study
from pipeline.index.triage import AIStatus
from pipeline.lab.synth import synth_study
from tests.core.conftest import ENV, HOST, make_settings
from tests.web.seed import seed_study

pytestmark = pytest.mark.slow  # a DICOM server and dcmtk peers

PEERS = [{"ae_title": "WS1", "host": HOST, "port": 11113, "allow": ["query", "retrieve", "move_destination"]}]
MANY = 2000  # header-only studies: enough that a C-CANCEL lands mid-answer even on a busy machine


@dataclass
class Server:
    archive: Archive
    port: int
    analysed: str  # StudyInstanceUID of the study with SEG + SR
    utf8: str  # StudyInstanceUID of the study received in ISO_IR 192


def _header_only(i: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.3.{i}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.1.{i}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.2.{i}"
    ds.PatientName, ds.PatientID, ds.Modality, ds.StudyDate = f"Many^{i:04d}", f"M{i}", "CT", "20010101"
    return ds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("find")
    settings = make_settings(tmp, allowed_aes=["STORER", "STORESCU"], peers=PEERS)
    settings.storage.fsync = False
    migrate(settings.index_url)
    archive = Archive(settings)
    analysed = seed_study(
        archive, tmp / "seed", seed=3, name="Doe^John", accession="ACC1", bleed=True, ai_status=AIStatus.done,
        minutes_ago=5,
    )  # fmt: skip
    for seed, name, pid, date in ((4, "DOE^JANE", "PJ", "20240115"), (5, "Smith^Ann", "PS", "20230601")):
        for path in synth_study(tmp / f"s{seed}", seed=seed, slices=2, rows=32, cols=32, PatientName=name,
                                PatientID=pid, StudyDate=date):  # fmt: skip
            archive.store_dataset(pydicom.dcmread(path))
    utf8 = pydicom.dcmread(synth_study(tmp / "u", seed=6, slices=1, rows=16, cols=16, PatientID="PU")[0])
    utf8.SpecificCharacterSet, utf8.PatientName = "ISO_IR 192", "Müller^Jürgen"
    archive.store_dataset(utf8)
    for i in range(MANY):
        archive.store_dataset(_header_only(i))
    from pipeline.dicom.receiver import start_receiver

    srv = start_receiver(settings, archive)
    try:
        yield Server(archive, int(srv.server_address[1]), analysed.StudyInstanceUID, str(utf8.StudyInstanceUID))
    finally:
        srv.shutdown()
        archive.engine.dispose()


def findscu(
    port: int, out: Path, *keys: str, model: str = "-S", aet: str = "WS1"
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """dcmtk findscu; the responses it extracted (rsp0001.dcm ...) read back."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [a for k in keys for a in ("-k", k)]
    result = subprocess.run(
        ["findscu", "-d", model, "-aet", aet, "-aec", "RADTRIAGE", "-X", "-od", str(out), *args, HOST, str(port)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def final_status(result: subprocess.CompletedProcess[str]) -> int:
    codes = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stdout + result.stderr)
    assert codes, result.stdout + result.stderr
    return int(codes[-1], 16)


def _index(archive: Archive) -> list[tuple[str, str, str, str]]:
    with session_scope(archive.session_factory, readonly=True) as session:
        rows = session.execute(
            select(Study.StudyInstanceUID, Patient.PatientName, Patient.PatientID, Study.StudyDate).join(Patient)
        ).all()
    return [tuple(r) for r in rows]


def _uids(answers: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(a.get(keyword)) for a in answers}


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_study_level_matching_agrees_with_the_index(server: Server, tmp_path: Path, model: str) -> None:
    index = _index(server.archive)
    john = next(r for r in index if r[1] == "Doe^John")
    patient = ("PatientID=" + john[2]) if model == "-P" else "PatientID"
    level = ("QueryRetrieveLevel=STUDY", patient, "StudyInstanceUID", "PatientName")
    scoped = [r for r in index if model == "-S" or r[2] == john[2]]

    rsp, answers = findscu(server.port, tmp_path, *level, "PatientName=doe*", model=model)
    assert final_status(rsp) == 0x0000
    assert _uids(answers) == {r[0] for r in scoped if r[1].lower().startswith("doe")}
    assert {str(a.RetrieveAETitle) for a in answers} == {"RADTRIAGE"}

    rsp, answers = findscu(server.port, tmp_path, *level, "StudyDate=20240101-20241231", model=model)
    assert final_status(rsp) == 0x0000
    assert _uids(answers) == {r[0] for r in scoped if "20240101" <= r[3] <= "20241231"}

    wanted = [r[0] for r in scoped][:2]
    keys = [k for k in level if not k.startswith("StudyInstanceUID")]
    rsp, answers = findscu(server.port, tmp_path, *keys, "StudyInstanceUID=" + "\\".join(wanted), model=model)
    assert _uids(answers) == set(wanted)

    rsp, answers = findscu(server.port, tmp_path, *level, "AccessionNumber", "StudyDescription", model=model)
    assert _uids(answers) == {r[0] for r in scoped}  # universal keys: everything, values returned
    by_uid = {str(a.StudyInstanceUID): a for a in answers}
    assert by_uid[john[0]].AccessionNumber == "ACC1"
    assert "InstitutionName" not in by_uid[john[0]]  # not asked, not returned


def test_patient_level_and_names_in_their_own_character_set(server: Server, tmp_path: Path) -> None:
    rsp, answers = findscu(
        server.port, tmp_path, "SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=PATIENT",
        "PatientName=M*", "PatientID", "NumberOfPatientRelatedStudies", model="-P",
    )  # fmt: skip
    assert final_status(rsp) == 0x0000
    mine = [a for a in answers if a.PatientID == "PU"]
    assert [(a.SpecificCharacterSet, str(a.PatientName), a.NumberOfPatientRelatedStudies) for a in mine] == [
        ("ISO_IR 192", "Müller^Jürgen", 1)
    ]
    raw = next(p for p in sorted(tmp_path.glob("rsp*.dcm")) if b"PU" in p.read_bytes()).read_bytes()
    assert "Müller^Jürgen".encode() in raw  # as received: UTF-8 on the wire


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_series_level_shows_our_seg_and_sr(server: Server, tmp_path: Path, model: str) -> None:
    with session_scope(server.archive.session_factory, readonly=True) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == server.analysed))
        assert study is not None
        pid = study.patient.PatientID
        series = {
            s.SeriesInstanceUID: s.Modality for s in session.scalars(select(Series).where(Series.study_id == study.id))
        }
    above = ["PatientID=" + pid] if model == "-P" else []
    rsp, answers = findscu(
        server.port, tmp_path, "QueryRetrieveLevel=SERIES", *above, "StudyInstanceUID=" + server.analysed,
        "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances", model=model,
    )  # fmt: skip
    assert final_status(rsp) == 0x0000
    assert {str(a.SeriesInstanceUID): a.Modality for a in answers} == series
    assert sorted(series.values()) == ["CT", "SEG", "SR"]
    level = ["QueryRetrieveLevel=STUDY", *above, "StudyInstanceUID=" + server.analysed]
    rsp, answers = findscu(
        server.port, tmp_path, *level, "ModalitiesInStudy", "NumberOfStudyRelatedSeries", model=model
    )
    assert [(list(a.ModalitiesInStudy), a.NumberOfStudyRelatedSeries) for a in answers] == [(["CT", "SEG", "SR"], 3)]


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_image_level(server: Server, tmp_path: Path, model: str) -> None:
    with session_scope(server.archive.session_factory, readonly=True) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == server.analysed))
        assert study is not None
        pid, ct = study.patient.PatientID, next(s for s in study.series if s.Modality == "CT")
        expected = {i.SOPInstanceUID for i in ct.instances}
        ct_uid = ct.SeriesInstanceUID
    above = ["PatientID=" + pid] if model == "-P" else []
    keys = ("QueryRetrieveLevel=IMAGE", *above, "StudyInstanceUID=" + server.analysed, "SeriesInstanceUID=" + ct_uid)
    rsp, answers = findscu(server.port, tmp_path, *keys, "SOPInstanceUID", "InstanceNumber", model=model)
    assert final_status(rsp) == 0x0000
    assert _uids(answers, "SOPInstanceUID") == expected and len(expected) == 12


def test_bad_identifiers_get_their_status_and_a_log_line(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [
        (("QueryRetrieveLevel=STUDY", "Modality=CT"), "-S", 0xA900, "keys below the STUDY level"),
        (("QueryRetrieveLevel=SERIES", "Modality"), "-S", 0xA900, "StudyInstanceUID is required"),
        (("QueryRetrieveLevel=STUDY", "StudyInstanceUID"), "-P", 0xA900, "PatientID is required"),
        (("QueryRetrieveLevel=PATIENT", "PatientName"), "-S", 0xA900, "not in the Study Root"),
        (("QueryRetrieveLevel=FRAME", "PatientName"), "-S", 0xC000, "is not PATIENT/STUDY"),
        (("QueryRetrieveLevel=STUDY", "StudyDate=2024-01-01"), "-S", 0xC000, "not a valid DA"),
    ]
    for keys, model, status, reason in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.dicom.find"):
            rsp, answers = findscu(server.port, tmp_path, *keys, model=model)
        assert (final_status(rsp), answers) == (status, []), keys
        assert reason in rsp.stdout + rsp.stderr  # the ErrorComment reaches the peer
        assert any(reason in r.getMessage() for r in caplog.records), keys
        rsp, answers = findscu(server.port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=Smith*")
        assert final_status(rsp) == 0x0000 and len(answers) == 1  # the next good request works
    with session_scope(server.archive.session_factory, readonly=True) as session:
        audited = session.scalars(select(AuditEvent).where(AuditEvent.method == "C-FIND")).all()
    assert {0xA900, 0xC000, 0x0000} <= {a.status_code for a in audited}
    assert any("Smith*" in a.path and '"matches": 1' in a.detail and a.username == "WS1" for a in audited)


def test_a_query_from_an_ae_without_the_right_is_refused(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # STORER may store but not query: findscu's association is rejected, with a reason logged.
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.receiver"):
        rsp, answers = findscu(server.port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName", aet="STORER")
    assert rsp.returncode != 0 and answers == []
    assert "Calling AE Title Not Recognized" in rsp.stdout + rsp.stderr
    assert any("STORER" in r.getMessage() and '"query"' in r.getMessage() for r in caplog.records)
    # An association it may have (C-ECHO) carrying a C-FIND: refused 0x0124, audited.
    ae = AE(ae_title="STORER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientName = "STUDY", ""
        statuses = [s.Status for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if s]
    finally:
        assoc.release()
    assert statuses == [0x0124]
    rsp, answers = findscu(server.port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=Smith*")
    assert final_status(rsp) == 0x0000 and len(answers) == 1


def test_c_cancel_stops_the_pending_responses(server: Server) -> None:
    ae = AE(ae_title="WS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientName, query.StudyInstanceUID = "STUDY", "Many^*", ""
    pending, final = 0, None
    try:
        for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            if status and status.Status == 0xFF00:
                pending += 1
                if pending == 1:
                    assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelFind)
            elif status:
                final = status.Status
    finally:
        assoc.release()
    assert final == 0xFE00
    assert 1 <= pending < MANY


def test_radtriage_audit_lists_the_queries_newest_first(server: Server, tmp_path: Path) -> None:
    findscu(server.port, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=Smith*")
    findscu(server.port, tmp_path, "QueryRetrieveLevel=STUDY", "Modality=CT")
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = {**ENV, "RADTRIAGE_STORAGE__DATA_DIR": str(server.archive.data_dir)}
    env["RADTRIAGE_INDEX__URL"] = server.archive.engine.url.render_as_string(
        hide_password=False
    )  # the module's installation, on either index
    env.pop("RADTRIAGE_CONFIG", None)
    cli = [sys.executable, "-m", "pipeline", "--config", str(config), "audit", "--who", "WS1", "--limit", "2"]
    listed = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["operation"], r["status"]) for r in rows] == [("C-FIND", 0xA900), ("C-FIND", 0x0000)]
    assert rows[1]["detail"]["matches"] == 1 and "PatientName=Smith*" in rows[1]["request"]
    text = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert "0xA900" in text.stdout and "keys below the STUDY level" in text.stdout
    nobody = subprocess.run([*cli[:-4], "--who", "NOBODY"], env=env, capture_output=True, text=True, timeout=60)
    assert nobody.stdout.strip() == "no audit records match"


@pytest.mark.parametrize("explicit", [True, False])
def test_fast_response_identifiers_are_the_bytes_pydicom_writes(explicit: bool) -> None:
    """pipeline/dicom/identifier.py writes what pydicom would for the same response, and
    leaves to pydicom what it does not write (sequences, numbers, code extensions)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.dsutils import encode

    from pipeline.config import Settings
    from pipeline.dicom.fastsend import EncodedIdentifier
    from pipeline.dicom.find import ResponseEncoder, query_from_identifier
    from pipeline.index.query import InformationModel

    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "AccessionNumber"):
        setattr(request, keyword, "")
    request.ModalitiesInStudy = ""
    request.NumberOfStudyRelatedInstances = ""
    request.InstanceAvailability = ""
    request.StudyDescription = ""
    settings = Settings()
    query = query_from_identifier(request, InformationModel.STUDY_ROOT, settings)
    syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    encoder = ResponseEncoder(request, query, "RADTRIAGE", syntax, fast=True)
    base = {"PatientID": "P1", "StudyDate": "20240131", "StudyInstanceUID": "1.2.3.4.5", "AccessionNumber": None}
    matches = [
        {**base, "PatientName": "DOE^JOHN", "SpecificCharacterSet": "", "ModalitiesInStudy": ["CT", "SEG", "SR"]},
        {**base, "PatientName": "MÜLLER^JÖRG", "SpecificCharacterSet": "ISO_IR 100", "StudyDescription": "Kopf"},
        {**base, "PatientName": "Ωμέγα^Ζ", "SpecificCharacterSet": "ISO_IR 100"},  # renamed: UTF-8
        {
            **base,
            "PatientName": "ヤマダ^タロウ",
            "SpecificCharacterSet": "ISO_IR 192",
            "NumberOfStudyRelatedInstances": 7,
        },
        {**base, "PatientName": "ODD^1", "SpecificCharacterSet": "ISO_IR 6", "ModalitiesInStudy": "MR"},
    ]
    for match in matches:
        got = encoder(match)
        assert isinstance(got, EncodedIdentifier), match
        expected = encode(got.fallback(), not explicit, True)
        assert got.encoded_identifier == expected, match["PatientName"]
    # Code extensions (ISO 2022) and numbers are pydicom's to write.
    assert not isinstance(
        encoder({**base, "PatientName": "X", "SpecificCharacterSet": "\\ISO 2022 IR 87"}), EncodedIdentifier
    )
    with_sequence = Dataset()
    with_sequence.QueryRetrieveLevel = "STUDY"
    with_sequence.StudyInstanceUID = ""
    with_sequence.ReferencedStudySequence = []
    sq_query = query_from_identifier(with_sequence, InformationModel.STUDY_ROOT, settings)
    sq_encoder = ResponseEncoder(with_sequence, sq_query, "RADTRIAGE", syntax, fast=True)
    assert not isinstance(sq_encoder(base), EncodedIdentifier)
