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

import os
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


def file_pdus(context_id: int, command: bytes, stored: Archived, max_pdu: int) -> bytearray:
    """The PDUs of a C-STORE-RQ whose dataset is read from the archived file, no copy between.

    The dataset goes from the page cache into the PDUs' buffer in one ``preadv`` (each
    fragment's place in it one I/O vector), after one ``pread`` of the file's beginning.

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
        length = os.fstat(fd).st_size - start
        buffer, slots = _layout(context_id, command, length, max_pdu)
        with memoryview(buffer) as view:
            vectors = [view[pos : pos + n] for pos, n in slots]
            offset = start
            while vectors:
                batch = vectors[:_IOV_MAX]
                got = os.preadv(fd, batch, offset)
                if not got:
                    raise OSError(f"{stored.stored_path} ended while being sent (changed on disk?)")
                offset += got
                while got and got >= len(vectors[0]):  # whole vectors done
                    got -= len(vectors[0])
                    vectors[0].release()
                    del vectors[0]
                if got:  # a short read inside one: go on from there
                    vectors[0] = vectors[0][got:]
    finally:
        os.close(fd)
    return buffer


_IOV_MAX = 1024  # I/O vectors per preadv (Linux's UIO_MAXIOV)


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
