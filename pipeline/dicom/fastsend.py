"""Send DIMSE messages as whole, prebuilt P-DATA-TF PDUs: the retrieve side's fast path.

pynetdicom sends a message by encoding its command set with pydicom, re-encoding the
dataset, cutting both into one ``P_DATA`` primitive per PDU and passing each through
the DUL thread's state machine, one queue item, one wake-up and one ``send`` per PDU.
For a 512x512 CT image to a peer with dcmtk's 16 KiB maximum PDU that is 33 trips, and
with the re-encoding about 3 ms of CPU per image, five times the time the bytes take.

On an association where :func:`enable` was called:

* ``assoc.send_c_store`` with a :class:`StoredFile` (what
  :func:`pipeline.dicom.substore.prepare` yields when the peer accepted the instance's
  stored transfer syntax) reads the archived file's dataset (everything after the File
  Meta Information) straight into the PDUs' buffer, with no decoding: the peer gets the
  very bytes that were received. Anything else goes the normal way;
* ``dimse.send_msg`` encodes the command set of C-STORE-RQ/RSP and C-FIND/C-GET/C-MOVE-RSP
  by hand (:func:`encode_command`, byte-equal to pynetdicom's) and sends command and
  dataset together. Other messages, and every message while pynetdicom's logger is at
  DEBUG (its standard handlers then log each PDU and message), go the normal way;
* a C-FIND response identifier that :mod:`pipeline.dicom.identifier` encoded
  (:class:`EncodedIdentifier`) is sent as those bytes (``pynetdicom.service_class.encode``
  passes every other dataset to pydicom);
* ``dimse.get_msg`` gives a C-STORE's response only to the thread that sent it
  (:func:`_get_msg`), in place of pynetdicom's racy pause of the association's reactor.

A message is written to the socket by the thread that sends it (:func:`_write`), in one
``sendall`` under the tuned socket's send lock, when the DUL has nothing queued; else it
is queued as one ``P_DATA`` primitive (:class:`EncodedPData`) that passes the state
machine once. Each PDU holds one PDV, of at most the peer's maximum PDU length (0,
unlimited: :data:`UNLIMITED_FRAGMENT`) less its 6-byte header, rounded down to even.

Like :mod:`pipeline.dicom.tuning`, written against pynetdicom 3.0.4; with another layout
:func:`enable` leaves the association untouched and says so with a WARNING. It also
turns pynetdicom's ``LOG_REQUEST_IDENTIFIERS``/``LOG_RESPONSE_IDENTIFIERS`` off for the
process unless its logger is at DEBUG: pynetdicom formats every identifier for them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pynetdicom.fsm
import pynetdicom.service_class
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import _config, _handlers, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pipeline.dicom.tuning import _LowLatencySocket, _skipped

log = logging.getLogger(__name__)

UNLIMITED_FRAGMENT = 4 * 1024 * 1024  # PDV bytes per PDU when the peer sets no maximum
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


def read_file_meta(f: BinaryIO) -> tuple[int, str] | None:
    """Where the dataset of a Part 10 file starts and its Transfer Syntax UID, from the
    File Meta Information's group length; ``None`` when the file has none (or is not
    Part 10), for the caller to take the normal path. Leaves ``f`` at the dataset."""
    head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (group_length,) = struct.unpack_from("<I", head, 140)
    meta = f.read(group_length)
    pos, syntax = 0, None
    while pos + 8 <= len(meta):
        group, element = struct.unpack_from("<HH", meta, pos)
        vr = meta[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", meta, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", meta, pos + 6)
            start = pos + 8
        if group != 0x0002 or start + length > len(meta):
            return None
        if element == 0x0010:
            syntax = meta[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    if syntax is None or pos != group_length:
        return None
    return 144 + group_length, syntax


# -- command sets -----------------------------------------------------------------------

# (element of group 0000, primitive attribute, VR) in tag order, per message.
_RSP_FIELDS = [
    (0x0002, "AffectedSOPClassUID", "UI"),
    (0x0100, None, "US"),  # CommandField
    (0x0120, "MessageIDBeingRespondedTo", "US"),
    (0x0800, None, "US"),  # CommandDataSetType
    (0x0900, "Status", "US"),
    (0x0901, "OffendingElement", "AT"),
    (0x0902, "ErrorComment", "LO"),
]
_SUBOPERATIONS = [
    (0x1020, "NumberOfRemainingSuboperations", "US"),
    (0x1021, "NumberOfCompletedSuboperations", "US"),
    (0x1022, "NumberOfFailedSuboperations", "US"),
    (0x1023, "NumberOfWarningSuboperations", "US"),
]
_MESSAGES: dict[tuple[type, bool], tuple[int, list[tuple[int, str | None, str]], str | None]] = {
    # (primitive class, is a response): (CommandField, fields, dataset attribute)
    (C_STORE, False): (
        0x0001,
        [
            (0x0002, "AffectedSOPClassUID", "UI"),
            (0x0100, None, "US"),
            (0x0110, "MessageID", "US"),
            (0x0700, "Priority", "US"),
            (0x0800, None, "US"),
            (0x1000, "AffectedSOPInstanceUID", "UI"),
            (0x1030, "MoveOriginatorApplicationEntityTitle", "AE"),
            (0x1031, "MoveOriginatorMessageID", "US"),
        ],
        "DataSet",
    ),
    (C_STORE, True): (0x8001, [*_RSP_FIELDS, (0x1000, "AffectedSOPInstanceUID", "UI")], None),
    (C_FIND, True): (0x8020, _RSP_FIELDS, "Identifier"),
    (C_GET, True): (0x8010, _RSP_FIELDS + _SUBOPERATIONS, "Identifier"),
    (C_MOVE, True): (0x8021, _RSP_FIELDS + _SUBOPERATIONS, "Identifier"),
}


def _element(element: int, vr: str, value: Any) -> bytes | None:
    if vr == "US":
        data = struct.pack("<H", int(value))
    elif vr in ("UI", "AE", "LO"):
        data = str(value).encode("ascii")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
    else:  # AT (a list of tags): rare, failures only; pynetdicom encodes those
        return None
    return struct.pack("<HHI", 0, element, len(data)) + data


def encode_command(primitive: Any) -> tuple[bytes, bytes | None] | None:
    """The Implicit VR Little Endian command set of a C-STORE-RQ/RSP or C-FIND/C-GET/C-MOVE-RSP
    primitive, and its encoded dataset (``None``: none); ``None`` for another message."""
    spec = _MESSAGES.get((type(primitive), primitive.MessageIDBeingRespondedTo is not None))
    if spec is None:
        return None
    command_field, fields, dataset_attribute = spec
    dataset = getattr(primitive, dataset_attribute) if dataset_attribute else None
    parts = []
    for element, attribute, vr in fields:
        if attribute is None:
            value: Any = command_field if element == 0x0100 else (0x0101 if dataset is None else 0x0001)
        else:
            value = getattr(primitive, attribute)
            if value is None:
                continue
        encoded = _element(element, vr, value)
        if encoded is None:
            return None
        parts.append(encoded)
    body = b"".join(parts)
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    return command, (dataset.getvalue() if dataset is not None else None)


# -- PDUs -------------------------------------------------------------------------------


def fragment_length(max_pdu: int) -> int:
    """The PDV bytes per PDU for a peer's maximum PDU length (0: unlimited)."""
    if max_pdu == 0:
        return UNLIMITED_FRAGMENT
    return min(UNLIMITED_FRAGMENT, (max_pdu - 6) & ~1)


