"""The C-STORE SCP: the EVT_C_STORE handler, and the association thread that reads the
C-STOREs after it itself.

:func:`handle_store` is what pynetdicom calls for a C-STORE request: it stores the
received bytes as they are (:meth:`pipeline.archive.Archive.store_encoded`) and answers;
it never decodes pixel data and never runs a model.

A modality sends one C-STORE after another on one association, and pynetdicom reads each
in its DUL thread, passes it through its state machine and DIMSE layer, and hands the
message to the association's thread through a queue: two threads and ~0.3 ms of decoding
per image, and with several associations per process every hand-over is a wait for the
GIL. :func:`read_stores_inline` (an EVT_CONN_OPEN handler) lets the association's thread,
once it has answered a C-STORE, read the requests that follow itself, under a
:class:`pipeline.dicom.lease.Lease` on the socket (:func:`handle_store` keeps the DUL off
the socket from its response on, so the next request is this thread's to read):

* a P-DATA-TF PDU that opens with a whole C-STORE-RQ command set (the plain elements of
  PS3.7 9.3.1.1, read by :func:`pipeline.dicom.incoming.store_request_fields` and set
  through pynetdicom's own primitive, which validates them as before) on an accepted
  context of that SOP Class, from an AE that may store, is taken: its dataset's
  fragments go to an archive spool as they arrive (:mod:`pipeline.archive.spool`), the
  instance is stored by the same :func:`store_received` the handler uses, and the
  response goes out through the association's fast send path (:mod:`pipeline.dicom.fastsend`);
* any other PDU before a request is taken (a C-ECHO, a C-FIND, an A-RELEASE-RQ, an
  A-ABORT, a command in several fragments, anything pynetdicom's watchers want to see)
  is handed back whole and the thread returns to pynetdicom, which handles it as it
  always did;
* inside a request's dataset, an A-ABORT or any other non-P-DATA PDU is handed back too
  and the instance is dropped unanswered (its spool removed), as pynetdicom would; a
  P-DATA-TF that breaks the message (a command fragment, another context) aborts the
  association with a log line saying why;
* the connection breaking, a PDU over the limits, the association ending meanwhile: the
  spool is removed and pynetdicom sees what it would have seen.

The guarantee is unchanged: Success only after :func:`store_received` returns, i.e. the
file fsynced, renamed, its folder fsynced and the index row committed. TLS associations,
and every association while pynetdicom's logger is at DEBUG, stay on pynetdicom's path
(the lease and the fast send path refuse them). Written against pynetdicom 3.0.4, like
:mod:`pipeline.dicom.tuning`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pipeline.archive import Archive, OutOfResourcesError
from pipeline.archive.header import DatasetError, InvalidUIDError, SOPClassMismatchError
from pipeline.archive.spool import Spool
from pipeline.config import DicomSettings
from pipeline.dicom import lease
from pipeline.dicom.fastsend import active as sends_fast
from pipeline.dicom.fastsend import enable as send_fast
from pipeline.dicom.incoming import presentation_data_values, store_request_fields
from pipeline.dicom.peers import may
from pipeline.dicom.spooling import spool_of
from pipeline.dicom.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_INVALID_UID,
    STATUS_NOT_AUTHORISED,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_MISMATCH,
)

log = logging.getLogger(__name__)

_FAILURES: list[tuple[type[Exception], int]] = [
    (OutOfResourcesError, STATUS_OUT_OF_RESOURCES),
    (SOPClassMismatchError, STATUS_SOP_CLASS_MISMATCH),
    (DatasetError, STATUS_CANNOT_UNDERSTAND),
    (InvalidUIDError, STATUS_INVALID_UID),
]
_STATUS_HANDLER_FAILED = 0xC211  # what pynetdicom answers when the EVT_C_STORE handler raises

# After taking the lease: how long, and how often, the first wait looks for a request
# the DUL read just before (see InlineStores._next_request).
ENTRY_WAIT_SECONDS = 0.1
ENTRY_POLL_SECONDS = 0.002
# How many C-STOREs an association's own thread served (an attribute of the association).
INLINE_COUNT = "_radtriage_inline_stores"
_P_DATA_TF = 0x04
_COMMAND = 0x01  # message control header (PS3.8 E.2): command, not data set
_LAST = 0x02  # ... and the last fragment
# Handlers that watch what pynetdicom decodes: with any of them bound, requests stay on
# its path (they would miss what this thread reads).
_WATCHED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV)


def failure(code: int, comment: str) -> Dataset:
    """A C-STORE failure status with its Error Comment (LO: at most 64 characters)."""
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = comment[:64]
    return rsp


def store_received(
    archive: Archive,
    dicom: DicomSettings | None,
    calling: str,
    *,
    encoded: bytes,
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    spool: Spool | None,
) -> int | Dataset:
    """Store one received C-STORE dataset; its status (0x0000, or a failure with why).

    With ``dicom``, a calling AE without the ``store`` right (a peer admitted for
    querying) gets 0x0124 and nothing is written.
    """
    if dicom is not None and not may(dicom, calling, "store"):
        if spool is not None:
            spool.discard()
        log.warning("C-STORE from %s refused with 0x0124: it may not store (allowed_aes, [[dicom.peers]])", calling)
        return failure(STATUS_NOT_AUTHORISED, f"AE {calling.strip()} may not store here")
    try:
        archive.store_encoded(
            encoded,
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            source_ae=calling,
            spool=spool,
        )
    except tuple(cls for cls, _ in _FAILURES) as err:
        code = next(c for cls, c in _FAILURES if isinstance(err, cls))
        log.warning("C-STORE from %s of %s refused with 0x%04X: %s", calling, sop_instance_uid, code, err)
        return failure(code, str(err))
    return 0x0000


def handle_store(event: evt.Event, archive: Archive, dicom: DicomSettings | None = None) -> int | Dataset:
    """EVT_C_STORE handler: store the received bytes as they are, then answer."""
    request = event.request
    # The response (and every later one) as one prebuilt PDU written by this thread:
    # no pydicom encoding and no hand-over to the DUL thread, ~0.6 ms less per image.
    send_fast(event.assoc)
    status = store_received(
        archive,
        dicom,
        event.assoc.requestor.ae_title,
        # The buffer's own bytes (BytesIO shares them, no copy), which the header
        # parser's BytesIO shares in turn; a memoryview would be copied there.
        encoded=request.DataSet.getvalue(),  # type: ignore[union-attr]
        transfer_syntax=event.context.transfer_syntax,
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        spool=spool_of(request.DataSet),  # written while it arrived (pipeline.dicom.spooling)
    )
    if sends_fast(event.assoc) and not _watched(event.assoc):
        # The next request is for this thread (read_stores_inline), not the DUL: the
        # peer may send it the moment the response is out, before this thread is back.
        lease.reserve(event.assoc)
    return status


def _watched(assoc: Any) -> bool:
    """Whether anything but :func:`handle_store` would see what pynetdicom decodes."""
    handler = assoc.get_handlers(evt.EVT_C_STORE)  # an intervention event: one (handler, args)
    return any(assoc.get_handlers(event) for event in _WATCHED) or handler[0] is not handle_store


def read_stores_inline(event: evt.Event, archive: Archive, dicom: DicomSettings | None = None) -> None:
    """EVT_CONN_OPEN handler: after each C-STORE pynetdicom serves on this association,
    its thread reads and answers the C-STOREs that follow itself (module docstring)."""
    assoc = event.assoc
    original = getattr(assoc, "_serve_request", None)
    if not callable(original) or getattr(original, "func", None) is _serve_request:
        return
    assoc._serve_request = partial(_serve_request, assoc, original, archive, dicom)


def _serve_request(assoc: Any, original: Any, archive: Archive, dicom: DicomSettings | None, msg: Any, cx: int) -> None:
    original(msg, cx)
    if type(msg) is C_STORE and sends_fast(assoc) and assoc.is_established:
        try:
            InlineStores(assoc, archive, dicom).run()
        except Exception:  # as pynetdicom's own _serve_request does with what a service raises
            log.exception("C-STORE association from %s aborted", assoc.requestor.ae_title)
            assoc.abort()


class InlineStores:
    """The C-STOREs read by the association's own thread (see the module docstring)."""

    def __init__(self, assoc: Any, archive: Archive, dicom: DicomSettings | None) -> None:
        self.assoc = assoc
        self.archive = archive
        self.dicom = dicom
        self.calling = assoc.requestor.ae_title
        # Rights do not change during an association; without it pynetdicom's path answers 0x0124.
        self.may_store = dicom is None or may(dicom, self.calling, "store")
        self._storage: dict[str, bool] = {}  # abstract syntax: a Storage Service Class SOP Class

    def run(self) -> None:
        """Serve requests until one is not a plain C-STORE, or the association ends."""
        held = lease.take(self.assoc)
        if held is None:
            lease.unreserve(self.assoc)  # handle_store's reservation: the DUL reads again
            return
        try:
            first = True
            while not held.ended and not _watched(self.assoc) and self._serve_one(held, first):
                first = False
        finally:
            held.end(reserve=False)

    def _queued(self) -> bool:
        """Whether pynetdicom holds a request of the peer's already (its DUL read it before
        the lease): the thread must go back and serve it."""
        return bool(self.assoc.dimse.msg_queue.queue)

    def _next_request(self, held: lease.Lease, first: bool) -> bytearray | None:
        """The PDU that opens the next request. Just after the lease was taken, the DUL
        may still be passing on a request it read before (between its queues for a few
        microseconds, or longer on a busy machine): the first wait looks for that every
        :data:`ENTRY_POLL_SECONDS`, and every wait keeps looking for it."""
        if first:
            try:
                return held.read_pdu(ENTRY_WAIT_SECONDS, poll=ENTRY_POLL_SECONDS, give_up=self._queued)
            except TimeoutError:
                pass
        return held.read_pdu(None, give_up=self._queued)

    def _serve_one(self, held: lease.Lease, first: bool) -> bool:
        """Read, store and answer one C-STORE; ``False`` when the thread is to go back to
        pynetdicom (a PDU handed back, a request of its own to serve, the association ended)."""
        pdu = self._next_request(held, first)
        if pdu is None:
            return False
        request = self._request(pdu)
        if request is None:
            held.hand_back(pdu)
            return False
        primitive, context, fragments, last = request
        transfer_syntax = str(context.transfer_syntax[0])
        spool = self.archive.open_spool(
            transfer_syntax=transfer_syntax,
            sop_class_uid=str(primitive.AffectedSOPClassUID),
            sop_instance_uid=str(primitive.AffectedSOPInstanceUID),
            source_ae=self.calling,
        )
        parts: list[memoryview] = []
        complete = False
        try:
            while True:
                for fragment in fragments:
                    parts.append(fragment)
                    if spool is not None:
                        spool.write(fragment)
                if last:
                    break
                more = self._dataset_pdu(held, context.context_id)
                if more is None:
                    return False
                fragments, last = more
            complete = True
        finally:
            if not complete and spool is not None:
                spool.discard()
        self._answer(primitive, context.context_id, transfer_syntax, b"".join(parts), spool)
        self.assoc.__dict__[INLINE_COUNT] = self.assoc.__dict__.get(INLINE_COUNT, 0) + 1
        return True

    def _request(self, pdu: bytearray) -> tuple[C_STORE, Any, list[memoryview], bool] | None:
        """The C-STORE-RQ that ``pdu`` opens, its accepted context, the dataset fragments
        in the same PDU and whether the last came; ``None``: pynetdicom's to handle."""
        values = presentation_data_values(pdu)  # None for any other PDU type
        if not values or not self.may_store:
            return None
        cx_id, command = values[0]
        if command[0] != _COMMAND | _LAST:
            return None  # a command set in several fragments
        fields = store_request_fields(bytes(command[1:]), checked=True)
        context = self.assoc._accepted_cx.get(cx_id)
        if fields is None or context is None or context.abstract_syntax != fields["AffectedSOPClassUID"]:
            return None
        if not self._is_storage(str(context.abstract_syntax)):
            return None
        primitive = C_STORE()
        try:
            for name, value in fields.items():
                setattr(primitive, name, value)  # pynetdicom's own checks of each value
        except (ValueError, TypeError):
            return None
        data = _data_set_fragments(values[1:], cx_id)
        if data is None:
            return None
        return primitive, context, *data

    def _is_storage(self, abstract_syntax: str) -> bool:
        known = self._storage.get(abstract_syntax)
        if known is None:
            known = self._storage[abstract_syntax] = (
                _config.UNRESTRICTED_STORAGE_SERVICE or uid_to_service_class(abstract_syntax) is StorageServiceClass
            )
        return known

    def _dataset_pdu(self, held: lease.Lease, cx_id: int) -> tuple[list[memoryview], bool] | None:
        """The next PDU's fragments of the dataset being received and whether the last
        came; ``None``: the instance is dropped (PDU handed back, association ended)."""
        pdu = held.read_pdu(None)
        if pdu is None:
            return None
        if pdu[0] != _P_DATA_TF:
            held.hand_back(pdu)  # an A-ABORT, ...: pynetdicom acts on it as it would have
            return None
        values = presentation_data_values(pdu)
        data = None if values is None else _data_set_fragments(values, cx_id)
        if data is None:
            log.warning(
                "association from %s aborted: a P-DATA-TF inside a C-STORE data set is malformed "
                "or carries another message (PS3.8 9.3.5)",
                self.calling,
            )
            held.end(reserve=False)
            self.assoc.abort()
            return None
        return data

    def _answer(self, request: C_STORE, cx_id: int, transfer_syntax: str, encoded: bytes, spool: Spool | None) -> None:
        try:
            status = store_received(
                self.archive,
                self.dicom,
                self.calling,
                encoded=encoded,
                transfer_syntax=transfer_syntax,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                spool=spool,
            )
        except Exception:  # answered as pynetdicom answers a handler that raised
            log.exception("C-STORE from %s of %s failed", self.calling, request.AffectedSOPInstanceUID)
            status = _STATUS_HANDLER_FAILED
        if not self.assoc.is_established:
            return
        rsp = C_STORE()
        rsp.MessageID = request.MessageID
        rsp.MessageIDBeingRespondedTo = request.MessageID
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
        self.assoc.dimse.send_msg(StorageServiceClass(self.assoc).validate_status(status, rsp), cx_id)


def _data_set_fragments(values: list[tuple[int, memoryview]], cx_id: int) -> tuple[list[memoryview], bool] | None:
    """The data set fragments ``values`` carry (control headers off) and whether the last
    came; ``None`` unless they continue one data set on context ``cx_id`` (data set
    fragments only, none after the last)."""
    for i, (value_cx, value) in enumerate(values):
        if value_cx != cx_id or value[0] & _COMMAND or (value[0] & _LAST and i != len(values) - 1):
            return None
    return [value[1:] for _, value in values], bool(values and values[-1][1][0] & _LAST)
