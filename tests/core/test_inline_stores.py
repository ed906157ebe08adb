"""C-STOREs read and answered by the association's own thread (pipeline.dicom.storescp):
the same statuses, files and index rows as pynetdicom's path, whatever else the peer
sends on the association, and nothing left behind when a request breaks off."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pipeline.archive.store import NotInArchiveError, encode_dataset
from pipeline.dicom.storescp import INLINE_COUNT
from pipeline.dicom.wire import store_request
from pipeline.lab.synth import synth_study
from tests.core.conftest import HOST, Receiver, p_data_pdu, pdv_item, statuses, storescu

pytestmark = pytest.mark.slow  # a receiver on loopback


_A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _association(receiver: Receiver, sop_class: str) -> Any:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, receiver.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    return assoc


def _server_side(receiver: Receiver) -> Any:
    (server_side,) = receiver.server.active_associations
    return server_side


def _wait_until_inline(server_side: Any) -> None:
    """Until the server's association thread holds its socket (it waits for the next request)."""
    deadline = time.monotonic() + 5
    while not getattr(server_side.dul.socket, "_leased", False):
        assert time.monotonic() < deadline, "the association thread never read the socket itself"
        time.sleep(0.005)


def _send_raw(assoc: Any, data: bytes) -> None:
    """Write ``data`` on the requestor's socket, its reactor paused (as send_c_store does)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    assoc.dul.socket.socket.sendall(data)


def _stored(receiver: Receiver, sop_instance_uid: str) -> bool:
    try:
        return receiver.archive.path_of(sop_instance_uid).exists()
    except NotInArchiveError:
        return False


def _incoming(receiver: Receiver) -> list[Path]:
    return sorted(p for p in receiver.archive.incoming_dir.iterdir() if p.is_file())


@pytest.fixture
def slices(tmp_path: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in synth_study(tmp_path / "s", seed=21, slices=6, rows=256, cols=256)]


def test_a_modalitys_stream_of_c_stores_is_served_by_the_association_thread(receiver: Receiver, tmp_path: Path) -> None:
    """dcmtk storescu, 8 images on one association: all stored, all but the first read by
    the association's own thread (the first is pynetdicom's, which hands over)."""
    files = synth_study(tmp_path / "big", seed=22, slices=8, rows=512, cols=512)
    seen: list[Any] = []
    original = receiver.archive.store_encoded

    def watching(encoded: bytes, **kwargs: Any) -> Any:
        seen.extend(receiver.server.active_associations)
        return original(encoded, **kwargs)

    receiver.archive.store_encoded = watching  # type: ignore[method-assign]
    result = storescu(receiver.port, *files)
    assert statuses(result) == [0] * 8, result.stderr
    (server_side,) = set(seen)
    assert server_side.__dict__.get(INLINE_COUNT) == 7, "every C-STORE after the first is the association thread's"
    for path in files:
        ds = pydicom.dcmread(path)
        assert pydicom.dcmread(receiver.archive.path_of(ds.SOPInstanceUID)).PixelData == ds.PixelData
    assert _incoming(receiver) == []


def test_echo_between_stores_goes_back_to_pynetdicom_and_storing_resumes(
    receiver: Receiver, slices: list[pydicom.Dataset]
) -> None:
    assoc = _association(receiver, slices[0].SOPClassUID)
    try:
        assert assoc.send_c_store(slices[0]).Status == 0
        assert assoc.send_c_store(slices[1]).Status == 0
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(slices[2]).Status == 0
        assert assoc.send_c_store(slices[3]).Status == 0
        assert _server_side(receiver).__dict__.get(INLINE_COUNT, 0) >= 2
    finally:
        assoc.release()
    assert all(_stored(receiver, ds.SOPInstanceUID) for ds in slices[:4])


def _context(assoc: Any, sop_class: str) -> int:
    return next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == sop_class)


def _store_raw(assoc: Any, msg_id: int, sop_class: str, sop_instance: str, dataset: bytes) -> Any:
    """One C-STORE of ``dataset`` as these bytes, in one PDU; the response."""
    cx = _context(assoc, sop_class)
    command = store_request(msg_id, 0, sop_class, sop_instance, None, None)
    _send_raw(assoc, p_data_pdu(pdv_item(cx, 0x03, command), pdv_item(cx, 0x02, dataset)))
    _, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assert response is not None, "no C-STORE response"
    assert response.MessageIDBeingRespondedTo == msg_id
    return response


def test_bad_datasets_read_by_the_association_thread_get_the_same_failure_status(
    receiver: Receiver, slices: list[pydicom.Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    """A dataset that does not parse, one without its Study Instance UID, one whose SOP
    Instance differs from the request's: 0xC000, 0xC001 and 0xA900, each with an Error
    Comment and a log line; then the next store succeeds and nothing is left behind."""
    ds = slices[1]
    encoded = encode_dataset(ds, ExplicitVRLittleEndian)
    cases = [
        (b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 10, ds.SOPInstanceUID, 0xC000),  # an element runs past the end
        (encoded[:301], ds.SOPInstanceUID, 0xC001),  # cut before the Study Instance UID
        (encoded, "1.2.826.0.1.3680043.8.498.99", 0xA900),  # the request names another instance
    ]
    assoc = _association(receiver, ds.SOPClassUID)
    try:
        assert assoc.send_c_store(slices[0]).Status == 0
        _wait_until_inline(_server_side(receiver))
        with caplog.at_level(logging.WARNING, logger="pipeline.dicom.storescp"):
            for msg_id, (dataset, sop_instance, status) in enumerate(cases, start=11):
                response = _store_raw(assoc, msg_id, ds.SOPClassUID, sop_instance, dataset)
                assert (response.Status, bool(response.ErrorComment)) == (status, True)
        assert assoc.send_c_store(slices[2]).Status == 0
        assert _server_side(receiver).__dict__.get(INLINE_COUNT, 0) == 4
    finally:
        assoc.release()
    for status in ("0xC000", "0xC001", "0xA900"):
        assert f"refused with {status}" in caplog.text
    assert not _stored(receiver, ds.SOPInstanceUID)
    assert _stored(receiver, slices[2].SOPInstanceUID)
    assert _incoming(receiver) == []


@pytest.mark.parametrize("how", ["a-abort", "connection closed", "command inside the data set"])
def test_a_request_broken_off_inside_its_data_set_leaves_nothing(
    receiver: Receiver, slices: list[pydicom.Dataset], caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Half a dataset, then an A-ABORT, the connection closed, or a new command where the
    data set should go on: no spool file, no index row, no answer; the receiver serves the
    next association."""
    assoc = _association(receiver, slices[0].SOPClassUID)
    cx = _context(assoc, slices[1].SOPClassUID)
    half = encode_dataset(slices[1], ExplicitVRLittleEndian)[:200_000]
    command = store_request(5, 0, slices[1].SOPClassUID, slices[1].SOPInstanceUID, None, None)
    assert assoc.send_c_store(slices[0]).Status == 0
    server_side = _server_side(receiver)
    _wait_until_inline(server_side)
    _send_raw(assoc, p_data_pdu(pdv_item(cx, 0x03, command), pdv_item(cx, 0x00, half)))
    deadline = time.monotonic() + 5
    while not _incoming(receiver):  # the spool of the request being received
        assert time.monotonic() < deadline, "no spool file for the request"
        time.sleep(0.005)
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.storescp"):
        if how == "a-abort":
            assoc.dul.socket.socket.sendall(_A_ABORT)
        elif how == "connection closed":
            assoc.dul.socket.socket.close()
        else:
            assoc.dul.socket.socket.sendall(p_data_pdu(pdv_item(cx, 0x03, command)))
        deadline = time.monotonic() + 10
        while receiver.server.active_associations or _incoming(receiver):
            assert time.monotonic() < deadline, "the association or its spool outlived the broken request"
            time.sleep(0.01)
    assoc.abort()
    if how == "command inside the data set":
        assert "P-DATA-TF inside a C-STORE data set" in caplog.text
    assert not _stored(receiver, slices[1].SOPInstanceUID)
    with receiver.archive.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT count(*) FROM instance WHERE SOPInstanceUID = ?", (slices[1].SOPInstanceUID,)
        ).scalar()
    assert rows == 0
    again = _association(receiver, slices[2].SOPClassUID)
    try:
        assert again.send_c_store(slices[2]).Status == 0
        assert again.send_c_store(slices[1]).Status == 0
    finally:
        again.release()


def test_a_c_moves_sub_operations_are_read_by_the_association_thread(
    receiver: Receiver, slices: list[pydicom.Dataset]
) -> None:
    """C-STOREs that name a Move Originator (another PACS moving a study here) take the
    same path as a modality's."""
    assoc = _association(receiver, slices[0].SOPClassUID)
    try:
        for i, ds in enumerate(slices[:4]):
            assert assoc.send_c_store(ds, originator_aet="OTHERPACS", originator_id=40 + i).Status == 0
        assert _server_side(receiver).__dict__.get(INLINE_COUNT, 0) == 3
    finally:
        assoc.release()
    assert all(_stored(receiver, ds.SOPInstanceUID) for ds in slices[:4])
