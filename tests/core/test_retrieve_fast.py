"""The retrieve fast path (pipeline/dicom/subops.py): our own sub-operation loop.

What a user notices: the same files arrive, dcmtk and pynetdicom peers read the same
pending and final responses (counts, statuses, Failed SOP Instance UID List) whether our
loop or pynetdicom's ran, and the normal path still serves when ours may not (pynetdicom
at DEBUG, another pynetdicom version: with a WARNING).
"""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, Verification
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyMove

from tests.core.conftest import HOST
from tests.core.test_retrieve import (
    QR,
    _check_arrived,
    _dcmtk,
    _final,
    _get_requestor,
    _identifier,
    _move_responses,
    _received,
    running_storescp,
)
from tests.core.test_retrieve import qr as qr  # a fixture
from tests.core.test_tls import modality_tls, tls_receiver_settings
from tests.core.test_tls import pki as pki  # a fixture


def test_pending_responses_are_byte_equal_to_pynetdicoms() -> None:
    from pynetdicom.dimse import _RSP_TO_MESSAGE
    from pynetdicom.dimse_primitives import C_GET, C_MOVE
    from pynetdicom.dsutils import encode

    from pipeline.dicom.wire import SuboperationResponses

    for cls, move in ((C_GET, False), (C_MOVE, True)):
        for msg_id, counts in ((1, (299, 1, 0, 0)), (65535, (0, 65535, 7, 3)), (300, (5, 0, 0, 0))):
            rsp = cls()
            rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, 0xFF00
            rsp.AffectedSOPClassUID = StudyMove if move else StudyRootQueryRetrieveInformationModelGet
            rsp.Identifier = None
            (
                rsp.NumberOfRemainingSuboperations,
                rsp.NumberOfCompletedSuboperations,
                rsp.NumberOfFailedSuboperations,
                rsp.NumberOfWarningSuboperations,
            ) = counts
            message = _RSP_TO_MESSAGE[cls]()
            message.primitive_to_message(rsp)
            theirs = bytes(encode(message.command_set, True, True))
            ours = SuboperationResponses(move, str(rsp.AffectedSOPClassUID), msg_id).pending(*counts)
            assert ours == theirs, (cls.__name__, msg_id)


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 131072])
def test_file_pdus_are_the_pdus_of_the_files_dataset(study_files: list[Path], tmp_path: Path, max_pdu: int) -> None:
    """What goes from the mapped file is what encode_pdus makes of the file's dataset bytes
    (checked byte for byte against pynetdicom in tests/core/test_tuning.py), also for a
    file with no dataset after its File Meta Information, and when sendmsg sends short."""
    import socket
    import threading

    from pipeline.dicom.wire import encode_pdus, file_pdus, read_file_meta, store_request

    empty = tmp_path / "meta-only.dcm"
    raw = study_files[0].read_bytes()
    meta = read_file_meta(raw)
    assert meta is not None
    empty.write_bytes(raw[: meta[0]])
    command = store_request(7, 2, CTImageStorage, "1.2.3.4", "MOVESCU", 3)
    for path in (study_files[0], empty):
        data = path.read_bytes()
        start, syntax = read_file_meta(data)  # type: ignore[misc]
        stored = type("Stored", (), {"stored_path": path, "stored_syntax": syntax})()
        wanted = bytes(encode_pdus(5, command, data[start:] or None, max_pdu))
        pdus = file_pdus(5, command, stored, max_pdu)
        assert pdus.buffer() == wanted and len(pdus) == len(wanted)
        a, b = socket.socketpair()
        got = bytearray()

        def read(sock: socket.socket = b, into: bytearray = got) -> None:
            while chunk := sock.recv(65536):
                into.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        pdus.send(a)
        pdus.close()
        a.close()
        reader.join(10)
        b.close()
        assert bytes(got) == wanted

    class Short:  # a socket whose sendmsg takes at most 1000 bytes, as a full buffer does
        sent = bytearray()

        def sendmsg(self, parts: list[bytes]) -> int:
            data = b"".join(bytes(p) for p in parts)[:1000]
            self.sent += data
            return len(data)

    short = Short()
    pdus = file_pdus(5, command, type("S", (), {"stored_path": study_files[0], "stored_syntax": meta[1]})(), max_pdu)
    wanted = pdus.buffer()
    pdus.send(short)  # type: ignore[arg-type]
    pdus.close()
    assert bytes(short.sent) == wanted


