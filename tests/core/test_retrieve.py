"""C-MOVE and C-GET SCP against real peers: dcmtk movescu, getscu and storescp, and Orthanc.

What a user checks: the files that arrive carry the same data elements as the ones sent
(or the same pixels, when the destination takes only uncompressed), the statuses and
counts the tools print, and a log line for every refusal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, Association, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, Verification
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyMove
from sqlalchemy import select

from pipeline.archive import Archive
from pipeline.dicom.receiver import start_receiver
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import migrate, session_scope
from pipeline.triage.prefect_server import free_port
from tests.core.conftest import ENV, HOST, make_settings, require_tool, statuses, storescu

pytestmark = pytest.mark.slow


@dataclass
class QR:
    archive: Archive
    port: int
    files: dict[str, Path]  # SOP Instance UID -> the file that was sent
    study_uid: str
    series_uid: str
    compressed: dict[str, str]  # SOP Instance UID -> its stored (compressed) transfer syntax
    store_port: int  # where the STORESCP peer listens
    move_port: int  # where movescu's own listener (MOVESCU) listens


def _compressed_copy(src: Path, out: Path, tool: str, flag: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(ds.InstanceNumber) + 100
    plain = out.with_suffix(".plain.dcm")
    ds.save_as(plain, enforce_file_format=True)
    subprocess.run([require_tool(tool), flag, str(plain), str(out)], check=True, capture_output=True, timeout=60)
    plain.unlink()
    return out


@pytest.fixture
def qr(tmp_path: Path, study_files: list[Path]) -> Iterator[QR]:
    store_port, move_port = free_port(), free_port()
    peers = [
        {"ae_title": "MOVESCU", "host": HOST, "port": move_port, "allow": ["retrieve", "move_destination"]},
        {"ae_title": "STORESCP", "host": HOST, "port": store_port, "allow": ["move_destination"]},
        {"ae_title": "GETSCU", "host": HOST, "port": 104, "allow": ["retrieve"]},
        {"ae_title": "PYSCU", "host": HOST, "port": 104, "allow": ["retrieve"]},
        {"ae_title": "NOSY", "host": HOST, "port": 104, "allow": ["query"]},
    ]
    settings = make_settings(tmp_path, peers=peers)
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)  # the receiver as radtriage serve runs it
    port = int(server.server_address[1])
    extra = tmp_path / "compressed"
    extra.mkdir()
    jls = _compressed_copy(study_files[0], extra / "jls.dcm", "dcmcjpls", "+el")
    rle = _compressed_copy(study_files[1], extra / "rle.dcm", "dcmcrle", "+e")
    sent = [*study_files, jls, rle]
    result = storescu(port, *study_files)
    assert statuses(result) == [0] * len(study_files), result.stdout[-3000:]
    for path in (jls, rle):  # as a modality that compresses would have sent them
        archive.store_dataset(pydicom.dcmread(path))
    files = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sent}
    compressed = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): str(
            pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
        for p in (jls, rle)
    }
    assert set(compressed.values()) == {JPEGLSLossless, RLELossless}
    first = pydicom.dcmread(study_files[0], stop_before_pixels=True)
    try:
        yield QR(
            archive,
            port,
            files,
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            compressed,
            store_port,
            move_port,
        )
    finally:
        server.shutdown()
        archive.engine.dispose()


def _elements(path: Path) -> dict[int, tuple[str, bytes]]:
    """Every data element outside the File Meta group, as (VR, value bytes)."""
    ds = pydicom.dcmread(path)
    out: dict[int, tuple[str, bytes]] = {}
    for elem in ds:
        raw = ds.get_item(elem.tag)
        value = raw.value if hasattr(raw, "value") and isinstance(raw.value, bytes) else repr(elem.value).encode()
        out[int(elem.tag)] = (str(elem.VR), value)
    return out


def _received(folder: Path) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.rglob("*") if p.is_file()
    }


def _check_arrived(qr: QR, arrived: dict[str, Path], wanted: set[str], *, uncompressed: bool) -> None:
    assert set(arrived) == wanted
    for uid, path in arrived.items():
        if uid in qr.compressed and uncompressed:
            got, sent = pydicom.dcmread(path), pydicom.dcmread(qr.files[uid])
            assert not got.file_meta.TransferSyntaxUID.is_compressed
            np.testing.assert_array_equal(got.pixel_array, sent.pixel_array)
            assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PatientName == sent.PatientName
        else:
            assert _elements(path) == _elements(qr.files[uid]), uid


def _dcmtk(tool: str, qr: QR, out: Path | None, keys: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """movescu/getscu, Study Root; ``out``: where its own listener writes (``None``: none)."""
    cmd = [require_tool(tool), "-v", "-S", "-aec", "RADTRIAGE", *args]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cmd += ["-od", str(out)]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}"]
    return subprocess.run([*cmd, HOST, str(qr.port)], env=ENV, capture_output=True, text=True, timeout=120)


def _final(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr)[-4000:]


def test_movescu_to_its_own_listener_pulls_a_study_uncompressed(qr: QR, tmp_path: Path) -> None:
    """movescu's listener takes uncompressed only: the JPEG-LS and RLE instances arrive decompressed."""
    out = tmp_path / "moved"
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    result = _dcmtk("movescu", qr, out, keys, "-aet", "MOVESCU", "-aem", "MOVESCU", "+P", str(qr.move_port))
    assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(out), set(qr.files), uncompressed=True)


