"""Send DIMSE messages as whole, prebuilt P-DATA-TF PDUs: the retrieve side's fast path.

pynetdicom sends a message by encoding its command set with pydicom, re-encoding the
dataset, cutting both into one ``P_DATA`` primitive per PDU and passing each through
the DUL thread's state machine, one queue item, one wake-up and one ``send`` per PDU.
For a 512x512 CT image to a peer with dcmtk's 16 KiB maximum PDU that is 33 trips, and
with the re-encoding about 3 ms of CPU per image, five times the time the bytes take.

On an association where :func:`enable` was called:

* ``assoc.send_c_store`` with a :class:`StoredFile` (what
  :func:`pipeline.dicom.substore.prepare` yields when the peer accepted the instance's
  stored transfer syntax), or :func:`store_status` with an :class:`ArchivedFile`, sends
  the archived file's dataset (everything after the File Meta Information) with no
  decoding, from the file mapped into memory (:class:`pipeline.dicom.wire.FilePdus`): the
  peer gets the very bytes that were received. Its response is read and decoded in the same thread
  (a :class:`pipeline.dicom.lease.Lease` on the socket), not handed over by the DUL
  thread; what that thread cannot take goes back to pynetdicom. Anything else goes the
  normal way;
* ``dimse.send_msg`` encodes the command set of C-STORE-RQ/RSP and C-FIND/C-GET/C-MOVE-RSP
  by hand and sends command and dataset together. Other messages, and every message
  while pynetdicom's logger is at DEBUG (its standard handlers then log each PDU and
  message), go the normal way;
* a C-FIND response identifier that :mod:`pipeline.dicom.identifier` encoded
  (:class:`EncodedIdentifier`) is sent as those bytes (``pynetdicom.service_class.encode``
  passes every other dataset to pydicom);
* ``dimse.get_msg`` gives a C-STORE's response only to the thread that sent it
  (:func:`_get_msg`), in place of pynetdicom's racy pause of the association's reactor.

The bytes (command sets, PDUs, the C-STORE-RSP) are :mod:`pipeline.dicom.wire`'s, each
byte-equal to pynetdicom's. A message is written to the socket by the thread that sends
it (:func:`_write`), in one ``sendall`` (``sendmsg``) under the tuned socket's send lock, when the DUL
has nothing queued; else it is queued as one ``P_DATA`` primitive (:class:`EncodedPData`)
that passes the state machine once.

Like :mod:`pipeline.dicom.tuning`, written against pynetdicom 3.0.4; with another layout
:func:`enable` leaves the association untouched and says so with a WARNING. It also
turns pynetdicom's ``LOG_REQUEST_IDENTIFIERS``/``LOG_RESPONSE_IDENTIFIERS`` off for the
process unless its logger is at DEBUG: pynetdicom formats every identifier for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pynetdicom.fsm
import pynetdicom.service_class
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import _config, _handlers, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pipeline.dicom import lease
from pipeline.dicom.tuning import _LowLatencySocket, _skipped
from pipeline.dicom.wire import (
    FilePdus,
    NotAsStored,
    StoreResponse,
    decode_store_response,
    encode_command,
    encode_pdus,
    file_pdus,
    store_request,
)

log = logging.getLogger(__name__)

_ATTRIBUTE = "_radtriage_fast_send"


class StoredFile(Dataset):
    """An archived instance to send as its stored bytes (see :func:`enable`).

    Holds only SOP Class and SOP Instance UID (what pynetdicom reads of a sub-operation's
    dataset, e.g. for the Failed SOP Instance UID List), the file, and the transfer
    syntax the index says it is stored in (checked against the file as it is sent).
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, path: Path, syntax: str) -> None:
        super().__init__()
        # UIDs from the index, validated when they were stored
        self[_SOP_CLASS] = DataElement(_SOP_CLASS, "UI", sop_class_uid, validation_mode=config.IGNORE)
        self[_SOP_INSTANCE] = DataElement(_SOP_INSTANCE, "UI", sop_instance_uid, validation_mode=config.IGNORE)
        self.stored_path = path
        self.stored_syntax = syntax


_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018


class EncodedPData(P_DATA):
    """A ``P_DATA`` primitive that carries whole P-DATA-TF PDUs, already encoded."""

    def __init__(self, encoded: bytearray) -> None:
        super().__init__()
        self.encoded = encoded

    def encode_pdus(self) -> bytearray:
        return self.encoded


_ORIGINAL_P_DATA_TF = P_DATA_TF


def _p_data_tf(primitive: P_DATA | None = None) -> P_DATA_TF:
    """``pynetdicom.fsm.P_DATA_TF``: the PDU(s) the state machine sends for a primitive."""
    if isinstance(primitive, EncodedPData):
        pdu = _ORIGINAL_P_DATA_TF()
        pdu.encode = primitive.encode_pdus  # type: ignore[method-assign]
        return pdu
    return _ORIGINAL_P_DATA_TF(primitive)