def _layout(context_id: int, command: bytes, data_length: int, max_pdu: int) -> tuple[bytearray, list[tuple[int, int]]]:
    """A buffer with every PDU's headers and the command set in place, and the
    ``(offset, length)`` of each dataset fragment in it, still to be filled."""
    size = fragment_length(max_pdu)
    pieces = [(command[i : i + size], True) for i in range(0, len(command), size)]
    data_fragments = [min(size, data_length - i) for i in range(0, data_length, size)]
    total = sum(12 + len(p) for p, _ in pieces) + sum(12 + n for n in data_fragments)
    buffer = bytearray(total)
    pos = 0
    slots: list[tuple[int, int]] = []

    def header(length: int, control: int) -> None:
        nonlocal pos
        struct.pack_into(">BBLLBB", buffer, pos, 0x04, 0, length + 6, length + 2, context_id, control)
        pos += 12

    for i, (piece, _) in enumerate(pieces):
        header(len(piece), 0x03 if i == len(pieces) - 1 else 0x01)
        buffer[pos : pos + len(piece)] = piece
        pos += len(piece)
    for i, n in enumerate(data_fragments):
        header(n, 0x02 if i == len(data_fragments) - 1 else 0x00)
        slots.append((pos, n))
        pos += n
    return buffer, slots


def encode_pdus(context_id: int, command: bytes, dataset: bytes | None, max_pdu: int) -> bytearray:
    """Command set and dataset as P-DATA-TF PDUs, one PDV each (PS3.8 9.3.5, E.2)."""
    data = dataset or b""
    buffer, slots = _layout(context_id, command, len(data), max_pdu)
    at = 0
    for pos, n in slots:
        buffer[pos : pos + n] = data[at : at + n]
        at += n
    return buffer


class NotAsStored(Exception):
    """The file is not what the index says (another transfer syntax, no group length)."""