def test_movescu_to_storescp_series_and_instances_as_stored(qr: QR, tmp_path: Path) -> None:
    """storescp accepting every syntax gets the compressed files as they were stored."""
    out = tmp_path / "storescp"
    with running_storescp(out, qr.store_port):
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": qr.study_uid, "SeriesInstanceUID": qr.series_uid}
        result = _dcmtk("movescu", qr, None, keys, "-aet", "MOVESCU", "-aem", "STORESCP")
        assert result.returncode == 0, _final(result)
        _check_arrived(qr, _received(out), set(qr.files), uncompressed=False)
        for f in out.iterdir():
            f.unlink()
        two = sorted(qr.compressed)
        keys = {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": qr.study_uid,
            "SeriesInstanceUID": qr.series_uid,
            "SOPInstanceUID": "\\".join(two),
        }
        result = _dcmtk("movescu", qr, None, keys, "-aet", "MOVESCU", "-aem", "STORESCP")
        assert result.returncode == 0, _final(result)
        arrived = _received(out)
        _check_arrived(qr, arrived, set(two), uncompressed=False)
        assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in arrived.values()} == {
            JPEGLSLossless,
            RLELossless,
        }


def test_getscu_pulls_a_study_a_series_and_one_instance(qr: QR, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    result = _dcmtk("getscu", qr, tmp_path / "study", keys, "-aet", "GETSCU")
    assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(tmp_path / "study"), set(qr.files), uncompressed=True)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": qr.study_uid, "SeriesInstanceUID": qr.series_uid}
    result = _dcmtk("getscu", qr, tmp_path / "series", keys, "-aet", "GETSCU")
    assert result.returncode == 0, _final(result)
    assert set(_received(tmp_path / "series")) == set(qr.files)
    one = next(uid for uid in qr.files if uid not in qr.compressed)
    keys = {
        "QueryRetrieveLevel": "IMAGE",
        "StudyInstanceUID": qr.study_uid,
        "SeriesInstanceUID": qr.series_uid,
        "SOPInstanceUID": one,
    }
    result = _dcmtk("getscu", qr, tmp_path / "one", keys, "-aet", "GETSCU")
    assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(tmp_path / "one"), {one}, uncompressed=True)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["echoscu", HOST, str(port)], env=ENV, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"nothing answers C-ECHO on port {port}"
        time.sleep(0.1)