# -- the association's send methods -----------------------------------------------------


def _pynetdicom_debug() -> bool:
    return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


def _peer_max_pdu(assoc: Any) -> int:
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return int(peer.maximum_length or 0)


def _send_msg(assoc: Any, original: Any, primitive: Any, context_id: int) -> None:
    finals = assoc.__dict__.get(_FINALS)
    if finals and isinstance(primitive, C_GET | C_MOVE) and primitive.MessageIDBeingRespondedTo is not None:
        final = finals.pop(primitive.MessageIDBeingRespondedTo, None)
        if final is not None:
            final(primitive)
    encoded = None if _pynetdicom_debug() else encode_command(primitive)
    if encoded is None:
        setattr(assoc, _DIRECT, False)  # its PDUs are queued one by one: keep later ones behind
        original(primitive, context_id)
        return
    command, dataset = encoded
    _write(assoc, encode_pdus(context_id, command, dataset, _peer_max_pdu(assoc)))


_FINALS = "_radtriage_finals"


def final_response(assoc: Any, msg_id: int, fill: Callable[[Any], None]) -> None:
    """Have ``fill`` set the status, counts and identifier of the next C-GET/C-MOVE-RSP
    pynetdicom sends for request ``msg_id`` on ``assoc`` (its final response, after
    :mod:`pipeline.dicom.subops` ran the sub-operations pynetdicom did not count)."""
    assoc.__dict__.setdefault(_FINALS, {})[msg_id] = fill


def send_command(assoc: Any, context_id: int, command: bytes) -> bool:
    """Send a message that is only a command set (e.g. a pending C-GET-RSP) as bytes;
    ``False`` when the connection is gone."""
    return _write(assoc, encode_pdus(context_id, command, None, _peer_max_pdu(assoc)))


_OWNER = "_radtriage_fast_owner"


def _get_msg(assoc: Any, original: Any, block: bool = False) -> Any:
    """``dimse.get_msg``: while a fast C-STORE waits for its response, no other thread
    (the association's reactor polls with ``block=False``) may take it.

    pynetdicom instead pauses the reactor around each ``send_*`` call, with a race: a
    reactor released by the previous call that has not run yet still reads as paused,
    and with one C-STORE after another a millisecond apart it then takes the next
    response ("Received unexpected C-STORE service message", and the sub-operation
    waits out the DIMSE timeout).
    """
    owner = getattr(assoc, _OWNER, None)
    if owner is not None and owner != threading.get_ident():
        return None, None
    return original(block)


def _context_id(assoc: Any, sop_class: str, syntax: str) -> int | None:
    """The accepted context to send ``sop_class`` in exactly ``syntax`` over (cached:
    accepted contexts do not change once the association is established)."""
    cache = assoc.__dict__.setdefault("_radtriage_contexts", {})
    key = (sop_class, syntax)
    if key not in cache:
        try:
            cache[key] = int(assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=False).context_id)
        except ValueError:
            cache[key] = None
    return cache[key]  # type: ignore[no-any-return]


def _send_c_store(
    assoc: Any,
    original: Any,
    dataset: Any,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    _check_established(assoc)
    if not isinstance(dataset, StoredFile):
        return _guarded(assoc, original, dataset, msg_id, priority, originator_aet, originator_id)
    archived = ArchivedFile(
        str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), dataset.stored_path, dataset.stored_syntax
    )
    result = _send_archived(assoc, archived, msg_id, priority, originator_aet, originator_id)
    return _status_dataset(result) if isinstance(result, StoreResponse) else result


def _check_established(assoc: Any) -> None:
    if not assoc.is_established or assoc.dul.state_machine.current_state != "Sta6":
        # Also when the peer's A-ABORT has been handled but the reactor has not yet said
        # so (``is_established``): pynetdicom would send and wait out the DIMSE timeout.
        raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")


@dataclass(frozen=True, slots=True)
class ArchivedFile:
    """What :class:`StoredFile` says, without a dataset: for :func:`store_status`."""

    SOPClassUID: str
    SOPInstanceUID: str
    stored_path: Path
    stored_syntax: str