def file_pdus(context_id: int, command: bytes, stored: StoredFile, max_pdu: int) -> bytearray:
    """The PDUs of a C-STORE-RQ whose dataset is read from the archived file, no copy between.

    Raises :class:`NotAsStored` when the file's File Meta Information does not say the
    transfer syntax the index has, or cannot be read quickly (the caller sends it the
    normal way), :class:`OSError` when it cannot be read.
    """
    with open(stored.stored_path, "rb") as f:
        meta = read_file_meta(f)
        if meta is None or meta[1] != stored.stored_syntax:
            raise NotAsStored(str(stored.stored_path))
        length = os.fstat(f.fileno()).st_size - meta[0]
        buffer, slots = _layout(context_id, command, length, max_pdu)
        with memoryview(buffer) as view:
            for pos, n in slots:
                got = 0
                while got < n:
                    read = f.readinto(view[pos + got : pos + n])
                    if not read:
                        raise OSError(f"{stored.stored_path} ended while being sent (changed on disk?)")
                    got += read
    return buffer


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
    encoded = None if _pynetdicom_debug() else encode_command(primitive)
    if encoded is None:
        setattr(assoc, _DIRECT, False)  # its PDUs are queued one by one: keep later ones behind
        original(primitive, context_id)
        return
    command, dataset = encoded
    _write(assoc, encode_pdus(context_id, command, dataset, _peer_max_pdu(assoc)))


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


def store_request(
    msg_id: int, priority: int, sop_class: str, sop_instance: str, originator_aet: str | None, originator_id: int | None
) -> bytes:
    """The command set of a C-STORE-RQ with a dataset (as pynetdicom encodes it)."""
    fields = [
        _element(0x0002, "UI", sop_class),
        _element(0x0100, "US", 0x0001),
        _element(0x0110, "US", msg_id),
        _element(0x0700, "US", priority),
        _element(0x0800, "US", 0x0001),
        _element(0x1000, "UI", sop_instance),
    ]
    if originator_aet is not None:
        fields.append(_element(0x1030, "AE", originator_aet))
    if originator_id is not None:
        fields.append(_element(0x1031, "US", originator_id))
    body = b"".join(f for f in fields if f is not None)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _send_c_store(
    assoc: Any,
    original: Any,
    dataset: Any,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    if not isinstance(dataset, StoredFile):
        return _guarded(assoc, original, dataset, msg_id, priority, originator_aet, originator_id)
    if not assoc.is_established:
        raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")
    sop_class, sop_instance = str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)
    cx_id = _context_id(assoc, sop_class, dataset.stored_syntax)
    command = store_request(msg_id, priority, sop_class, sop_instance, originator_aet, originator_id)
    try:
        if cx_id is None:
            raise NotAsStored(sop_instance)
        pdus = file_pdus(cx_id, command, dataset, _peer_max_pdu(assoc))
    except NotAsStored:  # pynetdicom converts between the uncompressed syntaxes, or refuses
        full = dcmread(dataset.stored_path)
        return _guarded(assoc, original, full, msg_id, priority, originator_aet, originator_id)
    setattr(assoc, _OWNER, threading.get_ident())
    try:
        if not _write(assoc, pdus):
            raise OSError(f"the connection to the peer closed while sending {sop_instance}")
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        setattr(assoc, _OWNER, None)
    if rsp is None:  # the DIMSE timeout expired: pynetdicom aborts
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)  # type: ignore[no-any-return]


def _guarded(assoc: Any, original: Any, *args: Any) -> Dataset:
    """pynetdicom's own ``send_c_store``, with its response kept from the reactor too."""
    setattr(assoc, _OWNER, threading.get_ident())
    try:
        return original(*args)  # type: ignore[no-any-return]
    finally:
        setattr(assoc, _OWNER, None)


_DIRECT = "_radtriage_direct"


def _write(assoc: Any, pdus: bytearray) -> bool:
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
        dul.send_pdu(EncodedPData(pdus))
        return True
    sock = dul.socket
    with sock.send_lock:
        try:
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
    assoc.send_c_store = partial(_send_c_store, assoc, assoc.send_c_store)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):  # they only write its log
        for event, handler in _STANDARD_HANDLERS:
            if (handler, None) in assoc.get_handlers(event):
                assoc.unbind(event, handler)
    setattr(assoc, _DIRECT, True)
    setattr(assoc, _ATTRIBUTE, True)
    return True


def is_enabled(assoc: Any) -> bool:
    """Whether :func:`enable` is active on ``assoc``."""
    return bool(getattr(assoc, _ATTRIBUTE, False)) and pynetdicom.fsm.P_DATA_TF is _p_data_tf
