"""pipeline/dicom/tuning.py is active on real associations, and says so when it is not.

The tuning swaps pynetdicom's socket class, wraps its queues and replaces a module
global; an upgrade of pynetdicom can make any of that silently ineffective. These tests
fail then: the receiver's associations must be tuned, and pynetdicom must still read
through the tuned socket and wait through the tuned clock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import types
from pathlib import Path

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pipeline.dicom import tuning

from .conftest import HOST, running_receiver

pytestmark = pytest.mark.slow  # a receiver on loopback

ROOT = Path(__file__).resolve().parents[2]


def test_pynetdicom_is_the_version_the_tuning_was_written_against() -> None:
    assert pynetdicom.__version__ == tuning.PYNETDICOM_VERSION
    pinned = re.search(r'"pynetdicom==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == tuning.PYNETDICOM_VERSION


def test_the_receivers_associations_are_tuned_and_pynetdicom_uses_the_tuning(
    tmp_path: Path, study_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"ready": 0, "recv": 0, "wake_wait": 0}
    ready, recv = tuning._LowLatencySocket.ready.fget, tuning._LowLatencySocket.recv  # type: ignore[attr-defined]
    sleep = tuning._ReactorClock.sleep

    def counting_ready(sock: object) -> bool:
        calls["ready"] += 1
        return bool(ready(sock))

    def counting_recv(sock: object, n: int) -> bytearray:
        calls["recv"] += 1
        return recv(sock, n)

    def counting_sleep(clock: object, seconds: float) -> None:
        if seconds == tuning._REACTOR_POLL_SECONDS and hasattr(threading.current_thread(), tuning._WAKE_ATTRIBUTE):
            calls["wake_wait"] += 1
        sleep(clock, seconds)  # type: ignore[arg-type]

    monkeypatch.setattr(tuning._LowLatencySocket, "ready", property(counting_ready))
    monkeypatch.setattr(tuning._LowLatencySocket, "recv", counting_recv)
    monkeypatch.setattr(tuning._ReactorClock, "sleep", counting_sleep)

    with running_receiver(tmp_path) as running:
        server = running.server
        assert tuning.contexts_are_cheap(server)
        ae = AE(ae_title="TUNINGTEST")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(HOST, running.port, ae_title="RADTRIAGE")
        assert assoc.is_established
        try:
            deadline = time.monotonic() + 5
            while not server.active_associations and time.monotonic() < deadline:
                time.sleep(0.01)
            ours = server.active_associations
            assert ours and all(tuning.is_tuned(a) for a in ours), "the receiver's association is not tuned"
            from pynetdicom import _handlers, evt

            # pynetdicom's logger is not at DEBUG here: no PDU summaries formatted for nobody
            summary = (_handlers.standard_pdu_recv_handler, None)
            assert all(summary not in a.get_handlers(evt.EVT_PDU_RECV) for a in ours)
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(dcmread(study_files[0])).Status == 0x0000
        finally:
            assoc.release()
    # pynetdicom still reads PDUs through the tuned socket and polls through the tuned clock.
    assert calls["ready"] > 0 and calls["recv"] > 0 and calls["wake_wait"] > 0, calls


def test_a_tuning_that_cannot_apply_warns_and_leaves_the_association(caplog: pytest.LogCaptureFixture) -> None:
    tuning._warned.clear()
    unknown = types.SimpleNamespace(dul=types.SimpleNamespace(socket=object()))
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.tuning"):
        assert tuning.tune_association(unknown) is False
        assert tuning.cheap_context_copies(types.SimpleNamespace(contexts=None)) is False
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'low-latency DUL' skipped" in m for m in warned), warned
    assert any("'cheap context copies' skipped" in m for m in warned), warned
    assert not tuning.is_tuned(unknown)


# -- pipeline/dicom/wire.py: what fastsend writes is what pynetdicom would, in fewer PDUs --


def _pynetdicom_command(primitive: object) -> bytes:
    from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
    from pynetdicom.dsutils import encode

    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE  # type: ignore[attr-defined]
    message = table[type(primitive)]()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def test_hand_encoded_command_sets_are_byte_equal_to_pynetdicoms() -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE

    from pipeline.dicom import wire

    cases: list[object] = []
    for originator in ((None, None), ("MOVESCU", 7), ("ODD", 65535)):
        rq = C_STORE()
        rq.MessageID, rq.Priority = 3, 2
        rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.45"  # odd length: padded
        rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = originator
        rq.DataSet = BytesIO(b"\x08\x00\x18\x00")
        cases.append(rq)
        assert wire.store_request(3, 2, CTImageStorage, "1.2.3.45", *originator) == _pynetdicom_command(rq)
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 3, 0xB000
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.4"
    cases.append(rsp)
    for cls, identifier in ((C_FIND, BytesIO(b"\x08\x00\x52\x00")), (C_FIND, None), (C_GET, None), (C_MOVE, None)):
        r = cls()
        r.MessageIDBeingRespondedTo, r.Status = 1, 0xFF00
        r.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
        r.Identifier = identifier
        if cls is not C_FIND:
            r.NumberOfRemainingSuboperations, r.NumberOfCompletedSuboperations = 299, 1
            r.NumberOfFailedSuboperations, r.NumberOfWarningSuboperations = 0, 0
        cases.append(r)
    failed = C_FIND()
    failed.MessageIDBeingRespondedTo, failed.Status, failed.ErrorComment = 1, 0xA900, "below the STUDY level"
    failed.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    cases.append(failed)
    for primitive in cases:
        encoded = wire.encode_command(primitive)
        assert encoded is not None, primitive
        assert encoded[0] == _pynetdicom_command(primitive), type(primitive).__name__
    offending = C_FIND()
    offending.MessageIDBeingRespondedTo, offending.Status, offending.OffendingElement = 1, 0xA900, [0x00100010]
    assert wire.encode_command(offending) is None  # left to pynetdicom


@pytest.mark.parametrize("max_pdu", [0, 4096, 4097, 16384, 131072])
@pytest.mark.parametrize("length", [0, 1, 4083, 4084, 100_001])
def test_prebuilt_pdus_decode_to_the_same_message_within_the_peers_maximum(max_pdu: int, length: int) -> None:
    from pynetdicom.pdu import P_DATA_TF

    from pipeline.dicom import wire

    command = wire.store_request(1, 2, CTImageStorage, "1.2.3.4", None, None)
    dataset = bytes(range(256)) * (length // 256) + bytes(length % 256)
    buffer = bytes(wire.encode_pdus(5, command, dataset, max_pdu))
    pos, parts = 0, {True: b"", False: b""}
    controls = []
    while pos < len(buffer):
        pdu_length = int.from_bytes(buffer[pos + 2 : pos + 6], "big")
        assert max_pdu == 0 or pdu_length <= max_pdu
        pdu = P_DATA_TF()
        pdu.decode(buffer[pos : pos + 6 + pdu_length])
        (item,) = pdu.presentation_data_value_items  # one PDV per PDU
        assert item.presentation_context_id == 5
        control, fragment = item.presentation_data_value[0], item.presentation_data_value[1:]
        controls.append(control)
        parts[bool(control & 1)] += fragment
        pos += 6 + pdu_length
    assert parts[True] == command and parts[False] == dataset
    assert controls[0] == 0x03 and (controls[-1] == 0x02 if dataset else len(controls) == 1)
    assert all(c in (0x00, 0x02) for c in controls[1:])
    assert wire.fragment_length(4097) % 2 == 0  # fragments even, whatever the peer's maximum


def _pynetdicom_pdus(primitive: object, context_id: int, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for a DIMSE primitive."""
    from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
    from pynetdicom.pdu import P_DATA_TF

    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE  # type: ignore[attr-defined]
    message = table[type(primitive)]()
    message.primitive_to_message(primitive)
    message.context_id = context_id
    return [bytes(P_DATA_TF(p).encode()) for p in message.encode_msg(context_id, max_pdu)]


