"""DIMSE messages as bytes: command sets, P-DATA-TF PDUs, and the C-STORE response.

What :mod:`pipeline.dicom.fastsend` sends and reads instead of going through pynetdicom's
encoders: the Implicit VR Little Endian command sets of the messages a retrieve sends
most (C-STORE-RQ, C-FIND/C-GET/C-MOVE-RSP; :func:`encode_command`, :func:`store_request`),
the P-DATA-TF PDUs that carry a command and its dataset (:func:`encode_pdus`, and
:func:`file_pdus`, which reads an archived file's dataset straight into them), and the
decoding of a C-STORE-RSP that came in one PDU (:func:`decode_store_response`), the only
message a storage sub-operation waits for. Each writes or reads what pynetdicom would
(``tests/core/test_tuning.py`` compares them byte for byte); anything they do not
cover returns ``None``, for the caller to go pynetdicom's way (PS3.7 6.3, E; PS3.8 9.3.5).
"""

from __future__ import annotations

import mmap
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE

UNLIMITED_FRAGMENT = 4 * 1024 * 1024  # PDV bytes per PDU when the peer sets no maximum


class Archived(Protocol):
    """An archived file to send as stored (:class:`pipeline.dicom.fastsend.StoredFile`)."""

    stored_path: Path
    stored_syntax: str


_HEAD = 4096  # the first read of a file: its File Meta Information is almost always within


def read_file_meta(head: bytes, fd: int | None = None) -> tuple[int, str] | None:
    """Where the dataset of a Part 10 file starts and its Transfer Syntax UID, from the
    File Meta Information's group length; ``None`` when the file has none (or is not
    Part 10), for the caller to take the normal path.

    ``head`` is the file's beginning; when the File Meta Information goes on past it,
    the rest is read from ``fd``."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (group_length,) = struct.unpack_from("<I", head, 140)
    meta = head[144 : 144 + group_length]
    if len(meta) < group_length and fd is not None:
        meta = os.pread(fd, group_length, 144)
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


class SuboperationResponses:
    """The pending C-GET-RSP or C-MOVE-RSP command sets of one request (Status 0xFF00, no
    identifier), as pynetdicom encodes them: everything but the four counts built once."""

    def __init__(self, move: bool, sop_class: str, msg_id: int) -> None:
        head = [
            _element(0x0002, "UI", sop_class),
            _element(0x0100, "US", 0x8021 if move else 0x8010),
            _element(0x0120, "US", msg_id),
            _element(0x0800, "US", _NO_DATA_SET),
            _element(0x0900, "US", 0xFF00),
        ]
        body = b"".join(e for e in head if e is not None)
        self._prefix = struct.pack("<HHII", 0, 0, 4, len(body) + 4 * 10) + body

    def pending(self, remaining: int, completed: int, failed: int, warning: int) -> bytes:
        """The command set of one pending response with these Number of ... Sub-operations."""
        return self._prefix + _COUNTS.pack(
            0, 0x1020, 2, remaining, 0, 0x1021, 2, completed, 0, 0x1022, 2, failed, 0, 0x1023, 2, warning
        )


_COUNTS = struct.Struct("<" + "HHIH" * 4)


# -- PDUs -------------------------------------------------------------------------------


def fragment_length(max_pdu: int) -> int:
    """The PDV bytes per PDU for a peer's maximum PDU length (0: unlimited)."""
    if max_pdu == 0:
        return UNLIMITED_FRAGMENT
    return min(UNLIMITED_FRAGMENT, (max_pdu - 6) & ~1)


_PDU_HEADER = struct.Struct(">BBLLBB")  # P-DATA-TF type, reserved, length; PDV length, context, control