def _count_own_loops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many instances each run of our own loop sent."""
    from pipeline.dicom import retrieve

    runs: list[int] = []
    original = retrieve.send_all

    def counting(*args: object, **kwargs: object) -> object:
        progress = original(*args, **kwargs)  # type: ignore[arg-type]
        runs.append(len(progress.sent))  # type: ignore[attr-defined]
        return progress

    monkeypatch.setattr(retrieve, "send_all", counting)
    return runs


def _responses(text: str) -> list[str]:
    """The response lines dcmtk -v prints: 'Received Final Move Response (Success)', 'Received C-GET Response (Pending)'."""
    return re.findall(r"Received (?:Final )?(?:Move|C-GET) Response.*", text)


@pytest.mark.slow
def test_movescu_and_getscu_are_served_by_our_loop_and_by_pynetdicoms_alike(
    qr: QR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our loop with storescp (every file as stored) and getscu (two decompressed); then
    pynetdicom's loop (the C-MOVE with pynetdicom's logger at DEBUG, the C-GET as with
    another pynetdicom version): the same files, the same responses printed.

    (Not the C-GET at DEBUG: there a C-STORE response is lost now and then, about one
    retrieve in fifteen, and the sub-operation waits out the DIMSE timeout; so it was
    before this loop existed.)"""
    import pynetdicom

    runs = _count_own_loops(monkeypatch)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    printed: dict[str, list[str]] = {}
    pynetdicom_log = logging.getLogger("pynetdicom")
    monkeypatch.setattr(pynetdicom_log, "level", pynetdicom_log.level)  # restored afterwards
    for mode in ("ours", "pynetdicom"):
        if mode == "pynetdicom":
            pynetdicom_log.setLevel(logging.DEBUG)
        out = tmp_path / f"storescp-{mode}"
        with running_storescp(out, qr.store_port):
            moved = _dcmtk("movescu", qr, None, keys, "-aet", "MOVESCU", "-aem", "STORESCP")
        assert moved.returncode == 0, _final(moved)
        _check_arrived(qr, _received(out), set(qr.files), uncompressed=False)
        if mode == "pynetdicom":
            pynetdicom_log.setLevel(logging.NOTSET)
            monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
        got = _dcmtk("getscu", qr, tmp_path / f"got-{mode}", keys, "-aet", "GETSCU")
        assert got.returncode == 0, _final(got)
        _check_arrived(qr, _received(tmp_path / f"got-{mode}"), set(qr.files), uncompressed=True)
        printed[mode] = _responses(moved.stdout + moved.stderr) + _responses(got.stdout + got.stderr)
        if mode == "ours":
            assert runs == [len(qr.files), len(qr.files)]
    assert runs == [len(qr.files), len(qr.files)]  # nothing more: pynetdicom's loop ran
    assert printed["ours"] == printed["pynetdicom"]
    finals = [line for line in printed["ours"] if "Pending" not in line]
    assert finals == ["Received Final Move Response (Success)", "Received C-GET Response (Success)"]
    assert len(printed["ours"]) == 2 * (len(qr.files) + 1)