@contextlib.contextmanager
def running_storescp(out: Path, port: int, *flags: str) -> Iterator[None]:
    """dcmtk ``storescp`` accepting every transfer syntax into ``out`` on ``port`` until the block ends."""
    out.mkdir(exist_ok=True)
    scp = subprocess.Popen(
        [require_tool("storescp"), "-aet", "STORESCP", "+xa", *flags, "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield
    finally:
        scp.terminate()
        scp.wait(10)


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _move_responses(
    qr: QR, identifier: Dataset, destination: str, *, aet: str = "PYSCU", cancel_after: int = 0, msg_id: int = 7
) -> list[tuple[Dataset, Dataset | None]]:
    """C-MOVE with a pynetdicom SCU; every ``(status, identifier)``, optionally C-CANCEL after some pendings."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyMove)
    # Not only C-MOVE, so that the receiver does not refuse an AE without the right at
    # association already: the C-MOVE handler's own check is what is tested.
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, qr.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    responses: list[tuple[Dataset, Dataset | None]] = []
    try:
        for status, found in assoc.send_c_move(identifier, destination, StudyMove, msg_id=msg_id):
            responses.append((status, found))
            if cancel_after and len(responses) == cancel_after:
                assoc.send_c_cancel(msg_id, query_model=StudyMove)
    finally:
        assoc.release()
    return responses


def _move(qr: QR, identifier: Dataset, destination: str, *, aet: str = "PYSCU", cancel_after: int = 0) -> list[Dataset]:
    """The statuses of :func:`_move_responses`."""
    return [status for status, _ in _move_responses(qr, identifier, destination, aet=aet, cancel_after=cancel_after)]


def _get_requestor(
    port: int, store: object, ct_syntaxes: list[str] | None = None, *, aet: str = "PYSCU", **associate: object
) -> Association:
    """An established pynetdicom C-GET requestor on radtriage at ``port``, taking CT (in
    ``ct_syntaxes``, default pynetdicom's) in the storage SCP role through ``store``."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ct_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
    assoc = ae.associate(
        HOST,
        port,
        ae_title="RADTRIAGE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, store)],
        **associate,
    )
    assert assoc.is_established
    return assoc


def _audits(qr: QR) -> list[AuditEvent]:
    with session_scope(qr.archive.session_factory, readonly=True) as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.method.in_(["C-MOVE", "C-GET"]))))
        session.expunge_all()
    return rows