def _layout(context_id: int, command: bytes, data_length: int, max_pdu: int) -> tuple[bytearray, list[tuple[int, int]]]:
    """A buffer with every PDU's headers and the command set in place, and the
    ``(offset, length)`` of each dataset fragment in it, still to be filled.

    Every dataset PDU but the last has the same header: it is packed once and copied
    (a 512x512 image to a 16 KiB peer is 33 PDUs)."""
    size = fragment_length(max_pdu)
    n_data = -(-data_length // size)
    buffer = bytearray(12 * (-(-len(command) // size) + n_data) + len(command) + data_length)
    pos = 0
    for i in range(0, len(command), size):
        piece = command[i : i + size]
        control = 0x03 if i + size >= len(command) else 0x01
        _PDU_HEADER.pack_into(buffer, pos, 0x04, 0, len(piece) + 6, len(piece) + 2, context_id, control)
        buffer[pos + 12 : pos + 12 + len(piece)] = piece
        pos += 12 + len(piece)
    if not n_data:
        return buffer, []
    step = 12 + size
    starts = range(pos, pos + step * (n_data - 1), step)
    full = _PDU_HEADER.pack(0x04, 0, size + 6, size + 2, context_id, 0x00)
    for start in starts:
        buffer[start : start + 12] = full
    last_pos, last = pos + step * (n_data - 1), data_length - size * (n_data - 1)
    _PDU_HEADER.pack_into(buffer, last_pos, 0x04, 0, last + 6, last + 2, context_id, 0x02)
    slots = [(start + 12, size) for start in starts]
    slots.append((last_pos + 12, last))
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


class FilePdus:
    """The PDUs of a C-STORE-RQ whose dataset is an archived file's bytes, as I/O vectors:
    each PDU's header, then its fragment of the file mapped into memory (``mmap``).

    :meth:`send` writes them with ``sendmsg``, which copies the fragments from the page
    cache into the socket once: no buffer to allocate and fill per image (for a 512x512
    CT image that was most of the sending side's CPU). :meth:`buffer` joins them, for a
    message that must go through pynetdicom's DUL. Archived files are never rewritten in
    place (the archive renames a new file into place), so a mapped file cannot shrink
    while it is sent. :meth:`close` when done.
    """

    def __init__(self, parts: list[bytes | memoryview], mapped: mmap.mmap | None, view: memoryview | None) -> None:
        self.parts = parts
        self._mapped = mapped
        self._view = view

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def buffer(self) -> bytes:
        return b"".join(self.parts)

    def send(self, sock: socket.socket) -> None:
        """All of it, as ``sendall`` would (raises :class:`OSError` as it does)."""
        if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg: encrypted from one buffer
            sock.sendall(self.buffer())
            self.parts = []
            return
        parts = self.parts
        while parts:
            sent = sock.sendmsg(parts[:_IOV_MAX])
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                del parts[0]
            if sent:  # a short send inside one part: go on from there
                parts[0] = memoryview(parts[0])[sent:]

    def close(self) -> None:
        self.parts = []  # the slices of the mapping go first
        if self._view is not None:
            self._view.release()
        if self._mapped is not None:
            try:
                self._mapped.close()
            except BufferError:  # a slice still held somewhere: closed when it goes
                pass


def file_pdus(context_id: int, command: bytes, stored: Archived, max_pdu: int) -> FilePdus:
    """The PDUs of a C-STORE-RQ whose dataset is read from the archived file (:class:`FilePdus`).

    Raises :class:`NotAsStored` when the file's File Meta Information does not say the
    transfer syntax the index has, or cannot be read quickly (the caller sends it the
    normal way), :class:`OSError` when it cannot be read.
    """
    fd = os.open(stored.stored_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        meta = read_file_meta(os.pread(fd, _HEAD, 0), fd)
        if meta is None or meta[1] != stored.stored_syntax:
            raise NotAsStored(str(stored.stored_path))
        start = meta[0]
        file_size = os.fstat(fd).st_size
        mapped, view = None, None
        if file_size > start:
            try:
                mapped = mmap.mmap(fd, file_size, prot=mmap.PROT_READ)
                view = memoryview(mapped)
            except (OSError, ValueError):  # a file system that cannot map: read it
                view = memoryview(_read_all(fd, file_size))
    finally:
        os.close(fd)
    size, length = fragment_length(max_pdu), file_size - start
    parts: list[bytes | memoryview] = [bytes(_layout(context_id, command, 0, max_pdu)[0])]  # the command's PDU(s)
    if view is not None:
        full = _PDU_HEADER.pack(0x04, 0, size + 6, size + 2, context_id, 0x00)  # every dataset PDU's but the last
        last = start + size * ((length - 1) // size)
        for offset in range(start, last, size):
            parts += (full, view[offset : offset + size])
        n = file_size - last
        parts += (_PDU_HEADER.pack(0x04, 0, n + 6, n + 2, context_id, 0x02), view[last:file_size])
    return FilePdus(parts, mapped, view)


def _read_all(fd: int, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            raise OSError("the archived file ended while being read (changed on disk?)")
        data += chunk
    return bytes(data)


_IOV_MAX = 1024  # I/O vectors per sendmsg (Linux's UIO_MAXIOV)


# -- the C-STORE response ---------------------------------------------------------------


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP as :func:`decode_store_response` read it (PS3.7 9.3.1.2)."""

    context_id: int
    message_id: int  # MessageIDBeingRespondedTo
    status: int
    sop_instance_uid: str | None = None  # AffectedSOPInstanceUID
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None


_US = {0x0100: "command", 0x0120: "message_id", 0x0800: "data_set_type", 0x0900: "status"}
_NO_DATA_SET = 0x0101
_C_STORE_RSP = 0x8001


def decode_store_response(pdu: bytes | bytearray) -> StoreResponse | None:
    """The C-STORE-RSP in ``pdu``, a whole P-DATA-TF PDU; ``None`` when it holds anything
    else (another message, more than one PDV, a command in several fragments, an
    element a C-STORE-RSP does not have, a malformed value), for pynetdicom to handle."""
    if len(pdu) < 12 or pdu[0] != 0x04 or int.from_bytes(pdu[2:6], "big") != len(pdu) - 6:
        return None
    if int.from_bytes(pdu[6:10], "big") != len(pdu) - 10 or pdu[11] != 0x03:
        return None  # not exactly one PDV, or not a whole command set
    command = bytes(pdu[12:])
    values: dict[str, Any] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", command, pos)
        value = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
        if group != 0 or len(value) != length:
            return None
        if element == 0x0000:
            if length != 4 or struct.unpack("<I", value)[0] != end - pos:
                return None
        elif element in _US:
            if length != 2:
                return None
            values[_US[element]] = struct.unpack("<H", value)[0]
        elif element in (0x0002, 0x1000):  # Affected SOP Class / Instance UID
            values[element] = value.rstrip(b"\0 ").decode("ascii", "replace")
        elif element == 0x0902:
            values["error_comment"] = value.decode("ascii", "replace").rstrip(" \0")  # as pydicom reads LO
        elif element == 0x0901 and length % 4 == 0:
            pairs = struct.unpack(f"<{length // 2}H", value)
            values["offending_element"] = tuple(pairs[i] << 16 | pairs[i + 1] for i in range(0, len(pairs), 2))
        else:
            return None
    if values.get("command") != _C_STORE_RSP or values.get("data_set_type") != _NO_DATA_SET:
        return None
    if "message_id" not in values or "status" not in values:
        return None
    return StoreResponse(
        context_id=pdu[10],
        message_id=values["message_id"],
        status=values["status"],
        sop_instance_uid=values.get(0x1000),
        error_comment=values.get("error_comment"),
        offending_element=values.get("offending_element"),
    )