def store_status(
    assoc: Any,
    item: ArchivedFile | Dataset,
    msg_id: int,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> int:
    """One C-STORE on an :func:`enable`-d association and the Status of its response: an
    :class:`ArchivedFile` as its bytes (as :class:`StoredFile`), any other dataset by
    ``assoc.send_c_store``. Raises what ``send_c_store`` raises, and :class:`AttributeError`
    when no response came (a DIMSE timeout: pynetdicom has aborted)."""
    if not isinstance(item, ArchivedFile):
        return int(
            assoc.send_c_store(item, msg_id=msg_id, originator_aet=originator_aet, originator_id=originator_id).Status
        )
    _check_established(assoc)
    result = _send_archived(assoc, item, msg_id, 2, originator_aet, originator_id)
    if isinstance(result, StoreResponse):
        return result.status
    return int(result.Status)


def _send_archived(
    assoc: Any,
    archived: ArchivedFile,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> StoreResponse | Dataset:
    """The C-STORE of an archived file as its bytes: the response read in this thread,
    or pynetdicom's status dataset (it read the response, or the file went its way)."""
    sop_class, sop_instance = archived.SOPClassUID, archived.SOPInstanceUID
    cx_id = _context_id(assoc, sop_class, archived.stored_syntax)
    command = store_request(msg_id, priority, sop_class, sop_instance, originator_aet, originator_id)
    original = assoc.__dict__[_ORIGINAL_SEND]
    try:
        if cx_id is None:
            raise NotAsStored(sop_instance)
        pdus = file_pdus(cx_id, command, archived, _peer_max_pdu(assoc))
    except NotAsStored:  # pynetdicom converts between the uncompressed syntaxes, or refuses
        full = dcmread(archived.stored_path)
        return _guarded(assoc, original, full, msg_id, priority, originator_aet, originator_id)
    held = lease.take(assoc)  # taken before the request goes: its response may come at once
    setattr(assoc, _OWNER, threading.get_ident())
    try:
        try:
            written = _write(assoc, pdus)
        finally:
            pdus.close()
        if not written:
            raise OSError(f"the connection to the peer closed while sending {sop_instance}")
        if held is not None:
            try:
                response = _read_response(held, msg_id, cx_id, sop_instance)
            except TimeoutError:
                held.end()
                assoc._handle_no_response()  # the DIMSE timeout expired: pynetdicom aborts
                return Dataset()
            if response is not None:
                return response
            held.end(reserve=False)  # pynetdicom reads it, or learns what became of the association
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        if held is not None:
            held.end()
        setattr(assoc, _OWNER, None)
    if rsp is None:  # the DIMSE timeout expired: pynetdicom aborts
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)  # type: ignore[no-any-return]


def _read_response(held: lease.Lease, msg_id: int, cx_id: int, sop_instance: str) -> StoreResponse | None:
    """The C-STORE-RSP read in this thread, or ``None``: the lease ended without one,
    for pynetdicom's ``get_msg``."""
    assoc = held.assoc
    pdu = held.read_pdu(assoc.dimse_timeout)
    if pdu is None:
        return None
    rsp = decode_store_response(pdu)
    if rsp is None or rsp.message_id != msg_id or rsp.context_id != cx_id:
        held.hand_back(pdu)  # another message, or one pynetdicom must judge
        return None
    held.end()
    observer = getattr(assoc, _OBSERVER, None)
    if observer is not None:
        observer(rsp.sop_instance_uid or sop_instance, rsp.status)
    return rsp


def _status_dataset(rsp: StoreResponse) -> Dataset:
    """The status dataset pynetdicom's ``_check_received_status`` makes of a response."""
    status = Dataset()
    status[_STATUS] = DataElement(_STATUS, "US", rsp.status)
    if rsp.offending_element is not None:
        status.OffendingElement = list(rsp.offending_element)
    if rsp.error_comment is not None:
        status.ErrorComment = rsp.error_comment
    return status


_STATUS = 0x00000900
_OBSERVER = "_radtriage_store_observer"
_ORIGINAL_SEND = "_radtriage_original_send_c_store"


def observe_responses(assoc: Any, observer: Callable[[str, int], None] | None) -> None:
    """Call ``observer(SOP Instance UID, status)`` for each C-STORE response read in the
    sending thread (pynetdicom sees no message, so ``EVT_DIMSE_RECV`` is not triggered
    for those); ``None`` stops it."""
    setattr(assoc, _OBSERVER, observer)


def _guarded(assoc: Any, original: Any, *args: Any) -> Dataset:
    """pynetdicom's own ``send_c_store``, with its response kept from the reactor too."""
    setattr(assoc, _OWNER, threading.get_ident())
    try:
        return original(*args)  # type: ignore[no-any-return]
    finally:
        setattr(assoc, _OWNER, None)


_DIRECT = "_radtriage_direct"


def _write(assoc: Any, pdus: bytearray | FilePdus) -> bool:
    """Send whole PDUs: straight to the socket from this thread when nothing else is
    queued for the DUL, else through the DUL in order. ``False``: the connection is gone.

    Written here, a message costs no wake-up of the DUL thread and no wait for it to
    get the GIL. The tuned socket's lock keeps a message's bytes together against
    whatever the DUL sends meanwhile (an A-ABORT); after one message has gone through
    the DUL in several PDUs (pynetdicom's own encoding), every later one does too, so
    that none can slip between those PDUs.
    """
    dul = assoc.dul
    if not getattr(assoc, _DIRECT, False) or dul.to_provider_queue.queue or dul.state_machine.current_state != "Sta6":
        dul.send_pdu(EncodedPData(bytearray(pdus.buffer()) if isinstance(pdus, FilePdus) else pdus))
        return True
    sock = dul.socket
    with sock.send_lock:
        try:
            if isinstance(pdus, FilePdus):
                pdus.send(sock.socket)
            else:
                sock.socket.sendall(pdus)
        except (OSError, AttributeError):  # closed (the socket may be None by now)
            dul.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False
    dul._idle_timer.restart()  # what the DUL does for what it sends
    return True


class EncodedIdentifier(Dataset):
    """A C-FIND response identifier already encoded (:mod:`pipeline.dicom.identifier`),
    with the way to build it as a dataset should pynetdicom want it in another syntax."""

    def __init__(self, encoded: bytes, explicit: bool, fallback: Callable[[], Dataset]) -> None:
        super().__init__()
        self.encoded_identifier = encoded
        self.encoded_explicit = explicit
        self.fallback = fallback


_ORIGINAL_ENCODE = pynetdicom.service_class.encode


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """``pynetdicom.service_class.encode``: an :class:`EncodedIdentifier` as its bytes."""
    if isinstance(ds, EncodedIdentifier):
        if ds.encoded_explicit is not is_implicit_vr and is_little_endian and not deflated:
            return ds.encoded_identifier
        ds = ds.fallback()
    return _ORIGINAL_ENCODE(ds, is_implicit_vr, is_little_endian, deflated)  # type: ignore[no-any-return]


def active(assoc: Any) -> bool:
    """Whether messages on ``assoc`` go the fast way now (enabled, pynetdicom not at DEBUG)."""
    return is_enabled(assoc) and not _pynetdicom_debug()


_STANDARD_HANDLERS = (
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),  # ~0.1 ms a C-STORE-RSP
)