def test_bad_requests_get_their_status_and_a_log_line_and_the_next_works(
    qr: QR, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.dicom.retrieve")
    study = _identifier("STUDY", StudyInstanceUID=qr.study_uid)
    # The destination: a pynetdicom storage SCP (slow, so that a C-CANCEL lands mid-move).
    got: list[str] = []
    dest = AE(ae_title="MOVESCU")
    dest.add_supported_context(CTImageStorage)
    dest.add_supported_context(Verification)

    def slow_store(event: evt.Event) -> int:
        time.sleep(0.2)
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    listener = dest.start_server((HOST, qr.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        rsp = _move(qr, study, "NOWHERE")
        assert rsp[-1].Status == 0xA801
        assert "move destination 'NOWHERE' is not a known peer" in caplog.text

        rsp = _move(qr, study, "MOVESCU", aet="NOSY")
        assert rsp[-1].Status == 0x0124 and "may not retrieve" in rsp[-1].ErrorComment
        assert "C-MOVE from NOSY (127.0.0.1) refused with 0x0124" in caplog.text

        below = _identifier("STUDY", StudyInstanceUID=qr.study_uid, SeriesInstanceUID=qr.series_uid)
        rsp = _move(qr, below, "MOVESCU")
        assert rsp[-1].Status == 0xA900 and "below the STUDY" in rsp[-1].ErrorComment
        rsp = _move(qr, _identifier("SERIES", SeriesInstanceUID=qr.series_uid), "MOVESCU")
        assert rsp[-1].Status == 0xA900 and "StudyInstanceUID missing" in rsp[-1].ErrorComment
        rsp = _move(qr, _identifier("FRAME", StudyInstanceUID=qr.study_uid), "MOVESCU")
        assert rsp[-1].Status == 0xA900
        assert got == []

        rsp = _move(qr, study, "MOVESCU", cancel_after=2)
        assert rsp[-1].Status == 0xFE00
        assert 0 < len(got) < len(qr.files)
        assert "cancelled after" in caplog.text
        # ... and the next good request goes through whole.
        got.clear()
        series = _identifier("SERIES", StudyInstanceUID=qr.study_uid, SeriesInstanceUID=qr.series_uid)
        rsp = _move(qr, series, "MOVESCU")
    finally:
        listener.shutdown()
    # The listener takes CT uncompressed only: the two compressed ones are decompressed, all arrive.
    assert rsp[-1].Status == 0x0000, rsp[-1]
    assert rsp[-1].NumberOfCompletedSuboperations == len(qr.files)
    assert sorted(got) == sorted(qr.files)

    audits = _audits(qr)
    statuses = [a.status_code for a in audits]
    assert statuses == [0xA801, 0x0124, 0xA900, 0xA900, 0xA900, 0xFE00, 0x0000]
    assert all(a.username in ("PYSCU", "NOSY") for a in audits)
    last = json.loads(audits[-1].detail)
    assert last["completed"] == len(qr.files) and last["failed"] == 0 and last["destination"] == "MOVESCU"


def test_get_with_a_destination_that_takes_no_rle_fails_that_one_with_its_uid(qr: QR) -> None:
    """A C-GET requestor that offers CT only in JPEG-LS gets the RLE and plain ones failed and listed."""
    got: list[str] = []

    def store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = _get_requestor(qr.port, store, [JPEGLSLossless])
    try:
        responses = list(
            assoc.send_c_get(
                _identifier("STUDY", StudyInstanceUID=qr.study_uid), StudyRootQueryRetrieveInformationModelGet
            )
        )
    finally:
        assoc.release()
    final, identifier = responses[-1]
    jls = next(uid for uid, ts in qr.compressed.items() if ts == JPEGLSLossless)
    assert final.Status == 0xB000
    assert got == [jls]
    assert final.NumberOfCompletedSuboperations == 1 and final.NumberOfFailedSuboperations == len(qr.files) - 1
    failed = identifier.FailedSOPInstanceUIDList
    assert sorted([failed] if isinstance(failed, str) else failed) == sorted(set(qr.files) - {jls})


def test_orthanc_pulls_a_study_with_its_seg_and_sr_by_c_move(tmp_path: Path) -> None:
    from pipeline.index.triage import AIStatus
    from tests.peers.orthanc import OrthancPeer
    from tests.web.seed import seed_study

    orthanc = OrthancPeer(tmp_path / "orthanc")
    peers = [
        {"ae_title": "ORTHANC", "host": HOST, "port": orthanc.dicom_port, "allow": ["retrieve", "move_destination"]}
    ]
    settings = make_settings(tmp_path, peers=peers)
    migrate(settings.index_url)
    archive = Archive(settings)
    seeded = seed_study(
        archive,
        tmp_path / "seed",
        seed=3,
        name="DOE^JANE",
        accession="A1",
        bleed=True,
        ai_status=AIStatus.done,
        minutes_ago=5,
    )
    assert seeded.seg_uid and seeded.sr_uid
    server = start_receiver(settings, archive)  # the receiver as radtriage serve runs it
    orthanc.modalities = {"radtriage": ("RADTRIAGE", HOST, int(server.server_address[1]))}
    try:
        with orthanc:
            body = {
                "Level": "Study",
                "Resources": [{"StudyInstanceUID": seeded.StudyInstanceUID}],
                "TargetAet": "ORTHANC",
                "Synchronous": True,
                "Timeout": 60,
            }
            request = urllib.request.Request(
                orthanc.rest_url + "/modalities/radtriage/move",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=90) as response:
                assert response.status == 200
            wanted = {*seeded.sop_uids, seeded.seg_uid, seeded.sr_uid}
            stored = orthanc.wait_for_instances(wanted, timeout=30)
            assert stored == wanted
            modalities = {i["MainDicomTags"].get("SOPInstanceUID"): i for i in orthanc.instances()}
            assert len(modalities) == len(wanted)
    finally:
        server.shutdown()
        archive.engine.dispose()


@pytest.mark.parametrize("max_pdu", ["4096", "131072"])
def test_files_go_as_their_stored_bytes_within_the_destinations_maximum_pdu(
    qr: QR, tmp_path: Path, max_pdu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (pipeline/dicom/fastsend.py) sends each file's own bytes, cut to the
    PDU size storescp asks for; what storescp writes has the data elements that were sent."""
    from pipeline.dicom import fastsend

    sent_fast: list[str] = []
    file_pdus = fastsend.file_pdus

    def counting(context_id: int, command: bytes, stored: fastsend.StoredFile, peer_max: int) -> bytearray:
        assert peer_max == int(max_pdu)
        sent_fast.append(str(stored.SOPInstanceUID))
        return file_pdus(context_id, command, stored, peer_max)

    monkeypatch.setattr(fastsend, "file_pdus", counting)
    out = tmp_path / "storescp"
    with running_storescp(out, qr.store_port, "-pdu", max_pdu):
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
        result = _dcmtk("movescu", qr, None, keys, "-aet", "MOVESCU", "-aem", "STORESCP")
        assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(out), set(qr.files), uncompressed=False)
    assert sorted(sent_fast) == sorted(qr.files)  # compressed ones too: storescp +xa accepts them
    # C-GET: getscu's storage SCP role, its own maximum PDU
    sent_fast.clear()
    monkeypatch.setattr(fastsend, "file_pdus", file_pdus)
    result = _dcmtk("getscu", qr, tmp_path / "got", keys, "-aet", "GETSCU", "-pdu", max_pdu)
    assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(tmp_path / "got"), set(qr.files), uncompressed=True)


def test_instances_that_need_decompression_take_the_normal_path(
    qr: QR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getscu proposes uncompressed only: the JPEG-LS and RLE files are decompressed by the
    normal path, the others go as stored, and pixels and elements arrive as the user expects."""
    from pipeline.dicom import fastsend

    sent_fast: list[str] = []
    file_pdus = fastsend.file_pdus

    def counting(context_id: int, command: bytes, stored: fastsend.StoredFile, peer_max: int) -> bytearray:
        sent_fast.append(str(stored.SOPInstanceUID))
        return file_pdus(context_id, command, stored, peer_max)

    monkeypatch.setattr(fastsend, "file_pdus", counting)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    result = _dcmtk("getscu", qr, tmp_path / "got", keys, "-aet", "GETSCU")
    assert result.returncode == 0, _final(result)
    _check_arrived(qr, _received(tmp_path / "got"), set(qr.files), uncompressed=True)
    assert sorted(sent_fast) == sorted(set(qr.files) - set(qr.compressed))


def _counting_direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Statuses of the C-STORE responses read in the sending thread (pipeline/dicom/lease.py)."""
    from pipeline.dicom import fastsend

    read: list[int] = []
    decode = fastsend.decode_store_response

    def counting(pdu: bytes) -> object:
        rsp = decode(pdu)
        if rsp is not None:
            read.append(rsp.status)
        return rsp

    monkeypatch.setattr(fastsend, "decode_store_response", counting)
    return read


def test_store_statuses_read_by_the_sender_count_as_the_destination_meant(
    qr: QR, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination that fails one instance (with a comment and the offending element) and
    warns on another: the responses, read in the sending thread, give the counts and the
    Failed SOP Instance UID List a user reads in the final C-MOVE response."""
    read = _counting_direct_reads(monkeypatch)
    plain = sorted(uid for uid in qr.files if uid not in qr.compressed)
    fail, warn = plain[0], plain[1]
    stored_as = str(pydicom.dcmread(qr.files[fail], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    dest = AE(ae_title="MOVESCU")
    dest.add_supported_context(CTImageStorage, [stored_as])  # as stored: the fast path

    def store(event: evt.Event) -> Dataset | int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid not in (fail, warn):
            return 0x0000
        status = Dataset()
        status.Status = 0xC000 if uid == fail else 0xB007
        status.ErrorComment = "cannot understand" if uid == fail else "coerced"
        if uid == fail:
            status.OffendingElement = [0x00100010]
        return status

    listener = dest.start_server((HOST, qr.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        responses = _move_responses(qr, _identifier("STUDY", StudyInstanceUID=qr.study_uid), "MOVESCU")
    finally:
        listener.shutdown()
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfWarningSuboperations == 1
    assert final.NumberOfCompletedSuboperations == len(qr.files) - 2
    assert identifier.FailedSOPInstanceUIDList == fail
    pending = [status for status, _ in responses[:-1]]
    assert [p.NumberOfRemainingSuboperations for p in pending] == list(range(len(qr.files) - 1, -1, -1))
    # The uncompressed ones go the fast path, whose sender reads its responses itself; one
    # that comes after the sender's lease ran out (a loaded machine) is read by pynetdicom
    # and handed over, which the counts above must not notice either.
    meant = Counter([0xC000, 0xB007] + [0] * (len(plain) - 2))
    assert not Counter(read) - meant, f"the sender read statuses the destination never sent: {read}"
    assert len(read) >= len(plain) - 2, f"most responses should be read by the sender, got {len(read)}"
    last = json.loads(_audits(qr)[-1].detail)
    assert (last["failed"], last["warning"], last["failed_uids"]) == (1, 1, [fail])


def test_a_destination_that_aborts_fails_the_rest_at_once_and_the_next_move_works(
    qr: QR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storescp --abort-after answers the first C-STORE with an A-ABORT: the sending thread
    hands it to pynetdicom, the move ends with every instance failed and listed, without
    waiting out the DIMSE timeout, and the next C-MOVE goes through whole."""
    read = _counting_direct_reads(monkeypatch)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    for abort, out in ((True, tmp_path / "aborting"), (False, tmp_path / "good")):
        flags = ["--abort-after"] if abort else []
        with running_storescp(out, qr.store_port, *flags):
            t0 = time.monotonic()
            result = _dcmtk("movescu", qr, None, keys, "-aet", "MOVESCU", "-aem", "STORESCP")
            took = time.monotonic() - t0
        text = _final(result)
        if abort:
            assert took < 10, text  # not the 30 s DIMSE timeout
            assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in text, text  # 0xA702
            assert read == []  # no response came: nothing was taken for one
            failed = json.loads(_audits(qr)[-1].detail)
            assert failed["failed"] == len(qr.files) and failed["completed"] == 0
        else:
            assert result.returncode == 0, text
            _check_arrived(qr, _received(out), set(qr.files), uncompressed=False)
            # Each response read by the sender, but one that beat its lease (the first, just
            # after the association, on a loaded machine) is read by pynetdicom instead.
            assert set(read) == {0} and len(read) >= len(qr.files) - 1, read


def test_a_c_cancel_mid_get_is_read_and_honoured(qr: QR) -> None:
    """The C-CANCEL arrives while the sending thread owns the socket: it is handed to
    pynetdicom, the C-GET stops with 0xFE00 and the association serves the next one."""
    got: list[str] = []

    def store(event: evt.Event) -> int:
        time.sleep(0.05)
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = _get_requestor(qr.port, store)
    study = _identifier("STUDY", StudyInstanceUID=qr.study_uid)
    try:
        responses = []
        for status, _ in assoc.send_c_get(study, StudyRootQueryRetrieveInformationModelGet, msg_id=5):
            responses.append(status)
            if len(responses) == 2:
                assoc.send_c_cancel(5, query_model=StudyRootQueryRetrieveInformationModelGet)
        cancelled_after = len(got)
        got.clear()
        again = list(assoc.send_c_get(study, StudyRootQueryRetrieveInformationModelGet, msg_id=9))
    finally:
        assoc.release()
    assert responses[-1].Status == 0xFE00
    assert 0 < cancelled_after < len(qr.files)
    assert again[-1][0].Status == 0x0000 and sorted(got) == sorted(qr.files)