def _pynetdicom_reads(pdus: list[bytes]) -> object:
    """What pynetdicom's DIMSE layer makes of those PDUs (the response primitive)."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu import P_DATA_TF

    message = DIMSEMessage()
    for raw in pdus:
        pdu = P_DATA_TF()
        pdu.decode(raw)
        done = message.decode_msg(pdu.to_primitive())
    assert done
    return message.message_to_primitive()


def test_store_responses_decode_as_pynetdicom_decodes_them() -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE

    from pipeline.dicom import wire

    cases = []
    for status, extra in (
        (0x0000, {}),
        (0xB007, {"ErrorComment": " coerced."}),  # warning; odd length: padded; a leading space kept
        (0xC000, {"ErrorComment": "cannot understand", "OffendingElement": [0x00100010, 0x00080018]}),
        (0xA700, {"ErrorComment": "out of resources", "AffectedSOPInstanceUID": None}),
    ):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 41, status
        rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.45"
        for keyword, value in extra.items():
            setattr(rsp, keyword, value)
        cases.append(rsp)
    for rsp in cases:
        pdus = _pynetdicom_pdus(rsp, 9, 16384)
        assert len(pdus) == 1
        ours = wire.decode_store_response(pdus[0])
        theirs = _pynetdicom_reads(pdus)
        assert ours is not None
        assert (ours.context_id, ours.message_id, ours.status) == (9, 41, theirs.Status)  # type: ignore[attr-defined]
        assert ours.sop_instance_uid == theirs.AffectedSOPInstanceUID  # type: ignore[attr-defined]
        assert ours.error_comment == theirs.ErrorComment  # type: ignore[attr-defined]
        offending = theirs.OffendingElement  # type: ignore[attr-defined]
        assert ours.offending_element == (tuple(int(t) for t in offending) if offending else None)

    # What it must leave to pynetdicom: another message, a command in two PDUs, two PDVs.
    rq = C_STORE()
    rq.MessageID, rq.Priority, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = 1, 2, CTImageStorage, "1.2.3"
    rq.DataSet = BytesIO(b"\x08\x00\x18\x00")
    echo, find = C_ECHO(), C_FIND()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    find.MessageIDBeingRespondedTo, find.Status, find.AffectedSOPClassUID = 1, 0, "1.2.840.10008.5.1.4.1.2.2.1"
    for other in (rq, echo, find):
        assert all(wire.decode_store_response(p) is None for p in _pynetdicom_pdus(other, 1, 16384))
    split = _pynetdicom_pdus(cases[2], 1, 64)
    assert len(split) > 1 and all(wire.decode_store_response(p) is None for p in split)
    one = _pynetdicom_pdus(cases[0], 1, 16384)[0]
    body = one[6:]
    two_pdvs = b"\x04\x00" + (2 * len(body)).to_bytes(4, "big") + body + body
    assert wire.decode_store_response(two_pdvs) is None
    assert wire.decode_store_response(one[:-2]) is None  # truncated


def test_remembered_uid_checks_still_refuse_and_warn_as_pynetdicom_does(caplog: pytest.LogCaptureFixture) -> None:
    """A UID check passed once is remembered; a bad UID is refused every time, and a
    non-conformant one warned about every time (neither is remembered)."""
    import pynetdicom.pdu_items
    import pynetdicom.presentation
    import pynetdicom.utils

    assert tuning.remembered_uid_checks()
    set_uid = pynetdicom.utils.set_uid
    assert pynetdicom.pdu_items.set_uid is set_uid and pynetdicom.presentation.set_uid is set_uid
    good = set_uid(b"1.2.840.10008.5.1.4.1.1.2", "Abstract Syntax Name")
    assert good == CTImageStorage and set_uid(b"1.2.840.10008.5.1.4.1.1.2", "Abstract Syntax Name") is good
    for _ in range(2):
        with pytest.raises(ValueError):
            set_uid("1." + "2" * 70, "Abstract Syntax Name")  # longer than 64
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        set_uid("1.02.3", "Abstract Syntax Name")
        set_uid("1.02.3", "Abstract Syntax Name")
    assert sum("Non-conformant" in r.getMessage() for r in caplog.records) == 2