def enable(assoc: Any) -> bool:
    """Send this association's C-STOREs of :class:`StoredFile` and its hot messages as
    prebuilt PDUs (see the module docstring); ``True`` if done (or already)."""
    if getattr(assoc, _ATTRIBUTE, False):
        return True
    dul = getattr(assoc, "dul", None)
    dimse = getattr(assoc, "dimse", None)
    needed = ("_get_valid_context", "_check_received_status", "_handle_no_response")
    if (
        not isinstance(getattr(dul, "socket", None), _LowLatencySocket)
        or not callable(getattr(dimse, "send_msg", None))
        or not callable(getattr(dimse, "get_msg", None))
        or not all(hasattr(assoc, name) for name in needed)
        or pynetdicom.fsm.P_DATA_TF not in (_ORIGINAL_P_DATA_TF, _p_data_tf)
        or getattr(pynetdicom.service_class, "encode", None) not in (_ORIGINAL_ENCODE, _encode)
    ):
        _skipped("fast send", "the association is not tuned or pynetdicom's layout is unknown")
        return False
    pynetdicom.fsm.P_DATA_TF = _p_data_tf  # type: ignore[attr-defined, misc]
    pynetdicom.service_class.encode = _encode  # type: ignore[attr-defined]
    if not _pynetdicom_debug():
        # pynetdicom formats every C-FIND request and response identifier for its log
        # (pretty_dataset, ~0.2 ms a response) whatever the log level: only for DEBUG.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    dimse.send_msg = partial(_send_msg, assoc, dimse.send_msg)  # type: ignore[union-attr]
    dimse.get_msg = partial(_get_msg, assoc, dimse.get_msg)  # type: ignore[union-attr]
    assoc.__dict__[_ORIGINAL_SEND] = assoc.send_c_store
    assoc.send_c_store = partial(_send_c_store, assoc, assoc.send_c_store)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):  # they only write its log
        for event, handler in _STANDARD_HANDLERS:
            if (handler, None) in assoc.get_handlers(event):
                assoc.unbind(event, handler)
    lease.make_leasable(assoc)  # C-STORE responses read in the sending thread, where it can
    setattr(assoc, _DIRECT, True)
    setattr(assoc, _ATTRIBUTE, True)
    return True


def is_enabled(assoc: Any) -> bool:
    """Whether :func:`enable` is active on ``assoc``."""
    return bool(getattr(assoc, _ATTRIBUTE, False)) and pynetdicom.fsm.P_DATA_TF is _p_data_tf
