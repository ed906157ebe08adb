"""Incoming P-DATA-TF PDUs decoded the lean way (:mod:`pipeline.dicom.spooling`): every
fragment reaches the archive exactly, however a sender packs its PDUs."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from pipeline.archive.store import encode_dataset
from pipeline.dicom.incoming import decode_p_data, presentation_data_values
from pipeline.dicom.wire import store_request
from pipeline.lab.synth import synth_study
from tests.core.conftest import HOST, Receiver, p_data_pdu, pdv_item, statuses, storescu

pytestmark = pytest.mark.slow  # a receiver on loopback


def test_each_presentation_data_value_is_a_view_of_its_bytes() -> None:
    pdu = bytearray(p_data_pdu(pdv_item(1, 0x03, b"cmd!"), pdv_item(3, 0x00, b"data" * 3), pdv_item(3, 0x02, b"")))
    values = presentation_data_values(pdu)
    assert values is not None
    assert [(cx, bytes(v)) for cx, v in values] == [(1, b"\x03cmd!"), (3, b"\x00" + b"data" * 3), (3, b"\x02")]
    assert all(isinstance(v, memoryview) for _, v in values)


@pytest.mark.parametrize(
    "pdu",
    [
        p_data_pdu(),  # no item at all
        p_data_pdu(pdv_item(1, 0x02, b"abcd"))[:-1],  # the PDU ends before its length says
        p_data_pdu(pdv_item(1, 0x02, b"abcd")) + b"\x00",  # ... or after
        p_data_pdu(struct.pack(">LB", 1, 1) + b"\x02"),  # an item too short for its control header
        p_data_pdu(struct.pack(">LBB", 99, 1, 2) + b"abcd"),  # an item running past the PDU's end
        p_data_pdu(pdv_item(1, 0x02, b"ab"), b"\x00\x00"),  # half an item header at the end
    ],
)
def test_a_pdu_that_does_not_parse_exactly_goes_pynetdicoms_way(pdu: bytes) -> None:
    assert presentation_data_values(bytearray(pdu)) is None


def test_fragments_packed_several_to_a_pdu_are_stored_byte_for_byte(receiver: Receiver, tmp_path: Path) -> None:
    """A sender that packs the command and several dataset fragments of odd sizes into
    each PDU (PS3.8 allows any number of PDVs per PDU) gets Success, and the archive holds
    exactly the bytes it sent."""
    ds = pydicom.dcmread(synth_study(tmp_path / "s", seed=5, slices=1, rows=256, cols=256)[0])
    dataset = encode_dataset(ds, ExplicitVRLittleEndian)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, receiver.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    try:
        (server_side,) = receiver.server.active_associations
        assert getattr(server_side.dul._decode_pdu, "func", None) is decode_p_data, "lean decoding is not active"
        cx = assoc.accepted_contexts[0].context_id
        command = store_request(7, 2, ds.SOPClassUID, ds.SOPInstanceUID, None, None)
        cuts = [0, 1, 4097, 40000, 40001, 77777, len(dataset)]
        fragments = [dataset[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        items = [pdv_item(cx, 0x03, command)]
        items += [pdv_item(cx, 0x02 if i == len(fragments) - 1 else 0x00, f) for i, f in enumerate(fragments)]
        pdus = [p_data_pdu(*items[:3]), p_data_pdu(*items[3:5]), p_data_pdu(*items[5:])]
        assoc._reactor_checkpoint.clear()  # as send_c_store does: our thread takes the response
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dul.socket.socket.sendall(b"".join(pdus))
        _, response = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert response is not None, "no C-STORE response"
        assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, 7)
    finally:
        assoc.release()
    stored = receiver.archive.path_of(ds.SOPInstanceUID)
    assert stored.read_bytes().endswith(dataset)
    assert pydicom.dcmread(stored).PixelData == ds.PixelData


def test_a_complete_datasets_fsync_has_begun_when_its_handler_runs(receiver: Receiver, tmp_path: Path) -> None:
    """For a C-STORE pynetdicom reads (an association's first), the dataset's fdatasync
    starts as the message is queued for the C-STORE handler (pipeline.archive.spool:
    Spool.flush_ahead), not when the handler gets to it. The association's own thread,
    which reads the second, syncs it after the header parse."""
    seen: list[bool] = []
    store = receiver.archive.store_encoded

    def watching(encoded: bytes, **kwargs: Any) -> Any:
        spool = kwargs.get("spool")
        seen.append(spool is not None and spool.flushing)
        return store(encoded, **kwargs)

    receiver.archive.store_encoded = watching  # type: ignore[method-assign]
    files = synth_study(tmp_path / "big", seed=6, slices=2, rows=512, cols=512)  # several PDUs each
    result = storescu(receiver.port, *files)
    assert statuses(result) == [0, 0], result.stderr
    assert seen == [True, False]


@pytest.mark.parametrize("originator", [None, ("MOVESCU", 12), ("A", 65535), (" PAD ME ", 1)])
def test_the_lean_c_store_request_is_the_primitive_pynetdicom_builds(originator: tuple[str, int] | None) -> None:
    """Every parameter a handler reads is what pynetdicom's own decoding gives, with or
    without a Move Originator (a C-MOVE's sub-operation)."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE

    from pipeline.dicom.incoming import lean_store_request, store_request_fields, store_request_uids

    request = C_STORE()
    request.MessageID, request.Priority = 4321, 1
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567890123456789"
    if originator is not None:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = originator
    request.DataSet = BytesIO(b"\x08\x00\x16\x00" + b"x" * 300)

    def received() -> DIMSEMessage:
        sent = C_STORE_RQ()
        sent.primitive_to_message(request)
        message = DIMSEMessage()
        complete = [message.decode_msg(p) for p in sent.encode_msg(3, 64)]
        assert complete[-1] and isinstance(message, C_STORE_RQ)
        return message

    theirs = type(received()).message_to_primitive(received())
    message = received()
    assert lean_store_request(message)
    ours = message.message_to_primitive()
    names = [
        "MessageID",
        "Priority",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
        "_context_id",
    ]
    assert [getattr(ours, n) for n in names] == [getattr(theirs, n) for n in names]
    assert ours.DataSet.getvalue() == theirs.DataSet.getvalue()
    lean = store_request_fields(message.encoded_command_set.getvalue(), checked=True)
    assert lean is not None
    assert lean == {n: getattr(theirs, n) for n in names if n in lean}
    assert store_request_uids(message) == (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