@pytest.mark.slow
def test_another_pynetdicom_version_takes_the_normal_path_with_a_warning(
    qr: QR, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import pynetdicom

    from pipeline.dicom import tuning

    runs = _count_own_loops(monkeypatch)
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    monkeypatch.setattr(tuning, "_warned", set())
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": qr.study_uid}
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.tuning"):
        got = _dcmtk("getscu", qr, tmp_path / "got", keys, "-aet", "GETSCU")
    assert got.returncode == 0, _final(got)
    _check_arrived(qr, _received(tmp_path / "got"), set(qr.files), uncompressed=True)
    assert runs == []
    assert "own sub-operation loop" in caplog.text


def _get(qr: QR, store: object, *, cancel_after: int = 0) -> list[tuple[Dataset, Dataset | None]]:
    """C-GET of the study by a pynetdicom SCU that takes CT uncompressed; every response."""
    assoc = _get_requestor(qr.port, store)
    responses = []
    try:
        study = _identifier("STUDY", StudyInstanceUID=qr.study_uid)
        for status, identifier in assoc.send_c_get(study, StudyRootQueryRetrieveInformationModelGet, msg_id=11):
            responses.append((status, identifier))
            if cancel_after and len(responses) == cancel_after:
                assoc.send_c_cancel(11, query_model=StudyRootQueryRetrieveInformationModelGet)
    finally:
        assoc.release()
    return responses


@pytest.mark.slow
def test_c_get_counts_and_failed_list_from_our_loop(qr: QR, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requestor that fails one instance and warns on another: every pending response
    counts down, the final one says 0xB000 with the failed one listed and no Remaining."""
    runs = _count_own_loops(monkeypatch)
    plain = sorted(uid for uid in qr.files if uid not in qr.compressed)
    fail, warn = plain[0], plain[1]

    def store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        return 0xA700 if uid == fail else 0xB007 if uid == warn else 0x0000

    responses = _get(qr, store)
    assert runs == [len(qr.files)]
    pending = [s for s, _ in responses[:-1]]
    n = len(qr.files)
    assert [p.Status for p in pending] == [0xFF00] * n
    assert [p.NumberOfRemainingSuboperations for p in pending] == list(range(n - 1, -1, -1))
    assert pending[-1].NumberOfFailedSuboperations == 1 and pending[-1].NumberOfWarningSuboperations == 1
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert "NumberOfRemainingSuboperations" not in final
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (n - 2, 1)
    assert final.NumberOfWarningSuboperations == 1
    assert identifier.FailedSOPInstanceUIDList == fail


@pytest.mark.slow
def test_a_c_cancel_mid_get_ends_our_loop_with_the_remaining_count(qr: QR, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _count_own_loops(monkeypatch)
    got: list[str] = []

    def store(event: evt.Event) -> int:
        import time

        time.sleep(0.05)
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    responses = _get(qr, store, cancel_after=2)
    final, _ = responses[-1]
    assert final.Status == 0xFE00
    assert runs and 0 < runs[0] < len(qr.files)
    assert final.NumberOfCompletedSuboperations == len(got) == runs[0]
    assert final.NumberOfRemainingSuboperations == len(qr.files) - runs[0]


@pytest.mark.slow
def test_c_move_to_a_pynetdicom_destination_gets_the_move_originator(qr: QR, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each C-STORE of our loop names the C-MOVE's requestor (its AE title, not ours) and
    its message as the Move Originator."""
    runs = _count_own_loops(monkeypatch)
    originators: list[tuple[str, int]] = []
    dest = AE(ae_title="MOVESCU")
    dest.add_supported_context(
        CTImageStorage, [str(pydicom.dcmread(qr.files[min(qr.files)]).file_meta.TransferSyntaxUID)]
    )
    dest.add_supported_context(CTImageStorage)
    dest.add_supported_context(Verification)

    def store(event: evt.Event) -> int:
        rq = event.request
        originators.append((str(rq.MoveOriginatorApplicationEntityTitle).strip(), int(rq.MoveOriginatorMessageID)))
        return 0x0000

    listener = dest.start_server((HOST, qr.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        responses = _move_responses(qr, _identifier("STUDY", StudyInstanceUID=qr.study_uid), "MOVESCU", msg_id=21)
    finally:
        listener.shutdown()
    assert runs == [len(qr.files)]
    final, identifier = responses[-1]
    assert final.Status == 0x0000 and identifier is None
    assert final.NumberOfCompletedSuboperations == len(qr.files)
    assert originators == [("PYSCU", 21)] * len(qr.files)


@pytest.mark.slow
def test_c_get_over_tls_gets_every_file(
    pki: Path, tmp_path: Path, study_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS (no sendmsg, no lease) the files still go as their stored bytes, to a
    pynetdicom requestor (dcmtk's getscu has no TLS)."""
    from pipeline.archive import Archive
    from pipeline.dicom import fastsend
    from pipeline.dicom.receiver import start_receiver
    from pipeline.index.db import migrate
    from tests.core.conftest import storescu

    runs = _count_own_loops(monkeypatch)
    sent_over: list[str] = []
    file_pdus = fastsend.file_pdus

    def counting(*args: object) -> object:
        pdus = file_pdus(*args)  # type: ignore[arg-type]
        send = pdus.send

        def noting(sock: object) -> None:
            sent_over.append(type(sock).__name__)
            send(sock)  # type: ignore[arg-type]

        pdus.send = noting  # type: ignore[method-assign]
        return pdus

    monkeypatch.setattr(fastsend, "file_pdus", counting)
    tls = modality_tls(pki)
    settings = tls_receiver_settings(
        pki, tmp_path / "data", peers=[{"ae_title": "GETSCU", "host": HOST, "port": 104, "allow": ["retrieve"]}]
    )
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)
    port = int(server.server_address[1])
    try:
        assert storescu(port, *study_files[:3], extra=tls).returncode == 0
        study = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "modality.pem"), str(pki / "modality.key"))
        got: dict[str, bytes] = {}

        def store(event: evt.Event) -> int:
            got[str(event.request.AffectedSOPInstanceUID)] = bytes(event.dataset.PixelData)
            return 0x0000

        stored_as = str(pydicom.dcmread(study_files[0]).file_meta.TransferSyntaxUID)
        assoc = _get_requestor(port, store, [stored_as], aet="GETSCU", tls_args=(context, HOST))
        try:
            identifier = _identifier("STUDY", StudyInstanceUID=study)
            responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
        assert responses[-1][0].Status == 0x0000
        assert runs == [3] and sent_over == ["SSLSocket"] * 3  # as stored, our loop, over TLS
        sent = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).PixelData for p in study_files[:3]}
        assert got == sent
    finally:
        server.shutdown()
        archive.engine.dispose()
